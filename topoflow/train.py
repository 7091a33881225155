"""The training stage (imports TensorFlow: load it only to train): one of the three classifiers, streamed from a
prepared dataset, on CPU or GPU(s), checkpointed every epoch, then exported for serving.

Resuming (``resume=True``) continues from the last completed epoch and reaches the same result as
an uninterrupted run: the model file keeps the optimizer state, and epoch ``k`` always reads the
data in the order seeded by ``seed + k`` and draws dropout masks seeded by ``(seed, k)``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Callable

import numpy as np

from topoflow import dataset, engines, storage
from topoflow.config import Config, TrainConfig
from topoflow.errors import TopoflowError
from topoflow.models import build
from topoflow.preprocessing import Preprocessing
from topoflow.tf import import_tensorflow

tf = import_tensorflow()
import keras  # noqa: E402  (after import_tensorflow: see topoflow.tf)

log = logging.getLogger(__name__)
STATE = "state.json"  # {"epoch", "model", "history"}: names the model file of the last completed epoch


@dataclass
class TrainResult:
    model: str
    output: str
    epochs: int
    history: dict[str, list[float]] = field(default_factory=dict)
    samples_per_s: float = 0.0

    def table(self) -> str:
        last = {k: v[-1] for k, v in self.history.items() if v}
        metrics = "  ".join(f"{k}={v:.4f}" for k, v in sorted(last.items()))
        return (f"model {self.model}: {epochs_text(self.epochs)}, {self.samples_per_s:,.0f} samples/s\n{metrics}\n"
                f"exported to {self.output}")


def train(cfg: Config, resume: bool | str = False, restart: bool = False, show_progress: bool = True) -> TrainResult:
    """Train ``cfg.train.model`` on ``cfg.train.data`` and export it to ``cfg.train.output``.
    ``resume`` continues the checkpoint in ``checkpoint_dir`` ("auto": when there is one); ``restart``
    discards it. An engine with a ``launch`` may run it its own way (see :mod:`topoflow.engines`)."""
    tc = cfg.train
    storage.check_output(tc.resolved(tc.output), "train", cfg.storage, inputs=[tc.data])
    launch = getattr(engines.load(tc.engine), "launch", None)
    if launch and (launched := launch(cfg, resume, restart, show_progress)) is not None:
        return launched
    return fit_and_export(cfg, resume, restart, show_progress)


def fit_and_export(cfg: Config, resume: bool | str, restart: bool, show_progress: bool) -> TrainResult:
    """:func:`train` in this process (for an engine's ``launch`` too): :func:`fit`, then the chief exports."""
    from topoflow.export import export

    tc = cfg.train
    output = tc.resolved(tc.output)
    fitted = fit(cfg, resume, restart, show_progress)
    if fitted.chief:
        export(fitted.model, output, cfg.storage, fitted.preprocessing, cfg, fitted.history)
    return TrainResult(tc.model, output, fitted.epochs, fitted.history, fitted.samples_per_s)


@dataclass
class Fitted:
    model: object  # keras.Model
    preprocessing: Preprocessing
    history: dict[str, list[float]]  # metric -> value per epoch, resumed epochs included
    samples_per_s: float
    chief: bool = True  # this process writes the checkpoint and the export (see topoflow.engines)

    @property
    def epochs(self) -> int:
        return len(self.history.get("loss", ()))


def fit(cfg: Config, resume: bool | str = False, restart: bool = False, show_progress: bool = True,
        on_epoch: Callable[[int, dict[str, float]], bool] | None = None) -> Fitted:
    """The training itself, without export (what tuning trials run), by the engine ``train.engine``
    (:mod:`topoflow.engines`). ``on_epoch(epoch, metrics)`` is called after each epoch is checkpointed; when it
    returns True, training stops there. ``resume="auto"`` continues a checkpoint when there is one (a restarted
    pod), else starts afresh."""
    tc, sc = cfg.train, cfg.storage
    pre = Preprocessing.load(tc.data, sc)  # also checks that this is a prepared dataset
    validation = storage.join(tc.data, "validation")
    if not storage.expand(validation, sc, missing_ok=True):
        raise TopoflowError(f"no validation split in {tc.data!r} (prepared by an older topoflow)\n"
                            "re-run topoflow prepare on the ingested dataset")
    engine = engines.load(tc.engine)
    _use_threads(tc.threads)
    ckpt = Path(tc.resolved(tc.checkpoint_dir))
    state = _checkpoint_state(ckpt, tc, resume, restart)
    gpus = tf.config.list_physical_devices("GPU")
    if tc.mixed_precision and gpus:
        keras.mixed_precision.set_global_policy("mixed_float16")
    if not gpus:
        tf.config.experimental.enable_op_determinism()
    strategy = engine.strategy(tc)
    chief = engine.is_chief()

    first_epoch = state["epoch"] if state else 0
    history = state["history"] if state else {}
    steps = min(-(-dataset.num_rows(storage.join(tc.data, "train"), sc) // tc.batch_size),
                tc.steps_per_epoch or 1 << 62)
    with strategy.scope():
        if state:
            model = keras.saving.load_model(ckpt / state["model"])
        else:
            if chief:
                shutil.rmtree(ckpt, ignore_errors=True)
                ckpt.mkdir(parents=True)
            keras.utils.set_random_seed(tc.seed)
            model = build(tc, total_steps=steps * tc.epochs)
    timer = _Timer()
    bar = chief and show_progress and sys.stdout.isatty()  # Keras' bar would fill log files with redraws
    # only the chief saves: a save reads each variable's local copy (no collective), the others resume from its files
    callbacks = [_EpochSeeds(tc.seed), timer, _Checkpoint(ckpt if chief else None, history, tc)]
    if chief:
        callbacks += [_MetricLines(after_bar=bar), keras.callbacks.TensorBoard(str(ckpt / "logs"))]
    if on_epoch:
        callbacks.append(_Hook(on_epoch))
    measured = None
    if first_epoch < tc.epochs:
        try:
            measured = engine.train(model, Run(cfg, first_epoch, steps, callbacks, bar))
        except KeyboardInterrupt:
            raise interrupted(ckpt) from None
    return Fitted(model, pre, history, measured or timer.samples_per_s(tc.batch_size), chief)


@dataclass
class Run:
    """What an engine's ``train`` gets besides the model (see :mod:`topoflow.engines`)."""

    cfg: Config
    first_epoch: int
    steps: int  # batches of the global batch per epoch
    callbacks: list  # keras.callbacks.Callback
    verbose: bool  # show Keras' progress bar


def _use_threads(threads: int | None) -> None:
    """Give TensorFlow ``threads`` CPU threads (in a pod it sees the node's cores, not its CPU limit). Only
    possible before TensorFlow's first operation: a process that already ran one keeps its threads."""
    if threads is None or tf.config.threading.get_intra_op_parallelism_threads() == threads:
        return
    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    except RuntimeError:
        log.warning("train.threads=%d not applied: TensorFlow already runs in this process", threads)


def _checkpoint_state(ckpt: Path, tc: TrainConfig, resume: bool | str, restart: bool) -> dict | None:
    """The checkpoint to continue (``resume``), or None to start afresh; a checkpoint is never
    discarded silently, nor continued with other settings (the result would be neither run's)."""
    try:
        state = json.loads((ckpt / STATE).read_text())
    except FileNotFoundError:  # none, or the chief of several workers starting afresh just deleted it
        state = None
    if resume == "auto":
        resume = state is not None
    if resume and state is None:
        raise TopoflowError(f"nothing to resume: no checkpoint in {ckpt}\nrun without --resume to start afresh")
    if not resume:
        if state is not None and not restart:
            raise TopoflowError(f"a checkpoint of {epochs_text(state['epoch'])} exists in {ckpt}\n"
                                "continue it with --resume, or discard it and start afresh with --restart")
        return None
    now = tc.result_settings()
    differ = [f"{k} (checkpoint: {v!r}, now: {now.get(k)!r})"
              for k, v in state.get("settings", {}).items() if now.get(k) != v]
    if differ:
        raise TopoflowError(f"cannot resume the checkpoint in {ckpt} with other settings: {'; '.join(differ)}\n"
                            "resume with the checkpoint's settings, or start afresh with --restart")
    return state


def epochs_text(n: int) -> str:
    return f"{n} epoch{'s' if n != 1 else ''}"


def epochs_done(ckpt: Path) -> int:
    """The epochs the checkpoint in ``ckpt`` holds."""
    return json.loads((ckpt / STATE).read_text())["epoch"] if (ckpt / STATE).exists() else 0


def interrupted(ckpt: Path) -> TopoflowError:
    """The error of a training stopped by Ctrl-C or SIGTERM: how far it got and how to continue."""
    return TopoflowError(f"training interrupted; {epochs_text(epochs_done(ckpt))} checkpointed in {ckpt}\n"
                         "continue with: topoflow train --resume (same settings)")


class _EpochSeeds(keras.callbacks.Callback):
    """Dropout masks depend only on (seed, layer, epoch, step): a resumed run draws the same ones."""

    def __init__(self, seed: int):
        super().__init__()
        self.seed = seed

    def on_epoch_begin(self, epoch, logs=None):
        generators = [g for layer in self.model._flatten_layers() if (g := getattr(layer, "seed_generator", None))]
        for i, g in enumerate(generators):
            g.state.assign(np.array([self.seed + i, epoch], dtype=g.state.dtype))


class _Timer(keras.callbacks.Callback):
    """Training throughput over the epochs of this run (validation excluded)."""

    def __init__(self):
        super().__init__()
        self.batches, self.seconds, self.t0 = 0, 0.0, 0.0

    def on_train_batch_begin(self, batch, logs=None):
        self.t0 = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.seconds += time.perf_counter() - self.t0
        self.batches += 1

    def samples_per_s(self, batch_size: int) -> float:
        return self.batches * batch_size / self.seconds if self.seconds else 0.0


class _Checkpoint(keras.callbacks.Callback):
    """After every epoch: the metrics into ``history``, then (with a ``folder``: the chief) the model (with optimizer
    state) in a new file, then ``state.json`` naming it, replaced atomically; a kill at any instant leaves a state
    and the model it names."""

    def __init__(self, folder: Path | None, history: dict, tc: TrainConfig):
        super().__init__()
        self.folder, self.history, self.settings = folder, history, tc.result_settings()

    def on_epoch_end(self, epoch, logs=None):
        for k, v in (logs or {}).items():
            self.history.setdefault(k, []).append(float(v))
        if self.folder is None:
            return
        name = f"epoch-{epoch + 1:04d}.keras"
        self.model.save(self.folder / f".{name}.tmp.keras")
        os.replace(self.folder / f".{name}.tmp.keras", self.folder / name)
        state = {"epoch": epoch + 1, "model": name, "history": self.history, "settings": self.settings}
        (self.folder / f".{STATE}.tmp").write_text(json.dumps(state))
        os.replace(self.folder / f".{STATE}.tmp", self.folder / STATE)
        for old in self.folder.glob("epoch-*.keras"):
            if old.name != name:
                old.unlink()


class _Hook(keras.callbacks.Callback):
    """Calls ``fit``'s ``on_epoch`` after each epoch; stops training when it says so."""

    def __init__(self, on_epoch: Callable[[int, dict[str, float]], bool]):
        super().__init__()
        self.on_epoch = on_epoch

    def on_epoch_end(self, epoch, logs=None):
        if self.on_epoch(epoch + 1, {k: float(v) for k, v in (logs or {}).items()}):
            self.model.stop_training = True


class _MetricLines(keras.callbacks.Callback):
    """``<UTC time> epoch=N name=value …`` on stdout each epoch: the format Katib's StdOut collector reads (an RFC
    3339 time first, else it gives every value the same time and "latest" is whatever its database returns).
    Always a line of its own: after Keras' bar (which ends its line only after this callback)."""

    def __init__(self, after_bar: bool):
        super().__init__()
        self.start = "\n" if after_bar else ""

    def on_epoch_end(self, epoch, logs=None):
        values = " ".join(f"{k}={float(v):.6g}" for k, v in sorted((logs or {}).items()))
        now = datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
        print(f"{self.start}{now} epoch={epoch + 1} {values}", flush=True)
