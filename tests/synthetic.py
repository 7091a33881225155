"""Synthetic datasets in topoflow's ingested schema and in the original CERN schema, for tests of
preparation and streaming that need more events than the real samples have."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from topoflow import CLASSES
from topoflow.datasource import ARROW_SCHEMA


def ingested_table(counts: dict[str, int], seed: int = 0, nan_entry: int | None = None) -> pa.Table:
    """Random events: HLF shifted by class, 5-60 particles each; ``nan_entry`` gets a NaN feature."""
    rng = np.random.default_rng(seed)
    labels, hlf, parts, files, entries = [], [], [], [], []
    for cls, n in counts.items():
        k = CLASSES.index(cls)
        for i in range(n):
            labels.append(k)
            hlf.append((rng.normal(size=14) + k).astype(np.float32).tolist())
            rows = rng.normal(loc=k, size=(rng.integers(5, 61), 19)).astype(np.float32)
            if nan_entry == i and k == 0:
                rows[0, 3] = np.nan
            parts.append(rows.tolist())
            files.append(f"synthetic_{cls}.root")
            entries.append(i)
    return pa.table({"label": pa.array(labels, pa.int32()), "hlf": hlf, "particles": parts,
                     "source_file": files, "entry": pa.array(entries, pa.int64())}, schema=ARROW_SCHEMA)


def write_dataset(table: pa.Table, path: Path, n_files: int = 3, manifest: bool = True) -> Path:
    path.mkdir(parents=True)
    files = []
    for i, chunk in enumerate(np.array_split(np.arange(table.num_rows), n_files)):
        name = f"part-{i}.parquet"
        pq.write_table(table.take(chunk), path / name, row_group_size=200)
        files.append({"name": name, "rows": len(chunk)})
    if manifest:
        labels = table.column("label").to_numpy()
        (path / "_manifest.json").write_text(json.dumps({
            "files": files, "rows": table.num_rows,
            "rows_per_class": {c: int((labels == i).sum()) for i, c in enumerate(CLASSES)}}))
    return path


def to_original(table: pa.Table, path: Path) -> Path:
    """The CERN published schema: HLF_input, GRU_input padded to 801 rows with zero rows
    interleaved (as the original ΔR sort left them), encoded_label one-hot, all doubles."""
    rng = np.random.default_rng(1)
    grus = []
    for rows in table.column("particles").to_pylist():
        padded = np.zeros((801, 19))
        slots = np.sort(rng.choice(801, size=len(rows), replace=False))
        padded[slots] = rows
        grus.append(padded.tolist())
    labels = table.column("label").to_numpy()
    out = pa.table({
        "HLF_input": pa.array(table.column("hlf").to_pylist(), pa.list_(pa.float64())),
        "GRU_input": pa.array(grus, pa.list_(pa.list_(pa.float64()))),
        "encoded_label": pa.array(np.eye(3)[labels].tolist(), pa.list_(pa.float64())),
    })
    path.mkdir(parents=True)
    pq.write_table(out, path / "part-00000.parquet")
    return path


def prepared(spark, base: Path, per_class: int) -> Path:
    """Separable synthetic events of ``per_class`` events per class, prepared by topoflow into ``base/prepared``."""
    from topoflow.config import Config
    from topoflow.prepare import prepare

    src = write_dataset(ingested_table({c: per_class for c in CLASSES}), base / "in")
    cfg = Config()
    cfg.prepare.input, cfg.prepare.output = str(src), str(base / "prepared")
    prepare(cfg, spark, show_progress=False)
    return base / "prepared"
