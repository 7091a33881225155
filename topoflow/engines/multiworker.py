"""The ``multiworker`` engine: TensorFlow MultiWorkerMirroredStrategy over processes that ``TF_CONFIG`` names
(a TFJob's workers on Kubernetes; :func:`launch` starts them on this machine).

Keras 3 ``model.fit`` does not run under this strategy (keras-team/keras#20585), so :func:`train` is a custom
loop. Every replica trains on its slice of the same global batches a single process reads (each worker
decodes only its own slices), the loss is summed over the slice and divided by the global batch, and the
optimizer sums the gradients of all replicas: any number of workers computes the single-process step, so
``train.batch_size`` stays the global batch and ``train.learning_rate`` needs no scaling with the workers.
Metrics are counted per worker and summed over all of them at the end of each epoch: the chief's metric lines
are those of the whole batch, with the names and meaning of Keras ``fit``'s.

Every worker runs the same number of steps (from the row counts, never by exhausting its input: a worker
with one batch more would wait in a collective forever). The chief saves the model each epoch into the
checkpoint folder, which the others read to resume (shared on one machine, a PVC on Kubernetes). A worker whose
peer is gone exits :data:`PEER_LOST`, and the whole group restarts from that checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path

from topoflow import dataset, storage
from topoflow.config import Config, load_config
from topoflow.engines import end_group
from topoflow.errors import TopoflowError
from topoflow.models import INPUTS
from topoflow.tf import import_tensorflow

tf = import_tensorflow()
import keras  # noqa: E402  (after import_tensorflow: see topoflow.tf)

from topoflow.train import TrainResult, epochs_done, epochs_text, fit_and_export, interrupted  # noqa: E402

log = logging.getLogger(__name__)
PEER_LOST = 138  # a worker's exit code when another worker died: >= 128, what a TFJob (restartPolicy ExitCode) retries
# what a collective raises when a peer is gone: Unavailable (the connection refused: seen in the variables'
# first broadcast, the epoch agreement and a step), else a timeout, a peer's restart, or the operations its
# failure cancelled
PEER_ERRORS = (tf.errors.UnavailableError, tf.errors.DeadlineExceededError, tf.errors.AbortedError,
               tf.errors.CancelledError)


def strategy(tc):
    options = tf.distribute.experimental.CommunicationOptions(
        implementation=tf.distribute.experimental.CommunicationImplementation.AUTO)  # ring on CPUs, NCCL on GPUs
    return tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)


def is_chief() -> bool:
    """Task ``chief``, else worker 0 of a cluster without one (no ``TF_CONFIG``: the only worker)."""
    config = json.loads(os.environ.get("TF_CONFIG") or "{}")
    task = config.get("task", {"type": "worker", "index": 0})
    return task["type"] == "chief" or (task["type"] == "worker" and int(task["index"]) == 0
                                       and "chief" not in config.get("cluster", {}))


def train(model, run) -> None:
    tc, sc = run.cfg.train, run.cfg.storage
    distribution = model.distribute_strategy
    loss = keras.losses.get(model.loss)
    train_url, validation_url = storage.join(tc.data, "train"), storage.join(tc.data, "validation")
    rows = dataset.num_rows(train_url, sc)
    validation_steps = -(-dataset.num_rows(validation_url, sc) // tc.batch_size)

    def slices(url, **options):
        """Each worker streams the global batches and keeps the slices of its replicas."""
        def worker_input(context):
            local = context.num_replicas_in_sync // context.num_input_pipelines
            first = context.input_pipeline_id * local
            return dataset.tf_dataset(url, sc, tc.batch_size, inputs=INPUTS[tc.model], threads=tc.threads,
                                      parts=context.num_replicas_in_sync, keep=tuple(range(first, first + local)),
                                      **options)

        return distribution.distribute_datasets_from_function(worker_input)

    train_data = slices(train_url, shuffle=True, seed=tc.seed, bucket=tc.bucket, first_epoch=run.first_epoch)
    validation_data = slices(validation_url)
    train_metrics, validation_metrics = _metrics(model, loss), _metrics(model, loss)

    def count(metrics, y, p):
        y, p = (tf.concat(distribution.experimental_local_results(t), axis=0) for t in (y, p))
        for m in metrics:
            m.update_state(y, p)

    @tf.function
    def train_step(iterator, batch_rows):
        def step(x, y):
            with tf.GradientTape() as tape:
                p = model(x, training=True)
                mean = tf.nn.compute_average_loss(loss(y, p), global_batch_size=batch_rows)
            grads = tape.gradient(model.optimizer.scale_loss(mean), model.trainable_variables)
            model.optimizer.apply(grads, model.trainable_variables)  # sums the replicas' gradients
            return y, p

        count(train_metrics, *distribution.run(step, args=next(iterator)))

    @tf.function
    def validation_step(iterator):
        count(validation_metrics, *distribution.run(lambda x, y: (y, model(x, training=False)), args=next(iterator)))

    @tf.function
    def all_workers_sum(values):
        """Each worker's ``values`` summed over the workers. All replicas of a worker hold its values: only the
        first contributes them (exact, where adding a share from each would not be)."""
        local = len(distribution.extended.worker_devices)

        def contribution(values):
            first = tf.equal(tf.distribute.get_replica_context().replica_id_in_sync_group % local, 0)
            return [tf.where(first, v, tf.zeros_like(v)) for v in values]

        return [distribution.reduce("SUM", v, axis=None) for v in distribution.run(contribution, args=(values,))]

    def results(metrics) -> dict[str, float]:
        variables = [v for m in metrics for v in m.variables]
        for v, total in zip(variables, all_workers_sum([v.value for v in variables])):
            v.assign(total)
        values = {m.name: float(m.result()) for m in metrics}
        for m in metrics:
            m.reset_state()
        return values

    epochs, squares, workers = (float(v) for v in all_workers_sum([tf.constant(x, tf.float64) for x in (
        run.first_epoch, run.first_epoch ** 2, 1)]))
    if squares * workers != epochs ** 2:  # Cauchy-Schwarz: equal only when all workers start at the same epoch
        log.error("the workers would resume different epochs (this one: %d): a restarted worker read the checkpoint "
                  "of an epoch before the chief's last one, or they do not share it; restarting them all\nif this "
                  "repeats, put train.checkpoint_dir on storage every worker mounts (a PVC on Kubernetes)",
                  run.first_epoch)
        raise SystemExit(PEER_LOST)  # all read the checkpoint again
    callbacks = keras.callbacks.CallbackList(run.callbacks, model=model, add_progbar=run.verbose, verbose=1,
                                             epochs=tc.epochs, steps=run.steps)
    model.stop_training = False
    logs: dict[str, float] = {}
    callbacks.on_train_begin()
    for epoch in range(run.first_epoch, tc.epochs):
        callbacks.on_epoch_begin(epoch)
        batches = iter(train_data)  # a new pass: epoch k reads in the order seeded by seed + k
        for s in range(run.steps):
            callbacks.on_train_batch_begin(s)
            train_step(batches, tf.constant(min(tc.batch_size, rows - s * tc.batch_size), tf.int64))
            callbacks.on_train_batch_end(s)
        logs = results(train_metrics)
        batches = iter(validation_data)
        for _ in range(validation_steps):
            validation_step(batches)
        logs |= {f"val_{k}": v for k, v in results(validation_metrics).items()}
        callbacks.on_epoch_end(epoch, logs)
        if model.stop_training:
            break
    callbacks.on_train_end(logs)


def _metrics(model, loss) -> list:
    """Fresh, local (per worker) copies of the loss and the metrics ``model.compile`` names."""
    compiled = [keras.metrics.CategoricalAccuracy(name="accuracy") if m == "accuracy" else keras.metrics.deserialize(m)
                for m in model.get_compile_config()["metrics"]]  # "accuracy" of one-hot labels is the categorical one
    return [keras.metrics.MeanMetricWrapper(loss, name="loss"), *compiled]


def launch(cfg: Config, resume: bool | str, restart: bool, show_progress: bool) -> TrainResult | None:
    """Train with ``train.workers`` local worker processes and return the chief's result; None with one worker
    (then this process is the only one). The chief's metric lines come to stdout (its progress is those lines:
    ``show_progress`` does not apply), all workers' logs go to ``<checkpoint_dir>.workers/``.
    A worker killed by a signal or exiting with a code >= 128 (what a TFJob with restartPolicy ExitCode retries)
    restarts all of them from the chief's checkpoint, at most ``pipeline.train_restarts`` times; codes 1-127 are
    permanent failures.
    In a worker itself (``TF_CONFIG`` set: a TFJob's pod, or a process started here) it trains as that worker."""
    tc = cfg.train
    if "TF_CONFIG" in os.environ:
        return _as_worker(cfg, resume, restart, show_progress)
    if tc.workers == 1:
        return None
    ckpt = Path(tc.resolved(tc.checkpoint_dir))
    folder = Path(f"{ckpt}.workers")  # the workers' logs, kept until the next run
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    data = cfg.model_dump()
    if tc.threads is None:  # the workers share this machine's cores
        data["train"]["threads"] = max(1, len(os.sched_getaffinity(0)) // tc.workers)
    with open(os.open(folder / "config.json", os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:  # it may hold secrets
        json.dump(data, f, default=lambda secret: secret.get_secret_value())
    restarts = 0
    try:
        while (failed := _run_workers(folder, tc.workers, resume, restart)) is not None:
            index, code = failed
            if 0 < code < 128 or restarts == cfg.pipeline.train_restarts:
                raise TopoflowError(_failure(folder, index, code, restarts))
            restarts += 1
            print(f"worker {index} {_ended(code)}; restarting the {tc.workers} workers from the checkpoint "
                  f"({epochs_text(epochs_done(ckpt))} done), restart {restarts} of {cfg.pipeline.train_restarts}",
                  flush=True)
            resume, restart = "auto", False
    except KeyboardInterrupt:
        raise interrupted(ckpt) from None
    finally:
        (folder / "config.json").unlink()  # the logs stay for a failed run, the settings and their secrets go
    return TrainResult(**json.loads((folder / "result.json").read_text()))


def _run_workers(folder: Path, n: int, resume: bool | str, restart: bool) -> tuple[int, int] | None:
    """Run one group of workers to its end: None when all succeed, else the failed worker and its exit code
    (a signal's as negative). A worker killed by a signal is named first: its peers fail because of it. The
    workers still running are killed."""
    hosts = [f"127.0.0.1:{_free_port()}" for _ in range(n)]
    workers, echo = [], None
    try:
        for i in range(n):
            env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL=os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"),
                       TF_CONFIG=json.dumps({"cluster": {"worker": hosts}, "task": {"type": "worker", "index": i}}))
            with open(folder / f"worker-{i}.log", "ab") as log:
                workers.append(subprocess.Popen(
                    [sys.executable, "-m", "topoflow.engines.multiworker", str(folder), json.dumps(resume),
                     json.dumps(restart)], env=env, stdout=subprocess.PIPE if i == 0 else log, stderr=log,
                    start_new_session=True))  # its own process group: killed as a whole, and Ctrl-C is ours to handle
        echo = threading.Thread(target=_echo, args=(workers[0].stdout, folder / "worker-0.log"), daemon=True)
        echo.start()
        while True:
            codes = [w.poll() for w in workers]
            failed = [(i, c) for i, c in enumerate(codes) if c]
            if failed:
                return min(failed, key=lambda f: 0 < f[1] < 128)
            if all(c == 0 for c in codes):
                return None
            time.sleep(0.2)
    finally:
        for w in workers:
            if w.poll() is None:
                end_group(w, grace=0)  # no grace: the group restarts from the checkpoint anyway
            w.wait()
        if echo:
            echo.join()


def _echo(stream, log: Path) -> None:
    """The chief's stdout to ours, and to its log."""
    with stream, open(log, "a") as out:
        for line in iter(stream.readline, b""):
            text = line.decode(errors="replace")
            sys.stdout.write(text)
            sys.stdout.flush()
            out.write(text)


def _failure(folder: Path, index: int, code: int, restarts: int) -> str:
    """The worker's own error when it raised one (a bad setting: every worker says the same), else the end of
    its log; the folder keeps all the workers' logs."""
    error = folder / f"error-{index}.txt"
    if error.exists():
        return f"{error.read_text()}\n(worker {index}; logs of all workers in {folder})"
    tail = "\n".join((folder / f"worker-{index}.log").read_text(errors="replace").splitlines()[-20:]) or "(empty)"
    gave_up = f" after {restarts} restart{'s' if restarts != 1 else ''}" if code < 0 or code >= 128 else ""
    return (f"training worker {index} {_ended(code)}{gave_up}; the end of its log:\n{tail}\n"
            f"logs of all workers in {folder}")


def _ended(code: int) -> str:
    return f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_worker(cfg: Config, resume: bool | str, restart: bool, show_progress: bool) -> TrainResult:
    """Train as one worker of the group. Every collective can find a peer gone (the model's first broadcast, the
    epoch agreement, a step, the metric sums): exit :data:`PEER_LOST` then, so that the group restarts."""
    try:
        return fit_and_export(cfg, resume, restart, show_progress)
    except PEER_ERRORS as e:
        log.error("a peer worker is gone (%s: %s); exiting %d to restart the group", type(e).__name__, e, PEER_LOST)
        raise SystemExit(PEER_LOST) from e


def _worker(folder: Path, resume: bool | str, restart: bool) -> int:
    """One worker that :func:`launch` started: trains, the chief writes the result. A topoflow error (a bad
    setting, an existing checkpoint) is written for the launcher to show; the exit code 1 says it is permanent."""
    from topoflow.train import train as train_stage

    parent = os.getppid()
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()
    index = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
    try:
        result = train_stage(load_config(folder / "config.json"), resume, restart, show_progress=False)
    except TopoflowError as e:
        (folder / f"error-{index}.txt").write_text(str(e))
        return 1
    if is_chief():
        (folder / "result.json").write_text(json.dumps(asdict(result)))
    return 0


def _exit_with_parent(parent: int) -> None:
    """No orphans: a worker whose launcher died (killed, even with SIGKILL) ends too."""
    while os.getppid() == parent:
        time.sleep(1)
    os._exit(137)


if __name__ == "__main__":
    from topoflow.engines.multiworker import _worker as worker  # the module's own copy, not this __main__ one

    sys.exit(worker(Path(sys.argv[1]), json.loads(sys.argv[2]), json.loads(sys.argv[3])))
