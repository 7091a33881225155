"""The generation stage: Pythia 8 events of each class through topoflow's fast detector simulation,
written as Delphes-format ROOT files (TTree ``Delphes``) that ``topoflow ingest`` reads like real
Delphes output. Files are made in parallel processes, one seed per file, and published together.
QCD comes in two components (``qcd_*`` and ``qcd_fake_*`` files; the glob ``qcd_*.root`` takes both).

    <output>/ttbar_0000.root  <output>/wjets_0000.root  <output>/qcd_0000.root  <output>/qcd_fake_0000.root  …
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field

import numpy as np

from topoflow import CLASSES, storage
from topoflow.config import Config, StorageConfig
from topoflow.progress import progress_bar


@dataclass
class GenerateSummary:
    output: str
    per_class: dict[str, dict[str, float]] = field(default_factory=dict)
    seconds: float = 0.0

    def table(self) -> str:
        lines = [f"{'class':<8}{'events':>9}{'tried':>10}{'filter eff.':>12}{'events/s/core':>15}"]
        for c, s in self.per_class.items():
            lines.append(f"{c:<8}{s['kept']:>9,}{s['tried']:>10,}{s['kept'] / max(s['tried'], 1):>12.4f}"
                         f"{s['kept'] / max(s['cpu_seconds'], 1e-9):>15.1f}")
        lines.append(f"written to {self.output} in {self.seconds:.1f} s")
        return "\n".join(lines)


def file_seed(base: int, cls: str, index: int) -> int:
    """A seed per file, so that the same settings always give the same files."""
    return int.from_bytes(hashlib.sha256(f"{base}/{cls}/{index}".encode()).digest()[:4], "little") % 900_000_000


def make_file(process: str, index: int, n: int, seed: int, url: str, cfg: StorageConfig) -> dict:
    """Generate ``n`` events of ``process`` and write them to ``url`` (runs in a worker process)."""
    from topoflow.generate import detector, pythia, writer

    t0, stats = time.process_time(), {}
    batch = list(pythia.events(process, seed, n, stats))
    arrays = detector.simulate(batch, np.random.default_rng(seed), fake_leptons=process == "qcd_fake")
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, "events.root")
        writer.write(local, arrays)
        fs, path = storage.filesystem(url, cfg)
        fs.put(local, path)
    return {"class": process, "index": index, "kept": stats["kept"], "tried": stats["tried"],
            "cpu_seconds": time.process_time() - t0}


def generate(cfg: Config, show_progress: bool = True) -> GenerateSummary:
    """Generate the configured events; returns per-class counts, filter efficiency and speed."""
    gc, sc = cfg.generate, cfg.storage
    t0 = time.monotonic()
    storage.check_output(gc.output, "generate", sc)
    fakes = round(gc.events.get("qcd", 0) * gc.qcd_fake_fraction)
    per_process = {**gc.events, "qcd": gc.events.get("qcd", 0) - fakes, "qcd_fake": fakes}
    jobs = [(p, i, min(gc.events_per_file, n - start))
            for p in (*CLASSES, "qcd_fake") if (n := per_process.get(p, 0)) > 0
            for i, start in enumerate(range(0, n, gc.events_per_file))]
    fs, staging_url, staging = storage.new_staging(gc.output, sc)
    final = storage.filesystem(gc.output, sc)[1]
    fs.makedirs(staging, exist_ok=True)
    per_class = {c: {"kept": 0, "tried": 0, "cpu_seconds": 0.0, "files": 0} for c, _, _ in jobs}
    try:
        with progress_bar("generating", sum(n for _, _, n in jobs), "events", enabled=show_progress) as advance, \
                ProcessPoolExecutor(gc.workers or os.cpu_count()) as pool:
            futures = [pool.submit(make_file, c, i, n, file_seed(gc.seed, c, i),
                                   storage.join(staging_url, f"{c}_{i:04d}.root"), sc) for c, i, n in jobs]
            for f in as_completed(futures):
                r = f.result()
                s = per_class[r["class"]]
                s["kept"] += r["kept"]
                s["tried"] += r["tried"]
                s["cpu_seconds"] += r["cpu_seconds"]
                s["files"] += 1
                advance(r["kept"])
    except BaseException:
        storage.discard(fs, staging)
        raise
    storage.publish(fs, staging, final, {"stage": "generate", "settings": gc.model_dump(mode="json"),
                                        "per_class": per_class})
    return GenerateSummary(gc.output, per_class, time.monotonic() - t0)
