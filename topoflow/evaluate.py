"""The evaluation stage: exported models predict on the full test split of a prepared dataset, or
on every event of an ingested one (each model applying its own preprocessing, so that a model is
judged on another sample without re-preparing it), judged the way physicists judge a trigger (the
numbers: :mod:`topoflow.metrics`), and one JSON and Markdown report with PNG plots compares every
model given. A model folder that is damaged or was trained on differently prepared data is one
clear error naming it.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from topoflow import CLASS_TITLES, CLASSES, dataset, datasource, export, plots, storage
from topoflow.config import Config, StorageConfig
from topoflow.errors import BadInputError, ConfigError
from topoflow.metrics import RESAMPLES, SIGNALS, metrics
from topoflow.preprocessing import FILE_NAME, Preprocessing

RAW_COLUMNS = ["label", "hlf", "particles"]


def is_ingested(url: str, sc: StorageConfig) -> bool:
    """Whether ``url`` holds raw (ingested) events rather than a prepared dataset: its manifest says
    so, or, for data written by others, it has no preprocessing.json and the ingested columns. A
    prepared split (already scaled, with ``n_particles``) is not: scaling it again would be wrong."""
    import pyarrow.parquet as pq

    fs, path = storage.filesystem(url, sc)
    with storage.storage_errors(url):
        if fs.exists(storage.join(path, FILE_NAME)) or not fs.exists(path):
            return False
        stage = storage.output_stage(fs, path)
        if stage:
            return stage == "ingest"
        with fs.open(datasource.parquet_files(url, sc)[0]) as f:
            columns = set(pq.read_schema(f).names)
    return set(RAW_COLUMNS) <= columns and "n_particles" not in columns


def raw_batches(url: str, sc: StorageConfig, batch_size: int):
    """``(labels, hlf, particle rows, counts)`` per batch of an ingested dataset, as ingestion wrote
    them (the arguments of :meth:`topoflow.export.Exported.predict`); one batch in memory at a time."""
    import pyarrow.parquet as pq

    fs, _ = storage.filesystem(url, sc)
    for path in datasource.parquet_files(url, sc):
        with storage.storage_errors(url), fs.open(path) as f:
            for b in pq.ParquetFile(f).iter_batches(batch_size=batch_size, columns=RAW_COLUMNS):
                yield (b.column("label").to_numpy(), *datasource.feature_arrays(b))


def predict(model_url: str, data_url: str, cfg: Config) -> tuple[np.ndarray, np.ndarray, dict]:
    """Labels and probabilities of the exported model, with its card: on every event
    of an ingested ``data_url`` through the model's own preprocessing, or on the test split of a
    prepared one, which must have been prepared with the model's transform (else its inputs are
    mis-scaled and its numbers meaningless)."""
    exported = export.load(model_url, cfg.storage)
    size = cfg.evaluate.batch_size
    if is_ingested(data_url, cfg.storage):
        batches = ((exported.predict(hlf, rows, counts), y) for y, hlf, rows, counts in
                   raw_batches(data_url, cfg.storage, size))
    else:
        ours, theirs = exported.preprocessing.fingerprint(), Preprocessing.load(data_url, cfg.storage).fingerprint()
        if ours != theirs:
            raise BadInputError(model_url, f"this model was trained with preprocessing {ours}, but the dataset "
                                f"{data_url} was prepared with preprocessing {theirs}: its features would be "
                                "scaled differently from what the model learnt",
                                f"evaluate on the dataset the model was trained on ({exported.card['data']}) or "
                                f"on an ingested one, or retrain on this one (topoflow train --data {data_url})")
        batches = ((exported.run(x), y.argmax(axis=1)) for x, y in dataset.iter_batches(
            storage.join(data_url, "test"), cfg.storage, size, inputs=exported.inputs))
    probs, labels = zip(*batches)
    return np.concatenate(labels), np.concatenate(probs), exported.card


@dataclass
class Report:
    output: str
    results: dict[str, dict]
    curves: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # model → (labels, probabilities)

    def table(self) -> str:
        head = f"{'model':<12}{'accuracy':>9}" + "".join(f"{'AUC ' + c:>18}" for c in CLASSES)
        head += "".join(f"{'FPR@99% ' + c:>15}" for c in SIGNALS)
        lines = [head]
        for name, r in self.results.items():
            lines.append(f"{name:<12}{r['accuracy']:>9.4f}" + "".join(f"{_auc(r, c):>18}" for c in CLASSES)
                         + "".join(f"{_num(r['trigger'][c] and r['trigger'][c]['fpr_at_99pct_efficiency']):>15}"
                                   for c in SIGNALS))
        return "\n".join(lines + _cautions(self.results) + [f"report: {self.output}"])


def evaluate(cfg: Config) -> Report:
    """Evaluate every model in ``cfg.evaluate.models`` and write one comparative report."""
    ec = cfg.evaluate
    if not ec.models:
        raise ConfigError("no models to evaluate: pass --model FOLDER (repeatable) or set evaluate.models")
    storage.check_output(ec.output, "evaluate", cfg.storage, inputs=[ec.data, *ec.models])
    results, curves = {}, {}
    ingested = is_ingested(ec.data, cfg.storage)
    with tempfile.TemporaryDirectory(prefix="topoflow-report-") as tmp:
        folder = Path(tmp)
        for url in ec.models:
            y, prob, card = predict(url, ec.data, cfg)
            name = card["model"] if card["model"] not in results else url.rstrip("/").rsplit("/", 1)[-1]
            results[name] = metrics(y, prob) | {"model_url": url, "history": card.get("history", {})}
            curves[name] = (y, prob)
        plots.report_plots(folder, results, curves)
        (folder / "report.json").write_text(json.dumps(results, indent=2, sort_keys=True))
        (folder / "report.md").write_text(markdown(results, ec.data, ingested))
        storage.publish_folder(str(folder), ec.output, cfg.storage, {"stage": "evaluate", "models": list(results)})
    return Report(ec.output, results, curves)


def _num(value) -> str:
    """A metric, or n/a where the test split cannot define it (a class without events)."""
    return "n/a" if value is None else f"{value:.4f}"


def _auc(r: dict, c: str) -> str:
    return "n/a" if r["auc"][c] is None else f"{r['auc'][c]:.4f} ± {r['auc_std'][c]:.4f}"


def _cautions(results: dict[str, dict]) -> list[str]:
    """The cautions of all models, once each (they share the test split)."""
    return list(dict.fromkeys(line for r in results.values() for line in r["cautions"]))


def markdown(results: dict[str, dict], data: str, ingested: bool = False) -> str:
    first = next(iter(results.values()))
    counts = ", ".join(f"{CLASS_TITLES[c]} {n:,}" for c, n in first["events_per_class"].items())
    events = f"({first['events']:,} events: {counts})"
    on = (f"the ingested dataset `{data}`, every event {events}, with each model's own preprocessing; a model "
          "prepared from this dataset saw some of these events in training" if ingested else
          f"the test split of `{data}` {events}, which no model saw in training")
    lines = ["# topoflow evaluation", "",
             f"All numbers are on {on}. AUC ± its standard deviation over {RESAMPLES} bootstrap resamples.",
             *(f"- **{line}**" for line in _cautions(results)), "",
             "## ROC AUC (one class against the rest) and accuracy", "",
             "| model | events | accuracy | " + " | ".join(CLASS_TITLES[c] for c in CLASSES) + " |",
             "|---|---:|---:|" + "---:|" * len(CLASSES)]
    for name, r in results.items():
        lines.append(f"| {name} | {r['events']:,} | {r['accuracy']:.4f} | "
                     + " | ".join(_auc(r, c) for c in CLASSES) + " |")
    lines += ["", "## Trigger view", "",
              "| model | signal | eff. @ 1 % FPR | eff. @ 10 % FPR | FPR @ 99 % eff. | rejection @ 99 % eff. |",
              "|---|---|---:|---:|---:|---:|"]
    for name, r in results.items():
        for c in SIGNALS:
            t = r["trigger"][c]
            if t is None:
                lines.append(f"| {name} | {CLASS_TITLES[c]} | n/a | n/a | n/a | n/a |")
                continue
            lines.append(f"| {name} | {CLASS_TITLES[c]} | {t['efficiency_at_fpr_0.01']:.4f} | "
                         f"{t['efficiency_at_fpr_0.1']:.4f} | {t['fpr_at_99pct_efficiency']:.4f} | "
                         f"{t['background_rejection_at_99pct_efficiency']:.1f} |")
    lines += ["", "Plots: `roc_<class>.png`, `confusion_<model>.png`, `scores_<model>.png`, `training_<model>.png`."]
    return "\n".join(lines) + "\n"
