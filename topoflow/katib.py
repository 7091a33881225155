"""Tune on Kubernetes with Katib: the search space of ``cfg.tune`` as a ``kubeflow.org/v1beta1`` Experiment whose
trials are batch Jobs running ``topoflow train`` (:func:`experiment`), and the launcher that creates it, or
continues the study of the same name, waits for Katib to end it and returns the best trial (:func:`run`).

What it relies on, read in kubeflow/katib v0.19.0 (the version of the schema in ../shared/crds):

- Metrics. Katib's pod webhook (``pkg/webhook/v1beta1/pod/inject_webhook.go``, ``utils.go``) adds a collector
  sidecar and rewrites the trial container into ``sh -c "<command and args joined by spaces> 1>/var/log/katib/
  metrics.log 2>&1 && echo completed > /var/log/katib/$$$$.pid"``, keeping a leading ``sh -c``; a container
  without ``command`` makes the webhook fetch the image's entry point from its registry. So the container here
  is ``sh -c`` with one simple, shell-quoted ``topoflow train`` command: no ``exec`` (the completion marker
  would never be written), nothing after it (the redirection would miss it). The collector
  (``pkg/metricscollector/v1beta1/file-metricscollector``) applies each ``metricsFormat`` regex (Go RE2) to every
  line of that file naming a metric and takes submatch 1 as the name, 2 as the value; :data:`METRICS_FORMAT`
  accepts only the ``epoch=N name=value …`` lines ``topoflow train`` prints, so no log line of TensorFlow's
  can give a trial a value. A trial without its objective is MetricsUnavailable, which counts as failed.
- Trial parameters. The trial template is marshalled to JSON and each ``${trialParameters.NAME}`` replaced by
  the assigned value as raw text (``pkg/controller.v1beta1/experiment/manifest/generator.go``); suggestion
  services write values with Python's ``str``. Categorical values are written here as YAML flow text, which
  ``--set`` reads back; they must hold no character that JSON or the shell's double quotes would interpret.
- Counts. The experiment fails once failed plus metrics-unavailable trials reach ``maxFailedTrialCount``
  and succeeds once finished trials reach ``maxTrialCount`` (``pkg/controller.v1beta1/experiment/util/
  status_util.go``); Katib's webhook wants both counts and ``parallelTrialCount`` at most ``maxTrialCount``,
  and Optuna's grid no more trials than grid points. ``resumePolicy: LongRunning`` keeps a finished study
  restartable: raising ``maxTrialCount`` continues it (the only spec change Katib allows besides the counts).
- Settings. ``random_state`` seeds hyperopt's random and tpe and Optuna's grid; medianstop takes
  ``min_trials_required`` and ``start_step`` (epochs reported before a trial may be stopped).

``tune.timeout_s`` has no Katib field: Katib bounds a study by its trial count only. :func:`run` waits that
long at most, then leaves the Experiment running and says so.
"""

from __future__ import annotations

import math
import shlex

import yaml

from topoflow import images, kube
from topoflow.config import METRICS, Config, Parameter, TrainConfig, as_overrides
from topoflow.errors import ConfigError, TopoflowError
from topoflow.extras import require

EXPERIMENT = kube.Resource("kubeflow.org", "v1beta1", "experiments", "Experiment", "Katib")
CONTAINER = "train"  # the trial's primary container: the one Katib wraps and whose output it reads
INJECTION_LABEL = "katib.kubeflow.org/metrics-collector-injection"  # Katib injects collectors where it is "enabled"
EXPERIMENT_LABEL, TRIAL_LABEL = "katib.kubeflow.org/experiment", "katib.kubeflow.org/trial"  # on trials and pods
COLLECTOR = "metrics-logger-and-collector"  # the name of the sidecar Katib injects
# Katib copies an Experiment's labels onto its trials and their pods: the same labels on both keep them consistent
LABELS = {"app.kubernetes.io/name": "topoflow-tune", "app.kubernetes.io/component": "tune",
          "app.kubernetes.io/part-of": "topoflow"}
WORK = "/var/lib/topoflow"  # a trial's scratch volume: its export and checkpoints (the pipeline retrains the best)
JOB_CONDITIONS = {  # Katib's defaults for a batch Job (experiment_defaults.go), written out
    "successCondition": 'status.conditions.#(type=="Complete")#|#(status=="True")#',
    "failureCondition": 'status.conditions.#(type=="Failed")#|#(status=="True")#',
}
_VALUE = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"  # a finite number as "%.6g" prints it: never nan or inf
# One regex per metric (RE2: no look-around, no back-references): an "epoch=N name=value …" line, optionally after
# an RFC 3339 timestamp (which Katib's collector would take as the value's time); group 1 the name, 2 the value
METRICS_FORMAT = tuple(rf"^(?:\d{{4}}-\d\d-\d\dT\S+ )?epoch=\d+ (?:\S+ )*?({name})=({_VALUE})(?: |$)"
                       for name in METRICS)
_UNSAFE = set('"\\$`')  # what breaks a value inside the template's JSON or the command's double quotes
CONFLICTS = 5  # update attempts when Katib's controller writes the Experiment between our read and write


def experiment(cfg: Config, namespace: str | None = None) -> dict:
    """The Katib Experiment tuning ``cfg.train.model`` over ``cfg.tune``; trials run on the pods the pipeline's
    training runs on (``cfg.pipeline``: resources, GPUs, Secrets, volume)."""
    tc = cfg.tune
    name = tc.resolved(tc.name, cfg.train.model)
    if not (name[:1].isalpha() and len(name) <= 40):  # Katib's validator; tune.name's pattern checks the rest
        raise ConfigError(f"tune.name gives {name!r}: a Katib Experiment's name starts with a letter and has at most "
                          "40 characters")
    if tc.seed < 0:
        raise ConfigError(f"tune.seed is {tc.seed}: Katib's random_state must be 0 or more")
    trials = min(tc.trials, math.prod(len(p.values()) for p in tc.parameters.values())) \
        if tc.algorithm == "grid" else tc.trials
    metric = tc.objective.metric
    others = [m for m in METRICS if m != metric]
    spec = {
        "objective": {"type": tc.objective.goal, "objectiveMetricName": metric, "additionalMetricNames": others,
                      # a trial scores by its last epoch, as in the local backend (Katib's default: the best one)
                      "metricStrategies": [{"name": m, "value": "latest"} for m in (metric, *others)]},
        "algorithm": {"algorithmName": tc.algorithm, "algorithmSettings": [{"name": "random_state",
                                                                             "value": str(tc.seed)}]},
        "parallelTrialCount": min(tc.parallelism, trials),
        "maxTrialCount": trials,
        "maxFailedTrialCount": min(tc.max_failed + 1, trials),  # Katib stops at this many; tune.max_failed: above
        "resumePolicy": "LongRunning",
        "parameters": [_parameter(n, p) for n, p in tc.parameters.items()],
        "metricsCollectorSpec": {"collector": {"kind": "StdOut"},
                                 "source": {"filter": {"metricsFormat": list(METRICS_FORMAT)}}},
        "trialTemplate": {
            "primaryContainerName": CONTAINER,
            "retain": True,  # keep a finished trial's Job and pod log (its ttlSecondsAfterFinished removes them)
            **JOB_CONDITIONS,
            "trialParameters": [{"name": n, "description": f"train.{n}", "reference": n} for n in tc.parameters],
            "trialSpec": _trial_job(cfg),
        },
    }
    if tc.early_stopping.enabled:
        es = tc.early_stopping
        spec["earlyStopping"] = {"algorithmName": "medianstop", "algorithmSettings": [
            {"name": "min_trials_required", "value": str(es.min_trials)},
            {"name": "start_step", "value": str(es.start_epoch)}]}
    metadata = {"name": name, **({"namespace": namespace} if namespace else {}), "labels": dict(LABELS)}
    return {"apiVersion": EXPERIMENT.api_version, "kind": EXPERIMENT.kind, "metadata": metadata, "spec": spec}


def _parameter(name: str, p: Parameter) -> dict:
    """One Katib parameter; every field Katib's defaulting webhook would fill is written, so that the stored spec
    equals this one (:func:`run` compares them to continue a study)."""
    if p.type == "categorical":
        return {"name": name, "parameterType": "categorical",
                "feasibleSpace": {"list": [_choice(name, c) for c in p.choices], "distribution": "uniform"}}
    space = {"min": _number(p.low, p.type), "max": _number(p.high, p.type),
             "distribution": "logUniform" if p.scale == "log" else "uniform"}
    if p.step is not None:
        space["step"] = _number(p.step, p.type)
    return {"name": name, "parameterType": "int" if p.type == "int" else "double", "feasibleSpace": space}


def _number(value: float, kind: str) -> str:
    return str(int(value)) if kind == "int" else repr(float(value))


def _choice(name: str, value) -> str:
    """A categorical value as the YAML text ``--set`` reads back (a list [50, 20, 10] stays "[50, 20, 10]")."""
    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 30).removesuffix("...\n").strip()
    if yaml.safe_load(text) != value or _UNSAFE & set(text):
        raise ConfigError(f"tune.parameters.{name}: the choice {value!r} cannot pass through Katib, which writes it "
                          "into JSON and into a shell command; give choices without \", \\, $ or `")
    return text


def _value(p: Parameter, text: str):
    """A value Katib assigned to parameter ``p`` (Python's ``str`` of a number, or one of our categorical texts)
    as the setting takes it: "1e-05" is text to YAML, hence the casts."""
    value = yaml.safe_load(text)
    return float(value) if p.type == "float" else int(value) if p.type == "int" else value


def _trial_job(cfg: Config) -> dict:
    """The trial: ``topoflow train`` in a batch Job sized, placed and given Secrets as the pipeline's training."""
    container = {"name": CONTAINER, "image": images.TRAIN, "command": ["sh", "-c"], "args": [_command(cfg)]}
    pod = {"restartPolicy": "Never", **kube.training_pod(cfg.pipeline, container, scratch=WORK)}
    return {"apiVersion": "batch/v1", "kind": "Job", "spec": {
        "backoffLimit": 0,  # a failed trial is Katib's to count, not to retry
        "ttlSecondsAfterFinished": 86400,
        "template": {"metadata": {"labels": dict(LABELS),
                                  # Katib's advice: an Istio sidecar would outlive training and hold the pod
                                  "annotations": {"sidecar.istio.io/inject": "false"}},
                     "spec": pod}}}


def _command(cfg: Config) -> str:
    """The trial's shell command: ``topoflow train`` with every train and storage setting that differs from its
    default (secrets never: they come from the Secret), the export and checkpoints on the scratch volume, as many
    TensorFlow threads as the CPU limit's whole CPUs (TensorFlow would start one per core of the node), and each
    tuned setting from its trial parameter."""
    tc, tuned = cfg.train, set(cfg.tune.parameters)
    settings = as_overrides(cfg.public_dump(exclude_defaults=True, include={"storage": True, "train": {
        n for n in TrainConfig.model_fields if n not in {"model", "output", "checkpoint_dir", *tuned}}}))
    if tc.threads is None and "threads" not in tuned:
        settings.append(f"train.threads={kube.whole_cpus(cfg.pipeline.train_cpu)}")
    args = ["topoflow", "train", "--model", tc.model, "--no-progress", "--output", f"{WORK}/model",
            "--set", f"train.checkpoint_dir={WORK}/checkpoints", *(a for s in settings for a in ("--set", s))]
    return shlex.join(args) + "".join(f' --set "train.{n}=${{trialParameters.{n}}}"' for n in cfg.tune.parameters)


def run(cfg: Config, namespace: str, client=None, log=print, timeout_s: float | None = None,
        poll_s: float = 10.0) -> dict:
    """Tune ``cfg.train.model`` with Katib in ``namespace``: create the Experiment, or continue the study of that
    name (more trials when ``tune.trials`` grew), wait until Katib ends it (at most ``timeout_s``, default
    ``tune.timeout_s``, default unbounded) and return the best trial: ``{"trial", "parameters" (typed as the
    settings take them), "objective", "metrics"}`` (each metric's last reported value). ``client`` is a
    ``kubernetes.client.ApiClient`` (default: the in-cluster service account, else the kubeconfig). A failed
    study or the time-out raises TopoflowError saying what to look at; the Experiment stays in both cases."""
    k8s = require("kubernetes.client", "pipeline")
    api = client or kube.default_client()
    body = experiment(cfg, namespace)
    name = body["metadata"]["name"]
    crd = k8s.CustomObjectsApi(api)
    _check_namespace(api, namespace, log)
    _start(crd, namespace, body, log)
    where = f"Experiment {namespace}/{name}"
    timeout_s = cfg.tune.timeout_s if timeout_s is None else timeout_s
    trials = f"kubectl -n {namespace} get trials -l {EXPERIMENT_LABEL}={name}"
    try:
        obj = kube.wait(lambda: kube.call(crd, EXPERIMENT, "get", namespace, crd.get_namespaced_custom_object,
                                          name=name),
                        lambda obj: f"{where}: {_progress(obj, cfg)}", _finished, timeout_s, poll_s, log)
    except kube.TimedOut as e:
        hint = "" if (e.last.get("status") or {}).get("conditions") else \
            "\nis Katib's controller running? kubectl -n kubeflow get pods -l katib.kubeflow.org/component=controller"
        raise TopoflowError(f"{where} still {_progress(e.last, cfg)} after {timeout_s:g} s; it keeps running (Katib "
                            f"bounds a study by its trials only){hint}\nits trials: {trials}\nwait again with the "
                            f"same settings (the study continues), or stop it: kubectl -n {namespace} delete "
                            f"experiment {name}") from None
    except KeyboardInterrupt:
        log(f"stopped waiting; {where} keeps running (stop it: kubectl -n {namespace} delete experiment {name})")
        raise
    failed = kube.condition(obj, "Failed")
    if failed:
        raise TopoflowError(f"{where} failed: {failed.get('reason')}: {failed.get('message')}\n"
                            + _trial_problems(obj, namespace, trials))
    best = (obj["status"].get("currentOptimalTrial") or {})
    metrics, metric = _metrics(best), cfg.tune.objective.metric
    if not best.get("bestTrialName") or metric not in metrics:
        raise TopoflowError(f"{where} ended without a trial that reported {metric}\n"
                            + _trial_problems(obj, namespace, trials))
    assigned = {a["name"]: a["value"] for a in best.get("parameterAssignments", [])}
    return {"trial": best["bestTrialName"],
            "parameters": {n: _value(p, assigned[n]) for n, p in cfg.tune.parameters.items()},
            "objective": metrics[metric], "metrics": metrics}


def _check_namespace(api, namespace: str, log) -> None:
    """Warn when the namespace lacks the label under which Katib injects its metrics collector (without it Katib
    0.19 refuses Experiments, older versions run trials whose metrics nobody collects). A service account may not
    read namespaces (cluster-scoped): then the check is skipped."""
    from kubernetes import client as k8s
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    try:
        ns = k8s.CoreV1Api(api).read_namespace(namespace, _request_timeout=kube.REQUEST_TIMEOUT)
    except (ApiException, HTTPError):  # 403 for most service accounts; the create says what else is wrong
        return
    if (ns.metadata.labels or {}).get(INJECTION_LABEL) != "enabled":
        log(f"warning: namespace {namespace} lacks the label {INJECTION_LABEL}=enabled, under which Katib collects "
            f"trial metrics\nlabel it: kubectl label namespace {namespace} {INJECTION_LABEL}=enabled "
            "(k8s/base/namespace.yaml has it)")


_COUNTS = ("maxTrialCount", "parallelTrialCount", "maxFailedTrialCount")  # the spec Katib lets a study change


def _start(crd, namespace: str, body: dict, log) -> None:
    """Create the Experiment; or continue the existing study of that name when it is the same study, raising its
    trial counts to ``body``'s (Katib restarts a finished LongRunning study whose maxTrialCount grew)."""
    name, spec = body["metadata"]["name"], body["spec"]
    where = f"Experiment {namespace}/{name}"
    for _ in range(CONFLICTS):
        old = kube.call(crd, EXPERIMENT, "get", namespace, crd.get_namespaced_custom_object, name=name, missing_ok=True)
        if not old:
            try:
                kube.call(crd, EXPERIMENT, "create", namespace, crd.create_namespaced_custom_object, body=body)
            except kube.Conflict:  # created meanwhile: continue it
                continue
            log(f"created {where}: {spec['maxTrialCount']} trials, {spec['parallelTrialCount']} at a time; "
                f"trials: kubectl -n {namespace} get trials -l {EXPERIMENT_LABEL}={name}")
            return
        if {k: v for k, v in old["spec"].items() if k not in _COUNTS} != {k: v for k, v in spec.items()
                                                                          if k not in _COUNTS}:
            raise TopoflowError(f"{where} exists with another search space or trial template, and Katib lets a "
                                "study change only its trial counts\ncontinue it with the settings it was made "
                                f"with, give this study another tune.name, or delete it: kubectl -n {namespace} "
                                f"delete experiment {name}")
        if failed := kube.condition(old, "Failed"):
            raise TopoflowError(f"{where} failed earlier ({failed.get('reason')}: {failed.get('message')}); Katib "
                                f"does not restart a failed study\nits trials: kubectl -n {namespace} get trials -l "
                                f"{EXPERIMENT_LABEL}={name}\nstart afresh: kubectl -n {namespace} delete experiment "
                                f"{name}")
        had = (old.get("status") or {}).get("trials", 0)
        if spec["maxTrialCount"] <= had or all(old["spec"].get(k) == spec[k] for k in _COUNTS):
            log(f"continuing {where} ({had} trials so far, at most {old['spec']['maxTrialCount']})")
            return
        new = {**old, "spec": {**old["spec"], **{k: spec[k] for k in _COUNTS}}}
        try:
            kube.call(crd, EXPERIMENT, "update", namespace, crd.replace_namespaced_custom_object, name=name, body=new)
        except kube.Conflict:  # Katib's controller wrote it since our read
            continue
        log(f"continuing {where}: {spec['maxTrialCount']} trials now ({had} so far)")
        return
    raise TopoflowError(f"{where} kept changing while being updated ({CONFLICTS} conflicts)")


def _finished(obj: dict) -> bool:
    """Whether Katib ended the study: Failed, or Succeeded for the current spec (right after maxTrialCount was
    raised the status still says Succeeded with fewer finished trials, until the controller restarts it)."""
    if kube.condition(obj, "Failed"):
        return True
    succeeded = kube.condition(obj, "Succeeded")
    return bool(succeeded) and (succeeded.get("reason") != "ExperimentMaxTrialsReached"
                                or _done(obj) >= obj["spec"]["maxTrialCount"])


def _done(obj: dict) -> int:
    s = obj.get("status") or {}
    return sum(s.get(k, 0) for k in ("trialsSucceeded", "trialsFailed", "trialsKilled", "trialsEarlyStopped",
                                     "trialMetricsUnavailable"))


def _progress(obj: dict, cfg: Config) -> str:
    """The study's state in words: its last condition, its trials, the best objective so far."""
    s = obj.get("status") or {}
    true = [c["type"] for c in s.get("conditions", []) if c.get("status") == "True"]
    if not true:
        return "waiting for Katib's controller to take it up (no status yet)"
    counts = {k: s.get(f"trials{k.title()}", 0) for k in ("succeeded", "failed", "running", "pending")}
    counts["failed"] += s.get("trialMetricsUnavailable", 0) + s.get("trialsKilled", 0)
    counts["early stopped"] = s.get("trialsEarlyStopped", 0)
    line = true[-1]
    if any(counts.values()):
        line += ", trials: " + ", ".join(f"{n} {k}" for k, n in counts.items() if n) + \
            f" of {obj['spec']['maxTrialCount']}"
    best = _metrics(s.get("currentOptimalTrial") or {}).get(cfg.tune.objective.metric)
    return line + (f"; best {cfg.tune.objective.metric} {best:.4g}" if best is not None else "")


def _metrics(best: dict) -> dict[str, float]:
    """Each metric's last value in an optimal-trial record ("unavailable" when never reported)."""
    out = {}
    for m in (best.get("observation") or {}).get("metrics", []):
        try:
            out[m["name"]] = float(m["latest"])
        except (KeyError, ValueError):
            continue
    return out


def _trial_problems(obj: dict, namespace: str, trials: str) -> str:
    """Where to look: the failed trials and, for trials without metrics, the collector's usual causes."""
    s = obj.get("status") or {}
    lines = []
    if failed := s.get("failedTrialList"):
        lines.append(f"failed trials: {', '.join(failed)}; a trial's log: kubectl -n {namespace} logs -l "
                     f"{TRIAL_LABEL}={failed[0]} -c {CONTAINER}")
    if missing := s.get("metricsUnavailableTrialList"):
        lines.append(f"trials without metrics: {', '.join(missing)}: Katib's collector read no objective from them. "
                     f"Is the namespace labelled {INJECTION_LABEL}=enabled, does the pod have the {COLLECTOR} "
                     "container, may it reach katib-db-manager (NetworkPolicy allow-katib-trial)? Its log: "
                     f"kubectl -n {namespace} logs -l {TRIAL_LABEL}={missing[0]} -c {COLLECTOR}")
    return "\n".join([*lines, f"its trials: {trials}"])
