"""The prediction stage: an exported model scores Delphes ROOT files (any URLs, any number) or one
ingested dataset on Spark, and writes one Parquet row per event read: its source file and entry,
whether it passes the selection, and for selected events the probability of each class
(``p_<class>``) and the predicted class; for an ingested dataset also its true class (``label``).

Reading, selection and features are ingestion's own (:func:`topoflow.datasource.read_range`) and
scoring is :meth:`topoflow.export.Exported.predict`, so an event gets the probabilities evaluation
and serving give it. Executors run the model with ONNX Runtime (no TensorFlow there); each of their
Python processes loads it once and keeps it for the tasks that Spark's worker reuse sends it.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Iterator

import numpy as np
import pyarrow as pa

from topoflow import CLASSES, datasource, export, storage
from topoflow.config import Config, StorageConfig
from topoflow.errors import BadInputError, ConfigError
from topoflow.evaluate import RAW_COLUMNS, is_ingested
from topoflow.ingest import footer, probe_all
from topoflow.progress import spark_progress
from topoflow.spark import job_error

BACKEND = "onnx"
_JOB_GROUP = "topoflow-predict"
_UNKNOWN = -1  # the label of a ROOT file's ranges: prediction does not know the class


@dataclass
class PredictSummary:
    """What a run did; printed by the CLI and returned to Kubeflow components."""

    output: str
    events: int  # rows written: every event read
    selected: int  # of which scored (passing the selection)
    predicted: dict[str, int]  # selected events per predicted class
    skipped: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    def table(self) -> str:
        lines = [f"{'predicted':<10}{'events':>12}{'fraction':>10}"]
        lines += [f"{c:<10}{n:>12,}{n / max(self.selected, 1):>10.1%}" for c, n in self.predicted.items()]
        lines.append(f"{'selected':<10}{self.selected:>12,} of {self.events:,} events read "
                     f"({self.selected / max(self.events, 1):.1%})")
        return "\n".join(lines + footer(self.events, self.seconds, self.skipped, self.output))


def predict(cfg: Config, spark=None, show_progress: bool = True) -> PredictSummary:
    """Score ``cfg.predict.inputs`` with ``cfg.predict.model`` and write ``cfg.predict.output``
    atomically; ROOT files are read with the ingest settings (muon collection, entries per task,
    on_bad_file). ``spark`` defaults to a new session."""
    pc, sc = cfg.predict, cfg.storage
    if not pc.inputs:
        raise ConfigError("nothing to score: pass --input with Delphes ROOT files (a path, URL or glob; "
                          "repeatable) or an ingested dataset, or set predict.inputs")
    t0 = time.monotonic()
    # Checks that need no Spark come first: a bad model folder or output fails in a second.
    storage.check_output(pc.output, "predict", sc, inputs=[*pc.inputs, pc.model])
    classes = export.load(pc.model, sc, BACKEND, threads=1).card["classes"]  # a bad folder fails here, once
    dataset = _ingested_input(pc.inputs, sc)
    if spark is None:
        from topoflow.spark import session

        spark = session(cfg.spark)
    spark.sparkContext.setJobGroup(_JOB_GROUP, f"predict → {pc.output}")
    if dataset:  # one task per Parquet file
        work, skipped = datasource.parquet_files(dataset, sc), []
        total, unit = len(work), "files"
    else:
        work, total, skipped = _plan(cfg, spark, show_progress)
        unit = "events"
    _, staging, _ = storage.new_staging(pc.output, sc)
    schema = _schema(classes, labelled=bool(dataset))
    score = partial(_score, model_url=pc.model, model_id=_model_id(pc.model, sc), sc=sc, batch_size=pc.batch_size,
                    skip=cfg.ingest.on_bad_file == "skip", errors_dir=storage.join(staging, "_errors"),
                    dataset=dataset, schema=schema)
    from pyspark.sql.pandas.types import from_arrow_schema

    n_tasks = max(len(work), 1)  # one task per item of work
    tasks = spark.createDataFrame(spark.sparkContext.parallelize([(w,) for w in work], n_tasks), "work string")
    meta = {"stage": "predict", "model": pc.model, "inputs": pc.inputs,
            "rows_per_class": "selected events per predicted class"}
    with spark_progress(spark, "scoring", n_tasks, total, unit, show_progress):
        try:
            (tasks.mapInArrow(score, from_arrow_schema(schema)).write.format("fsparquet").mode("overwrite")
             .options(**datasource.storage_options(sc)).option("staging", staging).option("count", "predicted")
             .option("meta", json.dumps(meta)).option("skipped", json.dumps(skipped)).save(pc.output))
        except Exception as e:
            raise job_error(e) from e
    manifest = storage.read_manifest(pc.output, sc)
    predicted = {c: manifest["rows_per_class"].get(c, 0) for c in classes}
    return PredictSummary(pc.output, manifest["rows"], sum(predicted.values()), predicted,
                          datasource.skipped_files(pc.output, sc), time.monotonic() - t0)


def _ingested_input(inputs: list[str], sc: StorageConfig) -> str | None:
    """The ingested dataset to score, or None when the inputs are ROOT files (paths or globs)."""
    folders = [u for u in inputs if _is_folder(u, sc)]
    if not folders:
        return None
    if len(inputs) > 1:
        raise ConfigError(f"an ingested dataset is scored alone, but the inputs are {inputs}: pass the "
                          f"folder {folders[0]!r} as the only --input, or only ROOT files (paths or globs)")
    try:
        ingested = is_ingested(folders[0], sc)
    except BadInputError:  # no Parquet files at all: the fix below is the one that applies
        ingested = False
    if not ingested:
        raise BadInputError(folders[0], "this folder is not an ingested dataset (a prepared one holds scaled "
                            "features)", "give Delphes ROOT files (paths or globs such as 'DIR/*.root') or "
                            "one dataset written by topoflow ingest")
    return folders[0]


def _is_folder(url: str, sc: StorageConfig) -> bool:
    fs, path = storage.filesystem(url, sc)
    with storage.storage_errors(url):
        return fs.isdir(path)


def _plan(cfg: Config, spark, show_progress: bool) -> tuple[list[str], int, list[dict]]:
    """The ROOT files cut into tasks as ingestion cuts them: ``(tasks as JSON, entries, files skipped)``."""

    urls = [(u, _UNKNOWN) for p in cfg.predict.inputs for u in storage.expand(p, cfg.storage)]
    infos, skipped = probe_all(urls, cfg, spark, show_progress)
    if not infos:
        raise BadInputError(", ".join(s["file"] for s in skipped), "no readable input file left",
                            "fix the inputs listed above")
    splits = datasource.plan(infos, cfg.ingest.entries_per_partition, 2 * spark.sparkContext.defaultParallelism)
    work = [json.dumps([asdict(r) for r in split.ranges]) for split in splits]
    return work, sum(info.entries for info, _ in infos), skipped


def _model_id(url: str, sc: StorageConfig) -> str:
    """A hash of the ONNX file: a model exported again to the same folder is not served from the
    cache of a worker that a long-lived session (a notebook) keeps."""
    fs, path = storage.filesystem(url, sc)
    with storage.storage_errors(url):
        return hashlib.sha256(fs.cat(storage.join(path, export.ONNX_FILE))).hexdigest()


def _schema(classes: list[str], labelled: bool) -> pa.Schema:
    return pa.schema([("source_file", pa.string()), ("entry", pa.int64()), ("selected", pa.bool_()),
                      *[(f"p_{c}", pa.float32()) for c in classes], ("predicted", pa.string()),
                      *([("label", pa.string())] if labelled else [])])


_MODELS: dict[tuple[str, str, str], export.Exported] = {}


def _model(url: str, model_id: str, sc: StorageConfig) -> export.Exported:
    """The model, loaded once per executor Python process (kept across tasks and jobs, since Spark
    reuses its Python workers), with as many ONNX Runtime threads as the task has cores."""
    from pyspark import TaskContext

    key = (url, BACKEND, model_id)
    if key not in _MODELS:
        ctx = TaskContext.get()
        _MODELS[key] = export.load(url, sc, BACKEND, threads=ctx.cpus() if ctx else None)
    return _MODELS[key]


def _score(batches: Iterator[pa.RecordBatch], *, model_url: str, model_id: str, sc: StorageConfig,
           batch_size: int, skip: bool, errors_dir: str, dataset: str | None,
           schema: pa.Schema) -> Iterator[pa.RecordBatch]:
    """One task (``mapInArrow``): its work is one JSON list of ROOT entry ranges, or one Parquet
    file of the ingested ``dataset``."""
    model = _model(model_url, model_id, sc)
    for work in (w for b in batches for w in b.column("work").to_pylist()):
        if dataset:
            yield from _score_ingested(model, dataset, work, sc, batch_size, schema)
        else:
            for r in datasource.split_from_json(json.loads(work)).ranges:
                for first, n, feats in datasource.read_range(r, sc, batch_size, skip, errors_dir):
                    selected = np.zeros(n, dtype=bool)
                    selected[feats.events] = True
                    probs = np.zeros((n, len(model.card["classes"])), dtype=np.float32)
                    probs[feats.events] = model.predict(feats.hlf, feats.particles, feats.counts)
                    yield _rows(pa.array([r.url] * n, pa.string()), pa.array(np.arange(first, first + n)),
                                selected, probs, schema)


def _score_ingested(model: export.Exported, dataset: str, path: str, sc: StorageConfig, batch_size: int,
                    schema: pa.Schema) -> Iterator[pa.RecordBatch]:
    import pyarrow.parquet as pq

    fs, _ = storage.filesystem(dataset, sc)
    with storage.storage_errors(dataset), fs.open(path) as f:
        for b in pq.ParquetFile(f).iter_batches(batch_size=batch_size, columns=[*RAW_COLUMNS, "source_file", "entry"]):
            probs = model.predict(*datasource.feature_arrays(b))
            yield _rows(b.column("source_file"), b.column("entry"), np.ones(b.num_rows, dtype=bool), probs, schema,
                        np.array(CLASSES, dtype=object)[b.column("label").to_numpy()])


def _rows(files: pa.Array, entries: pa.Array, selected: np.ndarray, probs: np.ndarray, schema: pa.Schema,
          labels: np.ndarray | None = None) -> pa.RecordBatch:
    """The output columns; probabilities and the predicted class are null where not ``selected``."""
    unselected = ~selected
    names = [f.name[2:] for f in schema if f.name.startswith("p_")]
    cols = [files, entries, pa.array(selected),
            *[pa.array(probs[:, k], pa.float32(), mask=unselected) for k in range(len(names))],
            pa.array(np.array(names, dtype=object)[probs.argmax(axis=1)], pa.string(), mask=unselected)]
    if labels is not None:
        cols.append(pa.array(labels, pa.string()))
    return pa.RecordBatch.from_arrays(cols, schema=schema)
