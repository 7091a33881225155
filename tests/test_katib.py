"""topoflow.katib: the Experiment it builds (checked against Katib's schema, parsed back into the config's search
space), its trials' command (run as Katib rewrites it, on a real training, and read with Katib's metrics filters
applied as its collector applies them), and the launcher against a stand-in API server (tests/k8s_api.py) that the
real ``kubernetes`` client talks to and that moves the study along as Katib's experiment controller does."""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

import synthetic
from crds import validate
from k8s_api import INJECTION_LABEL, OBSERVED, StandInAPI, as_submitted
from topoflow import images, katib
from topoflow.cli import _STAGE_OVERRIDES, _parser
from topoflow.config import METRICS, Config, load_config
from topoflow.errors import ConfigError, TopoflowError

NS = "topoflow"
SECRET = "tune-secret-value-0042"
RICH = [  # every kind of dimension, early stopping tuned
    "train.model=hlf", "tune.algorithm=random", "tune.trials=50", "tune.parallelism=3", "tune.max_failed=2",
    "tune.early_stopping.min_trials=2", "tune.early_stopping.start_epoch=3", "tune.seed=7",
    "tune.objective.metric=val_loss",
    "tune.parameters={learning_rate: {low: 0.00001, high: 0.01, scale: log}, dense_units: {low: 16, high: 64,"
    " step: 16}, dropout: {low: 0.0, high: 0.5}, hlf_units: {choices: [[50, 20, 10], [64, 32], [16]]},"
    " lr_schedule: {choices: [cosine, constant]}, bucket: {choices: [true, false]}}",
]
GRID = [  # a grid (steps or choices everywhere) without early stopping
    "train.model=gru", "tune.algorithm=grid", "tune.trials=50", "tune.early_stopping.enabled=false",
    "tune.parameters={learning_rate: {low: 0.001, high: 0.01, step: 0.003}, gru_units: {low: 16, high: 64, step: 16},"
    " batch_size: {choices: [64, 128, 256]}}",
]


def _cfg(*overrides: str) -> Config:
    return load_config(overrides=[f"storage.s3_secret_access_key={SECRET}", "storage.s3_access_key_id=AKIA-tune",
                                  "storage.s3_endpoint_url=https://s3.example.org", *overrides])


def _space(obj: dict) -> dict:
    """The search space an Experiment describes, read back: name -> (type, low, high, step, log, choices)."""
    out = {}
    for p in obj["spec"]["parameters"]:
        fs, kind = p["feasibleSpace"], {"double": "float", "int": "int"}.get(p["parameterType"], p["parameterType"])
        number = (lambda v: None if v is None else float(v))
        out[p["name"]] = (kind, number(fs.get("min")), number(fs.get("max")), number(fs.get("step")),
                          fs.get("distribution") == "logUniform",
                          [yaml.safe_load(v) for v in fs["list"]] if "list" in fs else None)
    return out


def _config_space(cfg: Config) -> dict:
    return {n: (p.type, p.low, p.high, p.step, p.scale == "log", p.choices) for n, p in cfg.tune.parameters.items()}


def _trial_pod(obj: dict) -> dict:
    return obj["spec"]["trialTemplate"]["trialSpec"]["spec"]["template"]


def _settings(obj: dict) -> dict[str, str]:
    return {s["name"]: s["value"] for s in obj["spec"].get("earlyStopping", {}).get("algorithmSettings", [])}


# ---- the object ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides", [[], RICH, GRID], ids=["default", "rich", "grid"])
def test_the_experiment_is_valid_and_searches_the_configs_space(overrides):
    cfg = _cfg(*overrides)
    obj = katib.experiment(cfg, namespace=NS)
    validate(obj)
    assert _space(obj) == _config_space(cfg)
    assert [p["name"] for p in obj["spec"]["trialTemplate"]["trialParameters"]] == list(cfg.tune.parameters)
    tc, spec = cfg.tune, obj["spec"]
    assert obj["metadata"]["name"] == cfg.train.model and obj["metadata"]["namespace"] == NS
    objective = spec["objective"]
    assert (objective["type"], objective["objectiveMetricName"]) == (tc.objective.goal, tc.objective.metric)
    assert {objective["objectiveMetricName"], *objective["additionalMetricNames"]} == set(METRICS)
    assert {s["name"]: s["value"] for s in objective["metricStrategies"]} == dict.fromkeys(METRICS, "latest")
    assert spec["algorithm"] == {"algorithmName": tc.algorithm,
                                 "algorithmSettings": [{"name": "random_state", "value": str(tc.seed)}]}
    trials = min(tc.trials, math.prod(len(p.values()) for p in tc.parameters.values())) \
        if tc.algorithm == "grid" else tc.trials  # Katib's grid refuses more trials than points
    assert (spec["maxTrialCount"], spec["parallelTrialCount"]) == (trials, tc.parallelism)
    assert spec["maxFailedTrialCount"] == tc.max_failed + 1  # Katib fails at this many; the study allows max_failed
    assert spec["resumePolicy"] == "LongRunning"  # a finished study can be continued
    es = tc.early_stopping
    assert _settings(obj) == ({"min_trials_required": str(es.min_trials), "start_step": str(es.start_epoch)}
                              if es.enabled else {})
    assert ("earlyStopping" in spec) == es.enabled and (spec.get("earlyStopping", {}).get("algorithmName")
                                                        in (None, "medianstop"))
    assert SECRET not in json.dumps(obj) and "AKIA-tune" not in json.dumps(obj)


def test_the_rich_space_reads_back_exactly():
    """Lists, booleans and words come back from Katib's strings as the settings they were."""
    obj = katib.experiment(_cfg(*RICH))
    space = _space(obj)
    assert space["hlf_units"][5] == [[50, 20, 10], [64, 32], [16]]
    assert space["bucket"][5] == [True, False] and space["lr_schedule"][5] == ["cosine", "constant"]
    assert space["dense_units"] == ("int", 16, 64, 16, False, None)
    assert space["learning_rate"] == ("float", 0.00001, 0.01, None, True, None)
    lists = {p["name"]: p["feasibleSpace"]["list"] for p in obj["spec"]["parameters"] if "list" in p["feasibleSpace"]}
    assert lists["hlf_units"] == ["[50, 20, 10]", "[64, 32]", "[16]"]
    assert space["dropout"] == ("float", 0.0, 0.5, None, False, None)
    assert katib.experiment(_cfg(*GRID))["spec"]["maxTrialCount"] == 4 * 4 * 3  # all the grid's points, not 50


def test_counts_never_exceed_the_trials():
    """Katib's webhook wants parallel and failed counts at most maxTrialCount; Optuna's grid no more trials than
    points."""
    spec = katib.experiment(_cfg("tune.trials=2", "tune.parallelism=5", "tune.max_failed=4"))["spec"]
    assert (spec["maxTrialCount"], spec["parallelTrialCount"], spec["maxFailedTrialCount"]) == (2, 2, 2)
    grid = katib.experiment(_cfg("tune.algorithm=grid", "tune.parameters={batch_size: {choices: [32, 64, 128]}}"))
    assert grid["spec"]["maxTrialCount"] == 3 and grid["spec"]["parallelTrialCount"] == 2


@pytest.mark.parametrize("overrides, message", [
    (["tune.name=1st-{model}"], r"tune.name: String should match pattern"),  # a letter first, as Katib wants
    (["tune.name=a{model}-" + "x" * 40], r"a Katib Experiment's name starts with a letter and has at most 40"),
    (["tune.name=a-very-long-study-name-for-the-{model}-model"], r"at most 40 characters"),
    (["tune.seed=-1"], r"tune.seed is -1: Katib's random_state must be 0 or more"),
    (['tune.parameters={data: {choices: ["s3://b/$x", "s3://b/y"]}}'],
     r"tune.parameters.data: the choice 's3://b/\$x' cannot pass through Katib"),
    (["tune.parameters={dense_units: {low: 10, high: 20, step: 2.5}}"],
     r"dense_units: an int range needs whole low, high and step"),
])
def test_what_katib_cannot_take_is_a_config_error(overrides, message):
    with pytest.raises(ConfigError, match=message):
        katib.experiment(_cfg(*overrides))


def test_trials_run_like_the_pipelines_training():
    """Sized, placed and given Secrets as training is; locked down for the "restricted" Pod Security Standard;
    a batch Job that Katib counts, not retries."""
    cfg = _cfg("pipeline.train_cpu='8'", "pipeline.train_memory=24Gi", "pipeline.gpus=2", "pipeline.pvc=data",
               "pipeline.xrootd_secret=eos-proxy")
    obj = katib.experiment(cfg)
    job = obj["spec"]["trialTemplate"]["trialSpec"]
    assert (job["apiVersion"], job["kind"], job["spec"]["backoffLimit"]) == ("batch/v1", "Job", 0)
    assert obj["spec"]["trialTemplate"]["primaryContainerName"] == katib.CONTAINER
    pod = _trial_pod(obj)
    assert pod["metadata"]["annotations"] == {"sidecar.istio.io/inject": "false"}
    assert pod["metadata"]["labels"] == obj["metadata"]["labels"]  # Katib copies the Experiment's onto the pods
    spec = pod["spec"]
    assert spec["restartPolicy"] == "Never" and spec["automountServiceAccountToken"] is False
    assert spec["serviceAccountName"] == "topoflow-train"
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert spec["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert spec["securityContext"]["runAsUser"] == images.UID and spec["securityContext"]["runAsNonRoot"] is True
    (c,) = spec["containers"]  # Katib's webhook gives the collector the first container's security context
    assert (c["name"], c["image"]) == (katib.CONTAINER, images.TRAIN)
    assert c["resources"]["requests"] == c["resources"]["limits"] == {"cpu": "8", "memory": "24Gi",
                                                                      "nvidia.com/gpu": "2"}
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    env = {e["name"]: e.get("valueFrom", {}).get("secretKeyRef", e.get("value")) for e in c["env"]}
    assert env == {"AWS_ACCESS_KEY_ID": {"name": "topoflow-s3", "key": "access_key_id"},
                   "AWS_SECRET_ACCESS_KEY": {"name": "topoflow-s3", "key": "secret_access_key"},
                   "X509_USER_PROXY": "/etc/topoflow/xrootd/x509up"}
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    assert mounts == {"/tmp": "tmp", katib.WORK: "work", "/etc/topoflow/xrootd": "xrootd", "/data": "data"}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["xrootd"]["secret"] == {"secretName": "eos-proxy"}
    assert volumes["data"]["persistentVolumeClaim"] == {"claimName": "data"}
    assert "emptyDir" in volumes["work"] and "emptyDir" in volumes["tmp"]
    assert "train.threads=8" in c["args"][0]  # TensorFlow on as many threads as the limit's CPUs


@pytest.mark.parametrize("cpu, threads", [("4", 4), ("2000m", 2), ("1500m", 1), ("0.5", 1)])
def test_tensorflow_threads_follow_the_cpu_limit(cpu, threads):
    script = _trial_pod(katib.experiment(_cfg(f"pipeline.train_cpu='{cpu}'", "pipeline.gpus=0")))["spec"][
        "containers"][0]["args"][0]
    assert re.findall(r"train\.threads=(\d+)", script) == [str(threads)]
    assert "nodeSelector" not in json.dumps(_trial_pod(katib.experiment(_cfg("pipeline.gpus=0"))))
    configured = _trial_pod(katib.experiment(_cfg("train.threads=2")))["spec"]["containers"][0]["args"][0]
    assert re.findall(r"train\.threads=(\d+)", configured) == ["2"]  # a configured value stays


# ---- the trial's command --------------------------------------------------------------------------------------

def substituted(obj: dict, values: dict[str, str]) -> dict:
    """The trial Job as Katib makes it (manifest/generator.go): the template as JSON text, each
    ``${trialParameters.NAME}`` replaced by the assigned value's text."""
    text = json.dumps(obj["spec"]["trialTemplate"]["trialSpec"])
    for name, value in values.items():
        text = text.replace(f"${{trialParameters.{name}}}", value)
    assert "${trialParameters." not in text
    return json.loads(text)


def wrapped(container: dict, early_stopping: bool, metrics_file: str = "/var/log/katib/metrics.log") -> list[str]:
    """The container's command after Katib's pod webhook (pkg/webhook/v1beta1/pod/utils.go, wrapWorkerContainer):
    a leading ``sh -c`` kept, the rest joined by spaces, output sent to the metrics file, the completion marker
    written (and, with early stopping rules, an early-stop check)."""
    args = [*container["command"], *container["args"]]
    command = ["sh", "-c"]
    if args[0] in ("sh", "bash") and args[1] == "-c":
        command, args = args[:2], args[2:]
    folder = os.path.dirname(metrics_file)
    args.append(f"1>{metrics_file} 2>&1")
    if early_stopping:
        args += ["||", f"if test -f {folder}/$$$$.pid && [ $(head -n 1 {folder}/$$.pid) = early-stopped ]; then "
                       "echo Training Container was Early Stopped; else echo Training Container was Failed; exit 1; fi"]
    args += ["&&", f"echo completed > {folder}/$$$$.pid"]
    return [*command, " ".join(args)]


def test_the_trial_command_is_the_cli_with_the_trials_values():
    """Parsed by topoflow's own argument parser and config loader, a trial's command trains the configured model
    on the configured data with the trial's values and nothing else changed."""
    cfg = _cfg(*RICH, "train.epochs=9", "train.data=s3://topoflow-data/prepared", "pipeline.train_cpu='3'")
    obj = katib.experiment(cfg)
    lists = {p["name"]: p["feasibleSpace"].get("list") for p in obj["spec"]["parameters"]}
    # as Katib's suggestion services write them: Python's str of a number ("1.37e-05" is text to YAML), a list
    # entry as it is
    values = {"learning_rate": str(1.37e-05), "dense_units": "48", "dropout": str(0.25),
              "hlf_units": lists["hlf_units"][2], "lr_schedule": lists["lr_schedule"][1], "bucket": lists["bucket"][1]}
    assert values["learning_rate"] == "1.37e-05" and values["hlf_units"] == "[16]"
    (c,) = substituted(obj, values)["spec"]["template"]["spec"]["containers"]
    assert c["command"] == ["sh", "-c"] and len(c["args"]) == 1
    argv = shlex.split(c["args"][0])
    assert argv[:2] == ["topoflow", "train"]
    args = _parser().parse_args(argv[1:])
    trial = load_config(args.config, args.overrides + _STAGE_OVERRIDES["train"](args))
    assert args.no_progress
    expected = {**cfg.train.model_dump(), "learning_rate": 1.37e-05, "dense_units": 48, "dropout": 0.25,
                "hlf_units": [16], "lr_schedule": "constant", "bucket": False, "threads": 3,
                "output": f"{katib.WORK}/model", "checkpoint_dir": f"{katib.WORK}/checkpoints"}
    assert trial.train.model_dump() == expected and trial.train.model == "hlf" and trial.train.epochs == 9
    assert type(trial.train.learning_rate) is float and type(trial.train.dense_units) is int
    # storage as configured, the keys from the Secret's environment instead
    assert trial.storage.s3_endpoint_url == "https://s3.example.org" and trial.storage.s3_access_key_id is None


def _prepared(base: Path) -> Path:
    """A small prepared dataset, written directly (no Spark): train and validation splits and the preprocessing."""
    from topoflow.preprocessing import Preprocessing

    table = synthetic.ingested_table({"qcd": 60, "ttbar": 60, "wjets": 60})
    for split in ("train", "validation"):
        synthetic.write_dataset(table, base / split, n_files=2)
    rng = np.random.default_rng(0)
    pre = Preprocessing(rng.normal(size=14) - 3, rng.normal(size=14) + 3, np.zeros(19), np.ones(19))
    (base / "preprocessing.json").write_text(pre.to_json())
    return base


# Katib's filter when an Experiment gives none (pkg/metricscollector/v1beta1/common/const.go, DefaultFilter)
KATIB_DEFAULT_FILTER = r"([\w|-]+)\s*=\s*([+-]?\d*(\.\d+)?([Ee][+-]?\d+)?)"


def collected(lines: list[str], filters: tuple[str, ...] | list[str], metrics: list[str]) -> list[tuple[str, str]]:
    """(name, value) as Katib's StdOut collector reads them (file-metricscollector.go, parseLogsInTextFormat): lines
    naming no metric skipped, then every match of every filter, submatch 1 the name, 2 the value, kept for metrics
    only."""
    regexes = [re.compile(f) for f in filters]
    out = []
    for line in lines:
        if not any(m in line for m in metrics):
            continue
        for regex in regexes:
            for match in regex.finditer(line):
                if match.group(1).strip() in metrics:
                    out.append((match.group(1).strip(), match.group(2).strip()))
    return out


def test_filters_are_re2_and_take_name_then_value():
    """Go's regexp (RE2) has no look-around and no back-references; Katib's validator wants two top
    subexpressions, name first."""
    two = re.compile(r".*\(.*\).*\(.*\).*")  # validator.go's check, as Katib writes it
    for f in katib.METRICS_FORMAT:
        assert two.fullmatch(f) and ";" not in f  # the collector splits its -f flag on ";"
        assert not re.search(r"\(\?[=!<>P]|\\[1-9]|[*+?}]\+", f), f
        assert re.compile(f).groups == 2


def test_only_topoflows_epoch_lines_give_values():
    epoch = "epoch=3 accuracy=0.812 auc=0.93 loss=0.48 val_accuracy=0.8 val_auc=0.91 val_loss=0.5"
    lines = [
        "2026-11-25 10:14:41.123456: I tensorflow/core/util/port.cc:153] oneDNN custom operations are on. loss=0.1",
        "W0000 00:00:1764065681.2 12 val_auc=0.99 cuda_executor.cc:1228] could not open file",
        "/usr/lib/python3/dist-packages/keras/src/trainers/trainer.py:123: UserWarning: val_loss=0.01 is suspicious",
        "Epoch 3/6 - 2s - loss: 0.4812 - val_auc: 0.9101",  # Keras' own format
        "epoch=2 accuracy=0.7 auc=nan loss=nan val_accuracy=0.6 val_auc=inf val_loss=-inf",  # nan, inf: no value
        epoch,
        "2026-11-25T10:15:03.123456Z epoch=4 val_auc=1e-3 val_loss=.25",  # after a timestamp; exponents, no digit
        "epoch=5 val_auc=0.9x val_loss=0.4",  # a damaged token is no value; its neighbour still is
    ]
    got = collected(lines, katib.METRICS_FORMAT, list(METRICS))
    assert got == [("accuracy", "0.7"), ("val_accuracy", "0.6"),  # epoch 2: only its numbers
                   ("loss", "0.48"), ("accuracy", "0.812"), ("auc", "0.93"), ("val_loss", "0.5"),
                   ("val_accuracy", "0.8"), ("val_auc", "0.91"),  # epoch 3: all of them
                   ("val_loss", ".25"), ("val_auc", "1e-3"), ("val_loss", "0.4")]
    assert all(math.isfinite(float(v)) for _, v in got)  # the collector's ParseFloat never fails


@pytest.mark.timeout(300)
def test_a_real_training_run_as_katib_runs_it_reports_every_epoch(tmp_path):
    """The trial's command, rewritten as Katib's webhook rewrites it, runs a real (tiny) training; the metrics file
    then holds each epoch's line amid TensorFlow's output, the filters recover exactly the printed values, and
    the completion marker is written."""
    data = _prepared(tmp_path / "prepared")
    cfg = _cfg("train.model=hlf", f"train.data={data}", "train.epochs=2", "train.steps_per_epoch=3",
               "train.batch_size=16", "pipeline.train_cpu='1'", "pipeline.gpus=0", "pipeline.s3_secret=null")
    obj = katib.experiment(cfg)
    job = substituted(obj, {"learning_rate": "0.0021", "batch_size": "64"})
    katib_dir, work = tmp_path / "katib", tmp_path / "work"
    katib_dir.mkdir()
    command = wrapped(job["spec"]["template"]["spec"]["containers"][0], early_stopping=True,
                      metrics_file=f"{katib_dir}/metrics.log")
    script = command[2].replace(katib.WORK, str(work)).replace("$$", "$")  # the kubelet turns $$ into $
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "TF_CPP_MIN_LOG_LEVEL": "0"}
    run = subprocess.run([*command[:2], script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=280)
    log = (katib_dir / "metrics.log").read_text()
    assert run.returncode == 0, run.stdout + run.stderr + log[-3000:]
    (marker,) = katib_dir.glob("*.pid")
    assert marker.read_text().strip() == "completed"  # what the collector waits for
    lines = log.split("\n")
    printed = [line for line in lines if re.match(r"\S+Z epoch=", line)]  # time first: Katib orders values by it
    assert len(printed) == 2 and len(lines) > len(printed) + 1, log  # other output is in the file too
    expected = [(k, v) for line in printed for k, v in sorted(t.split("=") for t in line.split()[2:])]
    got = collected(lines, katib.METRICS_FORMAT, [obj["spec"]["objective"]["objectiveMetricName"],
                                                  *obj["spec"]["objective"]["additionalMetricNames"]])
    assert sorted(got) == sorted(expected) and {k for k, _ in got} == set(METRICS)
    latest = {k: v for k, v in got}  # Katib's "latest": the last value read
    assert latest["val_auc"] == dict(t.split("=") for t in printed[-1].split()[1:])["val_auc"]
    # Katib's default filter would also read the summary `topoflow train` ends with (rounded values): the
    # study would score trials by it
    summary = [line for line in lines if "val_auc=" in line and line not in printed]
    assert summary and len(collected(lines, [KATIB_DEFAULT_FILTER], list(METRICS))) > len(expected)
    assert (work / "model" / "model_card.json").exists()  # exported to the scratch volume


# ---- the launcher -------------------------------------------------------------------------------------------

@pytest.fixture
def k8s():
    server = StandInAPI().start()
    yield server
    server.stop()


def _run(k8s, cfg: Config | None = None, **kwargs):
    """katib.run against the stand-in, fast polling; (its result or the error it raised, the lines it logged)."""
    lines: list[str] = []
    try:
        result = katib.run(cfg or _cfg("train.model=hlf"), NS, client=k8s.client(), log=lines.append, poll_s=0.01,
                           **kwargs)
    except TopoflowError as e:
        result = e
    return result, lines


def test_a_study_runs_and_its_best_trial_comes_back_typed(k8s):
    cfg = _cfg("train.model=hlf", "tune.trials=6", "tune.parameters={learning_rate: {low: 0.0003, high: 0.03, "
               "scale: log}, dense_units: {low: 16, high: 64, step: 16}, hlf_units: {choices: [[50, 20, 10], [64]]}}")
    result, lines = _run(k8s, cfg)
    (obj,) = k8s.experiments()
    validate(as_submitted(obj))  # the stand-in's status has Katib's shape too
    best = obj["status"]["currentOptimalTrial"]["bestTrialName"]
    assert result == {"trial": best, "parameters": {"learning_rate": 0.0003, "dense_units": 16, "hlf_units": [50, 20, 10]},
                      "objective": float(OBSERVED["val_auc"][0]),  # the last value, not the best
                      "metrics": {m: float(v[0]) for m, v in OBSERVED.items()}}
    assert [type(v) for v in result["parameters"].values()] == [float, int, list]
    assert [v for v, _ in k8s.requests] == ["namespace", "get", "create", "get", "get", "get", "get"]
    assert lines == [
        f"created Experiment {NS}/hlf: 6 trials, 2 at a time; trials: kubectl -n {NS} get trials -l "
        "katib.kubeflow.org/experiment=hlf",
        f"Experiment {NS}/hlf: waiting for Katib's controller to take it up (no status yet)",
        f"Experiment {NS}/hlf: Created",
        f"Experiment {NS}/hlf: Running, trials: 2 running of 6",
        f"Experiment {NS}/hlf: Succeeded, trials: 6 succeeded of 6; best val_auc 0.9671"]


def test_a_failed_study_says_which_trials_failed_and_where_to_look(k8s):
    k8s.play_katib("fails")
    error, lines = _run(k8s)
    text = str(error)
    assert isinstance(error, TopoflowError), error
    assert text.startswith(f"Experiment {NS}/hlf failed: ExperimentFailed: Experiment has failed because max failed "
                           "count has reached\n")
    validate(as_submitted(k8s.experiments()[0]))
    status = k8s.experiments()[0]["status"]
    failed, missing = status["failedTrialList"], status["metricsUnavailableTrialList"]
    assert f"failed trials: {', '.join(failed)}; a trial's log: kubectl -n {NS} logs -l katib.kubeflow.org/trial=" \
           f"{failed[0]} -c train" in text
    assert f"trials without metrics: {missing[0]}" in text and "-c metrics-logger-and-collector" in text
    assert f"{INJECTION_LABEL}=enabled" in text and "allow-katib-trial" in text
    assert text.endswith(f"its trials: kubectl -n {NS} get trials -l katib.kubeflow.org/experiment=hlf")
    assert lines[-1] == f"Experiment {NS}/hlf: Failed, trials: 1 succeeded, 4 failed of 12; best val_auc 0.9671"


@pytest.mark.parametrize("how", ["argument", "config"])
def test_a_study_that_does_not_end_times_out_and_is_left_running(k8s, how):
    k8s.play_katib("runs_forever")
    cfg = _cfg("train.model=hlf", *(["tune.timeout_s=1"] if how == "config" else []))
    error, _ = _run(k8s, cfg, **({"timeout_s": 0.3} if how == "argument" else {}))
    waited = "0.3" if how == "argument" else "1"
    assert str(error) == (
        f"Experiment {NS}/hlf still Running, trials: 2 running of 12 after {waited} s; it keeps running (Katib bounds "
        f"a study by its trials only)\nits trials: kubectl -n {NS} get trials -l katib.kubeflow.org/experiment=hlf\n"
        f"wait again with the same settings (the study continues), or stop it: kubectl -n {NS} delete experiment hlf")
    assert len(k8s.experiments()) == 1 and "delete" not in {v for v, _ in k8s.requests}


def test_forbidden_create_is_an_rbac_error(k8s):
    k8s.forbidden = {"create"}
    text = str(_run(k8s)[0])
    assert text.startswith(f"not allowed to create experiments.kubeflow.org in namespace '{NS}' (403 Forbidden, "
                           "RBAC): ")
    assert "must allow verb 'create' on resource 'experiments' in API group 'kubeflow.org'" in text


def test_an_invalid_experiment_is_refused_naming_the_field(k8s, monkeypatch):
    monkeypatch.setattr(katib, "_number", lambda value, kind: float(value))  # a number where Katib wants text
    text = str(_run(k8s)[0])
    assert text.startswith(f"cannot create experiments.kubeflow.org in namespace '{NS}' (422 Unprocessable Entity): ")
    assert "$.spec.parameters[0].feasibleSpace.min: 0.0003 is not of type 'string'" in text
    assert not k8s.experiments()


def test_a_namespace_without_the_injection_label_is_named(k8s):
    k8s.namespaces[NS] = {}
    error, lines = _run(k8s)
    assert lines[0] == (f"warning: namespace {NS} lacks the label {INJECTION_LABEL}=enabled, under which Katib collects "
                        f"trial metrics\nlabel it: kubectl label namespace {NS} {INJECTION_LABEL}=enabled "
                        "(k8s/base/namespace.yaml has it)")
    assert str(error) == (  # and Katib 0.19's webhook refuses the Experiment
        f"cannot create experiments.kubeflow.org in namespace '{NS}' (400 Bad Request): admission webhook "
        f'"validator.experiment.katib.kubeflow.org" denied the request: Cannot create the Experiment "hlf" in '
        f'namespace "{NS}": the namespace lacks label "{INJECTION_LABEL}: enabled"')


def test_a_service_account_that_may_not_read_namespaces_skips_the_check(k8s):
    k8s.forbidden = {"namespaces"}
    result, lines = _run(k8s)
    assert result["trial"] and not any(line.startswith("warning") for line in lines)


def test_a_study_of_the_same_name_is_continued_with_more_trials(k8s):
    first, _ = _run(k8s, _cfg("train.model=hlf", "tune.trials=4"))
    result, lines = _run(k8s, _cfg("train.model=hlf", "tune.trials=7"))
    (obj,) = k8s.experiments()
    assert obj["spec"]["maxTrialCount"] == 7 and obj["status"]["trials"] == obj["status"]["trialsSucceeded"] == 7
    assert lines[0] == f"continuing Experiment {NS}/hlf: 7 trials now (4 so far)"
    assert any(line.startswith(f"Experiment {NS}/hlf: Restarting, trials: 4 succeeded of 7") for line in lines)
    assert lines[-1].startswith(f"Experiment {NS}/hlf: Succeeded, trials: 7 succeeded of 7")
    assert result["parameters"] == first["parameters"] and [v for v, _ in k8s.requests].count("create") == 1
    # the same study again: nothing to add, its result at once
    again, lines = _run(k8s, _cfg("train.model=hlf", "tune.trials=7"))
    assert again == result and lines[0] == f"continuing Experiment {NS}/hlf (7 trials so far, at most 7)"
    assert [v for v, _ in k8s.requests].count("update") == 1


def test_another_study_of_the_same_name_is_refused(k8s):
    _run(k8s)
    error, _ = _run(k8s, _cfg("train.model=hlf", "tune.parameters={dropout: {low: 0.1, high: 0.3}}"))
    assert str(error) == (
        f"Experiment {NS}/hlf exists with another search space or trial template, and Katib lets a study change only "
        "its trial counts\ncontinue it with the settings it was made with, give this study another tune.name, or "
        f"delete it: kubectl -n {NS} delete experiment hlf")


def test_a_failed_study_is_not_continued(k8s):
    k8s.play_katib("fails")
    _run(k8s)
    error, _ = _run(k8s, _cfg("train.model=hlf", "tune.trials=20"))
    assert str(error).startswith(f"Experiment {NS}/hlf failed earlier (ExperimentFailed: Experiment has failed because "
                                 "max failed count has reached); Katib does not restart a failed study\n")
    assert f"start afresh: kubectl -n {NS} delete experiment hlf" in str(error)


def test_a_study_katib_never_takes_up_times_out_asking_for_its_controller(k8s):
    k8s.study = [""]  # no controller: the status stays empty
    text = str(_run(k8s, timeout_s=0.2)[0])
    assert text.startswith(f"Experiment {NS}/hlf still waiting for Katib's controller to take it up (no status yet) "
                           "after 0.2 s;")
    assert "\nis Katib's controller running? kubectl -n kubeflow get pods -l katib.kubeflow.org/component=controller\n" \
        in text


def test_ctrl_c_leaves_the_study_running_and_says_so(k8s):
    lines: list[str] = []

    def log(line: str) -> None:
        lines.append(line)
        if line.endswith(": Created"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        katib.run(_cfg("train.model=hlf"), NS, client=k8s.client(), log=log, poll_s=0.01)
    assert lines[-1] == (f"stopped waiting; Experiment {NS}/hlf keeps running (stop it: kubectl -n {NS} delete "
                         "experiment hlf)")
    assert len(k8s.experiments()) == 1 and "delete" not in {v for v, _ in k8s.requests}
