"""topoflow.sparkapp: the SparkApplication it builds (checked against the operator's CRD) and the launcher's
behaviour against a stand-in API server (tests/k8s_api.py) that the real ``kubernetes`` client talks to."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import time
from importlib.metadata import version
from pathlib import Path

import pytest

from crds import validate
from k8s_api import CRASH_ERROR, DRIVER_CONTAINER, DRIVER_ERROR, StandInAPI
from topoflow.cli import _parser
from topoflow.config import load_config
from topoflow.errors import ConfigError, TopoflowError
from topoflow.kube import LOG_TAIL, printed_error
from topoflow.sparkapp import IN_CLUSTER_MASTER, SPARK_PORTS, SPARK_VERSION, run_stage, spark_application

NS, IMAGE = "topoflow", "registry.example/topoflow:0.1.0"
REPO = Path(__file__).resolve().parents[1]
KEY, SECRET = "AKIA-launcher-key-0001", "launcher-secret-value-42"


def _cfg():
    return load_config(overrides=[
        "spark.driver_memory=6g", "spark.executor_memory=10g", "spark.executor_cores=3",
        "spark.executor_instances=5", "spark.conf={spark.sql.shuffle.partitions: '64'}",
        f"storage.s3_access_key_id={KEY}", f"storage.s3_secret_access_key={SECRET}",
        "storage.s3_endpoint_url=http://s3.example:8333", "ingest.output=s3://bucket/ingested",
        "ingest.datasets={qcd: ['root://eos.example//store/qcd/*.root']}", "prepare.seed=7",
        "predict.model=s3://bucket/models/gru", "predict.inputs=['root://eos.example//store/run1/*.root']",
    ])


@pytest.fixture
def k8s():
    server = StandInAPI().start()
    yield server
    server.stop()


def _run(k8s, stage="ingest", **kwargs):
    """run_stage against the stand-in, fast polling; returns (status or the error raised, logged lines)."""
    lines: list[str] = []
    kwargs.setdefault("log", lines.append)
    try:
        result = run_stage(stage, _cfg(), namespace=NS, image=IMAGE, api=k8s.client(), poll_s=0.01, **kwargs)
    except TopoflowError as e:
        result = e
    return result, lines


def _free_port() -> int:
    """A port nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _states(lines: list[str]) -> list[str]:
    return [line.rpartition(": ")[2] for line in lines if line.startswith(f"SparkApplication {NS}/")]


def test_object_is_valid_sized_from_config_and_runs_the_same_settings():
    cfg = _cfg()
    obj = spark_application("prepare", cfg, name="topoflow-prepare-abc", namespace=NS, image=IMAGE,
                            service_account="topoflow-spark", secret="topoflow-s3", run_id="run-1")
    validate(obj)
    spec = obj["spec"]
    assert (spec["type"], spec["mode"], spec["image"], spec["restartPolicy"]) == ("Python", "cluster", IMAGE,
                                                                               {"type": "Never"})
    assert spec["sparkVersion"] == SPARK_VERSION == version("pyspark")
    assert (spec["driver"]["memory"], spec["driver"]["serviceAccount"]) == ("6g", "topoflow-spark")
    assert {k: spec["executor"][k] for k in ("memory", "cores", "instances")} == {"memory": "10g", "cores": 3,
                                                                                 "instances": 5}
    assert spec["sparkConf"] == {**SPARK_PORTS, "spark.sql.shuffle.partitions": "64"}
    for role in ("driver", "executor"):  # what k8s/'s pod security and NetworkPolicies expect
        assert spec[role]["securityContext"]["readOnlyRootFilesystem"] and spec[role]["volumeMounts"][0]["mountPath"] == "/tmp"
        assert spec[role]["podSecurityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    for pod in (spec["driver"], spec["executor"], obj["metadata"]):
        assert pod["labels"]["app.kubernetes.io/component"] == "prepare"
        assert pod["labels"]["topoflow/run-id"] == "run-1"
    assert spec["driver"]["podSecurityContext"]["runAsNonRoot"] is True

    # the driver's command line parses, and gives back the launcher's settings with the cluster as master
    args = _parser().parse_args(spec["arguments"])
    assert (args.command, args.no_progress) == ("prepare", True)
    sent = load_config(overrides=args.overrides)
    assert sent.spark.master == IN_CLUSTER_MASTER
    assert sent.storage.s3_secret_access_key is None and sent.storage.s3_access_key_id is None
    expected = cfg.model_copy(deep=True)
    expected.spark.master = IN_CLUSTER_MASTER
    expected.storage.s3_access_key_id = expected.storage.s3_secret_access_key = None
    assert sent == expected

    defaults = spark_application("ingest", load_config(), name="n", namespace=NS, image=IMAGE,
                                 service_account="sa", secret=None, run_id="r")
    validate(defaults)
    assert {k: defaults["spec"]["executor"][k] for k in ("memory", "cores", "instances")} == {
        "memory": "4g", "cores": 1, "instances": 2}
    assert defaults["spec"]["driver"]["env"] == []
    with pytest.raises(ConfigError, match="'evaluate' does not run on Spark"):
        spark_application("evaluate", cfg, name="n", namespace=NS, image=IMAGE, service_account="sa", secret=None,
                          run_id="r")
    with pytest.raises(ConfigError, match="train.engine is 'keras': only the bigdl engine trains on Spark"):
        spark_application("train", cfg, name="n", namespace=NS, image=IMAGE, service_account="sa", secret=None,
                          run_id="r")


@pytest.mark.parametrize("pvc", [None, "checkpoints"])
def test_bigdl_training_runs_the_cli_in_the_bigdl_image(pvc):
    """train.engine bigdl on a cluster: the bigdl image's Spark, Python and jars, train.workers executors, and a
    driver running ``topoflow train`` with the run's settings, its checkpoint on the volume when there is one."""
    from topoflow import sparkapp
    from topoflow.cli import _STAGE_OVERRIDES

    cfg = load_config(overrides=["train.engine=bigdl", "train.workers=6", "train.model=hlf", "train.epochs=3",
                                 "spark.executor_cores=2", "train.data=s3://b/prepared", "train.output=s3://b/m/{model}",
                                 f"storage.s3_secret_access_key={SECRET}", *([f"pipeline.pvc={pvc}"] if pvc else [])])
    obj = spark_application("train", cfg, name="topoflow-train-abc", namespace=NS, image=sparkapp.BIGDL_IMAGE,
                            service_account="topoflow-spark", secret="topoflow-s3")
    validate(obj)
    spec = obj["spec"]
    assert (spec["image"], spec["mainApplicationFile"], spec["sparkVersion"]) == (
        sparkapp.BIGDL_IMAGE, sparkapp.BIGDL_ENTRY, sparkapp.BIGDL_SPARK_VERSION)
    assert spec["sparkConf"] == {**SPARK_PORTS, **sparkapp.BIGDL_CONF}
    assert spec["sparkConf"]["spark.driver.memoryOverhead"] == "4g"  # the JVM's heap is the least of the driver
    assert "/bigdl/share/dllib/lib/" in spec["sparkConf"]["spark.executor.extraClassPath"]
    entry = (REPO / "images" / "bigdl" / "driver.py").read_text()  # becomes `topoflow train --engine bigdl …`
    assert '[topoflow, "train", "--engine", "bigdl", *sys.argv[1:]]' in entry
    dockerfile = (REPO / "images" / "bigdl" / "Dockerfile").read_text()
    assert f"images/bigdl/driver.py {sparkapp.BIGDL_ENTRY.removeprefix('local://')}" in dockerfile
    assert f"BIGDL_CLASSPATH={sparkapp.BIGDL_JARS} " in dockerfile and f"PYSPARK_PYTHON={sparkapp.BIGDL_PYTHON} " in dockerfile
    assert (spec["executor"]["instances"], spec["executor"]["cores"], spec["executor"]["coreLimit"]) == (6, 2, "2")
    args = _parser().parse_args(["train", "--engine", "bigdl", *spec["arguments"]])
    assert args.command == "train" and args.resume == "auto" and args.no_progress
    sent = load_config(args.config, args.overrides + _STAGE_OVERRIDES["train"](args))
    checkpoints = sent.train.checkpoint_dir  # on the volume, else the scratch; per settings
    assert re.fullmatch(r"/data/checkpoints/hlf-[0-9a-f]{8}" if pvc else r"/tmp/checkpoints/hlf-[0-9a-f]{8}",
                        checkpoints)
    assert sent.train.model_dump() == {**cfg.train.model_dump(), "checkpoint_dir": checkpoints}
    assert sent.spark.master == IN_CLUSTER_MASTER and SECRET not in json.dumps(obj)
    claims = [v for v in spec["volumes"] if "persistentVolumeClaim" in v]
    assert claims == ([{"name": "data", "persistentVolumeClaim": {"claimName": pvc}}] if pvc else [])
    assert {m["mountPath"] for m in spec["driver"]["volumeMounts"]} == {"/tmp", *(["/data"] if pvc else [])}


@pytest.mark.parametrize("overrides, message", [
    (["train.output=out/models/{model}"], r"train.output is 'out/models/hlf', a path inside the driver's pod, which "
                                          r"would lose the export when it ends\ngive an s3:// or root:// URL"),
    (["train.data=file:///data/prepared"], r"(?s)train.data is 'file:///data/prepared', a path .* pipeline.pvc set"),
])
def test_bigdl_training_refuses_a_path_inside_the_driver(overrides, message):
    base = ["train.engine=bigdl", "train.model=hlf", "train.data=s3://b/prepared", "train.output=s3://b/m"]

    def build(*more):
        return spark_application("train", load_config(overrides=[*base, *overrides, *more]), name="n", namespace=NS,
                                 image=IMAGE, service_account="sa", secret=None)

    with pytest.raises(ConfigError, match=message):
        build()
    build("pipeline.pvc=data", "pipeline.pvc_mount=/data", "train.output=/data/models/{model}")  # shared, kept


def test_no_secret_value_reaches_the_cluster(k8s, monkeypatch):
    monkeypatch.setenv("AWS_SESSION_TOKEN", "env-token-never-sent")
    status, lines = _run(k8s)
    assert status["applicationState"]["state"] == "COMPLETED"
    (obj,) = k8s.objects.values()
    text = json.dumps(obj) + "\n".join(lines)
    for value in (KEY, SECRET, "env-token-never-sent"):
        assert value not in text
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in obj["spec"]["executor"]["env"]}
    assert env == {"AWS_ACCESS_KEY_ID": {"name": "topoflow-s3", "key": "access_key_id"},
                   "AWS_SECRET_ACCESS_KEY": {"name": "topoflow-s3", "key": "secret_access_key"}}
    assert obj["spec"]["driver"]["env"] == obj["spec"]["executor"]["env"]


@pytest.mark.parametrize("stage", ["ingest", "prepare", "predict"])
def test_success_logs_each_state_and_returns_the_final_status(k8s, stage):
    status, lines = _run(k8s, stage, run_id="kfp-run-7")
    assert status["applicationState"] == {"state": "COMPLETED"}
    assert _states(lines) == ["NEW", "SUBMITTED", "RUNNING", "SUCCEEDING", "COMPLETED"]
    (obj,) = k8s.objects.values()  # kept: the operator's TTL tidies it up
    name = obj["metadata"]["name"]
    assert name.startswith(f"topoflow-{stage}-") and obj["metadata"]["labels"]["topoflow/run-id"] == "kfp-run-7"
    assert obj["spec"]["arguments"][0] == stage
    assert [verb for verb, _ in k8s.requests] == ["create"] + ["get"] * 5


def test_a_failed_driver_is_reported_with_the_error_it_printed(k8s):
    """The operator only knows the exit code; the driver's log has topoflow's `error:` block, message and fix."""
    k8s.play("driver_fails")
    error, lines = _run(k8s)
    assert isinstance(error, TopoflowError)
    (name,) = (n for _, _, n in k8s.objects)
    assert str(error) == (
        f"Spark ingest failed: SparkApplication {NS}/{name} is FAILED: {DRIVER_ERROR}\n"
        "the driver printed:\n"
        "  error: no file matches 's3://bucket/x/*.root'\n"
        "  check the path or glob (and for s3:// the bucket name)\n"
        f"the driver's whole log: kubectl logs -n {NS} {name}-driver")
    assert _states(lines) == ["NEW", "SUBMITTED", "RUNNING", "FAILING", "FAILED"]
    assert k8s.requests[-1] == ("log", f"{name}-driver")
    assert k8s.log_queries == [{"container": DRIVER_CONTAINER, "tailLines": str(LOG_TAIL)}]
    assert ("delete", name) not in k8s.requests  # kept, with its driver's log, for the user to read


def test_a_crashed_driver_is_reported_with_its_tracebacks_last_line(k8s):
    k8s.play("driver_crashes")
    error, _ = _run(k8s)
    assert f"is FAILED: {CRASH_ERROR}\nthe driver printed:\n  RuntimeError: cannot count the events of " \
           "root://eos.example//store/qcd/1.root\nthe driver's whole log: kubectl logs" in str(error)
    assert "AttributeError" not in str(error)  # the first of the chained tracebacks


def test_an_unreadable_driver_log_still_reports_the_failure(k8s):
    k8s.play("driver_fails")
    k8s.forbidden = {"pods/log"}
    error, _ = _run(k8s)
    (name,) = (n for _, _, n in k8s.objects)
    text = str(error)
    assert text.startswith(f"Spark ingest failed: SparkApplication {NS}/{name} is FAILED: {DRIVER_ERROR}\n"
                           "the driver's log could not be read (403 Forbidden): ")
    assert f'pods "{name}-driver" is forbidden: User "{k8s.user}" cannot get resource "pods/log"' in text
    assert "needs verb 'get' on resource 'pods/log'" in text
    assert text.endswith(f"the driver's whole log: kubectl logs -n {NS} {name}-driver")


def test_a_driver_log_out_of_reach_still_reports_the_failure(k8s):
    k8s.play("driver_fails")
    api, port = k8s.client(), _free_port()

    def log(line):
        if line.endswith(": FAILED"):  # the API server is gone by the time the log is read
            api.configuration.host = f"http://127.0.0.1:{port}"

    start = time.monotonic()
    with pytest.raises(TopoflowError) as caught:
        run_stage("ingest", _cfg(), namespace=NS, image=IMAGE, api=api, poll_s=0.01, log=log)
    assert time.monotonic() - start < 5
    assert f"is FAILED: {DRIVER_ERROR}\nthe driver's log could not be read: " in str(caught.value)
    assert "Connection refused" in str(caught.value)


def test_a_failed_submission_ends_the_wait_at_once(k8s):
    k8s.play("submission_fails")
    error, lines = _run(k8s)
    assert "is SUBMISSION_FAILED: failed to submit spark application" in str(error)
    assert 'cannot create resource "pods"' in str(error)
    assert "the driver's log could not be read (404 Not Found): pods " in str(error)  # no driver was started
    assert _states(lines) == ["NEW", "SUBMISSION_FAILED"]


@pytest.mark.parametrize("log, expected", [
    ("", None),
    ("26/01/12 10:14:58 INFO SparkContext: Successfully stopped SparkContext\n", None),
    ("error: first\nerror: bad value 'x'\nin file s3://b/1.root\nuse y\n\nerror-free text\n",
     "error: bad value 'x'\nin file s3://b/1.root\nuse y"),
    ("error: it\n{\"ts\":\"2026-01-12T10:14:58.000Z\",\"level\":\"INFO\",\"msg\":\"stopped\"}\n", "error: it"),
    ("Traceback (most recent call last):\n  File \"x.py\", line 1, in <module>\nKeyError: 'a'\nmore\n",
     "KeyError: 'a'"),
    ("Traceback (most recent call last):\n  File \"x.py\", line 1\nValueError: v\nerror: chosen\n", "error: chosen"),
])
def test_the_drivers_error_is_found_in_its_log(log, expected):
    assert printed_error(log) == expected


def test_the_stand_in_serves_the_tail_of_the_driver_log(k8s):
    k8s.play("driver_fails")
    k8s.objects[("sparkapplications", NS, "app")] = {}
    code, text = k8s.handle("GET", f"/api/v1/namespaces/{NS}/pods/app-driver/log", None, {"tailLines": "2"})
    assert code == 200 and text == "".join(k8s.driver_log.splitlines(keepends=True)[-2:])
    assert len(k8s.driver_log.splitlines()) > LOG_TAIL  # the error is near the end, as in a real log


def test_a_time_out_deletes_the_application(k8s):
    k8s.play("runs_forever")
    error, lines = _run(k8s, timeout_s=0.2)
    assert isinstance(error, TopoflowError) and "still RUNNING after 0.2 s" in str(error)
    assert k8s.requests[-1][0] == "delete" and not k8s.objects
    assert lines[-1].startswith(f"deleted SparkApplication {NS}/topoflow-ingest-")


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_cancelling_deletes_the_application(k8s, how):
    """Ctrl-C, or SIGTERM (Kubeflow deleting the pipeline pod), while the application runs."""
    k8s.play("runs_forever")
    before = signal.getsignal(signal.SIGTERM)

    def log(line):
        if line.endswith(": RUNNING"):
            if how == "ctrl-c":
                raise KeyboardInterrupt
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler interrupts this

    with pytest.raises(KeyboardInterrupt):
        _run(k8s, log=log)
    assert k8s.requests[-1][0] == "delete" and not k8s.objects
    assert signal.getsignal(signal.SIGTERM) == before


def test_forbidden_is_an_rbac_error_naming_verb_resource_and_namespace(k8s):
    k8s.forbidden = {"create"}
    error, _ = _run(k8s)
    text = str(error)
    assert text.startswith(f"not allowed to create sparkapplications.sparkoperator.k8s.io in namespace '{NS}' "
                           "(403 Forbidden, RBAC): ")
    assert f'User "{k8s.user}" cannot create resource "sparkapplications"' in text
    assert "the Role in k8s/" in text and "must allow verb 'create' on resource 'sparkapplications'" in text
    assert [v for v, _ in k8s.requests] == ["create"]

    k8s.forbidden = {"get"}  # created but not watchable: deleted rather than left running unwatched
    error, lines = _run(k8s)
    assert "not allowed to get sparkapplications.sparkoperator.k8s.io" in str(error)
    assert [v for v, _ in k8s.requests[1:]] == ["create", "get", "delete"] and not k8s.objects


def test_an_invalid_object_is_refused_with_the_servers_reason(k8s, monkeypatch):
    monkeypatch.setattr("topoflow.images.UID", "spark")  # a name where the CRD wants a number
    error, _ = _run(k8s)
    assert "cannot create sparkapplications.sparkoperator.k8s.io in namespace 'topoflow' (422" in str(error)
    assert "runAsUser: 'spark' is not of type 'integer'" in str(error)


def test_an_api_server_that_is_not_listening_fails_in_seconds():
    port = _free_port()
    from kubernetes import client

    api = client.ApiClient(client.Configuration(host=f"http://127.0.0.1:{port}"))
    start = time.monotonic()
    with pytest.raises(TopoflowError) as caught:
        run_stage("ingest", _cfg(), namespace=NS, image=IMAGE, api=api, log=lambda line: None)
    assert time.monotonic() - start < 5
    assert f"cannot reach the Kubernetes API server at http://127.0.0.1:{port}: " in str(caught.value)
    assert "Connection refused" in str(caught.value)

