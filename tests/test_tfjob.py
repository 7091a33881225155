"""topoflow.tfjob: the TFJob it builds (checked against the training operator's CRD, its pods strictly as core
pods), its workers' command (parsed by topoflow's own CLI into the intended settings), and the launcher against a
stand-in API server (tests/k8s_api.py) that the real ``kubernetes`` client talks to and that moves the job along as
the training operator v1.9.0 does."""

from __future__ import annotations

import json
import re

import pytest

from crds import validate
from k8s_api import WORKER_ERROR, StandInAPI, as_submitted
from topoflow import images, kube, tfjob
from topoflow.cli import _STAGE_OVERRIDES, _parser
from topoflow.config import Config, load_config
from topoflow.errors import ConfigError, TopoflowError

NS = "topoflow"
SECRET = "tfjob-secret-value-0042"
CLUSTER = ["train.engine=multiworker", "train.data=s3://topoflow-data/prepared",
           "train.output=s3://topoflow-data/models/{model}", "storage.s3_endpoint_url=https://s3.example.org"]
CONFIGS = {  # what a cluster varies: CPU only, GPUs, a volume for checkpoints, the XRootD proxy, no S3 Secret
    "cpu": ["pipeline.gpus=0", "train.workers=3"],
    "gpu": ["pipeline.gpus=2", "pipeline.train_cpu='8'", "pipeline.train_memory=32Gi"],
    "pvc": ["pipeline.pvc=checkpoints", "pipeline.gpus=0"],
    "secrets": ["pipeline.xrootd_secret=eos-proxy", "pipeline.s3_secret=null"],
}


def _cfg(*overrides: str) -> Config:
    return load_config(overrides=[f"storage.s3_secret_access_key={SECRET}", "storage.s3_access_key_id=AKIA-tfjob",
                                  *CLUSTER, *overrides])


def _worker(obj: dict) -> dict:
    return obj["spec"]["tfReplicaSpecs"]["Worker"]


# ---- the object ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", CONFIGS)
def test_the_tfjob_is_valid_and_runs_workers_as_the_pipelines_training(kind):
    import kubernetes_validate

    cfg = _cfg(*CONFIGS[kind])
    obj = tfjob.tfjob(cfg, namespace=NS)
    validate(obj)
    worker, pc = _worker(obj), cfg.pipeline
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "w", "namespace": NS},
           "spec": {**worker["template"]["spec"], "restartPolicy": "Never"}}  # what the operator makes of it
    kubernetes_validate.validate(pod, "1.32.0", strict=True)
    assert (obj["metadata"]["name"], obj["metadata"]["namespace"]) == ("topoflow-inclusive", NS)
    assert worker["replicas"] == cfg.train.workers and worker["restartPolicy"] == "ExitCode"
    assert obj["spec"]["runPolicy"] == {"cleanPodPolicy": "Running", "suspend": False, "ttlSecondsAfterFinished": 86400}
    spec = worker["template"]["spec"]
    (c,) = spec["containers"]
    assert (c["name"], c["image"], c["ports"]) == ("tensorflow", images.TRAIN, [
        {"name": "tfjob-port", "containerPort": 2222, "protocol": "TCP"}])  # where TF_CONFIG goes, and its port
    gpus = {pc.gpu_resource: str(pc.gpus)} if pc.gpus else {}
    assert c["resources"]["requests"] == c["resources"]["limits"] == {"cpu": pc.train_cpu, "memory": pc.train_memory,
                                                                      **gpus}
    assert spec.get("nodeSelector") == (pc.gpu_node_selector if pc.gpus else None)
    assert bool(spec.get("tolerations")) == bool(pc.gpus)
    assert spec["serviceAccountName"] == "topoflow-train" and spec["automountServiceAccountToken"] is False
    assert spec["securityContext"]["runAsNonRoot"] is True and c["securityContext"]["readOnlyRootFilesystem"] is True
    env = {e["name"]: e.get("value") or e["valueFrom"]["secretKeyRef"] for e in c.get("env", [])}
    assert ("AWS_ACCESS_KEY_ID" in env) == bool(pc.s3_secret)
    assert ("X509_USER_PROXY" in env) == bool(pc.xrootd_secret)
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    checkpoints = _settings(c["command"]).train.checkpoint_dir
    if pc.pvc:  # the checkpoint lives on the volume: a recreated worker continues it
        assert volumes[mounts[pc.pvc_mount]]["persistentVolumeClaim"] == {"claimName": pc.pvc}
        assert re.fullmatch(rf"{pc.pvc_mount}/checkpoints/inclusive-[0-9a-f]{{8}}", checkpoints)
    else:
        assert "emptyDir" in volumes[mounts[tfjob.WORK]] and checkpoints.startswith(tfjob.WORK + "/")
    text = json.dumps(obj)
    assert SECRET not in text and "AKIA-tfjob" not in text


def _settings(command: list[str]) -> Config:
    """The configuration a worker runs with: its command parsed by topoflow's CLI."""
    assert command[:2] == ["topoflow", "train"]
    args = _parser().parse_args(command[1:])
    assert args.resume == "auto" and args.no_progress and not args.restart
    return load_config(args.config, args.overrides + _STAGE_OVERRIDES["train"](args))


def test_the_workers_command_is_the_cli_with_the_runs_settings():
    cfg = _cfg("train.epochs=9", "train.batch_size=256", "train.workers=4", "pipeline.train_cpu='3500m'",
               "train.model=gru", "pipeline.pvc=data")
    (c,) = _worker(tfjob.tfjob(cfg))["template"]["spec"]["containers"]
    worker = _settings(c["command"])
    assert re.fullmatch(r"/data/checkpoints/gru-[0-9a-f]{8}", worker.train.checkpoint_dir)
    expected = {**cfg.train.model_dump(), "threads": 3, "checkpoint_dir": worker.train.checkpoint_dir}
    assert worker.train.model_dump() == expected and worker.train.engine == "multiworker"
    assert worker.storage.s3_endpoint_url == "https://s3.example.org" and worker.storage.s3_access_key_id is None
    configured = _worker(tfjob.tfjob(_cfg("train.threads=2")))["template"]["spec"]["containers"][0]["command"]
    assert _settings(configured).train.threads == 2  # a configured value stays


def test_the_checkpoint_folder_is_per_settings():
    """A re-run of the same settings continues the checkpoint (also with other workers, or on other nodes); one of
    other settings (a new tuning result) starts afresh instead of failing on a checkpoint it cannot resume."""
    def folder(*overrides):
        (c,) = _worker(tfjob.tfjob(_cfg("pipeline.pvc=data", *overrides)))["template"]["spec"]["containers"]
        return _settings(c["command"]).train.checkpoint_dir

    assert folder() == folder("train.workers=4", "train.threads=2", "train.output=s3://elsewhere/{model}")
    assert folder("train.learning_rate=0.001") != folder() != folder("train.epochs=9")
    assert folder("train.checkpoint_dir=/data/mine") == "/data/mine"  # a configured folder on the volume stays


@pytest.mark.parametrize("overrides, message", [
    (["train.output=out/models/{model}"], r"train.output is 'out/models/inclusive', a path inside each worker's pod"),
    (["train.data=/data/prepared"], r"(?s)train.data is '/data/prepared', a path .* pipeline.pvc set"),
])
def test_a_path_the_workers_cannot_share_is_a_config_error(overrides, message):
    with pytest.raises(ConfigError, match=message):
        tfjob.tfjob(_cfg(*overrides))
    tfjob.tfjob(_cfg(*overrides, "pipeline.pvc=data", "pipeline.pvc_mount=/data", "train.output=/data/models/x"))


# ---- the launcher ------------------------------------------------------------------------------------------

@pytest.fixture
def k8s():
    server = StandInAPI().start()
    yield server
    server.stop()


def _run(k8s, *overrides, **kwargs):
    """tfjob.run against the stand-in, fast polling; (the model URL or the error raised, logged lines)."""
    lines: list[str] = []
    kwargs.setdefault("log", lines.append)
    try:
        result = tfjob.run(_cfg(*overrides), NS, client=k8s.client(), poll_s=0.01, **kwargs)
    except TopoflowError as e:
        result = e
    return result, lines


def _states(lines: list[str]) -> list[str]:
    return [line.split(": ", 1)[1] for line in lines if line.startswith(f"TFJob {NS}/topoflow-inclusive: ")]


def test_success_returns_the_export_and_logs_each_state(k8s):
    url, lines = _run(k8s)
    assert url == "s3://topoflow-data/models/inclusive"
    assert _states(lines) == ["waiting for the training operator to take it up (no status yet)", "Created",
                              "Running, workers: 2 active", "Succeeded, workers: 2 succeeded"]
    assert lines[0].startswith("warning: pipeline.pvc is not set: a restarted worker")
    (job,) = k8s.tfjobs()
    validate(as_submitted({k: v for k, v in job.items() if k != "status"}))
    assert [c["type"] for c in job["status"]["conditions"]] == ["Created", "Running", "Succeeded"]
    assert [c["status"] for c in job["status"]["conditions"]] == ["True", "False", "True"]


def test_a_failed_worker_is_named_with_its_exit_code_and_error(k8s):
    k8s.play_tfjob("fails")
    error, _ = _run(k8s)
    assert str(error) == (
        f"TFJob {NS}/topoflow-inclusive failed: TFJobFailed: job \"topoflow-inclusive\" is failing because "
        "\"Worker\" replica(s) failed.\n"
        "worker topoflow-inclusive-worker-1 exited with code 2 (not retried: 1-127 are permanent)\n"
        "worker topoflow-inclusive-worker-1 printed:\n" + "\n".join(f"  {line}" for line in WORKER_ERROR.splitlines())
        + f"\nits whole log: kubectl -n {NS} logs topoflow-inclusive-worker-1 -c tensorflow")
    assert k8s.log_queries == [{"container": "tensorflow", "tailLines": str(kube.LOG_TAIL)}]


def test_pods_that_cannot_be_listed_stop_the_job_with_an_rbac_error(k8s):
    k8s.forbidden.add("pods")  # restarts could not be counted
    error, lines = _run(k8s)
    assert str(error).startswith(f"cannot list the worker pods of TFJob {NS}/topoflow-inclusive (403 Forbidden): "
                                 "pods is forbidden: User ")
    assert str(error).endswith("must allow verb 'list' on resource 'pods': the workers' restarts are counted by their "
                               "pods")
    assert lines[-1] == f"deleted TFJob {NS}/topoflow-inclusive" and not k8s.tfjobs()


def test_a_restart_is_reported_and_the_training_continues(k8s):
    k8s.play_tfjob("restarts")
    url, lines = _run(k8s, "pipeline.pvc=checkpoints")
    assert url == "s3://topoflow-data/models/inclusive"
    assert "Restarting (job topoflow-inclusive is restarting because Worker replica(s) failed. Workers continue " \
           "from their checkpoint on checkpoints), workers: 2 active, restarts: 1 (at most 3)" in _states(lines)
    assert _states(lines)[-1] == "Succeeded, workers: 2 succeeded, restarts: 1 (at most 3)"
    assert not any(line.startswith("warning") for line in lines)


def test_more_restarts_than_allowed_stop_the_job(k8s):
    k8s.play_tfjob("keeps_restarting")
    error, lines = _run(k8s, "pipeline.train_restarts=2")
    assert str(error) == (f"TFJob {NS}/topoflow-inclusive restarted its workers 3 times, more than pipeline."
                          "train_restarts (2); deleted it\nthe failed worker's pod is gone (the training operator "
                          "deletes a worker that exits with 128-255, e.g. killed for memory, to recreate it) and its "
                          f"log with it; the exit codes: kubectl -n {NS} get events --field-selector involvedObject."
                          "name=topoflow-inclusive,reason=ExitedWithCode")
    assert sum("Restarting" in s for s in _states(lines)) == 3 and not k8s.tfjobs() and not k8s.pods


def test_restarts_are_counted_by_the_workers_pods_when_no_poll_sees_them_restarting(k8s):
    """An OOM crash loop faster than the polls: the operator drops Restarting within the reconcile that set it, so
    only the new pods tell; the last one, failed, is read before the job's deletion takes it along."""
    k8s.play_tfjob("crash_loops")
    error, lines = _run(k8s, "pipeline.train_restarts=2")
    pod = "topoflow-inclusive-worker-1"
    assert str(error) == (f"TFJob {NS}/topoflow-inclusive restarted its workers 3 times, more than pipeline."
                          f"train_restarts (2); deleted it\nworker {pod} exited with code 137 (killed, often for "
                          f"memory: pipeline.train_memory)\nits whole log: kubectl -n {NS} logs {pod} -c tensorflow")
    assert not any("Restarting" in s for s in _states(lines)) and _states(lines)[-1] == \
        "Running, workers: 1 active, 1 failed, restarts: 3 (at most 2)"
    assert k8s.log_queries and not k8s.tfjobs() and not k8s.pods


def test_pods_of_a_deleted_job_of_the_same_name_are_no_restarts(k8s):
    """A job replaced at once may leave pods still terminating: owned by the old job, they are not its workers."""
    pod = "topoflow-inclusive-worker-0"
    k8s.pods[(NS, pod)] = {"apiVersion": "v1", "kind": "Pod", "status": {"phase": "Running"}, "metadata": {
        "name": pod, "namespace": NS, "uid": "uid-old-pod", "deletionTimestamp": "2026-01-12T10:00:00Z",
        "ownerReferences": [{"apiVersion": "kubeflow.org/v1", "kind": "TFJob", "name": "topoflow-inclusive",
                             "uid": "uid-old-job"}],
        "labels": {"training.kubeflow.org/job-name": "topoflow-inclusive",
                   "training.kubeflow.org/replica-type": "worker", "training.kubeflow.org/replica-index": "0"}}}
    url, lines = _run(k8s)
    assert url.startswith("s3://") and not any("restarts" in state for state in _states(lines))


def test_a_time_out_deletes_the_job(k8s):
    k8s.play_tfjob("runs_forever")
    error, lines = _run(k8s, timeout_s=0.2)
    assert str(error).startswith(f"TFJob {NS}/topoflow-inclusive still Running, workers: 2 active after 0.2 s; "
                                 "deleted it\n")
    assert lines[-1] == f"deleted TFJob {NS}/topoflow-inclusive" and not k8s.tfjobs() and not k8s.pods


def test_cancelling_deletes_the_job(k8s):
    def log(line):
        if "Running" in line:
            raise KeyboardInterrupt  # what SIGTERM becomes (kube.sigterm_interrupts)

    with pytest.raises(KeyboardInterrupt):
        _run(k8s, log=log)
    assert not k8s.tfjobs() and ("delete", "topoflow-inclusive") in k8s.requests


def test_an_existing_job_is_waited_for_replaced_or_refused(k8s):
    k8s.play_tfjob("runs_forever")
    _run(k8s, timeout_s=0.05)  # deletes it: start one that stays
    k8s.objects.clear()
    api = k8s.client()
    from kubernetes import client

    crd = client.CustomObjectsApi(api)
    crd.create_namespaced_custom_object("kubeflow.org", "v1", NS, "tfjobs", tfjob.tfjob(_cfg(), NS))
    k8s.play_tfjob("completes")
    url, lines = _run(k8s)  # the same training: waited for, not created twice
    assert url.startswith("s3://") and lines[1] == f"TFJob {NS}/topoflow-inclusive of these settings is already " \
                                                   "running: waiting for it"
    creates = [r for r in k8s.requests if r[0] == "create"]
    url, lines = _run(k8s)  # now Succeeded: replaced by a new one
    assert url.startswith("s3://") and f"deleted TFJob {NS}/topoflow-inclusive, which succeeded earlier, to train " \
                                       "again" in lines
    assert len([r for r in k8s.requests if r[0] == "create"]) == len(creates) + 1
    k8s.play_tfjob("runs_forever")
    _run(k8s, timeout_s=0.05)
    crd.create_namespaced_custom_object("kubeflow.org", "v1", NS, "tfjobs", tfjob.tfjob(_cfg(), NS))
    error, _ = _run(k8s, "train.epochs=12")  # another training of the model, still running
    assert str(error).startswith(f"TFJob {NS}/topoflow-inclusive is running another training of this model (other "
                                 "settings); one job trains a model at a time\n")
    assert k8s.tfjobs()  # left alone


def test_forbidden_is_an_rbac_error_naming_verb_resource_and_namespace(k8s):
    k8s.forbidden.add("create")
    error, _ = _run(k8s)
    assert str(error).startswith(f"not allowed to create tfjobs.kubeflow.org in namespace '{NS}' (403 Forbidden, "
                                 "RBAC): tfjobs.kubeflow.org is forbidden: User ")
    assert "must allow verb 'create' on resource 'tfjobs' in API group 'kubeflow.org'" in str(error)


def test_an_invalid_object_is_refused_with_the_servers_reason(k8s, monkeypatch):
    build = tfjob.tfjob

    def invalid(cfg, namespace=None):
        obj = build(cfg, namespace)
        obj["spec"]["tfReplicaSpecs"]["Worker"]["replicas"] = "two"
        return obj

    monkeypatch.setattr(tfjob, "tfjob", invalid)
    error, _ = _run(k8s)
    assert str(error).startswith(f"cannot create tfjobs.kubeflow.org in namespace '{NS}' (422 Unprocessable Entity): "
                                 "TFJob.kubeflow.org \"topoflow-inclusive\" is invalid: ")
    assert "$.spec.tfReplicaSpecs.Worker.replicas: 'two' is not of type 'integer'" in str(error)
