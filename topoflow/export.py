"""Everything serving needs, in one folder at any fsspec URL, published atomically:

    model.keras  saved_model/  model.onnx  triton/  preprocessing.json  model_card.json  model_card.md

(``triton/``: the ONNX model as a Triton model repository, :mod:`topoflow.triton`).

This module owns that folder: :func:`export` writes it and :func:`load` reads it back, run by Keras,
ONNX Runtime or TensorFlow (``backend``). The preprocessing artifact travels with the model, and
:meth:`Exported.predict` applies it to raw features, so that evaluation, prediction and serving
apply exactly the transform the model was trained with, through one code path.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from topoflow import CLASSES, __version__, storage, triton
from topoflow.config import Config, StorageConfig
from topoflow.errors import BadInputError
from topoflow.extras import require
from topoflow.models import ENGINE_NOTES
from topoflow.onnx_export import OUTPUT, to_onnx
from topoflow.preprocessing import FILE_NAME, Preprocessing, pad

CARD = "model_card"
CARD_FORMAT, CARD_VERSION = "topoflow-model-card", 1
MODEL_FILE = "model.keras"
ONNX_FILE, SAVED_MODEL, TRITON = "model.onnx", "saved_model", "triton"
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
        to_onnx(model, folder / ONNX_FILE)  # the native GRU op: padding costs no GRU steps
        (folder / FILE_NAME).write_text(pre.to_json())
        card = model_card(model, pre, cfg, history)
        triton.write_repository(folder / ONNX_FILE, folder / TRITON, card)
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
        "engine": {"name": tc.engine, "note": ENGINE_NOTES.get(tc.engine, "")},
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


BACKENDS = ("keras", "onnx", "saved_model")  # what runs the model: its file in the folder
Runner = Callable[[dict[str, np.ndarray]], np.ndarray]  # model inputs -> probabilities (n, 3)
# Events per model call. Batching beyond 16-32 events gains nothing on CPU, while larger batches of
# length-sorted events span more lengths: calls of 256 typical events ran 2.3x faster in batches of 32
# than in one batch (benchmarks/serving.py's events, ONNX Runtime, one thread).
BATCH = 32


@dataclass
class Exported:
    """An exported model folder, read back and checked by :func:`load`, ready to predict."""

    run: Runner
    card: dict
    preprocessing: Preprocessing
    url: str
    backend: str = "keras"

    @property
    def inputs(self) -> tuple[str, ...]:
        return tuple(self.card["inputs"])

    def model_inputs(self, hlf: np.ndarray, rows: np.ndarray, counts: np.ndarray) -> dict[str, np.ndarray]:
        """The model's inputs for raw features as ingestion writes them (see :class:`Preprocessing`):
        unscaled HLF ``(n, 14)``, the unpadded particle rows of all events back to back
        ``(sum(counts), 19)`` and ``counts`` per event. Scaled by the model's own preprocessing and
        padded at the end to the batch's longest event, as training saw them."""
        x = {}
        if "hlf" in self.inputs:
            x["hlf"] = self.preprocessing.transform_hlf(hlf)
        if "particles" in self.inputs:
            x["particles"] = pad(self.preprocessing.transform_particles(rows), counts)
        return x

    def predict(self, hlf: np.ndarray, rows: np.ndarray, counts: np.ndarray, batch: int = BATCH) -> np.ndarray:
        """Softmax probabilities ``(n, 3)`` float32 for raw events (arguments of :meth:`model_inputs`).

        Events run ``batch`` at a time in order of length, so that a batch is padded only to
        events of about its own length: a batch costs about the sum of its events' lengths, never
        ``batch`` x the longest event of the call (ONNX Runtime steps every event of a batch to its
        longest). No empty batch is ever run."""
        counts = np.asarray(counts, dtype=np.int64)
        out = np.empty((len(counts), len(self.card["classes"])), dtype=np.float32)
        order = np.argsort(counts, kind="stable") if "particles" in self.inputs else np.arange(len(counts))
        starts = np.cumsum(counts) - counts
        for first in range(0, len(order), batch):
            idx = order[first:first + batch]
            c = counts[idx]
            row_idx = np.repeat(starts[idx] - (np.cumsum(c) - c), c) + np.arange(c.sum())
            out[idx] = self.run(self.model_inputs(hlf[idx], rows[row_idx], c))
        return out

    def predict_padded(self, hlf: np.ndarray, particles: np.ndarray, lengths: np.ndarray | None = None,
                       batch: int = BATCH) -> np.ndarray:
        """:meth:`predict` for particles given padded at the end ``(n, L, 19)`` (see :func:`unpad`)."""
        rows, lengths = unpad(particles, lengths)
        return self.predict(hlf, rows, lengths, batch)


def unpad(particles: np.ndarray, lengths: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The rows of events padded at the end ``(n, L, 19)`` back to back, and each event's length:
    ``lengths`` if given (a ValueError unless 0 ≤ length ≤ L), else up to its last row that is not all
    zeros (a real particle always has energy)."""
    n, length = particles.shape[:2]
    if lengths is None:
        real = np.any(particles != 0, axis=2)
        last = np.argmax(real[:, ::-1], axis=1) if length else np.zeros(n, np.int64)  # argmax refuses L = 0
        lengths = np.where(real.any(axis=1), length - last, 0)
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(bad := np.flatnonzero((lengths < 0) | (lengths > length))):
        raise ValueError(f"{lengths[bad[0]]} at [{bad[0]}], expected 0 to {length} (the rows per event)")
    return particles[np.arange(length)[None, :] < lengths[:, None]], lengths


def _keras(fs, path: str, url: str, threads: int | None) -> Runner:
    """The Keras model: only ``model.keras`` is read, with safe mode (no pickled or marshalled code)."""
    from topoflow.tf import import_tensorflow

    import_tensorflow()
    import keras

    with tempfile.TemporaryDirectory() as tmp:
        fs.get(storage.join(path, MODEL_FILE), f"{tmp}/{MODEL_FILE}")
        try:  # inference only: the optimizer and loss are not restored
            model = keras.saving.load_model(f"{tmp}/{MODEL_FILE}", compile=False, safe_mode=True)
        except Exception as e:  # Keras raises many types for a damaged file; its messages name our temp copy
            raise BadInputError(storage.join(url, MODEL_FILE), f"Keras cannot load {MODEL_FILE} "
                                f"({type(e).__name__}): the file is truncated, corrupt or not a Keras model, "
                                "or holds code (a Lambda layer), which safe mode does not run",
                                f"{RE_EXPORT}, or copy the whole folder again") from e

    def run(x: dict[str, np.ndarray]) -> np.ndarray:
        return model.predict_on_batch(x)

    run.input_shapes = _inputs(model)
    return run


def _onnx(fs, path: str, url: str, threads: int | None) -> Runner:
    """ONNX Runtime on ``model.onnx`` (the native GRU op, see :mod:`topoflow.onnx_export`)."""
    ort = require("onnxruntime", "serve")  # also in the spark extra, for predict
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads or 0, 1
    opts.log_severity_level = 3  # errors only: its warnings about unused initializers are noise
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")  # idle threads leave the cores
    try:
        sess = ort.InferenceSession(fs.cat(storage.join(path, ONNX_FILE)), opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT's own error types (Fail, InvalidGraph, ...) for a damaged file
        raise BadInputError(storage.join(url, ONNX_FILE), f"ONNX Runtime cannot load {ONNX_FILE}: {_first_line(e)}",
                            f"{RE_EXPORT}, or copy the whole folder again") from e

    def run(x: dict[str, np.ndarray]) -> np.ndarray:
        return sess.run([OUTPUT], x)[0]

    run.input_shapes = {i.name: [d if isinstance(d, int) else None for d in i.shape] for i in sess.get_inputs()}
    return run


def _saved_model(fs, path: str, url: str, threads: int | None) -> Runner:
    """The TensorFlow SavedModel's ``serving_default`` signature (Keras' export)."""
    from topoflow.tf import import_tensorflow

    tf = import_tensorflow()
    with tempfile.TemporaryDirectory() as tmp:
        fs.get(storage.join(path, SAVED_MODEL), f"{tmp}/{SAVED_MODEL}", recursive=True)
        try:
            serve = tf.saved_model.load(f"{tmp}/{SAVED_MODEL}").signatures["serving_default"]
        except Exception as e:  # TF raises many types for a damaged SavedModel
            raise BadInputError(storage.join(url, SAVED_MODEL), f"TensorFlow cannot load {SAVED_MODEL}/: "
                                f"{_first_line(e)}", f"{RE_EXPORT}, or copy the whole folder again") from e
    (output,) = serve.structured_outputs

    def run(x: dict[str, np.ndarray]) -> np.ndarray:
        return serve(**x)[output].numpy()

    run.input_shapes = {k: list(v.shape) for k, v in serve.structured_input_signature[1].items()}
    return run


_RUNNERS = {"keras": (_keras, MODEL_FILE), "onnx": (_onnx, ONNX_FILE), "saved_model": (_saved_model, SAVED_MODEL)}


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


def load(url: str, sc: StorageConfig, backend: str = "keras", threads: int | None = None) -> Exported:
    """The exported model folder at ``url``, run by ``backend`` (one of :data:`BACKENDS`; ``threads``:
    ONNX Runtime's intra-op threads, default all cores), checked so that a wrong, damaged or foreign folder is
    one clear error naming ``url`` and the fix: the files are there, the card and preprocessing are
    of versions this topoflow knows, and the card describes this model. Nothing in the folder runs:
    only JSON and the backend's model file are read (Keras with its safe mode)."""
    if backend not in _RUNNERS:
        raise BadInputError(url, f"unknown backend {backend!r}", f"use one of {list(BACKENDS)}")
    fs, path = storage.filesystem(url, sc)
    card_url = storage.join(url, f"{CARD}.json")
    reader, model_file = _RUNNERS[backend]
    with storage.storage_errors(url):
        for name, (problem, fix) in (MODEL_FILES | {model_file: (f"no {model_file}", RE_EXPORT)}).items():
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
        run = reader(fs, path, url, threads)
    if run.input_shapes != card.get("inputs"):
        raise BadInputError(url, f"the model card names the inputs {card.get('inputs')}, but {model_file} takes "
                            f"{run.input_shapes}: the files come from different exports",
                            f"copy the whole folder of one export again, or {RE_EXPORT}")
    return Exported(run, card, pre, url, backend)
