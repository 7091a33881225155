"""What topoflow's launchers share when they drive custom resources through the Kubernetes API
(:mod:`topoflow.sparkapp`: SparkApplications; :mod:`topoflow.deploy`: InferenceServices; :mod:`topoflow.katib`:
Experiments; :mod:`topoflow.tfjob`: TFJobs): the client, one call that turns the API server's refusals into errors
saying what to fix, the poll loop that waits for an operator to move a resource along, the deletion of one a launcher
gives up on, the error a failed pod printed, and the pod of a training container (Katib trials, TFJob workers and the
BigDL driver run alike: where their checkpoints go, which data and export URLs they share). Imports the
``kubernetes`` client (the ``pipeline`` extra) only when called.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import re
import signal
import threading
import time
from dataclasses import dataclass
from typing import Callable
from urllib.parse import urlsplit

from topoflow import images
from topoflow.errors import ConfigError, TopoflowError

SECRET_KEYS = {"AWS_ACCESS_KEY_ID": "access_key_id", "AWS_SECRET_ACCESS_KEY": "secret_access_key"}  # env <- key
# in the Secret pipeline.s3_secret: how every pod topoflow creates gets its S3 keys
XROOTD_MOUNT = "/etc/topoflow/xrootd"  # where the Secret pipeline.xrootd_secret (key x509up) is mounted
TRAIN_SERVICE_ACCOUNT = "topoflow-train"  # k8s/base/rbac.yaml: no API access
REQUEST_TIMEOUT = (10, 30)  # connect, read (s): a silent API server fails the call instead of hanging it
LOG_TAIL = 200  # lines of a failed pod's log read for its error: the error, then shutdown lines, fit well within
# A line a logging framework writes (log4j "26/01/12 10:15:03 INFO ...", ISO dates, or structured JSON): it ends an
# error block the program printed
_LOG_RECORD = re.compile(r"\d\d(\d\d)?[/-]\d\d[/-]\d\d[ T]\d\d:|\{")


@dataclass(frozen=True)
class Resource:
    """A custom resource type: where the API serves it, and whose CRD defines it (named when the API server
    does not know it)."""

    group: str
    version: str
    plural: str
    kind: str
    installed_by: str  # e.g. "the Spark operator"

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}"


def in_cluster() -> bool:
    """Whether this runs in a pod with a service account: the variable the in-cluster config reads is set."""
    return bool(os.environ.get("KUBERNETES_SERVICE_HOST"))


def default_client():
    """The in-cluster service account when running in a pod, else the kubeconfig."""
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        try:
            config.load_kube_config()
        except (config.ConfigException, FileNotFoundError) as e:
            raise TopoflowError(f"no Kubernetes credentials: not in a pod and no usable kubeconfig ({e})\n"
                                "set KUBECONFIG or run inside the cluster") from None
    return client.ApiClient()


def call(crd, resource: Resource, verb: str, namespace: str, method, missing_ok: bool = False, **kwargs) -> dict:
    """One ``CustomObjectsApi`` call on ``resource``; Kubernetes' refusals become errors that say what to fix:
    RBAC (the verb and resource the Role must allow), an admission webhook's refusal (which also answers 403),
    credentials, a missing CRD, an invalid object (the server's message names the field), and a
    :class:`Conflict` the caller may retry."""
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    host = crd.api_client.configuration.host
    r = resource
    try:
        return method(r.group, r.version, namespace, r.plural, _request_timeout=REQUEST_TIMEOUT, **kwargs)
    except ApiException as e:
        if e.status == 404 and missing_ok:
            return {}
        what = f"{verb} {r.plural}.{r.group} in namespace {namespace!r}"
        text = message(e)
        if e.status == 403 and text.startswith("admission webhook"):  # a validating webhook's "no", not RBAC
            raise TopoflowError(f"cannot {what}: refused by {r.installed_by}'s admission webhook: {text}") from None
        if e.status == 403:
            raise TopoflowError(f"not allowed to {what} (403 Forbidden, RBAC): {text}\nthe Role in k8s/ bound "
                                f"to the service account this runs as must allow verb {verb!r} on resource "
                                f"{r.plural!r} in API group {r.group!r}") from None
        if e.status == 401:
            raise TopoflowError(f"the Kubernetes API server at {host} rejected the credentials (401 Unauthorized)\n"
                                "check the kubeconfig's user or the pod's service-account token") from None
        if e.status == 404 and verb == "create":
            text += f"\nis {r.installed_by} (its {r.kind} CRD) installed in this cluster?"
        error = Conflict if e.status == 409 else TopoflowError
        raise error(f"cannot {what} ({e.status} {e.reason}): {text}") from None
    except HTTPError as e:
        raise TopoflowError(f"cannot reach the Kubernetes API server at {host}: {reason(e)}\n"
                            "check that it is running and that the kubeconfig names the right server") from None


def security_contexts(uid: int) -> tuple[dict, dict]:
    """(pod, container) security contexts of a non-root ``uid`` that the namespace's "restricted" Pod Security
    Standard admits: read-only root filesystem (mount a volume where the program writes), no privilege
    escalation, no capabilities, the runtime's seccomp profile."""
    user = {"runAsNonRoot": True, "runAsUser": uid, "runAsGroup": uid, "seccompProfile": {"type": "RuntimeDefault"}}
    return {**user, "fsGroup": uid}, {**user, "readOnlyRootFilesystem": True, "allowPrivilegeEscalation": False,
                                      "privileged": False, "capabilities": {"drop": ["ALL"]}}


def secret_env(secret: str | None) -> list[dict]:
    """The S3 keys of Secret ``secret`` as the AWS_* variables (none without a Secret): values never leave it."""
    return [{"name": var, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}
            for var, key in SECRET_KEYS.items()] if secret else []


def training_pod(pc, container: dict, scratch: str | None = None) -> dict:
    """The pod spec of a training ``container`` (name, image, command) as the pipeline's training runs: requests =
    limits ``pc.train_cpu``/``train_memory`` and ``pc.gpus`` GPUs on the GPU nodes (their taints tolerated), the S3
    keys from ``pc.s3_secret``, the XRootD proxy, ``pc.pvc`` at ``pc.pvc_mount``, a writable ``/tmp`` and a
    ``scratch`` folder (emptyDirs) under a read-only root, the "restricted" Pod Security Standard, no API token.
    ``pc`` is the config's PipelineConfig."""
    # copies: a dict shared by both contexts would appear in YAML as an anchor and an alias
    pod_security, container_security = map(copy.deepcopy, security_contexts(images.UID))
    resources = {"cpu": pc.train_cpu, "memory": pc.train_memory, **({pc.gpu_resource: str(pc.gpus)} if pc.gpus else {})}
    env = secret_env(pc.s3_secret)
    mounts = [{"name": "tmp", "mountPath": "/tmp"}, *([{"name": "work", "mountPath": scratch}] if scratch else [])]
    volumes = [{"name": "tmp", "emptyDir": {"sizeLimit": "2Gi"}},
               *([{"name": "work", "emptyDir": {"sizeLimit": "4Gi"}}] if scratch else [])]
    if pc.xrootd_secret:  # as the pipeline's tasks have it
        env.append({"name": "X509_USER_PROXY", "value": f"{XROOTD_MOUNT}/x509up"})
        mounts.append({"name": "xrootd", "mountPath": XROOTD_MOUNT, "readOnly": True})
        volumes.append({"name": "xrootd", "secret": {"secretName": pc.xrootd_secret}})
    if pc.pvc:
        mounts.append({"name": "data", "mountPath": pc.pvc_mount})
        volumes.append({"name": "data", "persistentVolumeClaim": {"claimName": pc.pvc}})
    container = {**container, **({"env": env} if env else {}),
                 "resources": {"requests": resources, "limits": dict(resources)},
                 "securityContext": container_security, "volumeMounts": mounts}
    pod = {"serviceAccountName": TRAIN_SERVICE_ACCOUNT, "automountServiceAccountToken": False,
           "securityContext": pod_security, "containers": [container], "volumes": volumes}
    if pc.gpus:
        pod["nodeSelector"] = dict(pc.gpu_node_selector)
        pod["tolerations"] = [t.model_dump(exclude_none=True) for t in pc.gpu_tolerations]
    return pod


def checkpoint_dir(cfg, scratch: str) -> str:
    """Where a training pod keeps ``train.checkpoint_dir``: on the volume ``pipeline.pvc`` when there is one (the
    configured folder if it lies there, else ``<pvc_mount>/checkpoints/<model>-<digest of the settings>``), so that a
    restarted pod continues it; else in ``scratch``, the pod's own volume, which a restarted pod starts over in. The
    digest of ``train.result_settings()`` makes a re-run with other settings (a new tuning result) start afresh
    instead of failing on a checkpoint it cannot resume; the same settings resume, also on new data at the same URL."""
    tc, pc = cfg.train, cfg.pipeline
    root = (pc.pvc_mount if pc.pvc else scratch).rstrip("/")
    configured = tc.resolved(tc.checkpoint_dir)
    if configured.startswith(f"{root}/"):
        return configured
    digest = hashlib.sha256(json.dumps(tc.result_settings(), sort_keys=True).encode()).hexdigest()[:8]
    return f"{root}/checkpoints/{tc.model}-{digest}"


def require_shared(cfg, pods: str) -> None:
    """Refuse a ``train.data`` or ``train.output`` that is a path inside ``pods`` (e.g. "each worker's pod"): such a
    path is neither shared with the pipeline nor kept after the pod. A remote URL, or a path on the volume
    ``pipeline.pvc`` (mounted in every training pod), is."""
    tc, pc = cfg.train, cfg.pipeline
    volume = pc.pvc_mount.rstrip("/") + "/"
    for setting in ("data", "output"):
        url = tc.resolved(getattr(tc, setting))
        local = len(urlsplit(url).scheme) < 2 or url.startswith("file:")  # "C:" is a drive letter, not a scheme
        if local and not (pc.pvc and url.removeprefix("file://").startswith(volume)):
            raise ConfigError(f"train.{setting} is {url!r}, a path inside {pods}, which "
                              f"{'does not hold it' if setting == 'data' else 'would lose the export when it ends'}"
                              f"\ngive an s3:// or root:// URL, or a path under pipeline.pvc_mount ({pc.pvc_mount}) "
                              "with pipeline.pvc set")


def condition(obj: dict, kind: str) -> dict | None:
    """The status condition ``kind`` of ``obj`` when it is True (Katib's and the training operator's style)."""
    return next((c for c in (obj.get("status") or {}).get("conditions", [])
                 if c.get("type") == kind and c.get("status") == "True"), None)


def printed_error(log: str) -> str | None:
    """The error a topoflow process's log ends with, None if none: topoflow's CLI prints what the user can act on
    as a block that starts ``error: `` (the file and the fix may follow on the next lines), so the last such block
    is taken; anything unexpected ends in a traceback, whose ``SomeError: message`` line is taken otherwise."""
    lines = log.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("error: ")]
    if starts:
        block = [lines[starts[-1]]]
        for line in lines[starts[-1] + 1:]:
            if not line.strip() or _LOG_RECORD.match(line):
                break
            block.append(line)
        return "\n".join(block)
    tracebacks = [i for i, line in enumerate(lines) if line.startswith("Traceback (most recent call last):")]
    if tracebacks:  # the frames are indented; the exception's line is the first that is not
        return next((line for line in lines[tracebacks[-1] + 1:] if line.strip() and not line[0].isspace()), None)
    return None


def pod_error(api, namespace: str, pod: str, container: str, who: str) -> str | None:
    """What ``who`` (e.g. "the driver", the pod ``pod``) printed as its error, indented, or why its log could not
    be read (None when the log holds no error): operators report only exit codes, the cause is in the log."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    try:  # raw bytes: the client would parse a log that happens to be valid JSON
        response = client.CoreV1Api(api).read_namespaced_pod_log(
            pod, namespace, container=container, tail_lines=LOG_TAIL, _preload_content=False,
            _request_timeout=REQUEST_TIMEOUT)
        log = response.data.decode(errors="replace")
    except ApiException as e:
        why = f"({e.status} {e.reason}): {message(e)}"
        if e.status == 403:
            why += ("\nthe Role in k8s/ bound to the service account this runs as needs verb 'get' on resource "
                    "'pods/log'")
        return f"{who}'s log could not be read {why}"
    except HTTPError as e:
        return f"{who}'s log could not be read: {reason(e)}"
    error = printed_error(log)
    if error is None:
        return None
    return f"{who} printed:\n" + "\n".join(f"  {line}" for line in error.splitlines())


def _interrupt(signum, frame):
    raise KeyboardInterrupt


@contextlib.contextmanager
def sigterm_interrupts():
    """Kubeflow cancels a run by deleting its pod (SIGTERM): treat that like Ctrl-C, so that a launcher deletes what
    it started instead of leaving it running unwatched. Signal handlers can only be set in the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class Conflict(TopoflowError):
    """409: the object already exists (create), or changed since it was read (update)."""


class TimedOut(TopoflowError):
    """:func:`wait` ran out of time; ``last`` is the object as last read, for the caller's message."""

    def __init__(self, last: dict):
        super().__init__("timed out")
        self.last = last


def delete(crd, resource: Resource, namespace: str, name: str, log) -> None:
    """Delete a resource a launcher gave up on (its operator's owner references take the pods along); a failure is
    logged with the command to do it by hand, never raised: it would mask the reason for deleting."""
    where = f"{resource.kind} {namespace}/{name}"
    try:
        call(crd, resource, "delete", namespace, crd.delete_namespaced_custom_object, name=name, missing_ok=True)
        log(f"deleted {where}")
    except TopoflowError as e:
        log(f"could not delete {where}: {e}\ndelete it yourself: kubectl -n {namespace} delete "
            f"{resource.kind.lower()} {name}")


def wait(read: Callable[[], dict], describe: Callable[[dict], str], done: Callable[[dict], bool],
         timeout_s: float | None, poll_s: float, log) -> dict:
    """Poll ``read()`` until ``done`` holds for the object it returns, logging ``describe(object)`` whenever
    that changes; the final object. Raises :class:`TimedOut` once ``timeout_s`` (None: never) has passed."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    said = None
    while True:
        obj = read()
        line = describe(obj)
        if line != said:
            log(line)
            said = line
        if done(obj):
            return obj
        if deadline is not None and time.monotonic() >= deadline:
            raise TimedOut(obj)
        time.sleep(poll_s)


def message(e) -> str:
    """The ``message`` of the Status object Kubernetes answers an error with."""
    try:
        return json.loads(e.body)["message"]
    except (TypeError, ValueError, KeyError):
        return str(e.body or e.reason)


def reason(e) -> str:
    """The last words of urllib3's nested error, e.g. "[Errno 111] Connection refused"."""
    return str(getattr(e, "reason", None) or e).rpartition(": ")[2]


def whole_cpus(quantity: str) -> int:
    """The whole CPUs of a Kubernetes CPU quantity ("4", "3500m", "0.5"), at least one: what a pod may use."""
    value = float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)
    return max(1, int(value))
