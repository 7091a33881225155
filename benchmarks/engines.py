"""Training throughput of the three engines side by side, one run: samples/s for each engine and model, and
the scaling from 1 to 2 workers (multiworker: worker processes; bigdl: Spark cores; keras: TensorFlow threads).

Each configuration is one ``topoflow train`` process (a fresh TensorFlow/JVM: thread settings only apply at
start) on the same prepared dataset (``make run``'s, by default), ``--epochs`` whole epochs (BigDL trains whole
epochs only); the samples/s is what training reports (its own training time, validation excluded), the seconds
are the whole command (start-up, validation and export included). The original: BigDL ≈ 15.7 samples/s per core for the inclusive model, Keras on one T4
≈ 3.2 k samples/s.

    python benchmarks/engines.py [--data out/prepared] [--models hlf gru inclusive] [--engines keras bigdl]
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ENGINES = ("keras", "multiworker", "bigdl")


def measure(engine: str, model: str, workers: int, args, folder: Path) -> tuple[float, float]:
    """(samples/s reported by training, seconds of the whole command)."""
    out = folder / f"{engine}-{model}-{workers}"
    scale = ["--set", f"train.threads={workers}"] if engine == "keras" else ["--workers", str(workers)]
    cmd = [sys.executable, "-m", "topoflow.cli", "train", "--data", args.data, "--model", model, "--engine", engine,
           *scale, "--epochs", str(args.epochs), "--output", str(out / "model"), "--restart", "--no-progress",
           "--set", f"train.checkpoint_dir={out / 'ckpt'}", "--set", f"train.batch_size={args.batch_size}"]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if done.returncode:
        print(f"  {engine} {model} x{workers} failed:\n{done.stderr[-1500:]}", file=sys.stderr)
        return float("nan"), seconds
    rate = re.search(r"([\d,]+) samples/s", done.stdout)
    return float(rate.group(1).replace(",", "")), seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="out/prepared")
    p.add_argument("--models", nargs="+", default=["hlf", "gru", "inclusive"])
    p.add_argument("--engines", nargs="+", default=list(ENGINES))
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=128)
    args = p.parse_args()
    print(f"data {args.data}, {args.epochs} epochs, batches of {args.batch_size}\n")
    print("| engine | model | samples/s, 1 worker | samples/s, 2 workers | scaling | command s (1 / 2) |")
    print("|---|---|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory(prefix="topoflow-bench-engines-") as tmp:
        for engine in args.engines:
            for model in args.models:
                (r1, s1), (r2, s2) = (measure(engine, model, w, args, Path(tmp)) for w in (1, 2))
                print(f"| {engine} | {model} | {r1:,.0f} | {r2:,.0f} | {r2 / r1:.2f}x | {s1:.0f} / {s2:.0f} |",
                      flush=True)


if __name__ == "__main__":
    main()
