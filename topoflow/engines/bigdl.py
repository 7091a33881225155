"""The BigDL engine: the epochs run in BigDL (dllib's Keras-style API), synchronous data-parallel on Spark, in
a worker process of the BigDL environment (Python 3.9, Java 11: ``make bigdl-env``; :mod:`bigdl_worker`
says how it trains). This process keeps the Keras model: it hands the worker its weights, loads the weights of
every epoch the worker finishes, and calls the shared callbacks, so checkpoints, resuming, metric lines,
tuning's hook and the export are :mod:`topoflow.train`'s, as for every engine.

Differences from the Keras engine, all BigDL's:

- the GRU has no biases and puts the reset gate before the recurrent product (``reset_after=False``): the form
  in which BigDL's unmasked GRU, fed sequences padded at the start, computes what a masked GRU computes
  (:mod:`topoflow.models` builds this variant for ``engine: bigdl``);
- a cosine ``lr_schedule`` is applied per epoch (the rate at the epoch's middle), not per batch;
- Adam's moment estimates do not carry over exactly from one epoch (one BigDL ``fit``) to the next, nor from a
  checkpoint when resuming (the weights do);
- ``train.seed`` seeds the initial weights (the Keras model's, which BigDL starts from), not BigDL's data order
  or dropout masks: two BigDL runs of the same settings differ slightly;
- metrics are computed from BigDL's predictions after each epoch, with the epoch's final weights (Keras
  reports running means during the epoch): ``val_*`` on the whole validation split, ``loss``/``accuracy``/``auc``
  on a fixed, seeded sample of the train split as large as the validation split (not a second pass over all
  of it); AUC exact rather than Keras' 200-threshold approximation;
- the data are read by the Spark driver and sent to the executors: the training set must fit in its memory
  (padded to the longest event: 61 KB per event at 801 particles); ``steps_per_epoch`` is not supported;
  ``batch_size`` must be a multiple of the cores BigDL trains on (``workers`` locally).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from fsspec.implementations.local import LocalFileSystem

from topoflow import datasource, storage
from topoflow.engines import end_group
from topoflow.errors import TopoflowError
from topoflow.tf import import_tensorflow

tf = import_tensorflow()
import keras  # noqa: E402  (after import_tensorflow: see topoflow.tf)

log = logging.getLogger(__name__)
WORKER = Path(__file__).with_name("bigdl_worker.py")
VENV_PYTHON = Path(__file__).resolve().parents[2] / ".venv-bigdl" / "bin" / "python"
INSTALL = ("install CPython 3.9 (e.g. pyenv install 3.9, or apt-get install python3.9 python3.9-venv) and run "
           "make bigdl-env, or set train.bigdl_python to a Python 3.9 with images/bigdl/requirements.txt installed")


def strategy(tc):
    return tf.distribute.get_strategy()


def is_chief() -> bool:
    return True


def python(tc) -> str:
    """The BigDL environment's Python: ``train.bigdl_python``, the project's .venv-bigdl, or
    ``topoflow-bigdl-python`` on PATH (the images/bigdl image)."""
    found = tc.bigdl_python or (str(VENV_PYTHON) if VENV_PYTHON.exists() else shutil.which("topoflow-bigdl-python"))
    if not found:
        raise TopoflowError(f"no BigDL environment: no {VENV_PYTHON} and no topoflow-bigdl-python on PATH\n{INSTALL}")
    return found


def train(model, run) -> float:
    """Run the epochs in the BigDL worker; returns BigDL's training throughput (samples/s)."""
    tc, sc = run.cfg.train, run.cfg.storage
    if tc.steps_per_epoch:
        raise TopoflowError("train.steps_per_epoch is not supported by the bigdl engine (BigDL trains whole "
                            "epochs)\nunset it, or train with engine keras")
    # the checkpoint holds a Keras optimizer: build its variables, else a resume cannot load it (BigDL's Adam
    # state stays in BigDL)
    model.optimizer.build(model.trainable_variables)
    work = Path(tc.resolved(tc.checkpoint_dir)).resolve() / "bigdl"  # the exchange with the worker, its log
    work.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="topoflow-bigdl-data-") as downloads:
        spec = {"model": tc.model, "out": str(work), "weights": str(work / "initial.npz"),
                "master": None if os.environ.get("PYSPARK_GATEWAY_PORT") else f"local[{tc.workers}]",
                "first_epoch": run.first_epoch,
                **{s: _local_files(storage.join(tc.data, s), sc, Path(downloads) / s) for s in ("train", "validation")},
                **tc.model_dump(include={"seed", "epochs", "batch_size", "learning_rate", "lr_schedule", "dropout",
                                         "gru_units", "hlf_units", "dense_units"})}
        with open(spec["weights"], "wb") as f:
            np.savez(f, *model.get_weights())
        (work / "spec.json").write_text(json.dumps(spec, indent=1))
        return _run_worker(python(tc), work, model, run)


def _local_files(url: str, sc, downloads: Path) -> list[str]:
    """The split's Parquet files as local paths (the worker reads local files only): remote ones are
    downloaded to ``downloads`` first."""
    fs, _ = storage.filesystem(url, sc)
    files = datasource.parquet_files(url, sc)
    if isinstance(fs, LocalFileSystem):
        return files
    log.info("downloading %d files of %s for BigDL to %s", len(files), url, downloads)
    downloads.mkdir(parents=True)
    local = [str(downloads / f"{i:05d}-{p.rsplit('/', 1)[-1]}") for i, p in enumerate(files)]
    with storage.storage_errors(url):
        fs.get(files, local)
    return local


def _run_worker(python_exe: str, work: Path, model, run) -> float:
    tc = run.cfg.train
    callbacks = keras.callbacks.CallbackList(run.callbacks, model=model)
    log_file = work / "worker.log"
    with open(log_file, "wb") as stderr:
        # its own process group: Ctrl-C reaches this process only, which then ends the worker and its JVM
        proc = subprocess.Popen([python_exe, str(WORKER), str(work / "spec.json")], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=stderr, text=True, start_new_session=True,
                                cwd=work)  # BigDL writes bigdl.log where it runs
    samples = seconds = 0.0
    try:
        ready = _receive(proc, log_file, "ready")
        log.info("BigDL: %d events on %d cores, sequences padded to %d", ready["events"], ready["cores"],
                 ready["length"])
        model.stop_training = False
        callbacks.on_train_begin()
        for epoch in range(run.first_epoch, tc.epochs):
            callbacks.on_epoch_begin(epoch)
            proc.stdin.write("go\n")
            proc.stdin.flush()
            done = _receive(proc, log_file, "epoch")
            with np.load(done["weights"]) as saved:
                model.set_weights([saved[f"arr_{i}"] for i in range(len(model.weights))])
            samples += ready["events"]
            seconds += ready["events"] / done["samples_per_s"]
            callbacks.on_epoch_end(epoch, done["metrics"])
            if model.stop_training:
                break
        callbacks.on_train_end()
        proc.stdin.close()  # the worker stops at its next epoch
        try:
            if proc.wait(timeout=120):
                raise _failure(proc, log_file, None)
        except subprocess.TimeoutExpired:  # every epoch is in: end it below rather than fail the run
            log.warning("the BigDL worker did not stop within 120 s of its last epoch; ending it")
    finally:
        if proc.poll() is None and not end_group(proc, grace=10):  # TERM first: the JVM shuts Spark down
            print(f"warning: BigDL worker {proc.pid} did not end", file=sys.stderr)
    return samples / seconds if seconds else 0.0


def _receive(proc, log_file: Path, kind: str) -> dict:
    """The worker's next message of ``kind``; its error (or death) as a TopoflowError."""
    line = proc.stdout.readline()
    message = json.loads(line) if line.strip() else {}
    if kind not in message:
        raise _failure(proc, log_file, message.get("error"))
    return message[kind] if kind == "ready" else message


def _failure(proc, log_file: Path, error: str | None) -> TopoflowError:
    try:
        code = proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        code = "still running"
    tail = "\n".join(log_file.read_text(errors="replace").splitlines()[-25:])
    return TopoflowError(f"BigDL training failed (worker exit status {code}): {error or 'no message'}\n"
                         f"--- last lines of {log_file}:\n{tail}")
