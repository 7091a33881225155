"""Train with the multiworker engine on Kubernetes: a ``kubeflow.org/v1`` TFJob of ``train.workers`` workers, each
running ``topoflow train --engine multiworker --resume auto`` with the run's settings (:func:`tfjob`), and the
launcher that creates it, waits for the training operator to end it and returns the model's URL (:func:`run`).

What it relies on, read in kubeflow/training-operator v1.9.0:

- TF_CONFIG. The operator injects it only into the container named ``tensorflow`` (``TFJobDefaultContainerName``),
  with each worker's address at the port named ``tfjob-port`` (default 2222) of the headless service it makes per
  replica. Without a Chief, worker 0 is the chief: the job succeeds when it exits 0 (``successPolicy`` "") and it
  writes the checkpoint and the export (:mod:`topoflow.engines`).
- Status. Conditions Created → Running → Succeeded or Failed, reasons ``TFJob<Type>``; Restarting replaces Running
  while a failed worker is recreated (``pkg/util/status.go``), a success ends [Created, Running (False),
  Succeeded].
- Restarts. ``restartPolicy: ExitCode`` (``controller.v1/common/pod.go``) recreates a worker that exits with 128–255
  (a signal: eviction, OOM kill): it deletes the failed pod, with its log, and creates another at the same replica
  index; on 1–127 it fails the job at once (topoflow's errors exit 2: a bad input would fail again). Nothing in the
  operator bounds these restarts: ``runPolicy.backoffLimit`` counts container restarts, which ExitCode never makes
  (kubeflow/trainer#2045), so the TFJob sets none. :func:`run` counts them itself, as new pods at a replica index it
  has seen (the Restarting condition cannot be counted: ``filterOutCondition`` drops it as soon as Running is set
  again, often within the reconcile that set it, and two workers failing together make one), and stops the job
  after ``pipeline.train_restarts``. A recreated worker continues the checkpoint on ``pipeline.pvc``; without a
  volume it starts over.
- ``cleanPodPolicy: Running``: when the job ends, workers still running are deleted (their GPUs freed); the pods
  that ended stay, so the log of a worker that failed for good can be read.
"""

from __future__ import annotations

import hashlib
import json
import time

from topoflow import images, kube
from topoflow.config import Config, TrainConfig, as_overrides
from topoflow.errors import TopoflowError
from topoflow.extras import require

TFJOB = kube.Resource("kubeflow.org", "v1", "tfjobs", "TFJob", "the Kubeflow training operator")
CONTAINER = "tensorflow"  # the operator injects TF_CONFIG into this container only
PORT = {"name": "tfjob-port", "containerPort": 2222, "protocol": "TCP"}  # the address TF_CONFIG gives each worker
WORK = "/var/lib/topoflow"  # a worker's scratch volume: its checkpoints when there is no pipeline.pvc
LABELS = {"app.kubernetes.io/name": "topoflow-train", "app.kubernetes.io/component": "train",
          "app.kubernetes.io/part-of": "topoflow"}
JOB_LABEL, TYPE_LABEL, INDEX_LABEL = ("training.kubeflow.org/job-name", "training.kubeflow.org/replica-type",
                                       "training.kubeflow.org/replica-index")  # on its pods
SETTINGS = "topoflow/settings"  # annotation: a digest of the spec, to tell the same training from another one
TRIES = 5  # creations tried while a deleted job of the same name is still going


def name(cfg: Config) -> str:
    """One TFJob per model and namespace: a re-run finds the job of the run it continues, and two trainings of a
    model never write one checkpoint folder at once."""
    return f"topoflow-{cfg.train.model}"


def tfjob(cfg: Config, namespace: str | None = None) -> dict:
    """The TFJob training ``cfg.train.model`` on ``train.workers`` workers, each a pod as the pipeline's training
    (``cfg.pipeline``: resources and GPUs per worker, Secrets, volume)."""
    tc, pc = cfg.train, cfg.pipeline
    kube.require_shared(cfg, "each worker's pod")
    container = {"name": CONTAINER, "image": images.TRAIN, "command": _command(cfg), "ports": [dict(PORT)]}
    pod = kube.training_pod(pc, container, scratch=None if pc.pvc else WORK)
    spec = {
        "runPolicy": {"cleanPodPolicy": "Running", "suspend": False, "ttlSecondsAfterFinished": 86400},
        "tfReplicaSpecs": {"Worker": {
            "replicas": tc.workers,
            "restartPolicy": "ExitCode",
            "template": {"metadata": {"labels": dict(LABELS),
                                      # an Istio sidecar would outlive training and hold the pod
                                      "annotations": {"sidecar.istio.io/inject": "false"}},
                         "spec": pod}}},
    }
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    metadata = {"name": name(cfg), **({"namespace": namespace} if namespace else {}), "labels": dict(LABELS),
                "annotations": {SETTINGS: digest}}
    return {"apiVersion": TFJOB.api_version, "kind": TFJOB.kind, "metadata": metadata, "spec": spec}


def _command(cfg: Config) -> list[str]:
    """A worker's command: ``topoflow train`` with every train and storage setting that differs from its default
    (secrets never: they come from the Secret), continuing its checkpoint when there is one (a recreated worker), as
    many TensorFlow threads as the CPU limit's whole CPUs (TensorFlow would start one per core of the node)."""
    tc = cfg.train
    settings = as_overrides(cfg.public_dump(exclude_defaults=True, include={"storage": True, "train": {
        n for n in TrainConfig.model_fields if n not in {"model", "engine", "checkpoint_dir"}}}))
    if tc.threads is None:
        settings.append(f"train.threads={kube.whole_cpus(cfg.pipeline.train_cpu)}")
    settings.append(f"train.checkpoint_dir={kube.checkpoint_dir(cfg, WORK)}")
    return ["topoflow", "train", "--model", tc.model, "--engine", "multiworker", "--resume", "auto",
            "--no-progress", *(a for s in settings for a in ("--set", s))]


def run(cfg: Config, namespace: str, client=None, log=print, timeout_s: float | None = None,
        poll_s: float = 10.0) -> str:
    """Train ``cfg.train.model`` as a TFJob in ``namespace`` and return the URL of its export. An existing job of
    the same training (an interrupted pipeline step run again) is waited for instead of started twice; a finished
    one is replaced (its workers resume the checkpoint on the volume if their settings are the same); one of other
    settings still running is refused. The job is deleted when the wait is abandoned (``timeout_s``, Ctrl-C,
    SIGTERM: a cancelled run) or after more than ``pipeline.train_restarts`` restarts (recreated worker pods, read
    at each poll). ``client`` is a ``kubernetes.client.ApiClient``
    (default: the in-cluster service account, else the kubeconfig)."""
    k8s = require("kubernetes.client", "pipeline")
    api = client or kube.default_client()
    crd, core = k8s.CustomObjectsApi(api), k8s.CoreV1Api(api)
    body = tfjob(cfg, namespace)
    job, pc = body["metadata"]["name"], cfg.pipeline
    where = f"TFJob {namespace}/{job}"
    if not pc.pvc:
        log(f"warning: pipeline.pvc is not set: a restarted worker of {where} starts its training over (set "
            "pipeline.pvc to a ReadWriteMany volume to keep checkpoints)")
    seen: dict[str, set[str]] = {}  # replica index -> the UIDs of its worker pods so far
    pods: list = []  # the worker pods at the last read

    def read() -> dict:
        """The job, and its worker pods: each new pod at a replica index already seen is a restart."""
        nonlocal pods
        obj = kube.call(crd, TFJOB, "get", namespace, crd.get_namespaced_custom_object, name=job)
        pods = _workers(core, namespace, obj)
        for pod in pods:
            seen.setdefault(pod.metadata.labels.get(INDEX_LABEL), set()).add(pod.metadata.uid)
        return obj

    def restarts() -> int:
        return sum(len(uids) - 1 for uids in seen.values())

    with kube.sigterm_interrupts():
        _start(crd, namespace, body, log)
        try:
            obj = kube.wait(read, lambda obj: f"{where}: {_progress(obj, pc, restarts())}",
                            lambda obj: _finished(obj) or restarts() > pc.train_restarts, timeout_s, poll_s, log)
        except kube.TimedOut as e:
            kube.delete(crd, TFJOB, namespace, job, log)
            hint = "" if (e.last.get("status") or {}).get("conditions") else (
                "\nis the training operator running? kubectl -n kubeflow get pods -l control-plane="
                "kubeflow-training-operator")
            raise TopoflowError(f"{where} still {_progress(e.last, pc, restarts())} after {timeout_s:g} s; deleted "
                                f"it{hint}\nallow more time, or look at its workers: kubectl -n {namespace} get pods "
                                f"-l {JOB_LABEL}={job}") from None
        except BaseException:  # Ctrl-C, SIGTERM, an API error: nobody would watch the training any more
            kube.delete(crd, TFJOB, namespace, job, log)
            raise
        if not _finished(obj):  # restarted too often
            failed = _failed_worker(api, namespace, job, pods)  # before the deletion takes the pods along
            kube.delete(crd, TFJOB, namespace, job, log)
            raise TopoflowError(f"{where} restarted its workers {restarts()} times, more than pipeline."
                                f"train_restarts ({pc.train_restarts}); deleted it\n{failed}")
    failed = kube.condition(obj, "Failed")
    if failed:
        raise TopoflowError(f"{where} failed: {failed.get('reason')}: {failed.get('message')}\n"
                            + _failed_worker(api, namespace, job, pods))
    return cfg.train.resolved(cfg.train.output)


def _start(crd, namespace: str, body: dict, log) -> None:
    """Create the TFJob; or wait for the one of that name when it runs the same training; or replace a finished
    one. Another training of the same model, still running, is refused: the job's name is the model's."""
    job = body["metadata"]["name"]
    where = f"TFJob {namespace}/{job}"
    for _ in range(TRIES):
        old = kube.call(crd, TFJOB, "get", namespace, crd.get_namespaced_custom_object, name=job, missing_ok=True)
        if old and not (old.get("metadata") or {}).get("deletionTimestamp"):
            same = old["metadata"].get("annotations", {}).get(SETTINGS) == body["metadata"]["annotations"][SETTINGS]
            if not _finished(old):
                if not same:
                    raise TopoflowError(f"{where} is running another training of this model (other settings); "
                                        f"one job trains a model at a time\nwait for it, or stop it: kubectl -n "
                                        f"{namespace} delete tfjob {job}")
                log(f"{where} of these settings is already running: waiting for it")
                return
            state = "succeeded" if kube.condition(old, "Succeeded") else "failed"
            kube.call(crd, TFJOB, "delete", namespace, crd.delete_namespaced_custom_object, name=job, missing_ok=True)
            log(f"deleted {where}, which {state} earlier, to train again")
        try:
            kube.call(crd, TFJOB, "create", namespace, crd.create_namespaced_custom_object, body=body)
        except kube.Conflict:  # the old one is still being deleted, or another step created it meanwhile
            time.sleep(1)
            continue
        workers = body["spec"]["tfReplicaSpecs"]["Worker"]["replicas"]
        log(f"created {where}: {workers} workers; their logs: kubectl -n {namespace} logs -l {JOB_LABEL}={job} "
            f"-c {CONTAINER} -f")
        return
    raise TopoflowError(f"{where} could not be created: it kept existing after {TRIES} tries\n"
                        f"kubectl -n {namespace} get tfjob {job}")


def _finished(obj: dict) -> bool:
    return bool(kube.condition(obj, "Succeeded") or kube.condition(obj, "Failed"))


def _progress(obj: dict, pc, restarts: int) -> str:
    """The job's state in words: its last true condition (and what a restart means here), its workers, the restarts
    counted so far."""
    s = obj.get("status") or {}
    true = [c for c in s.get("conditions", []) if c.get("status") == "True"]
    if not true:
        return "waiting for the training operator to take it up (no status yet)"
    line = true[-1]["type"]
    if line == "Restarting":
        line += (f" ({true[-1].get('message', '').strip()} Workers continue from their checkpoint on {pc.pvc})"
                 if pc.pvc else f" ({true[-1].get('message', '').strip()} Without pipeline.pvc they start over)")
    counts = (s.get("replicaStatuses") or {}).get("Worker") or {}
    workers = ", ".join(f"{counts[k]} {k}" for k in ("active", "succeeded", "failed") if counts.get(k))
    return line + (f", workers: {workers}" if workers else "") + \
        (f", restarts: {restarts} (at most {pc.train_restarts})" if restarts else "")


def _workers(core, namespace: str, obj: dict) -> list:
    """The worker pods of the job ``obj``: those it owns, not those of a deleted job of the same name that may
    still be terminating. ``core`` is a ``CoreV1Api``."""
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    job, uid = obj["metadata"]["name"], obj["metadata"]["uid"]
    try:
        pods = core.list_namespaced_pod(namespace, label_selector=f"{JOB_LABEL}={job},{TYPE_LABEL}=worker",
                                        _request_timeout=kube.REQUEST_TIMEOUT).items
    except ApiException as e:
        rbac = ("\nthe Role in k8s/ bound to the service account this runs as must allow verb 'list' on resource "
                "'pods': the workers' restarts are counted by their pods") if e.status == 403 else ""
        raise TopoflowError(f"cannot list the worker pods of TFJob {namespace}/{job} ({e.status} {e.reason}): "
                            f"{kube.message(e)}{rbac}") from None
    except HTTPError as e:
        raise TopoflowError(f"cannot reach the Kubernetes API server at {core.api_client.configuration.host}: "
                            f"{kube.reason(e)}") from None
    return [p for p in pods if any(o.uid == uid for o in p.metadata.owner_references or [])]


def _failed_worker(api, namespace: str, job: str, pods: list) -> str:
    """Which of the worker ``pods`` failed, its exit code, what it printed, and how to read its whole log (the
    operator's status names only the replica type); to be called before the job is deleted, which takes the pods
    along. A worker that exited with 128-255 has usually no pod left: the operator deleted it to recreate it."""
    failed = sorted((p for p in pods if p.status.phase == "Failed"), key=lambda p: p.metadata.name)
    if not failed:
        return (f"the failed worker's pod is gone (the training operator deletes a worker that exits with 128-255, "
                f"e.g. killed for memory, to recreate it) and its log with it; the exit codes: kubectl -n {namespace} "
                f"get events --field-selector involvedObject.name={job},reason=ExitedWithCode")
    pod = failed[0].metadata.name
    code = next((s.state.terminated.exit_code for s in failed[0].status.container_statuses or []
                 if s.name == CONTAINER and s.state and s.state.terminated), None)
    if code is None:
        why = " failed"
    elif code < 128:
        why = f" exited with code {code} (not retried: 1-127 are permanent)"
    else:  # read before the operator deleted the pod to recreate it
        why = f" exited with code {code}" + (" (killed, often for memory: pipeline.train_memory)" if code == 137 else "")
    said = kube.pod_error(api, namespace, pod, CONTAINER, f"worker {pod}")
    return f"worker {pod}{why}\n" + (f"{said}\n" if said else "") + \
        f"its whole log: kubectl -n {namespace} logs {pod} -c {CONTAINER}"
