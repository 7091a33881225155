"""Ingestion throughput on real Delphes files, beside the raw uproot read of the same branches.

The shared 60-event samples are linked ``--copies`` times per class. Measured in one run:

1. one core, file by file: the raw read (open + needed branches → awkward: the I/O floor) and the
   full ingestion path (the same read + selection + features + Arrow rows), interleaved;
2. one core, files already open, batches of ``--batch-size`` events: the per-event cost of
   reading vs. features that large production files (thousands of events, opened once) see;
3. the whole ``topoflow ingest`` on local Spark with every core, Parquet written, on the linked
   60-event files and on large files holding the same events (uproot-written, 3,000 events each).

    python benchmarks/ingest_throughput.py [--copies 150] [--delphes-dir ../shared/data/delphes]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from topoflow import datasource, delphes, features
from topoflow.config import Config, StorageConfig
from topoflow.ingest import ingest

SAMPLES = {"qcd": "qcd_cms_60ev.root", "ttbar": "ttbar_cms_60ev.root", "wjets": "wjets_cms_60ev.root"}


def _raw(url: str, cfg: StorageConfig, batch: int) -> int:
    """The I/O floor: one open, the needed branches decompressed into awkward arrays."""
    import uproot

    with uproot.open(url) as f:
        tree = f["Delphes"]
        names = delphes._branch_names("Muon", "EFlowTrack.Charge")
        return sum(len(a["MissingET.MET"]) for a in tree.iterate(names, step_size=batch, library="ak", how=dict))


def _full(url: str, cfg: StorageConfig, batch: int) -> int:
    info = delphes.probe(url, cfg)
    n = 0
    for first, arrays in delphes.read_batches(info, cfg, 0, info.entries, batch):
        features.check_finite(arrays)
        datasource.to_record_batch(features.compute(arrays), 0, url, first)
        n += len(arrays["MissingET.MET"])
    return n


def per_file(files: list[str], batch: int) -> dict[str, float]:
    cfg, t = StorageConfig(), {"raw": 0.0, "full": 0.0}
    n = 0
    for url in files:  # interleaved, so that both see the same cache and machine state
        t0 = time.perf_counter()
        n += _raw(url, cfg, batch)
        t1 = time.perf_counter()
        _full(url, cfg, batch)
        t["full"] += time.perf_counter() - t1
        t["raw"] += t1 - t0
    return {"events": n, **t}


def per_event(delphes_dir: Path, repeats: int, batch: int) -> dict[str, float]:
    """Files opened once, as in large production files: the branches of ``batch`` entries read
    (from the small files in turn, joined into one batch) vs. the same plus the features."""
    import awkward as ak
    import uproot

    trees = [uproot.open(delphes_dir / f)["Delphes"] for f in SAMPLES.values()]
    names = delphes._branch_names("Muon", "EFlowTrack.Charge")
    per_batch = max(1, batch // trees[0].num_entries)

    def read_batch():
        parts = [trees[i % len(trees)].arrays(names, library="ak", how=dict, array_cache=None)
                 for i in range(per_batch)]
        return {k: ak.concatenate([p[k] for p in parts]) for k in names}

    t, n = {"raw": 0.0, "full": 0.0}, 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        arrays = read_batch()
        t1 = time.perf_counter()
        arrays = read_batch()
        features.check_finite(arrays)
        datasource.to_record_batch(features.compute(arrays), 0, "x", 0)
        t["full"] += time.perf_counter() - t1
        t["raw"] += t1 - t0
        n += len(arrays["MissingET.MET"])
    return {"events": n, **t}


def large_files(delphes_dir: Path, out_dir: Path, events_per_file: int, files_per_class: int) -> None:
    """The samples' events repeated into large uproot-written files (the layout `topoflow generate`
    writes), to see ingestion where file opens are amortised as in production."""
    import awkward as ak
    import uproot

    for c, name in SAMPLES.items():
        tree = uproot.open(delphes_dir / name)["Delphes"]
        reps = -(-events_per_file // tree.num_entries)
        data = {}
        for coll, fields in features.FIELDS.items():
            fields = (*fields, "Charge") if coll == "EFlowTrack" else fields
            data[coll] = ak.zip({f: ak.concatenate([tree[f"{coll}.{f}"].array()] * reps)[:events_per_file]
                                 for f in fields})
        for i in range(files_per_class):
            with uproot.recreate(out_dir / f"{c}_{i:03d}.root") as f:
                f.mktree("Delphes", {k: v.type for k, v in data.items()},
                         counter_name=lambda n: n + "_size", field_name=lambda o, n: o + "." + n)
                f["Delphes"].extend(data)


def spark_run(files_dir: Path, out: Path) -> dict[str, float]:
    cfg = Config()
    cfg.spark.master = "local[*]"
    cfg.ingest.datasets = {c: [str(files_dir / f"{c}_*.root")] for c in SAMPLES}
    cfg.ingest.output = str(out)
    t0 = time.perf_counter()
    summary = ingest(cfg, show_progress=False)
    return {"events": sum(summary.events_read.values()), "seconds": time.perf_counter() - t0,
            "selected": sum(summary.selected.values())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--copies", type=int, default=150, help="links of each sample per class")
    ap.add_argument("--delphes-dir", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/delphes")
    ap.add_argument("--batch-size", type=int, default=2000)
    ap.add_argument("--large-files", type=int, default=8, help="3,000-event files per class")
    args = ap.parse_args()
    cores = os.cpu_count()
    work = Path(tempfile.mkdtemp(prefix="topoflow-bench-"))
    try:
        files_dir = work / "in"
        files_dir.mkdir()
        for c, name in SAMPLES.items():
            for i in range(args.copies):
                os.link(args.delphes_dir / name, files_dir / f"{c}_{i:05d}.root")
        files = sorted(str(p) for p in files_dir.iterdir())
        sample = files[:: max(1, len(files) // 150)]  # single-core side: 150 files is plenty
        pf = per_file(sample, args.batch_size)
        pe = per_event(args.delphes_dir, repeats=10, batch=args.batch_size)
        sp = spark_run(files_dir, work / "out")
        large_dir = work / "large"
        large_dir.mkdir()
        large_files(args.delphes_dir, large_dir, events_per_file=3000, files_per_class=args.large_files)
        sp_large = spark_run(large_dir, work / "out-large")
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def row(name, events, seconds, per_core=1):
        rate = events / seconds
        return f"| {name} | {events:,} | {seconds:.1f} | {rate:,.0f} | {rate / per_core:,.0f} |"

    print(f"\ningestion throughput, real Delphes CMS samples ({cores} cores)\n")
    print("| measurement | events | seconds | events/s | events/s/core |")
    print("|---|---:|---:|---:|---:|")
    print(row("raw uproot read, 60-event files (one open + branches), 1 core", pf["events"], pf["raw"]))
    print(row("ingestion path, 60-event files (check + read + features + Arrow), 1 core", pf["events"], pf["full"]))
    print(row("raw uproot read, files open, 1,980-event batches, 1 core", pe["events"], pe["raw"]))
    print(row("ingestion path, files open, 1,980-event batches, 1 core", pe["events"], pe["full"]))
    print(row(f"topoflow ingest, 60-event real files, local Spark, {cores} cores, Parquet written",
              sp["events"], sp["seconds"], cores))
    print(row(f"topoflow ingest, 3,000-event uproot-written files, local Spark, {cores} cores",
              sp_large["events"], sp_large["seconds"], cores))
    print()
    print(f"feature cost over the raw read: {pf['full'] / pf['raw'] - 1:+.0%} (60-event files), "
          f"{pe['full'] / pe['raw'] - 1:+.0%} (files already open)")
    print(f"selected {sp['selected']:,} of {sp['events']:,} events; original: ≈ 12 events/s per core")


if __name__ == "__main__":
    main()
