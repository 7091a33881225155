"""Spark 4 Python data sources: ``delphes`` reads Delphes files into selected events with features,
``fsparquet`` writes Parquet through fsspec (any URL, no Hadoop connector) and publishes atomically.

    spark.read.format("delphes").option("label", "ttbar").load("root://host//store/tt/*.root")
    df.write.format("fsparquet").mode("overwrite").save("s3://bucket/ingested")

Reading is split by file and by entry range so that every executor is busy; each task streams its
range in vectorised batches. Writing stages part files next to the target and moves them into
place only when every task succeeded; a manifest written last marks the dataset complete.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
from pyspark.sql.datasource import (
    DataSource,
    DataSourceArrowWriter,
    DataSourceReader,
    InputPartition,
    WriterCommitMessage,
)

from topoflow import CLASSES, __version__, delphes, features, storage
from topoflow.config import StorageConfig
from topoflow.errors import BadInputError, ConfigError, TopoflowError

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
ARROW_SCHEMA = pa.schema([
    ("label", pa.int32()),
    ("hlf", pa.list_(pa.float32())),
    ("particles", pa.list_(pa.list_(pa.float32()))),
    ("source_file", pa.string()),
    ("entry", pa.int64()),
])
SPARK_SCHEMA = "label int, hlf array<float>, particles array<array<float>>, source_file string, entry bigint"
SKIPPED = "_skipped.json"
_ERRORS = "_errors"


def storage_options(cfg: StorageConfig) -> dict[str, str]:
    """Reader/writer options carrying the storage settings; secrets go under keys that Spark's
    default ``spark.redaction.regex`` masks in plans and the UI."""
    opts = {"storage": cfg.model_dump_json(exclude={"s3_access_key_id", "s3_secret_access_key"})}
    if cfg.s3_access_key_id:
        opts["s3.access.key"] = cfg.s3_access_key_id.get_secret_value()
    if cfg.s3_secret_access_key:
        opts["s3.secret"] = cfg.s3_secret_access_key.get_secret_value()
    return opts


def _storage(options: dict[str, str]) -> StorageConfig:
    cfg = StorageConfig.model_validate_json(options.get("storage", "{}"))
    if "s3.access.key" in options:
        cfg.s3_access_key_id = options["s3.access.key"]
    if "s3.secret" in options:
        cfg.s3_secret_access_key = options["s3.secret"]
    return cfg


@dataclass
class Range:
    """Entries ``[start, stop)`` of one file, with the file's probed layout."""

    url: str
    label: int
    start: int
    stop: int
    muon: str
    track_charge: str


@dataclass
class Split(InputPartition):
    """One task's work: ranges of one or more files (small files are packed together)."""

    ranges: list[Range]


def plan(infos: list[tuple[delphes.FileInfo, int]], max_entries: int, min_partitions: int = 1) -> list[Split]:
    """Cut the files into tasks of at most ``max_entries`` entries (fewer when that would give less
    than ``min_partitions`` tasks, so that all executors get work): large files are split into entry
    ranges, small files packed together so that per-task overhead stays small."""
    total = sum(info.entries for info, _ in infos)
    step = max(1, min(max_entries, -(-total // max(min_partitions, 1))))
    splits, current, room = [], [], step
    for info, label in infos:
        if room < info.entries <= step:  # a file that fits one task is never cut in two
            splits.append(Split(current))
            current, room = [], step
        start = 0
        while start < info.entries:
            stop = min(info.entries, start + room)
            current.append(Range(info.url, label, start, stop, info.muon, info.track_charge))
            room -= stop - start
            start = stop
            if room == 0:
                splits.append(Split(current))
                current, room = [], step
    if current:
        splits.append(Split(current))
    return splits


def split_from_json(ranges: list[dict[str, Any]]) -> Split:
    return Split([Range(**r) for r in ranges])


def record_skip(errors_dir: str | None, cfg: StorageConfig, url: str, reason: str, entries=None) -> None:
    """Leave a note for the writer's commit, which gathers them into ``_skipped.json``."""
    log.warning("skipping %s: %s", url, reason)
    if not errors_dir:
        return
    fs, path = storage.filesystem(errors_dir, cfg)
    fs.makedirs(path, exist_ok=True)
    storage.write_json(fs, storage.join(path, f"{uuid.uuid4().hex}.json"),
                       {"file": url, "reason": reason, "entries": entries})


class DelphesDataSource(DataSource):
    """``spark.read.format("delphes")``. Options: ``path`` (or ``paths``: JSON list) of URLs/globs,
    ``label`` (qcd, ttbar, wjets), ``muon_collection``, ``entries_per_partition``, ``batch_size``,
    ``min_partitions``, ``on_bad_file`` (fail/skip), ``errors_dir`` and the storage options."""

    @classmethod
    def name(cls) -> str:
        return "delphes"

    def schema(self) -> str:
        return SPARK_SCHEMA

    def reader(self, schema) -> DataSourceReader:
        return DelphesReader(self.options)


class DelphesReader(DataSourceReader):
    def __init__(self, options: dict[str, str]):
        self.cfg = _storage(options)
        self.batch_size = int(options.get("batch_size", 2000))
        self.skip = options.get("on_bad_file", "fail") == "skip"
        self.errors_dir = options.get("errors_dir")
        self.options = options

    def partitions(self) -> list[Split]:
        if "plan" in self.options:  # already probed by the ingest stage
            return [split_from_json(ranges) for ranges in json.loads(self.options["plan"])]
        label = self.options.get("label")
        if label not in CLASSES:
            raise ConfigError(f"option 'label' must be one of {list(CLASSES)}, not {label!r}")
        patterns = json.loads(self.options["paths"]) if "paths" in self.options else [self.options["path"]]
        infos = []
        for pattern in patterns:
            for url in storage.expand(pattern, self.cfg):
                try:
                    infos.append((delphes.probe(url, self.cfg, self.options.get("muon_collection", "auto")),
                                  CLASSES.index(label)))
                except BadInputError as e:
                    if not self.skip:
                        raise
                    record_skip(self.errors_dir, self.cfg, url, e.problem)
        return plan(infos, int(self.options.get("entries_per_partition", 20_000)),
                    int(self.options.get("min_partitions", 1)))

    def read(self, partition: Split) -> Iterator[pa.RecordBatch]:
        for r in partition.ranges:
            for first, _, feats in read_range(r, self.cfg, self.batch_size, self.skip, self.errors_dir):
                yield to_record_batch(feats, r.label, r.url, first)


def read_range(r: Range, cfg: StorageConfig, batch_size: int, skip: bool = False,
               errors_dir: str | None = None) -> Iterator[tuple[int, int, features.Features]]:
    """``(first entry, entries read, features of the selected events)`` per batch of ``r``: the one
    reading path of ingestion and prediction. A bad file or event raises :class:`BadInputError`;
    with ``skip``, the entries not read yet are recorded as skipped (:func:`record_skip`) instead."""
    info = delphes.FileInfo(r.url, r.stop, r.muon, r.track_charge)
    done = r.start
    try:
        for first, arrays in delphes.read_batches(info, cfg, r.start, r.stop, batch_size):
            try:
                arrays = features.jagged(arrays)  # converted once for both
                features.check_finite(arrays)
                feats = features.compute(arrays)
            except features.EventError as e:
                raise BadInputError(r.url, f"{e.problem} at entry {first + e.index}",
                                    "fix or drop this file, or use --on-bad-file skip") from e
            n = len(arrays["MissingET.MET"])
            yield first, n, feats
            done = first + n
    except BadInputError as e:
        if not skip:
            raise
        record_skip(errors_dir, cfg, r.url, e.problem, [done, r.stop])


def to_record_batch(feats: features.Features, label: int, url: str, first_entry: int) -> pa.RecordBatch:
    """Arrow rows of selected events: particle lists stay unpadded (variable length)."""
    n = len(feats.events)
    return record_batch(np.full(n, label), feats.hlf, feats.particles, feats.counts, [url] * n,
                        first_entry + feats.events.astype(np.int64), ARROW_SCHEMA)


def record_batch(labels, hlf: np.ndarray, rows: np.ndarray, counts: np.ndarray, files, entries,
                 schema: pa.Schema) -> pa.RecordBatch:
    """The columns of ``schema`` (ingested or prepared) from numpy: HLF (n, 14), the particle rows
    of all events back to back (sum(counts), 19), float32 in Arrow list columns."""
    inner = pa.ListArray.from_arrays(np.arange(0, 19 * len(rows) + 1, 19, dtype=np.int32),
                                     pa.array(np.asarray(rows, dtype=np.float32).ravel()))
    cols = {
        "label": pa.array(np.asarray(labels, dtype=np.int32)),
        "hlf": pa.ListArray.from_arrays(np.arange(0, 14 * len(hlf) + 1, 14, dtype=np.int32),
                                        pa.array(np.asarray(hlf, dtype=np.float32).ravel())),
        "particles": pa.ListArray.from_arrays(np.concatenate([[0], np.cumsum(counts)]).astype(np.int32), inner),
        "n_particles": pa.array(np.asarray(counts, dtype=np.int32)),
        "source_file": files if isinstance(files, pa.Array) else pa.array(files, pa.string()),
        "entry": pa.array(np.asarray(entries, dtype=np.int64)),
    }
    return pa.RecordBatch.from_arrays([cols[f.name] for f in schema], schema=schema)


def feature_arrays(b: pa.RecordBatch) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The inverse of :func:`record_batch` for the features: HLF (n, 14), the particle rows of all
    events back to back (sum(counts), 19), as float64, and the counts."""
    n = b.num_rows
    hlf = np.asarray(b.column("hlf").flatten().to_numpy(), dtype=np.float64).reshape(n, len(features.HLF_NAMES))
    parts = b.column("particles")
    rows = np.asarray(parts.flatten().flatten().to_numpy(), dtype=np.float64).reshape(-1, len(features.PARTICLE_NAMES))
    return hlf, rows, np.diff(parts.offsets.to_numpy())


@dataclass
class PartWritten(WriterCommitMessage):
    name: str | None
    rows: int
    per_label: dict[str, int] = field(default_factory=dict)


class FsParquetDataSource(DataSource):
    """Parquet at any fsspec URL. ``spark.read.format("fsparquet").load(url)`` reads a dataset: the
    files its manifest lists, or every ``*.parquet`` below ``url`` for data written by others.
    ``df.write.format("fsparquet")`` options: ``path`` (target URL), ``row_group_size``,
    ``staging`` (URL to write parts to before publishing), ``meta`` (JSON kept in the manifest),
    ``skipped`` (JSON list of files already left out), ``count`` (the column whose class indices or
    names the manifest counts in ``rows_per_class``; default ``label``) and the storage options."""

    @classmethod
    def name(cls) -> str:
        return "fsparquet"

    def schema(self):
        import pyarrow.parquet as pq
        from pyspark.sql.pandas.types import from_arrow_schema

        files = parquet_files(self.options["path"], _storage(self.options))
        fs, _ = storage.filesystem(self.options["path"], _storage(self.options))
        with fs.open(files[0]) as f:
            return from_arrow_schema(pq.read_schema(f))

    def reader(self, schema) -> DataSourceReader:
        return FsParquetReader(self.options, [f.name for f in schema.fields])

    def writer(self, schema, overwrite: bool) -> FsParquetWriter:
        return FsParquetWriter(self.options, overwrite, schema)


def parquet_files(url: str, cfg: StorageConfig) -> list[str]:
    """The data files of a dataset (paths inside its filesystem), or an error saying why there are none."""
    fs, path = storage.filesystem(url, cfg)
    with storage.storage_errors(url):
        manifest = storage.join(path, storage.MANIFEST)
        if fs.exists(manifest):
            with fs.open(manifest) as f:
                return [storage.join(path, part["name"]) for part in json.load(f)["files"]]
        found = sorted(fs.glob(storage.join(path, "**/*.parquet"))
                       or [p for p, info in fs.glob(path, detail=True).items() if info["type"] == "file"])
    found = [p for p in found if not p.rsplit("/", 1)[-1].startswith(("_", "."))]
    if not found:
        raise BadInputError(url, "no Parquet files here", "point at a dataset written by topoflow (with "
                            f"{storage.MANIFEST}) or at a directory of .parquet files")
    return found


class FsParquetReader(DataSourceReader):
    def __init__(self, options: dict[str, str], columns: list[str]):
        self.cfg = _storage(options)
        self.url, self.columns = options["path"], columns

    def partitions(self) -> list[InputPartition]:
        return [InputPartition(p) for p in parquet_files(self.url, self.cfg)]

    def read(self, partition: InputPartition) -> Iterator[pa.RecordBatch]:
        import pyarrow.parquet as pq

        fs, _ = storage.filesystem(self.url, self.cfg)
        with storage.storage_errors(self.url), fs.open(partition.value) as f:
            yield from pq.ParquetFile(f).iter_batches(batch_size=1024, columns=self.columns)


class FsParquetWriter(DataSourceArrowWriter):
    def __init__(self, options: dict[str, str], overwrite: bool, schema):
        self.cfg = _storage(options)
        self.columns = ", ".join(f"{f.name} {f.dataType.simpleString()}" for f in schema.fields)
        self.count = options.get("count", "label")
        self.target = options["path"]
        self.staging = options.get("staging") or storage.staging_url(self.target)
        self.row_group_size = int(options.get("row_group_size", 1000))
        self.meta = json.loads(options.get("meta", "{}"))
        self.skipped = json.loads(options.get("skipped", "[]"))
        fs, path = storage.filesystem(self.target, self.cfg)
        if not overwrite and fs.exists(storage.join(path, storage.MANIFEST)):
            raise TopoflowError(f"a complete dataset exists at {self.target!r}; use mode('overwrite')")

    def write(self, iterator: Iterator[pa.RecordBatch]) -> PartWritten:
        import pyarrow.parquet as pq

        fs, path = storage.filesystem(self.staging, self.cfg)
        name, rows, labels, writer, f = f"part-{uuid.uuid4().hex}.parquet", 0, Counter(), None, None
        try:
            for batch in iterator:
                if batch.num_rows == 0:
                    continue
                if writer is None:
                    fs.makedirs(path, exist_ok=True)
                    f = fs.open(storage.join(path, name), "wb")
                    writer = pq.ParquetWriter(f, batch.schema, compression="zstd")
                writer.write_batch(batch, row_group_size=self.row_group_size)
                rows += batch.num_rows
                if self.count in batch.schema.names:
                    labels.update({v["values"]: v["counts"] for v in batch.column(self.count).drop_null()
                                   .value_counts().to_pylist()})
        finally:
            if writer is not None:
                writer.close()
                f.close()
        per_label = {CLASSES[k] if isinstance(k, int) and 0 <= k < len(CLASSES) else str(k): v
                     for k, v in labels.items()}
        return PartWritten(name if rows else None, rows, per_label)

    def commit(self, messages: list[PartWritten]) -> None:
        fs, staging = storage.filesystem(self.staging, self.cfg)
        _, target = storage.filesystem(self.target, self.cfg)
        fs.makedirs(staging, exist_ok=True)
        skipped = list(self.skipped)
        errors = storage.join(staging, _ERRORS)
        if fs.exists(errors):
            for p in sorted(fs.ls(errors, detail=False)):
                with fs.open(p) as f:
                    skipped.append(json.load(f))
            fs.rm(errors, recursive=True)
        skipped = merge_skips(skipped)
        if skipped:
            storage.write_json(fs, storage.join(staging, SKIPPED), skipped)
        parts = [m for m in messages if m is not None and m.name]
        per_label = Counter()
        for m in parts:
            per_label.update(m.per_label)
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "topoflow_version": __version__,
            "columns": self.columns,
            "files": [{"name": m.name, "rows": m.rows} for m in sorted(parts, key=lambda m: m.name)],
            "rows": sum(m.rows for m in parts),
            "rows_per_class": {c: per_label.get(c, 0) for c in CLASSES},
            "skipped": len(skipped),
            **({"meta": self.meta} if self.meta else {}),
        }
        storage.publish(fs, staging, target, manifest)

    def abort(self, messages: list[PartWritten]) -> None:
        fs, staging = storage.filesystem(self.staging, self.cfg)
        storage.discard(fs, staging)


def merge_skips(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per file: ``entries`` is None (whole file) or its merged ``[start, stop)`` ranges."""
    by_file: dict[str, dict[str, Any]] = {}
    for r in records:
        merged = by_file.setdefault(r["file"], {"file": r["file"], "reason": r["reason"], "entries": []})
        if r["entries"] is None or merged["entries"] is None:
            merged["entries"] = None
        else:
            merged["entries"].append(list(r["entries"]))
    for merged in by_file.values():
        if merged["entries"]:
            ranges = sorted(merged["entries"])
            out = [ranges[0]]
            for lo, hi in ranges[1:]:
                if lo <= out[-1][1]:
                    out[-1][1] = max(out[-1][1], hi)
                else:
                    out.append([lo, hi])
            merged["entries"] = out
    return sorted(by_file.values(), key=lambda r: r["file"])


def register(spark) -> None:
    """Make ``delphes`` and ``fsparquet`` known to a session (done by :func:`topoflow.spark.session`)."""
    spark.dataSource.register(DelphesDataSource)
    spark.dataSource.register(FsParquetDataSource)


def skipped_files(url: str, cfg: StorageConfig) -> list[dict[str, Any]]:
    """The files (or entry ranges) left out of a dataset written with ``on_bad_file=skip``."""
    fs, path = storage.filesystem(url, cfg)
    p = storage.join(path, SKIPPED)
    if not fs.exists(p):
        return []
    with fs.open(p) as f:
        return json.load(f)

