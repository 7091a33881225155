"""The ingestion stage: Delphes files of each class → one Parquet dataset of selected events with
their high-level features and particle lists (plus source file and entry, for provenance).

Files are probed on the driver first, so that a bad file stops the job before anything is written
(or, with ``on_bad_file=skip``, is listed in ``_skipped.json`` next to the output).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field

from topoflow import CLASSES, datasource, delphes, storage
from topoflow.config import Config
from topoflow.errors import BadInputError, ConfigError
from topoflow.progress import spark_progress
from topoflow.spark import job_error

log = logging.getLogger(__name__)
_JOB_GROUP = "topoflow-ingest"


@dataclass
class IngestSummary:
    """What a run did; printed by the CLI and returned to Kubeflow components."""

    output: str
    events_read: dict[str, int]
    selected: dict[str, int]
    skipped: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    def table(self) -> str:
        lines = [f"{'class':<8}{'read':>12}{'selected':>12}{'fraction':>10}"]
        for c in CLASSES:
            read, sel = self.events_read.get(c, 0), self.selected.get(c, 0)
            if read:
                lines.append(f"{c:<8}{read:>12,}{sel:>12,}{sel / read:>10.1%}")
        total = sum(self.events_read.values())
        lines.append(f"{'total':<8}{total:>12,}{sum(self.selected.values()):>12,}")
        return "\n".join(lines + footer(total, self.seconds, self.skipped, self.output))


def footer(events: int, seconds: float, skipped: list[dict], output: str) -> list[str]:
    """The last lines of a Spark stage's summary (ingest, predict): speed, files left out, the output."""
    lines = [f"{seconds:.1f} s, {events / max(seconds, 1e-9):,.0f} events/s (Spark start-up included); "
             f"bad files: {len(skipped)}"]
    for s in skipped:
        where = ", ".join(f"{lo}-{hi}" for lo, hi in s["entries"] or [])
        lines.append(f"  skipped {s['file']}{' entries ' + where if where else ''}: {s['reason']}")
    return lines + [f"written to {output}"]


def ingest(cfg: Config, spark=None, show_progress: bool = True) -> IngestSummary:
    """Run ingestion as configured; returns the summary. ``spark`` defaults to a new session."""
    ic, sc = cfg.ingest, cfg.storage
    if not ic.datasets or not any(ic.datasets.values()):
        raise ConfigError(
            "no input datasets: set ingest.datasets in the config file, e.g.\n"
            "  ingest: {datasets: {ttbar: ['root://eos.example//store/tt/*.root'], ...}}\n"
            "or pass --dataset ttbar='/data/tt/*.root' (once per class)"
        )
    t0 = time.monotonic()
    # Checks that need no Spark come first: a typo'd glob or a read-only output fails in a second.
    storage.check_output(ic.output, "ingest", sc, inputs=[p for ps in ic.datasets.values() for p in ps])
    urls = [(u, CLASSES.index(c)) for c, patterns in ic.datasets.items() for p in patterns
            for u in storage.expand(p, sc)]
    if spark is None:
        from topoflow.spark import session

        spark = session(cfg.spark)
    spark.sparkContext.setJobGroup(_JOB_GROUP, f"ingest → {ic.output}")
    infos, skipped = probe_all(urls, cfg, spark, show_progress)
    if not infos:
        raise BadInputError(", ".join(s["file"] for s in skipped) or "(none)", "no readable input file left",
                            "fix the inputs listed above")
    splits = datasource.plan(infos, ic.entries_per_partition, 2 * spark.sparkContext.defaultParallelism)
    ranges = [r for split in splits for r in split.ranges]
    _, staging, _ = storage.new_staging(ic.output, sc)
    meta = {
        "stage": "ingest",
        "config_hash": hashlib.sha256(cfg.ingest.model_dump_json().encode()).hexdigest()[:16],
        "datasets": ic.datasets,
        "events_read": _events_per_class(ranges),
    }
    options = datasource.storage_options(sc)
    df = (
        spark.read.format("delphes").options(**options)
        .option("plan", json.dumps([[asdict(r) for r in split.ranges] for split in splits]))
        .option("batch_size", ic.batch_size)
        .option("on_bad_file", ic.on_bad_file)
        .option("errors_dir", storage.join(staging, "_errors"))
        .load()
    )
    total_events = sum(r.stop - r.start for r in ranges)
    with spark_progress(spark, "ingesting", len(splits), total_events, "events", show_progress):
        try:
            (df.write.format("fsparquet").mode("overwrite").options(**options)
             .option("staging", staging).option("row_group_size", ic.row_group_size)
             .option("meta", json.dumps(meta)).option("skipped", json.dumps(skipped))
             .save(ic.output))
        except Exception as e:
            raise job_error(e) from e
    manifest = storage.read_manifest(ic.output, sc)
    skipped = datasource.skipped_files(ic.output, sc)
    events_read = meta["events_read"]
    for s in skipped:  # entry ranges that failed while reading are not "read"
        if s["entries"]:
            label = next(CLASSES[r.label] for r in ranges if r.url == s["file"])
            events_read[label] -= sum(hi - lo for lo, hi in s["entries"])
    return IngestSummary(ic.output, events_read, manifest["rows_per_class"], skipped, time.monotonic() - t0)


def probe_all(urls: list[tuple[str, int]], cfg: Config, spark,
               show_progress: bool) -> tuple[list[tuple[delphes.FileInfo, int]], list[dict]]:
    """Open each (file, label) once, as a Spark job: at CERN scale (thousands of files, each open
    parsing a ~600-branch TTree) the driver alone would take minutes."""
    ic, storage_cfg = cfg.ingest, cfg.storage
    muon = ic.muon_collection

    def probe(item):
        url, label = item
        try:
            return delphes.probe(url, storage_cfg, muon), label, None
        except BadInputError as e:
            return None, label, {"file": e.url, "reason": e.problem, "fix": e.fix}

    slices = max(1, min(len(urls), 4 * spark.sparkContext.defaultParallelism))
    with spark_progress(spark, "checking files", slices, len(urls), "files", show_progress):
        try:
            results = spark.sparkContext.parallelize(urls, slices).map(probe).collect()
        except Exception as e:
            raise job_error(e) from e
    infos, skipped = [], []
    for info, label, error in results:
        if error is None:
            infos.append((info, label))
        elif ic.on_bad_file == "skip":
            skipped.append({"file": error["file"], "reason": error["reason"], "entries": None})
        else:
            raise BadInputError(error["file"], error["reason"], error["fix"])
    return infos, skipped


def _events_per_class(ranges) -> dict[str, int]:
    out = {c: 0 for c in CLASSES}
    for r in ranges:
        out[CLASSES[r.label]] += r.stop - r.start
    return out
