"""The evaluation stage: trained models on the full test split, judged the way physicists judge a
trigger. Per class (one against the rest): ROC AUC; for the signals tt̄ and W+jets the efficiency
at 1 % and 10 % false-positive rate; and, as Nguyen et al. highlight, the false-positive rate left
at 99 % signal efficiency. Plus accuracy and the confusion matrix, as PNG plots and a JSON and
Markdown report that compares every model given.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from topoflow import CLASS_TITLES, CLASSES, dataset, storage
from topoflow.config import Config
from topoflow.errors import BadInputError

SIGNALS = ("ttbar", "wjets")
FPR_POINTS = (0.01, 0.10)
EFFICIENCY = 0.99


def roc_curve(is_signal: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False- and true-positive rates at every distinct score threshold, from (0, 0) to (1, 1)."""
    order = np.argsort(-score, kind="stable")
    y, s = is_signal[order].astype(np.float64), score[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # last index of each distinct score
    tps, fps = np.cumsum(y)[last], np.cumsum(1 - y)[last]
    return np.r_[0.0, fps / max(fps[-1], 1)], np.r_[0.0, tps / max(tps[-1], 1)]


def metrics(y_true: np.ndarray, prob: np.ndarray) -> dict:
    """All numbers of the report for one model: ``y_true`` class indices, ``prob`` (n, 3)."""
    pred = prob.argmax(axis=1)
    confusion = np.zeros((3, 3), dtype=np.int64)
    np.add.at(confusion, (y_true, pred), 1)
    out = {"events": int(len(y_true)), "accuracy": float((pred == y_true).mean()),
           "confusion": confusion.tolist(), "auc": {}, "trigger": {}}
    for k, c in enumerate(CLASSES):
        n_signal = int((y_true == k).sum())
        if n_signal in (0, len(y_true)):  # a ROC needs both signal and background
            out["auc"][c] = None
            if c in SIGNALS:
                out["trigger"][c] = None
            continue
        fpr, tpr = roc_curve(y_true == k, prob[:, k])
        out["auc"][c] = float(np.trapezoid(tpr, fpr))
        if c in SIGNALS:
            fpr_99 = float(np.interp(EFFICIENCY, tpr, fpr))
            out["trigger"][c] = {
                **{f"efficiency_at_fpr_{p:g}": float(np.interp(p, fpr, tpr)) for p in FPR_POINTS},
                "fpr_at_99pct_efficiency": fpr_99,
                "background_rejection_at_99pct_efficiency": 1 / fpr_99 if fpr_99 > 0 else float("inf"),
            }
    return out


def predict(model_url: str, data_url: str, cfg: Config) -> tuple[np.ndarray, np.ndarray, dict, object]:
    """Labels and probabilities on the test split of ``data_url`` for the exported model."""
    from topoflow.tf import import_tensorflow

    import_tensorflow()
    import keras

    fs, path = storage.filesystem(model_url, cfg.storage)
    with storage.storage_errors(model_url):
        if not fs.exists(storage.join(path, "model.keras")):
            raise BadInputError(model_url, "no model.keras here", "point at a folder written by topoflow train")
        card = json.loads(fs.cat(storage.join(path, "model_card.json")))
        with tempfile.TemporaryDirectory() as tmp:
            fs.get(storage.join(path, "model.keras"), f"{tmp}/model.keras")
            model = keras.saving.load_model(f"{tmp}/model.keras")
    labels, probs = [], []
    for x, y in dataset.iter_batches(storage.join(data_url, "test"), cfg.storage, cfg.evaluate.batch_size,
                                     inputs=tuple(card["inputs"])):
        probs.append(model.predict_on_batch(x))
        labels.append(y.argmax(axis=1))
    return np.concatenate(labels), np.concatenate(probs), card, model


@dataclass
class Report:
    output: str
    results: dict[str, dict]

    def table(self) -> str:
        head = f"{'model':<12}{'accuracy':>9}" + "".join(f"{'AUC ' + c:>11}" for c in CLASSES)
        head += "".join(f"{'FPR@99% ' + c:>15}" for c in SIGNALS)
        lines = [head]
        for name, r in self.results.items():
            lines.append(f"{name:<12}{r['accuracy']:>9.4f}" + "".join(f"{_num(r['auc'][c]):>11}" for c in CLASSES)
                         + "".join(f"{_num(r['trigger'][c] and r['trigger'][c]['fpr_at_99pct_efficiency']):>15}"
                                   for c in SIGNALS))
        return "\n".join(lines + [f"report: {self.output}"])


def evaluate(cfg: Config) -> Report:
    """Evaluate every model in ``cfg.evaluate.models`` and write one comparative report."""
    ec = cfg.evaluate
    results, curves = {}, {}
    with tempfile.TemporaryDirectory(prefix="topoflow-report-") as tmp:
        folder = Path(tmp)
        for url in ec.models:
            y, prob, card, _ = predict(url, ec.data, cfg)
            name = card["model"] if card["model"] not in results else url.rstrip("/").rsplit("/", 1)[-1]
            results[name] = metrics(y, prob) | {"model_url": url, "history": card.get("history", {})}
            curves[name] = (y, prob)
        from topoflow import plots

        plots.report_plots(folder, results, curves)
        (folder / "report.json").write_text(json.dumps(results, indent=2, sort_keys=True))
        (folder / "report.md").write_text(markdown(results))
        storage.publish_folder(str(folder), ec.output, cfg.storage, {"stage": "evaluate", "models": list(results)})
    return Report(ec.output, results)


def _num(value) -> str:
    """A metric, or n/a where the test split cannot define it (a class without events)."""
    return "n/a" if value is None else f"{value:.4f}"


def markdown(results: dict[str, dict]) -> str:
    lines = ["# topoflow evaluation", "", "## ROC AUC (one class against the rest) and accuracy", "",
             "| model | events | accuracy | " + " | ".join(CLASS_TITLES[c] for c in CLASSES) + " |",
             "|---|---:|---:|" + "---:|" * len(CLASSES)]
    for name, r in results.items():
        lines.append(f"| {name} | {r['events']:,} | {r['accuracy']:.4f} | "
                     + " | ".join(_num(r["auc"][c]) for c in CLASSES) + " |")
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
