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
  (a signal: eviction, OOM kill) and fails the job at once on 1–127 (topoflow's errors exit 2: a bad input would
  fail again). ``runPolicy.backoffLimit`` does not bound ExitCode restarts (the operator counts container restarts,
  and ExitCode recreates pods; kubeflow/trainer#2045), so :func:`run` counts the restarts it sees and stops the job
  after ``pipeline.train_restarts``. A recreated worker continues the checkpoint on ``pipeline.pvc``; without a
  volume it starts over.
- ``cleanPodPolicy: Running``: when the job ends, workers still running are deleted (their GPUs freed); the pods
  that ended stay, so a failed worker's log can be read.
"""

from __future__ import annotations

import hashlib
import json
import time
from urllib.parse import urlsplit

from topoflow import images, kube
from topoflow.config import Config, TrainConfig, as_overrides
from topoflow.errors import ConfigError, TopoflowError
from topoflow.extras import require

TFJOB = kube.Resource("kubeflow.org", "v1", "tfjobs", "TFJob", "the Kubeflow training operator")
CONTAINER = "tensorflow"  # the operator injects TF_CONFIG into this container only
PORT = {"name": "tfjob-port", "containerPort": 2222, "protocol": "TCP"}  # the address TF_CONFIG gives each worker
WORK = "/var/lib/topoflow"  # a worker's scratch volume: its checkpoints when there is no pipeline.pvc
LABELS = {"app.kubernetes.io/name": "topoflow-train", "app.kubernetes.io/component": "train",
          "app.kubernetes.io/part-of": "topoflow"}
JOB_LABEL, TYPE_LABEL = "training.kubeflow.org/job-name", "training.kubeflow.org/replica-type"  # on its pods
SETTINGS = "topoflow/settings"  # annotation: a digest of the spec, to tell the same training from another one
TRIES = 5  # creations tried while a deleted job of the same name is still going


def name(cfg: Config) -> str:
    """One TFJob per model and namespace: its checkpoint folder is per model, so two jobs would write the same."""
    return f"topoflow-{cfg.train.model}"


def tfjob(cfg: Config, namespace: str | None = None) -> dict:
    """The TFJob training ``cfg.train.model`` on ``train.workers`` workers, each a pod as the pipeline's training
    (``cfg.pipeline``: resources and GPUs per worker, Secrets, volume)."""
    tc, pc = cfg.train, cfg.pipeline
    for setting in ("data", "output"):  # a path inside a worker pod is neither shared nor kept
        url = tc.resolved(getattr(tc, setting))
        if not _reachable(url, cfg):
            raise ConfigError(f"train.{setting} is {url!r}, a path inside each worker's pod: the workers would "
                              f"{'not find it' if setting == 'data' else 'lose the export with the pod'}\ngive an "
                              f"s3:// or root:// URL, or a path under pipeline.pvc_mount ({pc.pvc_mount}) with "
                              "pipeline.pvc set")
    container = {"name": CONTAINER, "image": images.TRAIN, "command": _command(cfg), "ports": [dict(PORT)]}
    pod = kube.training_pod(pc, container, scratch=None if pc.pvc else WORK)
    spec = {
        "runPolicy": {"backoffLimit": pc.train_restarts, "cleanPodPolicy": "Running", "suspend": False,
                      "ttlSecondsAfterFinished": 86400},
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


def _reachable(url: str, cfg: Config) -> bool:
    """Whether every worker pod reaches ``url``: a remote URL, or a path on the shared volume."""
    if len(urlsplit(url).scheme) > 1 and not url.startswith("file:"):
        return True
    pc = cfg.pipeline
    return bool(pc.pvc) and url.removeprefix("file://").startswith(pc.pvc_mount.rstrip("/") + "/")


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
    one is replaced (its workers resume the checkpoint on the volume); one of other settings still running is
    refused. The job is deleted when the wait is abandoned (``timeout_s``, Ctrl-C, SIGTERM: a cancelled run) or
    after more than ``pipeline.train_restarts`` restarts. ``client`` is a ``kubernetes.client.ApiClient``
    (default: the in-cluster service account, else the kubeconfig)."""
    k8s = require("kubernetes.client", "pipeline")
    api = client or kube.default_client()
    crd = k8s.CustomObjectsApi(api)
    body = tfjob(cfg, namespace)
    job, pc = body["metadata"]["name"], cfg.pipeline
    where = f"TFJob {namespace}/{job}"
    if not pc.pvc:
        log(f"warning: pipeline.pvc is not set: a restarted worker of {where} starts its training over (set "
            "pipeline.pvc to a ReadWriteMany volume to keep checkpoints)")
    restarts, last = 0, None  # restarts seen; the Restarting condition of the last read (None: not restarting)

    def read() -> dict:
        """The job, counting each restart once: a Restarting condition after another state, or a new one."""
        nonlocal restarts, last
        obj = kube.call(crd, TFJOB, "get", namespace, crd.get_namespaced_custom_object, name=job)
        restarting = kube.condition(obj, "Restarting")
        if restarting and (last is None or restarting.get("lastTransitionTime") != last.get("lastTransitionTime")):
            restarts += 1
        last = restarting
        return obj

    with kube.sigterm_interrupts():
        _start(crd, namespace, body, log)
        try:
            obj = kube.wait(read, lambda obj: f"{where}: {_progress(obj, pc)}",
                            lambda obj: _finished(obj) or restarts > pc.train_restarts, timeout_s, poll_s, log)
        except kube.TimedOut as e:
            _delete(crd, namespace, job, log)
            hint = "" if (e.last.get("status") or {}).get("conditions") else (
                "\nis the training operator running? kubectl -n kubeflow get pods -l control-plane="
                "kubeflow-training-operator")
            raise TopoflowError(f"{where} still {_progress(e.last, pc)} after {timeout_s:g} s; deleted it{hint}\n"
                                "allow more time, or look at its workers: kubectl -n "
                                f"{namespace} get pods -l {JOB_LABEL}={job}") from None
        except BaseException:  # Ctrl-C, SIGTERM, an API error: nobody would watch the training any more
            _delete(crd, namespace, job, log)
            raise
        if not _finished(obj):  # restarted too often
            _delete(crd, namespace, job, log)
            raise TopoflowError(f"{where} restarted its workers {restarts} times, more than pipeline."
                                f"train_restarts ({pc.train_restarts}); deleted it\n"
                                + _failed_worker(api, namespace, job))
    failed = kube.condition(obj, "Failed")
    if failed:
        raise TopoflowError(f"{where} failed: {failed.get('reason')}: {failed.get('message')}\n"
                            + _failed_worker(api, namespace, job))
    return cfg.train.resolved(cfg.train.output)


def _start(crd, namespace: str, body: dict, log) -> None:
    """Create the TFJob; or wait for the one of that name when it runs the same training; or replace a finished
    one. Another training of the same model, still running, is refused: the two would share a checkpoint."""
    job = body["metadata"]["name"]
    where = f"TFJob {namespace}/{job}"
    for _ in range(TRIES):
        old = kube.call(crd, TFJOB, "get", namespace, crd.get_namespaced_custom_object, name=job, missing_ok=True)
        if old and not (old.get("metadata") or {}).get("deletionTimestamp"):
            same = old["metadata"].get("annotations", {}).get(SETTINGS) == body["metadata"]["annotations"][SETTINGS]
            if not _finished(old):
                if not same:
                    raise TopoflowError(f"{where} is running another training of this model (other settings); it "
                                        f"would share the checkpoint\nwait for it, or stop it: kubectl -n {namespace} "
                                        f"delete tfjob {job}")
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


def _progress(obj: dict, pc) -> str:
    """The job's state in words: its last true condition (and what a restart means here), its workers."""
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
    return line + (f", workers: {workers}" if workers else "")


def _failed_worker(api, namespace: str, job: str) -> str:
    """Which worker failed, its exit code, what it printed, and how to read its whole log (the operator's status
    names only the replica type)."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    every = f"the workers' logs: kubectl -n {namespace} logs -l {JOB_LABEL}={job} -c {CONTAINER}"
    try:
        pods = client.CoreV1Api(api).list_namespaced_pod(namespace, label_selector=f"{JOB_LABEL}={job},"
                                                         f"{TYPE_LABEL}=worker", _request_timeout=kube.REQUEST_TIMEOUT)
    except (ApiException, HTTPError):  # the Role may not list pods: the hint below still holds
        return every
    failed = sorted((p for p in pods.items if p.status.phase == "Failed"), key=lambda p: p.metadata.name)
    if not failed:
        return every
    pod = failed[0].metadata.name
    codes = [s.state.terminated.exit_code for s in failed[0].status.container_statuses or []
             if s.name == CONTAINER and s.state and s.state.terminated]
    code = f" exited with code {codes[0]}" + (" (not retried: 1-127 are permanent)" if 0 < codes[0] < 128 else "") \
        if codes else " failed"
    said = kube.pod_error(api, namespace, pod, CONTAINER, f"worker {pod}")
    return f"worker {pod}{code}\n" + (f"{said}\n" if said else "") + \
        f"its whole log: kubectl -n {namespace} logs {pod} -c {CONTAINER}"


def _delete(crd, namespace: str, job: str, log) -> None:
    """Delete the job (the operator's owner references take its pods along); never masks the reason."""
    try:
        kube.call(crd, TFJOB, "delete", namespace, crd.delete_namespaced_custom_object, name=job, missing_ok=True)
        log(f"deleted TFJob {namespace}/{job}")
    except TopoflowError as e:
        log(f"could not delete TFJob {namespace}/{job}: {e}\ndelete it yourself: kubectl -n {namespace} delete "
            f"tfjob {job}")
