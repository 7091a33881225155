"""The preparation stage: an ingested dataset → balanced, split, shuffled and scaled training,
validation and test datasets, plus the fitted preprocessing artifact, published together:

    <output>/train/   <output>/validation/   <output>/test/   <output>/preprocessing.json   <output>/_manifest.json

Every random choice is a hash of the event's identity (source file name, entry, HLF) and the seed, so
that the same event always lands in the same split and a re-run gives the same datasets, wherever the files
are (the name, not the path or URL, enters the hash).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from topoflow import CLASSES, __version__, datasource, storage
from topoflow.config import Config
from topoflow.errors import BadInputError
from topoflow.preprocessing import FILE_NAME, Moments, Preprocessing
from topoflow.progress import spark_progress
from topoflow.spark import job_error

SCHEMA_VERSION = 1
PREPARED_SCHEMA = pa.schema([
    ("label", pa.int32()), ("hlf", pa.list_(pa.float32())), ("particles", pa.list_(pa.list_(pa.float32()))),
    ("n_particles", pa.int32()), ("source_file", pa.string()), ("entry", pa.int64()),
])
_INGESTED = {"label": "int", "hlf": "array<float>", "particles": "array<array<float>>",
             "source_file": "string", "entry": "bigint"}
_ORIGINAL = {"HLF_input": "array<double>", "GRU_input": "array<array<double>>", "encoded_label": "array<double>"}
_UNIT = 1_000_000  # hash → uniform number in [0, 1) with this resolution
_JOB_GROUP = "topoflow-prepare"
SPLITS = ("train", "validation", "test")
"""train fits the scalers and the weights, validation judges each epoch (and tuning), test is
left for ``topoflow evaluate`` alone."""


@dataclass
class PrepareSummary:
    output: str
    counts: dict[str, dict[str, int]]  # split -> class -> events
    seconds: float

    def table(self) -> str:
        lines = [f"{'class':<8}" + "".join(f"{s:>12}" for s in SPLITS)]
        for c in CLASSES:
            lines.append(f"{c:<8}" + "".join(f"{self.counts[s].get(c, 0):>12,}" for s in SPLITS))
        lines.append(f"written to {self.output} in {self.seconds:.1f} s")
        return "\n".join(lines)


def prepare(cfg: Config, spark=None, show_progress: bool = True) -> PrepareSummary:
    """Run preparation as configured; returns the counts per split and class."""
    from pyspark.sql import functions as F

    pc, sc = cfg.prepare, cfg.storage
    t0 = time.monotonic()
    if not storage.expand(pc.input, sc, missing_ok=True):
        raise BadInputError(pc.input, "the input dataset does not exist",
                            "check the path, or run topoflow ingest to write it")
    storage.check_output(pc.output, "prepare", sc, inputs=[pc.input])
    if spark is None:
        from topoflow.spark import session

        spark = session(cfg.spark)
    spark.sparkContext.setJobGroup(_JOB_GROUP, f"prepare → {pc.output}")
    options = datasource.storage_options(sc)
    try:
        df = spark.read.format("fsparquet").options(**options).load(pc.input)
        _check_schema(df, pc.input, _ORIGINAL if pc.from_original else _INGESTED, pc.from_original)
        if pc.from_original:
            df = df.mapInArrow(_from_original, _spark_schema(spark))
        key = F.xxhash64(F.element_at(F.split("source_file", "/"), -1), "entry", "hlf", F.lit(pc.seed))
        counts = {CLASSES[r["label"]]: r["count"] for r in df.groupBy("label").count().collect()}
        empty = [c for c in CLASSES if not counts.get(c)]
        if empty:
            raise BadInputError(pc.input, f"no events of class(es) {empty}; counts {counts}",
                                "every class needs events: check the datasets given to ingest")
        smallest = min(counts.values())
        keep = {CLASSES.index(c): (smallest / n if pc.balance else 1.0) for c, n in counts.items()}
        fraction = F.create_map(*[x for k, v in keep.items() for x in (F.lit(k), F.lit(v))])
        u = lambda salt: F.pmod(F.xxhash64(key, F.lit(salt)), F.lit(_UNIT)) / _UNIT  # noqa: E731
        df = df.where(u("balance") < fraction[F.col("label")])
        # One uniform number per event picks its split: [0, test) test, then validation, the rest
        # train; the test split stays the same whatever validation_fraction is.
        split = u("split")
        is_val = split < pc.test_fraction + pc.validation_fraction * (1 - pc.test_fraction)
        splits = {"train": df.where(~is_val).orderBy(u("shuffle")),
                  "validation": df.where(is_val & (split >= pc.test_fraction)),
                  "test": df.where(split < pc.test_fraction)}

        train = splits["train"]
        with spark_progress(spark, "fitting scalers", train.rdd.getNumPartitions(), 1, "passes", show_progress):
            moments = [json.loads(r["stats"]) for r in train.mapInArrow(_moments, "stats string").collect()]
        pre = _fit(moments, pc.input)
        out_fs, staging, staging_path = storage.new_staging(pc.output, sc)
        apply = _scaler(pre.to_json())
        try:
            for name, part in splits.items():
                (part.mapInArrow(apply, _spark_schema(spark, prepared=True)).write.format("fsparquet")
                 .mode("overwrite").options(**options).option("row_group_size", pc.row_group_size)
                 .option("meta", json.dumps({"stage": "prepare", "split": name}))
                 .save(storage.join(staging, name)))
        except BaseException:
            storage.discard(out_fs, staging_path)
            raise
    except Exception as e:
        raise job_error(e) from e
    split_counts = {name: storage.read_manifest(storage.join(staging, name), sc)["rows_per_class"]
                    for name in SPLITS}
    out_fs.pipe(storage.join(staging_path, FILE_NAME), pre.to_json().encode())
    manifest = {
        "schema_version": SCHEMA_VERSION, "topoflow_version": __version__, "stage": "prepare",
        "source": pc.input, "from_original": pc.from_original, "counts": split_counts,
        "input_counts": counts, "preprocessing": FILE_NAME,
        "config_hash": hashlib.sha256(pc.model_dump_json().encode()).hexdigest()[:16],
    }
    storage.publish(out_fs, staging_path, storage.filesystem(pc.output, sc)[1], manifest)
    return PrepareSummary(pc.output, split_counts, time.monotonic() - t0)


def _check_schema(df, url: str, expected: dict[str, str], original: bool) -> None:
    have = {f.name: f.dataType.simpleString() for f in df.schema.fields}
    problems = [f"column {c!r} missing" if c not in have else f"column {c!r} is {have[c]}, expected {t}"
                for c, t in expected.items() if have.get(c) != t]
    if problems:
        hint = ("the original CERN datasets have HLF_input, GRU_input and encoded_label"
                if original else "run topoflow ingest first, or pass --from-original for data in the CERN schema")
        raise BadInputError(url, "schema mismatch: " + "; ".join(problems), hint)


def _spark_schema(spark, prepared: bool = False):
    from pyspark.sql.pandas.types import from_arrow_schema

    schema = PREPARED_SCHEMA if prepared else datasource.ARROW_SCHEMA
    return from_arrow_schema(schema)


def _from_original(batches):
    """CERN schema → ingested schema: label from the one-hot, padding rows (all zero) removed; the
    entry number is a hash of the HLF (the published data carry no provenance)."""
    for b in batches:
        n = b.num_rows
        gru = b.column("GRU_input")
        rows = np.asarray(gru.flatten().flatten().to_numpy(zero_copy_only=False), dtype=np.float32).reshape(-1, 19)
        per_event = np.diff(gru.offsets.to_numpy())
        real = np.any(rows != 0, axis=1)
        counts = np.bincount(np.repeat(np.arange(n), per_event)[real], minlength=n)
        labels = np.asarray(b.column("encoded_label").flatten().to_numpy(), dtype=np.float64).reshape(n, -1).argmax(axis=1)
        hlf = np.asarray(b.column("HLF_input").flatten().to_numpy(), dtype=np.float32).reshape(n, -1)
        yield datasource.record_batch(labels, hlf, rows[real], counts, ["original"] * n, _row_ids(hlf),
                                      datasource.ARROW_SCHEMA)


def _row_ids(hlf: np.ndarray) -> np.ndarray:
    """A stable 63-bit identity for events without provenance: an FNV-1a hash of their HLF bits."""
    h = np.full(len(hlf), 0xCBF29CE484222325, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for column in np.ascontiguousarray(hlf, dtype=np.float32).view(np.uint32).T:
            h = (h ^ column.astype(np.uint64)) * np.uint64(0x100000001B3)
    return (h >> np.uint64(1)).astype(np.int64)


def _moments(batches):
    """Per-partition statistics of the training split: HLF ranges, particle moments (real rows only)."""
    hlf_m = part_m = None
    for b in batches:
        hlf, rows, _ = datasource.feature_arrays(b)
        h, p = Moments.of(hlf), Moments.of(rows)
        hlf_m, part_m = (h, p) if hlf_m is None else (hlf_m.merge(h), part_m.merge(p))
    if hlf_m is not None:
        yield pa.RecordBatch.from_pydict({"stats": [json.dumps([hlf_m.to_list(), part_m.to_list()])]})


def _fit(moments: list, url: str) -> Preprocessing:
    if not moments:
        raise BadInputError(url, "the training split is empty", "ingest more events or lower prepare.test_fraction")
    hlf, parts = (Moments.from_list(m) for m in moments[0])
    for h, p in moments[1:]:
        hlf, parts = hlf.merge(Moments.from_list(h)), parts.merge(Moments.from_list(p))
    if not (np.isfinite(hlf.low).all() and np.isfinite(hlf.high).all() and np.isfinite(parts.m2).all()):
        raise BadInputError(url, "non-finite (NaN or infinite) feature values in the training split",
                            "re-run ingestion (it refuses such values) or drop the affected files")
    return Preprocessing.fit(hlf, parts, {"events": int(hlf.n), "particles": int(parts.n), "source": url})


def _scaler(artifact: str):
    """The transform as a mapInArrow function, from the artifact's JSON (exactly what serving loads)."""

    def apply(batches):
        pre = Preprocessing.from_json(artifact)
        for b in batches:
            hlf, rows, counts = datasource.feature_arrays(b)
            if not (np.isfinite(hlf).all() and np.isfinite(rows).all()):
                bad = int(np.flatnonzero(~np.isfinite(hlf).all(axis=1) | ~_rows_finite(rows, counts))[0])
                raise BadInputError(b.column("source_file")[bad].as_py(),
                                    f"non-finite feature value at entry {b.column('entry')[bad].as_py()}",
                                    "re-run ingestion (it refuses such values) or drop the file")
            yield datasource.record_batch(b.column("label").to_numpy(), pre.transform_hlf(hlf),
                                          pre.transform_particles(rows), counts, b.column("source_file"),
                                          b.column("entry").to_numpy(), PREPARED_SCHEMA)

    return apply


def _rows_finite(rows: np.ndarray, counts: np.ndarray) -> np.ndarray:
    bad_rows = ~np.isfinite(rows).all(axis=1)
    event = np.repeat(np.arange(len(counts)), counts)
    return np.bincount(event[bad_rows], minlength=len(counts)) == 0
