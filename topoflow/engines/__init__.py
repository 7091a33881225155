"""Training engines: interchangeable ways to run the epochs of :func:`topoflow.train.fit`.

An engine is a module with three functions; everything else (the model, checkpoints, resuming, metric lines,
the hook tuning uses, export) is :mod:`topoflow.train`'s and the same for every engine:

- ``strategy(tc)``: the ``tf.distribute`` strategy the model is built (or loaded) in;
- ``is_chief()``: whether this process writes the checkpoint, metric lines and export (one process does);
- ``train(model, run)``: run epochs ``run.first_epoch`` to ``tc.epochs`` of ``run.steps`` batches, calling
  ``run.callbacks`` (Keras callbacks; a custom loop wraps them in ``keras.callbacks.CallbackList`` and calls
  epoch begin/end with the epoch's metrics, batch begin/end where it sees batches) and stopping when
  ``model.stop_training`` is set. Returns the training throughput in samples/s when the engine measures it
  itself (else the batch callbacks' timing is used).

and may have a fourth, for an engine whose training is more than this process:

- ``launch(cfg, resume, restart, show_progress) -> TrainResult | None``: called first by
  :func:`topoflow.train.train` with its arguments, to run the stage the engine's own way (start worker processes,
  give a worker's failures the exit codes its restarts need) and return the result; None: this process runs
  :func:`topoflow.train.fit_and_export`, as for an engine without ``launch``.
"""

from __future__ import annotations

import importlib
import os
import signal
import subprocess

ENGINES = ("keras", "multiworker", "bigdl")


def load(name: str):
    """The engine module called ``name`` (imported only when used: each brings its own dependencies)."""
    if name not in ENGINES:
        raise ValueError(f"unknown engine {name!r} (one of {', '.join(ENGINES)})")
    return importlib.import_module(f"topoflow.engines.{name}")


def end_group(proc: subprocess.Popen, grace: float) -> bool:
    """End a worker started in its own session and everything it started (a JVM, say): SIGTERM, then
    SIGKILL after ``grace`` seconds (at once when 0). False when it outlives both."""
    first = [(signal.SIGTERM, grace)] if grace > 0 else []
    for sig, wait in [*first, (signal.SIGKILL, 10)]:
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=wait)
            return True
        except ProcessLookupError:  # the group is gone already
            return True
        except subprocess.TimeoutExpired:
            continue
    return False
