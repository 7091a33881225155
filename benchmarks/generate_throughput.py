"""Event generation speed per process on one core: events written per second (after the
generator filter) and selected (isolated-lepton) events per CPU second, plus what that means for
the default `make run` dataset on this machine's cores.

    python benchmarks/generate_throughput.py [--events 300]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

from topoflow import CLASSES, delphes, features
from topoflow.config import Config, StorageConfig
from topoflow.generate import file_seed, make_file


def selected(path: str) -> int:
    cfg = StorageConfig()
    info = delphes.probe(path, cfg)
    return sum(len(features.compute(a).events) for _, a in delphes.read_batches(info, cfg, 0, info.entries, 2000))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=300, help="filtered events per process")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="topoflow-bench-gen-"))
    rows = {}
    try:
        for c in (*CLASSES, "qcd_fake"):
            path = str(work / f"{c}.root")
            r = make_file(c, 0, args.events, file_seed(1, c, 0), path, StorageConfig())
            rows[c] = r | {"selected": selected(path)}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    cores = os.cpu_count()
    import yaml

    default = Config.model_validate(yaml.safe_load(Path("configs/default.yaml").read_text())).generate
    print(f"\nevent generation, one core per process (this machine has {cores})\n")
    print("| process | generated | written (filter passed) | filter eff. | generated/s/core | written/s/core "
          "| selected | selected per CPU-s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for c, r in rows.items():
        cpu = r["cpu_seconds"]
        print(f"| {c} | {r['tried']:,} | {r['kept']:,} | {r['kept'] / r['tried']:.3f} | {r['tried'] / cpu:.0f} | "
              f"{r['kept'] / cpu:.1f} | {r['selected']:,} | {r['selected'] / cpu:.2f} |")
    fakes = default.events["qcd"] * default.qcd_fake_fraction
    events = {**default.events, "qcd": default.events["qcd"] - fakes, "qcd_fake": fakes}
    cpu = sum(n / (rows[p]["kept"] / rows[p]["cpu_seconds"]) for p, n in events.items())
    sel = {p: round(n * rows[p]["selected"] / rows[p]["kept"]) for p, n in events.items()}
    print(f"\ndefault `make run` dataset ({default.events}, QCD fakes {default.qcd_fake_fraction:.0%}): "
          f"≈ {cpu / cores / 60:.1f} min on {cores} cores, ≈ {sel} selected events")


if __name__ == "__main__":
    main()
