"""What topoflow's launchers share when they drive custom resources through the Kubernetes API
(:mod:`topoflow.sparkapp`: SparkApplications; :mod:`topoflow.deploy`: InferenceServices): the client, one
call that turns the API server's refusals into errors saying what to fix, and the poll loop that waits for an
operator to move a resource along. Imports the ``kubernetes`` client (the ``pipeline`` extra) only when called.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import Callable

from topoflow.errors import TopoflowError

SECRET_KEYS = {"AWS_ACCESS_KEY_ID": "access_key_id", "AWS_SECRET_ACCESS_KEY": "secret_access_key"}  # env <- key
# in the Secret pipeline.s3_secret: how every pod topoflow creates gets its S3 keys
REQUEST_TIMEOUT = (10, 30)  # connect, read (s): a silent API server fails the call instead of hanging it


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


class Conflict(TopoflowError):
    """409: the object already exists (create), or changed since it was read (update)."""


class TimedOut(TopoflowError):
    """:func:`wait` ran out of time; ``last`` is the object as last read, for the caller's message."""

    def __init__(self, last: dict):
        super().__init__("timed out")
        self.last = last


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
