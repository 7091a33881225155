"""The evaluation stage: exported models predict on the full test split, judged the way physicists
judge a trigger (the numbers: :mod:`topoflow.metrics`), and one JSON and Markdown report with PNG
plots compares every model given. A model folder that is damaged or was trained on differently
prepared data is one clear error naming it.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from topoflow import CLASS_TITLES, CLASSES, dataset, plots, storage
from topoflow.config import Config
from topoflow.errors import BadInputError, ConfigError
from topoflow.export import CARD
from topoflow.metrics import RESAMPLES, SIGNALS, metrics
from topoflow.preprocessing import FILE_NAME, Preprocessing

MODEL_FILE = "model.keras"
RE_EXPORT = "re-export the model with topoflow train"
MODEL_FILES = {  # what an exported model folder must hold: file -> (problem when missing, fix)
    MODEL_FILE: (f"no {MODEL_FILE}: no such folder, or not an exported model",
                 "point --model at a folder written by topoflow train"),
    f"{CARD}.json": (f"no {CARD}.json: not a folder written by topoflow train", RE_EXPORT),
    FILE_NAME: (f"no {FILE_NAME}: the transform the model was trained with is unknown", RE_EXPORT),
}


def load_model(url: str, cfg: Config) -> tuple[object, dict, Preprocessing]:
    """The Keras model, model card and preprocessing of an exported model folder, so that a wrong or
    damaged folder is one clear error naming ``url``. Keras' safe mode stays on: no code stored in
    the file runs."""
    from topoflow.tf import import_tensorflow

    import_tensorflow()
    import keras

    fs, path = storage.filesystem(url, cfg.storage)
    with storage.storage_errors(url):
        for name, (problem, fix) in MODEL_FILES.items():
            if not fs.exists(storage.join(path, name)):
                raise BadInputError(url, problem, fix)
        try:
            card = json.loads(fs.cat(storage.join(path, f"{CARD}.json")))
        except ValueError as e:
            raise BadInputError(storage.join(url, f"{CARD}.json"), f"unreadable model card: {e}", RE_EXPORT) from e
        pre = Preprocessing.from_json(fs.cat(storage.join(path, FILE_NAME)).decode(), storage.join(url, FILE_NAME))
        with tempfile.TemporaryDirectory() as tmp:
            fs.get(storage.join(path, MODEL_FILE), f"{tmp}/{MODEL_FILE}")
            try:
                model = keras.saving.load_model(f"{tmp}/{MODEL_FILE}")
            except Exception as e:  # Keras raises many types for a damaged file; its messages name our temp copy
                raise BadInputError(storage.join(url, MODEL_FILE), f"Keras cannot load {MODEL_FILE} "
                                    f"({type(e).__name__}): the file is truncated, corrupt or not a Keras model",
                                    f"{RE_EXPORT}, or copy the whole folder again") from e
    return model, card, pre


def predict(model_url: str, data_url: str, cfg: Config) -> tuple[np.ndarray, np.ndarray, dict, object]:
    """Labels and probabilities on the test split of ``data_url`` for the exported model, which must
    have been trained on data prepared with the same transform (else its inputs are mis-scaled and
    its numbers meaningless)."""
    model, card, pre = load_model(model_url, cfg)
    ours, theirs = pre.fingerprint(), Preprocessing.load(data_url, cfg.storage).fingerprint()
    if ours != theirs:
        raise BadInputError(model_url, f"this model was trained with preprocessing {ours}, but the dataset "
                            f"{data_url} was prepared with preprocessing {theirs}: its features would be scaled "
                            "differently from what the model learnt",
                            f"evaluate on the dataset the model was trained on ({card['data']}), "
                            f"or retrain on this one (topoflow train --data {data_url})")
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
    with tempfile.TemporaryDirectory(prefix="topoflow-report-") as tmp:
        folder = Path(tmp)
        for url in ec.models:
            y, prob, card, _ = predict(url, ec.data, cfg)
            name = card["model"] if card["model"] not in results else url.rstrip("/").rsplit("/", 1)[-1]
            results[name] = metrics(y, prob) | {"model_url": url, "history": card.get("history", {})}
            curves[name] = (y, prob)
        plots.report_plots(folder, results, curves)
        (folder / "report.json").write_text(json.dumps(results, indent=2, sort_keys=True))
        (folder / "report.md").write_text(markdown(results, ec.data))
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


def markdown(results: dict[str, dict], data: str) -> str:
    first = next(iter(results.values()))
    counts = ", ".join(f"{CLASS_TITLES[c]} {n:,}" for c, n in first["events_per_class"].items())
    lines = ["# topoflow evaluation", "",
             f"All numbers are on the test split of `{data}` ({first['events']:,} events: {counts}), which no "
             f"model saw in training. AUC ± its standard deviation over {RESAMPLES} bootstrap resamples.",
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
