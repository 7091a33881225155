"""Run a Spark stage (ingest, prepare) on Kubernetes as a SparkApplication of the Kubeflow Spark operator.

On a cluster the pipeline pod does not run Spark itself: :func:`run_stage` creates a
``sparkoperator.k8s.io/v1beta2`` SparkApplication whose driver runs ``topoflow <stage>`` with the same
settings, waits for the operator to report the end, and deletes the application when the wait is
abandoned (time-out, Ctrl-C, SIGTERM) so that no unwatched Spark job keeps writing.

Operator states (kubeflow/spark-operator v2.5.2, ``api/v1beta2/sparkapplication_types.go``, reconciled in
``internal/controller/sparkapplication/controller.go``): "" (new) → SUBMITTED → RUNNING → SUCCEEDING or
FAILING → COMPLETED or FAILED, the only states the operator treats as final (``util.IsTerminated``). With
``restartPolicy: Never`` (set here) SUCCEEDING always ends COMPLETED, FAILING ends FAILED, and
SUBMISSION_FAILED turns into FAILED without a retry, so it ends the wait too. UNKNOWN, PENDING_RERUN,
INVALIDATING and the SUSPEND* states pass; the time-out bounds them.

When the application fails the operator only reports the driver's exit code, so the error the driver printed
is read from the tail of its pod's log and raised with the failure.
"""

from __future__ import annotations

import contextlib
import json
import re
import signal
import threading
import time
import uuid

from topoflow import images
from topoflow.config import Config
from topoflow.errors import ConfigError, TopoflowError

GROUP, VERSION, PLURAL = "sparkoperator.k8s.io", "v1beta2", "sparkapplications"
SPARK_STAGES = ("ingest", "prepare")
# The image runs topoflow's CLI through this two-line script: from topoflow.cli import main; raise SystemExit(main())
ENTRY = "local:///opt/topoflow/entry.py"
# Inside the cluster the driver reaches the API server here; a configured local[*] master would keep it alone.
IN_CLUSTER_MASTER = "k8s://https://kubernetes.default.svc"
# Fixed ports, so that k8s/'s NetworkPolicy between drivers and executors can name them.
SPARK_PORTS = {"spark.driver.port": "7078", "spark.driver.blockManager.port": "7079", "spark.blockManager.port": "7079"}
SECRET_KEYS = {"AWS_ACCESS_KEY_ID": "access_key_id", "AWS_SECRET_ACCESS_KEY": "secret_access_key"}  # env -> key
SPARK_VERSION = "4.3.0"  # the pyspark that pyproject's spark extra pins, i.e. the image's Spark
FAILURE_STATES = ("FAILED", "SUBMISSION_FAILED")
_REQUEST_TIMEOUT = (10, 30)  # connect, read (s): a silent API server fails the call instead of hanging it
# Spark names the driver's container so (Constants.DEFAULT_DRIVER_CONTAINER_NAME; the operator's
# common.SparkDriverContainerName): naming it keeps the log read working when the pod has sidecars
DRIVER_CONTAINER = "spark-kubernetes-driver"
LOG_TAIL = 200  # lines: the driver's error, then Spark's shutdown lines, fit well within
# A line Spark's logging writes (log4j "26/01/12 10:15:03 INFO ...", ISO dates, or structured JSON): it ends an
# error block the driver printed
_LOG_RECORD = re.compile(r"\d\d(\d\d)?[/-]\d\d[/-]\d\d[ T]\d\d:|\{")


def run_stage(stage: str, cfg: Config, *, namespace: str, image: str, service_account: str = "topoflow-spark",
              secret: str | None = "topoflow-s3", run_id: str | None = None, timeout_s: float | None = None,
              poll_s: float = 5.0, log=print, api=None) -> dict:
    """Run ``topoflow <stage>`` as a SparkApplication in ``namespace`` and wait for it to end.

    ``secret`` names the Kubernetes Secret whose keys (``SECRET_KEYS``) reach the driver and executors as
    the AWS_* variables (the config's own keys are never copied into the object). ``run_id`` labels the
    application (e.g. the Kubeflow run's id). ``api`` is a ``kubernetes.client.ApiClient`` (default: the
    in-cluster service account, else the kubeconfig). Returns the final ``.status``; raises TopoflowError
    when the application fails or the time-out passes.
    """
    from kubernetes import client

    suffix = uuid.uuid4().hex[:8]
    name = f"topoflow-{stage}-{suffix}"
    body = spark_application(stage, cfg, name=name, namespace=namespace, image=image,
                             service_account=service_account, secret=secret, run_id=run_id or suffix)
    crd = client.CustomObjectsApi(api or _default_client())
    with _sigterm_interrupts():
        _call(crd, "create", namespace, crd.create_namespaced_custom_object, body=body)
        log(f"created SparkApplication {namespace}/{name}; driver log: kubectl logs -n {namespace} -f {name}-driver")
        try:
            status = _wait(crd, namespace, name, timeout_s, poll_s, log)
        except BaseException:  # time-out, Ctrl-C, SIGTERM, API error: nobody would watch the job any more
            _delete(crd, namespace, name, log)
            raise
    state = status["applicationState"]["state"]
    if state != "COMPLETED":
        driver = status.get("driverInfo", {}).get("podName") or f"{name}-driver"
        message = status["applicationState"].get("errorMessage") or "the operator gave no error message"
        said = _driver_said(crd.api_client, namespace, driver)
        raise TopoflowError(f"Spark {stage} failed: SparkApplication {namespace}/{name} is {state}: {message}\n"
                            + (f"{said}\n" if said else "")
                            + f"the driver's whole log: kubectl logs -n {namespace} {driver}")
    return status


def spark_application(stage: str, cfg: Config, *, name: str, namespace: str, image: str, service_account: str,
                      secret: str | None, run_id: str) -> dict:
    """The SparkApplication running ``topoflow <stage>`` with ``cfg``'s settings, sized by ``cfg.spark``."""
    if stage not in SPARK_STAGES:
        raise ConfigError(f"stage {stage!r} does not run on Spark; use one of {list(SPARK_STAGES)}")
    labels = {"app.kubernetes.io/name": "topoflow", "app.kubernetes.io/component": stage, "topoflow/run-id": run_id}
    env = [{"name": var, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}
           for var, key in SECRET_KEYS.items()] if secret else []
    user = {"runAsNonRoot": True, "runAsUser": images.UID, "runAsGroup": images.UID,
            "seccompProfile": {"type": "RuntimeDefault"}}  # what the namespace's "restricted" standard demands
    pod = {
        "labels": labels,
        "env": env,
        "podSecurityContext": {**user, "fsGroup": images.UID},
        "securityContext": {**user, "readOnlyRootFilesystem": True, "allowPrivilegeEscalation": False,
                            "privileged": False, "capabilities": {"drop": ["ALL"]}},
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
    }
    sc = cfg.spark
    executor = {"cores": 1, "instances": 2, "memory": "4g"}  # where cfg.spark leaves them to Spark
    executor.update({k: v for k, v in (("cores", sc.executor_cores), ("instances", sc.executor_instances),
                                       ("memory", sc.executor_memory)) if v is not None})
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "SparkApplication",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {
            "type": "Python",
            "pythonVersion": "3",
            "mode": "cluster",
            "image": image,
            "sparkVersion": SPARK_VERSION,
            "mainApplicationFile": ENTRY,
            "arguments": [stage, "--no-progress", *_settings(cfg)],
            "sparkConf": {**SPARK_PORTS, **sc.conf},
            "volumes": [{"name": "tmp", "emptyDir": {"sizeLimit": "4Gi"}}],  # the root filesystem is read-only
            "restartPolicy": {"type": "Never"},  # a rerun would repeat a stage that already failed on its input
            "timeToLiveSeconds": 24 * 3600,  # keeps a failed run's driver log a day, then the operator tidies up
            "driver": {**pod, "cores": 1, "memory": sc.driver_memory, "serviceAccount": service_account},
            "executor": {**pod, **executor},
        },
    }


def _settings(cfg: Config) -> list[str]:
    """``--set section.key=<json>`` for each setting that differs from its default, secrets left out (the
    driver reads them from the Secret's environment), the pipeline section left out (it concerns this launcher)
    and the master pointed at the cluster."""
    data = cfg.public_dump(exclude_defaults=True, exclude={"pipeline": True})
    data.setdefault("spark", {})["master"] = IN_CLUSTER_MASTER
    return [arg for section, values in data.items() for key, value in values.items()
            for arg in ("--set", f"{section}.{key}={json.dumps(value)}")]


def _wait(crd, namespace: str, name: str, timeout_s: float | None, poll_s: float, log) -> dict:
    """Poll until a final state, logging each change; the final ``.status``."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    state = None
    while True:
        obj = _call(crd, "get", namespace, crd.get_namespaced_custom_object, name=name)
        status = obj.get("status") or {}
        new = status.get("applicationState", {}).get("state", "")
        if new != state:
            log(f"SparkApplication {namespace}/{name}: {new or 'NEW'}")
            state = new
        if new == "COMPLETED" or new in FAILURE_STATES:
            return status
        if deadline is not None and time.monotonic() >= deadline:
            raise TopoflowError(f"SparkApplication {namespace}/{name} still {state or 'NEW'} after {timeout_s:g} s; "
                                "deleting it\nallow more time (timeout_s) or give Spark more executors (spark.*)")
        time.sleep(poll_s)


def _driver_said(api, namespace: str, pod: str) -> str | None:
    """What the driver printed as its error, indented, or why its log could not be read (None when the log
    holds no error): the operator's status gives only the exit code, the cause is in the log."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    try:  # raw bytes: the client would parse a log that happens to be valid JSON
        response = client.CoreV1Api(api).read_namespaced_pod_log(
            pod, namespace, container=DRIVER_CONTAINER, tail_lines=LOG_TAIL, _preload_content=False,
            _request_timeout=_REQUEST_TIMEOUT)
        log = response.data.decode(errors="replace")
    except ApiException as e:
        why = f"({e.status} {e.reason}): {_message(e)}"
        if e.status == 403:
            why += ("\nthe Role in k8s/ bound to the service account this runs as needs verb 'get' on resource "
                    "'pods/log'")
        return f"the driver's log could not be read {why}"
    except HTTPError as e:
        return f"the driver's log could not be read: {_reason(e)}"
    error = driver_error(log)
    if error is None:
        return None
    return "the driver printed:\n" + "\n".join(f"  {line}" for line in error.splitlines())


def driver_error(log: str) -> str | None:
    """The error a driver's log ends with, None if none: topoflow's CLI prints what the user can act on as a
    block that starts ``error: `` (the file and the fix may follow on the next lines), so the last such block
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


def _delete(crd, namespace: str, name: str, log) -> None:
    """Delete the application (the operator's owner references take its pods along); never masks the reason."""
    try:
        _call(crd, "delete", namespace, crd.delete_namespaced_custom_object, name=name, missing_ok=True)
        log(f"deleted SparkApplication {namespace}/{name}")
    except TopoflowError as e:
        log(f"could not delete SparkApplication {namespace}/{name}: {e}\n"
            f"delete it yourself: kubectl delete sparkapplication -n {namespace} {name}")


def _call(crd, verb: str, namespace: str, method, missing_ok: bool = False, **kwargs) -> dict:
    """One API call; Kubernetes' refusals become errors that say what to fix."""
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    host = crd.api_client.configuration.host
    try:
        return method(GROUP, VERSION, namespace, PLURAL, _request_timeout=_REQUEST_TIMEOUT, **kwargs)
    except ApiException as e:
        if e.status == 404 and missing_ok:
            return {}
        what = f"{verb} {PLURAL}.{GROUP} in namespace {namespace!r}"
        message = _message(e)
        if e.status == 403:
            raise TopoflowError(f"not allowed to {what} (403 Forbidden, RBAC): {message}\nthe Role in k8s/ bound "
                                f"to the service account this runs as must allow verb {verb!r} on resource "
                                f"{PLURAL!r} in API group {GROUP!r}") from None
        if e.status == 401:
            raise TopoflowError(f"the Kubernetes API server at {host} rejected the credentials (401 Unauthorized)\n"
                                "check the kubeconfig's user or the pod's service-account token") from None
        if e.status == 404 and verb == "create":
            message += "\nis the Spark operator (its SparkApplication CRD) installed in this cluster?"
        raise TopoflowError(f"cannot {what} ({e.status} {e.reason}): {message}") from None
    except HTTPError as e:
        raise TopoflowError(f"cannot reach the Kubernetes API server at {host}: {_reason(e)}\n"
                            "check that it is running and that the kubeconfig names the right server") from None


def _message(e) -> str:
    """The ``message`` of the Status object Kubernetes answers an error with."""
    try:
        return json.loads(e.body)["message"]
    except (TypeError, ValueError, KeyError):
        return str(e.body or e.reason)


def _reason(e) -> str:
    """The last words of urllib3's nested error, e.g. "[Errno 111] Connection refused"."""
    return str(getattr(e, "reason", None) or e).rpartition(": ")[2]


def _default_client():
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


def _interrupt(signum, frame):
    raise KeyboardInterrupt


@contextlib.contextmanager
def _sigterm_interrupts():
    """Kubeflow cancels a run by deleting its pod (SIGTERM): treat that like Ctrl-C, so the SparkApplication
    is deleted too instead of running on unwatched. Signal handlers can only be set in the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
