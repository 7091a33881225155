"""Training-input throughput against what the GRU model consumes, and its peak memory at two
dataset sizes (each measured in a fresh process).

Datasets are written directly in the prepared layout (topoflow's Parquet with a manifest) with
realistic sequence lengths (20-200 particles, ≈ the ingested Delphes samples' mean of 95-110).

    python benchmarks/input_pipeline.py [--sizes 20000 80000] [--batch-size 128]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from topoflow import CLASSES
from topoflow.prepare import PREPARED_SCHEMA


def write_prepared(path: Path, n: int, seed: int = 0, per_file: int = 5000) -> None:
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True)
    files = []
    for i, start in enumerate(range(0, n, per_file)):
        m = min(per_file, n - start)
        counts = rng.integers(20, 201, size=m)
        rows = rng.normal(size=(counts.sum(), 19)).astype(np.float32)
        inner = pa.ListArray.from_arrays(np.arange(0, 19 * len(rows) + 1, 19, dtype=np.int32), pa.array(rows.ravel()))
        table = pa.table({
            "label": pa.array(rng.integers(0, 3, m).astype(np.int32)),
            "hlf": pa.ListArray.from_arrays(np.arange(0, 14 * m + 1, 14, dtype=np.int32),
                                            pa.array(rng.random(14 * m, dtype=np.float32))),
            "particles": pa.ListArray.from_arrays(np.concatenate([[0], np.cumsum(counts)]).astype(np.int32), inner),
            "n_particles": pa.array(counts.astype(np.int32)),
            "source_file": pa.array(["bench"] * m),
            "entry": pa.array(np.arange(start, start + m, dtype=np.int64)),
        }, schema=PREPARED_SCHEMA)
        name = f"part-{i:04d}.parquet"
        pq.write_table(table, path / name, row_group_size=1000, compression="zstd")
        files.append({"name": name, "rows": m})
    (path / "_manifest.json").write_text(json.dumps({"files": files, "rows": n,
                                                    "rows_per_class": {c: 0 for c in CLASSES}}))


def child_pipeline(url: str, batch_size: int, bucket: bool) -> dict:
    from topoflow import dataset
    from topoflow.config import StorageConfig

    ds = dataset.tf_dataset(url, StorageConfig(), batch_size, shuffle=True, bucket=bucket)
    t0, n = time.perf_counter(), 0
    for _, y in ds:
        n += int(y.shape[0])
    seconds = time.perf_counter() - t0
    return {"samples": n, "seconds": seconds, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def child_model(url: str, batch_size: int, steps: int) -> dict:
    """The particle-sequence GRU of SPEC.md (topoflow.models) fed in-memory batches from the dataset."""
    from topoflow import dataset
    from topoflow.config import StorageConfig, TrainConfig
    from topoflow.models import build

    batches = [x for x, _ in dataset.iter_batches(url, StorageConfig(), batch_size, inputs=("particles",))][:steps]
    labels = np.eye(3, dtype=np.float32)[np.zeros(batch_size, dtype=int)]
    model = build(TrainConfig(model="gru"))
    model.train_on_batch(batches[0], labels[: len(batches[0]["particles"])])  # trace outside the timing
    t0 = time.perf_counter()
    for b in batches[1:]:
        model.train_on_batch(b, labels[: len(b["particles"])])
    seconds = time.perf_counter() - t0
    return {"samples": sum(len(b["particles"]) for b in batches[1:]), "seconds": seconds}


def _run_child(*args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs=2, default=[20_000, 80_000])
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--model-steps", type=int, default=30)
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        kind, url, *rest = args.child
        result = (child_pipeline(url, args.batch_size, rest == ["bucket"]) if kind == "pipeline"
                  else child_model(url, args.batch_size, args.model_steps))
        print(json.dumps(result))
        return

    work = Path(tempfile.mkdtemp(prefix="topoflow-bench-input-"))
    try:
        urls = []
        for n in args.sizes:
            write_prepared(work / f"ds{n}", n)
            urls.append(str(work / f"ds{n}"))
        model = _run_child("model", urls[0])
        rows = [(n, _run_child("pipeline", u), _run_child("pipeline", u, "bucket")) for n, u in zip(args.sizes, urls)]
    finally:
        shutil.rmtree(work, ignore_errors=True)

    consumed = model["samples"] / model["seconds"]
    print(f"\ntraining input vs. GRU training (batch {args.batch_size}, this machine)\n")
    print("| dataset | pipeline | samples/s | × GRU consumption | peak RSS (MB) |")
    print("|---|---|---:|---:|---:|")
    for n, plain, bucket in rows:
        for name, r in (("shuffled", plain), ("shuffled + bucketed", bucket)):
            rate = r["samples"] / r["seconds"]
            print(f"| {n:,} events | {name} | {rate:,.0f} | {rate / consumed:.1f} | {r['peak_rss_mb']:,.0f} |")
    print(f"| | GRU(50) training step, in-memory batches | {consumed:,.0f} | 1.0 | |")


if __name__ == "__main__":
    main()
