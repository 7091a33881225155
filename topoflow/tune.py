"""``topoflow tune``, the local/Spark backend: an Optuna study (ask and tell) proposes train settings and every
trial trains through :func:`topoflow.train.fit` as a Spark task of its own (local mode: one per core), so
trials run in parallel processes, not in threads under the GIL.

The driver keeps ``tune.parallelism`` trials in flight, each a one-task Spark job. Median stopping
(Katib's medianstop rule, :func:`median_stop`) runs inside the trial, against the curves of the trials
completed when it started: no channel back to the driver is needed, on any Spark cluster.

The study lives at ``tune.output``: an Optuna journal (``study.journal``) updated after every trial, and the
results, rewritten after every trial: ``trials.json``, ``trials.parquet``, ``trials.png`` and ``best.yaml``
(the best trial's configuration, which ``topoflow train --config`` takes as is). Running again with the same
study name continues it: finished trials are kept, trials that were in flight when it was killed are marked
failed ("interrupted") and do not count (a grid queues their points again). One driver per study: a remote
study's journal is a local copy uploaded after each trial, with no lock (the local journal file has one).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import re
import statistics
import tempfile
import time
import warnings
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

from topoflow import storage
from topoflow.config import Config, EarlyStopping, Parameter
from topoflow.errors import TopoflowError

JOURNAL = "study.journal"
INTERRUPTED = "interrupted: the study was stopped while this trial ran"


@dataclass
class TuneResult:
    name: str
    output: str
    metric: str
    goal: str
    rows: list[dict[str, Any]]  # one per trial, best first (trials.json)

    @property
    def best(self) -> dict[str, Any] | None:
        return next((r for r in self.rows if r["state"] == "complete"), None)

    def table(self) -> str:
        return _table(self)


def tune(cfg: Config, spark=None, log: Callable[[str], None] = print) -> TuneResult:
    """Run (or continue) the study ``tune.name`` for ``train.model`` on ``train.data``; see the module doc."""
    from topoflow.preprocessing import Preprocessing
    from topoflow.spark import session

    tc, model = cfg.tune, cfg.train.model
    name, output = tc.resolved(tc.name, model), tc.resolved(tc.output, model)
    Preprocessing.load(cfg.train.data, cfg.storage)  # a prepared dataset, before any trial starts
    study = Study(name, output, cfg)
    spark = spark or session(cfg.spark)
    sc = spark.sparkContext
    local = sc.master.startswith("local")
    threads = cfg.train.threads or max(1, sc.defaultParallelism // tc.parallelism if local
                                       else int(sc.getConf().get("spark.task.cpus", "1")))
    if local and tc.parallelism > sc.defaultParallelism:
        log(f"note: tune.parallelism {tc.parallelism} exceeds the {sc.defaultParallelism} cores Spark has here: "
            "trials will queue")
    log(study.describe())
    started = time.monotonic()
    with ThreadPoolExecutor(tc.parallelism, thread_name_prefix="trial") as pool:
        running: dict = {}
        try:
            while True:
                while len(running) < tc.parallelism and study.wants_more(len(running), started):
                    trial, params = study.ask()
                    job = trial_config(cfg, params, threads)
                    running[pool.submit(_on_spark, sc, job, study.completed_curves(), f"{name}-{trial.number}")] = (
                        trial, params)
                if not running:
                    break
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    trial, params = running.pop(future)
                    log(study.tell(trial, params, future.result()))
                    study.save(plot=False)
        except BaseException:  # Ctrl-C, SIGTERM, a failing save: trials in flight are lost, the rest is kept
            with contextlib.suppress(Exception):  # the JVM may be gone already
                sc.cancelAllJobs()
            for trial, params in running.values():
                study.tell(trial, params, {"error": INTERRUPTED})
            with contextlib.suppress(Exception):
                study.save()
            raise
    if study.stopped:
        log(f"stopped early: {study.stopped}")
    result = study.save()
    if result.best is None:
        raise TopoflowError(f"no trial of study {name} completed; the errors are in {storage.join(output, 'trials.json')}"
                            "\nfix what they name, then run again (finished trials are kept)")
    return result


def trial_config(cfg: Config, params: dict[str, Any], threads: int | None = None) -> Config:
    """``cfg`` with a trial's train settings (validated as any configuration is)."""
    data = cfg.model_dump()
    data["train"].update(params)
    if threads is not None and "threads" not in params:
        data["train"]["threads"] = threads
    return Config.model_validate(data)


def median_stop(curve: list[float], completed: list[list[float]], goal: str, es: EarlyStopping) -> bool:
    """Katib's medianstop rule (v0.19: its service's threshold, its collector's check): once ``min_trials`` trials
    have completed, a trial reaching epoch ``start_epoch`` stops when its best value so far is worse than the
    mean, over the completed trials, of each one's average over its first ``start_epoch`` epochs. Checked at
    that epoch only, as Katib's collector does."""
    done = [c[: es.start_epoch] for c in completed if c]
    if not es.enabled or len(curve) != es.start_epoch or len(done) < es.min_trials:
        return False
    threshold = statistics.mean(sum(c) / len(c) for c in done)
    return max(curve) < threshold if goal == "maximize" else min(curve) > threshold


def run_trial(cfg: Config, completed: list[list[float]], metric: str, goal: str, es: EarlyStopping) -> dict:
    """One trial, where a Spark task runs it: train with ``fit`` (no export), stopping when
    :func:`median_stop` says so. Errors come back as text: a failed trial is a result, not a failed job."""
    from topoflow.train import fit, keras

    curve: list[float] = []
    stopped: list[int] = []

    def on_epoch(epoch: int, metrics: dict[str, float]) -> bool:
        curve.append(metrics.get(metric, math.nan))
        if median_stop(curve, completed, goal, es):
            stopped.append(epoch)
            return True
        return False

    lines, t0, started = io.StringIO(), time.monotonic(), time.time()
    try:
        with tempfile.TemporaryDirectory(prefix="topoflow-trial-") as ckpt:
            cfg.train.checkpoint_dir = ckpt
            with contextlib.redirect_stdout(lines):  # the metric lines: the history says the same
                fitted = fit(cfg, restart=True, show_progress=False, on_epoch=on_epoch)
        return {"history": fitted.history, "stopped": stopped[0] if stopped else None, "started": started,
                "seconds": time.monotonic() - t0}
    except Exception as e:  # noqa: BLE001 (any failure of a trial is recorded, the study goes on)
        return {"error": f"{type(e).__name__}: {e}".strip(), "started": started, "seconds": time.monotonic() - t0}
    finally:
        keras.backend.clear_session()  # a reused Python worker runs the next trial


def _on_spark(sc, cfg: Config, completed: list[list[float]], group: str) -> dict:
    """Run one trial as a one-task Spark job; a task whose process died comes back as a failed trial."""
    from topoflow.spark import job_error

    tc = cfg.tune
    metric, goal, es = tc.objective.metric, tc.objective.goal, tc.early_stopping
    sc.setJobGroup(group, f"topoflow tune trial {group}", interruptOnCancel=True)
    try:
        return sc.parallelize([0], 1).map(lambda _: run_trial(cfg, completed, metric, goal, es)).collect()[0]
    except Exception as e:  # noqa: BLE001
        return {"error": _job_failure(str(job_error(e)))}


def _job_failure(text: str) -> str:
    """What killed a trial's Spark job, e.g. "Python worker exited unexpectedly (crashed)", not a stack frame."""
    causes = re.findall(r"SparkException: ([^\n]+)", text)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return (causes[-1] if causes else lines[0] if lines else "the trial's Spark job failed")[:500]


class Study:
    """The Optuna study of one ``tune`` run, kept in a journal at the study's URL (a local copy when remote)."""

    def __init__(self, name: str, output: str, cfg: Config):
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.name, self.output, self.cfg, self.tc = name, output, cfg, cfg.tune
        self.stopped = ""  # why the study stopped before its budget, if it did
        self.fs, self.path = storage.filesystem(output, cfg.storage)
        self.local = storage.protocol(output) == "file"
        storage.check_output(output, "tune", cfg.storage, inputs=[cfg.train.data])
        with storage.storage_errors(output):
            self.fs.makedirs(self.path, exist_ok=True)
            if not self.fs.exists(storage.join(self.path, storage.MANIFEST)):
                storage.write_json(self.fs, storage.join(self.path, storage.MANIFEST), {"stage": "tune", "study": name})
            if self.local:
                self.journal = Path(self.path) / JOURNAL
            else:
                self._tmp = tempfile.TemporaryDirectory(prefix="topoflow-study-")
                self.journal = Path(self._tmp.name) / JOURNAL
                if self.fs.exists(storage.join(self.path, JOURNAL)):
                    self.fs.get(storage.join(self.path, JOURNAL), str(self.journal))
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        self.storage = JournalStorage(JournalFileBackend(str(self.journal)))
        goal = self.tc.objective.goal
        self.study = optuna.create_study(study_name=name, storage=self.storage, direction=goal,
                                         load_if_exists=True)
        self._check_same_study()
        self.interrupted = self._fail_stale()
        self.study.sampler = self._sampler(len(self.study.trials))
        if self.tc.algorithm == "grid":
            self._enqueue_grid()
        self.distributions = {n: _distribution(p) for n, p in self.tc.parameters.items()}

    def _identity(self) -> dict:
        """What must not change when a study is continued: the space, the objective and the training."""
        return {"parameters": {n: p.model_dump(mode="json") for n, p in self.tc.parameters.items()},
                "objective": self.tc.objective.goal + " " + self.tc.objective.metric,
                "algorithm": self.tc.algorithm, "train": self.cfg.train.result_settings()}

    def _check_same_study(self) -> None:
        mine, theirs = self._identity(), self.study.user_attrs.get("identity")
        if theirs is None:
            self.study.set_user_attr("identity", mine)
            return
        differ = sorted(k for k in mine if mine[k] != theirs.get(k))
        if differ:
            raise TopoflowError(f"study {self.name} at {self.output} was started with other {', '.join(differ)} "
                                "settings\ncontinue it with the same settings, or start another study (tune.name)")

    def _fail_stale(self) -> int:
        """Trials left running by a killed run: marked failed, not counted (they are lost, not repeated)."""
        from optuna.trial import TrialState

        stale = [t for t in self.study.trials if t.state == TrialState.RUNNING]
        for t in stale:
            self.storage.set_trial_user_attr(t._trial_id, "error", INTERRUPTED)
            self.storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        return len(stale)

    def _enqueue_grid(self) -> None:
        """The grid: every point not tried yet queued once, in an order drawn with ``tune.seed`` (Optuna's
        GridSampler stops the study itself, which only works inside ``optimize``). A point whose trial was
        interrupted is queued again."""
        import itertools
        import random

        names = list(self.tc.parameters)
        points = list(itertools.product(*(self.tc.parameters[n].values() for n in names)))
        random.Random(self.tc.seed).shuffle(points)
        tried = {_key(t.params or t.system_attrs.get("fixed_params", {})) for t in self.study.trials
                 if _state(t) != "interrupted"}
        for point in points:
            params = {n: _encode(self.tc.parameters[n], v) for n, v in zip(names, point)}
            if _key(params) not in tried:
                self.study.enqueue_trial(params)

    def _sampler(self, offset: int):
        """The algorithm's sampler; seeded by ``tune.seed`` and the trials so far, so that a continued study
        does not propose the first run's trials again."""
        import optuna

        seed = self.tc.seed + offset
        if self.tc.algorithm == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        with warnings.catch_warnings():  # constant_liar (trials in flight count as proposed) is "experimental"
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.TPESampler(seed=seed, constant_liar=self.tc.parallelism > 1)

    def describe(self) -> str:
        counts = self._counts()
        done = counts["complete"] + counts["stopped"] + counts["failed"]
        where = f"study {self.name} at {self.output}"
        if not done and not self.interrupted:
            return f"{where}: new, up to {self.tc.trials} trials, {self.tc.parallelism} at a time"
        lost = f", {self.interrupted} interrupted (not counted)" if self.interrupted else ""
        return f"continuing {where}: {done} of {self.tc.trials} trials finished{lost}"

    def _counts(self) -> dict[str, int]:
        counts = {"complete": 0, "stopped": 0, "failed": 0, "interrupted": 0, "running": 0, "queued": 0}
        for t in self.study.trials:
            counts[_state(t)] += 1
        return counts

    def wants_more(self, in_flight: int, started: float) -> bool:
        """Whether another trial should start: budget, failures, time and (grid) points left. A study that
        stops before its budget says why in ``stopped``."""
        c = self._counts()
        finished = c["complete"] + c["stopped"] + c["failed"]
        if c["failed"] > self.tc.max_failed:
            self.stopped = f"{c['failed']} trials failed (more than tune.max_failed {self.tc.max_failed})"
            return False
        if self.tc.timeout_s is not None and time.monotonic() - started > self.tc.timeout_s:
            self.stopped = f"tune.timeout_s ({self.tc.timeout_s} s) passed; no trial starts after it"
            return False
        if self.tc.algorithm == "grid" and not c["queued"]:
            if not in_flight and finished < self.tc.trials:
                self.stopped = f"every point of the grid was tried ({finished} trials)"
            return False
        return finished + in_flight < self.tc.trials

    def ask(self):
        trial = self.study.ask(self.distributions)
        return trial, {n: _decode(self.tc.parameters[n], v) for n, v in trial.params.items()}

    def completed_curves(self) -> list[list[float]]:
        """The objective per epoch of every completed trial: what median stopping compares with."""
        from optuna.trial import TrialState

        return [[t.intermediate_values[k] for k in sorted(t.intermediate_values)]
                for t in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]

    def tell(self, trial, params: dict[str, Any], outcome: dict) -> str:
        """Record a trial's outcome; the line the console shows."""
        from optuna.trial import TrialState

        metric = self.tc.objective.metric
        shown = " ".join(f"{n}={_show(v)}" for n, v in params.items())
        seconds = outcome.get("seconds", 0.0)
        trial.set_user_attr("seconds", seconds)
        trial.set_user_attr("started", outcome.get("started"))
        history = outcome.get("history") or {}
        curve = history.get(metric, [])
        if "error" in outcome or not curve or not all(map(math.isfinite, curve)):
            error = outcome.get("error") or f"{metric} was not reported or not finite: {curve}"
            trial.set_user_attr("error", error)
            self.study.tell(trial, state=TrialState.FAIL)
            return f"trial {trial.number} failed after {seconds:.0f} s: {error} ({shown})"
        trial.set_user_attr("metrics", {k: v[-1] for k, v in history.items() if v})
        for epoch, value in enumerate(curve, 1):
            trial.report(value, epoch)
        if outcome.get("stopped"):
            trial.set_user_attr("stopped_at", outcome["stopped"])
            self.study.tell(trial, state=TrialState.PRUNED)
            return (f"trial {trial.number} stopped at epoch {outcome['stopped']} (median rule), {metric}="
                    f"{curve[-1]:.4f}, {seconds:.0f} s ({shown})")
        self.study.tell(trial, curve[-1])
        return f"trial {trial.number} complete: {metric}={curve[-1]:.4f}, {len(curve)} epochs, {seconds:.0f} s ({shown})"

    def result(self) -> TuneResult:
        rows = [self._row(t) for t in self.study.trials if _state(t) != "queued"]
        sign = -1 if self.tc.objective.goal == "maximize" else 1
        order = {"complete": 0, "stopped": 1, "failed": 2, "interrupted": 3, "running": 4}
        rows.sort(key=lambda r: (order[r["state"]], sign * r["value"] if r["value"] is not None else 0, r["number"]))
        return TuneResult(self.name, self.output, self.tc.objective.metric, self.tc.objective.goal, rows)

    def _row(self, t) -> dict[str, Any]:
        params = {n: _decode(self.tc.parameters[n], v) for n, v in t.params.items()}
        curve = [t.intermediate_values[k] for k in sorted(t.intermediate_values)]
        return {"number": t.number, "state": _state(t), "value": curve[-1] if curve else None,
                "epochs": len(curve), "started": t.user_attrs.get("started"),
                "seconds": round(t.user_attrs.get("seconds", 0.0), 1), "params": params,
                "metrics": t.user_attrs.get("metrics", {}), "curve": curve, "error": t.user_attrs.get("error")}

    def save(self, plot: bool = True) -> TuneResult:
        """Publish the journal (remote studies) and rewrite the results, each file replaced whole; the plot
        (half a second of the driver's CPU, which trials share) only when asked: at the end. Returns them."""
        result = self.result()
        files = {"trials.json": json.dumps(result.rows, indent=1).encode(), "trials.parquet": _parquet(result)}
        if plot:
            from topoflow.plots import tuning_plot

            with tempfile.TemporaryDirectory() as tmp:
                png = Path(tmp) / "trials.png"
                tuning_plot(png, result, self.tc.parameters)
                files["trials.png"] = png.read_bytes()
        if result.best:
            files["best.yaml"] = best_yaml(self.cfg, result).encode()
        if not self.local:
            files[JOURNAL] = self.journal.read_bytes()
        with storage.storage_errors(self.output):
            for name, content in files.items():
                target = storage.join(self.path, name)
                if self.local:  # a rename replaces a file whole; an object store's PUT does so itself
                    self.fs.pipe(target + ".tmp", content)
                    self.fs.mv(target + ".tmp", target)
                else:
                    self.fs.pipe(target, content)
        return result


def best_yaml(cfg: Config, result: TuneResult) -> str:
    """The best trial's configuration, for ``topoflow train --config`` (no secret: they come from the
    environment or the config given then)."""
    best = result.best
    data = trial_config(cfg, best["params"]).public_dump()
    header = (f"# best trial {best['number']} of study {result.name} ({result.output}): "
              f"{result.metric}={best['value']:.6g} after {best['epochs']} epochs\n"
              f"# tuned: {', '.join(f'train.{n}' for n in best['params'])}\n"
              f"# train it: topoflow train --config best.yaml\n")
    return header + yaml.safe_dump(data, sort_keys=False)


def _state(t) -> str:
    from optuna.trial import TrialState

    if t.state == TrialState.FAIL and t.user_attrs.get("error") == INTERRUPTED:
        return "interrupted"
    return {TrialState.COMPLETE: "complete", TrialState.PRUNED: "stopped", TrialState.FAIL: "failed",
            TrialState.WAITING: "queued"}.get(t.state, "running")


def _key(params: dict) -> str:
    return json.dumps(params, sort_keys=True)


def _distribution(p: Parameter):
    """The Optuna distribution of a parameter; choices travel as JSON text (they may be lists)."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    if p.type == "categorical":
        return CategoricalDistribution([_encode(p, v) for v in p.choices])
    log = p.scale == "log"
    if p.type == "int":
        return IntDistribution(int(p.low), int(p.high), log=log, step=int(p.step or 1))
    return FloatDistribution(p.low, p.high, log=log, step=p.step)


def _encode(p: Parameter, value: Any) -> Any:
    return json.dumps(value) if p.type == "categorical" else value


def _decode(p: Parameter, value: Any) -> Any:
    return json.loads(value) if p.type == "categorical" else value


def _show(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else json.dumps(value)


def _parquet(result: TuneResult) -> bytes:
    """trials.parquet: one row per trial, one column per parameter (JSON text where values are not numbers)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    names = sorted({n for r in result.rows for n in r["params"]})
    columns: dict[str, list] = {k: [r[k] for r in result.rows] for k in ("number", "state", "value", "epochs",
                                                                         "seconds", "error")}
    for n in names:
        values = [r["params"].get(n) for r in result.rows]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values if v is not None)
        columns[n] = values if numeric else [None if v is None else json.dumps(v) for v in values]
    buffer = io.BytesIO()
    pq.write_table(pa.table(columns), buffer)
    return buffer.getvalue()


def _table(result: TuneResult) -> str:
    names = sorted({n for r in result.rows for n in r["params"]})
    header = ["trial", "state", result.metric, "epochs", "s", *names]
    body = [[str(r["number"]), r["state"], "" if r["value"] is None else f"{r['value']:.4f}", str(r["epochs"]),
             f"{r['seconds']:.0f}", *(_show(r["params"][n]) if n in r["params"] else "" for n in names)]
            for r in result.rows]
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *body]]
    best = result.best
    footer = (f"best: trial {best['number']}, {result.metric}={best['value']:.4f} ({result.goal}); its training "
              f"config: {storage.join(result.output, 'best.yaml')}" if best else "no trial completed")
    return f"study {result.name} ({result.output}), best first:\n" + "\n".join(lines) + "\n" + footer
