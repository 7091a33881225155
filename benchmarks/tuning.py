"""Tuning throughput on this machine: trials completed per hour for the HLF model with ``tune.parallelism`` 1
and 2 (the same trials: random search with one seed over configs/tune-hlf.yaml's parameters, median stopping
off), then the same study with median stopping on: the epochs it saved and the best objective it still found.

Data: a prepared dataset (``--data``, by default the one ``make run`` leaves in out/prepared). Each study runs in
a fresh process with its own local Spark session (``local[<cores>]``). Trials per hour are counted over the
span from the first trial's start to the last trial's end (the rate a long study runs at); the wall time of the
whole ``tune`` call (study set-up, the first Spark job starting the Python workers, the final plot: ≈ 6 s once
per study) is shown beside it.

    python benchmarks/tuning.py [--data out/prepared] [--trials 12] [--epochs 20]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SPACE = Path(__file__).parents[1] / "configs" / "tune-hlf.yaml"  # its parameters; the rest is set here


def study(data: str, output: str, trials: int, epochs: int, parallelism: int, stopping: bool) -> dict:
    """One study in this process: wall time of its trials and its rows."""
    from topoflow.config import load_config
    from topoflow.spark import session
    from topoflow.tune import tune

    cfg = load_config(sections={"tune": SPACE}, overrides=[
        f"spark.master=local[{os.cpu_count()}]", "train.model=hlf", f"train.data={data}", f"train.epochs={epochs}",
        f"tune.output={output}", "tune.algorithm=random", f"tune.trials={trials}", f"tune.parallelism={parallelism}",
        "tune.seed=7", f"tune.early_stopping.enabled={str(stopping).lower()}"])
    spark = session(cfg.spark)
    t0 = time.perf_counter()
    result = tune(cfg, spark, log=lambda line: print(line, file=sys.stderr))
    return {"seconds": time.perf_counter() - t0, "rows": result.rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="out/prepared")
    p.add_argument("--trials", type=int, default=12)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one study, print its JSON
    args = p.parse_args()
    if args.one:
        parallelism, stopping, output = args.one.split(",")
        print(json.dumps(study(args.data, output, args.trials, args.epochs, int(parallelism), stopping == "on")))
        return
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for parallelism, stopping in ((1, "off"), (2, "off"), (2, "on")):
            out = subprocess.run([sys.executable, __file__, "--data", args.data, "--trials", str(args.trials),
                                  "--epochs", str(args.epochs), "--one", f"{parallelism},{stopping},{tmp}/{parallelism}{stopping}"],
                                 check=True, capture_output=True, text=True)
            runs[parallelism, stopping] = json.loads(out.stdout.strip().splitlines()[-1])

    def summary(run: dict) -> tuple[float, int, float, float]:
        rows = run["rows"]
        scored = [r["value"] for r in rows if r["state"] == "complete"]
        span = max(r["started"] + r["seconds"] for r in rows) - min(r["started"] for r in rows)
        return len(rows) / span * 3600, sum(r["epochs"] for r in rows), max(scored), span

    print(f"HLF model, {args.trials} trials of up to {args.epochs} epochs, random search (seed 7), {os.cpu_count()} cores, "
          f"data {args.data}\n")
    print("| tune.parallelism | median stopping | trials' span s | trials/hour | whole call s | epochs trained "
          "| best val_auc |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for (parallelism, stopping), run in runs.items():
        per_hour, epochs, best, span = summary(run)
        print(f"| {parallelism} | {stopping} | {span:.0f} | {per_hour:,.0f} | {run['seconds']:.0f} | {epochs} | {best:.4f} |")
    one, two, stop = (summary(runs[k]) for k in ((1, "off"), (2, "off"), (2, "on")))
    stopped = sum(r["state"] == "stopped" for r in runs[2, "on"]["rows"])
    whole = runs[1, "off"]["seconds"] / runs[2, "off"]["seconds"]
    print(f"\nparallelism 2 vs 1: {two[0] / one[0]:.2f}x trials/hour (target >= 1.7x on 2 cores); "
          f"{whole:.2f}x counting the whole call")
    print(f"median stopping: {stopped} of {args.trials} trials stopped early, {two[1] - stop[1]} of {two[1]} epochs saved "
          f"({1 - stop[1] / two[1]:.0%}), best val_auc {stop[2]:.4f} vs {two[2]:.4f} without")


if __name__ == "__main__":
    main()
