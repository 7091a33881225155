"""Everything serving needs, in one folder at any fsspec URL, published atomically:

    model.keras  saved_model/  model.onnx  preprocessing.json  model_card.json  model_card.md

This module owns that folder: :func:`export` writes it and :func:`load` reads it back. The
preprocessing artifact travels with the model, and :meth:`Exported.predict` applies it to raw
features, so that evaluation and serving apply exactly the transform the model was trained with,
through one code path.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from topoflow import CLASSES, __version__, storage
from topoflow.config import Config, StorageConfig
from topoflow.dataset import pad_particles
from topoflow.errors import BadInputError
from topoflow.features import PARTICLE_NAMES
from topoflow.onnx_export import to_onnx
from topoflow.preprocessing import FILE_NAME, Preprocessing

CARD = "model_card"
CARD_FORMAT, CARD_VERSION = "topoflow-model-card", 1
MODEL_FILE = "model.keras"
RE_EXPORT = "re-export the model with topoflow train"
MODEL_FILES = {  # what an exported model folder must hold: file -> (problem when missing, fix)
    MODEL_FILE: (f"no {MODEL_FILE}: no such folder, or not an exported model",
                 "point --model at a folder written by topoflow train"),
    f"{CARD}.json": (f"no {CARD}.json: not a folder written by topoflow train", RE_EXPORT),
    FILE_NAME: (f"no {FILE_NAME}: the transform the model was trained with is unknown", RE_EXPORT),
}


def export(model, output: str, sc: StorageConfig, pre: Preprocessing, cfg: Config, history: dict) -> None:
    """Write the Keras file, a TF SavedModel, ONNX, the preprocessing and the model card to ``output``."""
    with tempfile.TemporaryDirectory(prefix="topoflow-export-") as tmp:
        folder = Path(tmp)
        model.save(folder / MODEL_FILE)
        model.export(str(folder / "saved_model"), format="tf_saved_model", verbose=False)
        to_onnx(model, folder / "model.onnx")  # the native GRU op: padding costs no GRU steps
        (folder / FILE_NAME).write_text(pre.to_json())
        card = model_card(model, pre, cfg, history)
        (folder / f"{CARD}.json").write_text(json.dumps(card, indent=2, sort_keys=True))
        (folder / f"{CARD}.md").write_text(card_markdown(card))
        storage.publish_folder(str(folder), output, sc, {"stage": "train", "model": card["model"],
                                                         "files": sorted(p.name for p in folder.iterdir())})


def model_card(model, pre: Preprocessing, cfg: Config, history: dict) -> dict:
    tc = cfg.train
    return {
        "format": CARD_FORMAT,
        "version": CARD_VERSION,
        "model": tc.model,
        "name": model.name,
        "parameters": int(model.count_params()),
        "inputs": _inputs(model),
        "output": f"softmax probabilities for {list(CLASSES)}",
        "classes": list(CLASSES),
        "data": tc.data,
        "training": tc.model_dump(mode="json"),
        "final_metrics": {k: v[-1] for k, v in history.items() if v},
        "splits": {"train": "fits the weights; metrics without a prefix", "validation": "val_* metrics, every epoch",
                   "test": "not seen in training: its numbers come from topoflow evaluate"},
        "history": history,
        "preprocessing": {"file": FILE_NAME, "version": json.loads(pre.to_json())["version"],
                          "fitted_on": pre.fitted_on},
        "topoflow_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _inputs(model) -> dict[str, list]:
    return {i.name: list(i.shape) for i in model.inputs}


def card_markdown(card: dict) -> str:
    metrics = "\n".join(f"| {k} | {v:.4f} |" for k, v in sorted(card["final_metrics"].items()))
    sizes = ", ".join(f"{k}={v}" for k, v in card["training"].items()
                      if k in ("gru_units", "hlf_units", "dense_units", "dropout", "learning_rate", "batch_size", "epochs"))
    return f"""# Model card: topoflow {card['model']} classifier

- Classes (softmax order): {', '.join(card['classes'])}
- Parameters: {card['parameters']:,}; inputs: {', '.join(f'{k} {v}' for k, v in card['inputs'].items())}
- Trained on: `{card['data']}` ({card['preprocessing']['fitted_on'].get('events', '?')} training events fitted the scalers)
- Settings: {sizes}
- Preprocessing: `{card['preprocessing']['file']}` v{card['preprocessing']['version']} (apply it to raw features before the model)
- topoflow {card['topoflow_version']}, {card['created']}

| metric (last epoch) | value |
|---|---:|
{metrics}

Metrics without a prefix are on the `train` split, `val_*` on the `validation` split; the `test`
split is never seen in training: `topoflow evaluate` reports on it.
"""


@dataclass
class Exported:
    """An exported model folder, read back and checked by :func:`load`."""

    model: Any  # keras.Model
    card: dict
    preprocessing: Preprocessing
    url: str

    def model_inputs(self, hlf: np.ndarray, rows: np.ndarray, counts: np.ndarray) -> dict[str, np.ndarray]:
        """The model's inputs for raw features as ingestion writes them (see :class:`Preprocessing`):
        unscaled HLF ``(n, 14)``, the unpadded particle rows of all events back to back
        ``(sum(counts), 19)`` and ``counts`` per event. Scaled by the model's own preprocessing and
        padded at the end to the batch's longest event, as training saw them."""
        x = {}
        if "hlf" in self.card["inputs"]:
            x["hlf"] = self.preprocessing.transform_hlf(hlf)
        if "particles" in self.card["inputs"]:
            scaled = pa.array(self.preprocessing.transform_particles(rows).ravel())
            offsets = pa.array(np.concatenate([[0], np.cumsum(counts)]), pa.int32())
            x["particles"] = pad_particles(pa.ListArray.from_arrays(
                offsets, pa.FixedSizeListArray.from_arrays(scaled, len(PARTICLE_NAMES))))
        return x

    def predict(self, hlf: np.ndarray, rows: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """Softmax probabilities ``(n, 3)`` for one batch of raw events (arguments of :meth:`model_inputs`)."""
        return self.model.predict_on_batch(self.model_inputs(hlf, rows, counts))


def load(url: str, sc: StorageConfig) -> Exported:
    """The exported model folder at ``url``, checked so that a wrong, damaged or foreign folder is one
    clear error naming ``url`` and the fix: the files are there, the card and preprocessing are of
    versions this topoflow knows, and the card describes this model. Nothing in the folder runs: only
    JSON and ``model.keras`` are read, the latter with Keras' safe mode (no pickled or marshalled code)."""
    from topoflow.tf import import_tensorflow

    import_tensorflow()
    import keras

    fs, path = storage.filesystem(url, sc)
    card_url = storage.join(url, f"{CARD}.json")
    with storage.storage_errors(url):
        for name, (problem, fix) in MODEL_FILES.items():
            if not fs.exists(storage.join(path, name)):
                raise BadInputError(url, problem, fix)
        try:
            card = json.loads(fs.cat(storage.join(path, f"{CARD}.json")))
            form, version = card.get("format"), card.get("version")
        except (ValueError, AttributeError) as e:
            raise BadInputError(card_url, f"unreadable model card: {e}", RE_EXPORT) from e
        if form is None:
            raise BadInputError(card_url, "the model card has no format: an export of an older topoflow", RE_EXPORT)
        if (form, version) != (CARD_FORMAT, CARD_VERSION):
            raise BadInputError(card_url, f"model card format {form!r} v{version} is unknown to this topoflow "
                                f"({__version__}, which reads {CARD_FORMAT!r} v{CARD_VERSION})",
                                f"{RE_EXPORT}, or use the topoflow that wrote it ({card.get('topoflow_version')})")
        try:
            pre = Preprocessing.from_json(fs.cat(storage.join(path, FILE_NAME)).decode(), storage.join(url, FILE_NAME))
        except BadInputError as e:
            raise BadInputError(e.url, e.problem, RE_EXPORT) from e
        with tempfile.TemporaryDirectory() as tmp:
            fs.get(storage.join(path, MODEL_FILE), f"{tmp}/{MODEL_FILE}")
            try:  # inference only: the optimizer and loss are not restored
                model = keras.saving.load_model(f"{tmp}/{MODEL_FILE}", compile=False, safe_mode=True)
            except Exception as e:  # Keras raises many types for a damaged file; its messages name our temp copy
                raise BadInputError(storage.join(url, MODEL_FILE), f"Keras cannot load {MODEL_FILE} "
                                    f"({type(e).__name__}): the file is truncated, corrupt or not a Keras model, "
                                    "or holds code (a Lambda layer), which safe mode does not run",
                                    f"{RE_EXPORT}, or copy the whole folder again") from e
    if _inputs(model) != card.get("inputs"):
        raise BadInputError(url, f"the model card names the inputs {card.get('inputs')}, but {MODEL_FILE} takes "
                            f"{_inputs(model)}: the files come from different exports",
                            f"copy the whole folder of one export again, or {RE_EXPORT}")
    return Exported(model, card, pre, url)
