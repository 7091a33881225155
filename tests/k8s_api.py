"""A stand-in Kubernetes API server for SparkApplications, on 127.0.0.1, that the real ``kubernetes``
client talks to over HTTP (no API server can be installed here; see ../shared/STACK.md).

It serves create, get and delete of ``sparkoperator.k8s.io/v1beta2`` SparkApplications, refuses what
a real server refuses with its Status objects (404 NotFound, 409 AlreadyExists, 422 Invalid for objects
that fail ``crds.validate``, 403 Forbidden for the verbs a test forbids, worded as the RBAC authorizer
words it), and plays the Spark operator: each GET moves an application one step along the server's
``script`` of (state, errorMessage), the transitions the operator makes with ``restartPolicy: Never``.
It also serves the driver pod's log (``GET /api/v1/namespaces/{ns}/pods/{app}-driver/log``, plain text,
``tailLines`` and ``container`` honoured): the scenario's ``driver_log``, what the driver printed.
Every request is recorded in ``requests`` as (verb, name) so tests can see what the client did.
"""

from __future__ import annotations

import json
import re
import threading
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl

from crds import CRDValidationError, validate

GROUP, VERSION, PLURAL, KIND = "sparkoperator.k8s.io", "v1beta2", "sparkapplications", "SparkApplication"
PREFIX = f"/apis/{GROUP}/{VERSION}/namespaces/"
POD_LOG = re.compile(r"/api/v1/namespaces/([^/]+)/pods/([^/]+)/log")
DRIVER_CONTAINER = "spark-kubernetes-driver"  # the name Spark gives the driver pod's container
# What the operator (v2.5.2) writes into .status.applicationState.errorMessage
DRIVER_ERROR = "driver container failed with ExitCode: 2, Reason: Error"
SUBMIT_ERROR = ("failed to submit spark application: failed to run spark-submit: exit status 1\n"
                "Exception in thread \"main\" io.fabric8.kubernetes.client.KubernetesClientException: "
                "pods is forbidden: User \"system:serviceaccount:topoflow:topoflow-spark\" cannot create "
                "resource \"pods\" in API group \"\" in the namespace \"topoflow\"")
# What an ingest driver that found no input writes: Spark's start-up and shutdown logging (log4j's
# "yy/MM/dd HH:mm:ss LEVEL Logger: message" on stderr) around topoflow's `error:` block (its exit code 2)
DRIVER_LOG = "".join([
    "Using Spark's default log4j profile: org/apache/spark/log4j2-defaults.properties\n",
    "26/01/12 10:14:41 INFO SparkContext: Running Spark version 4.3.0\n",
    "26/01/12 10:14:41 INFO SparkContext: OS info Linux, 6.8.0-1021-aws, amd64\n",
    "26/01/12 10:14:41 INFO SparkContext: Java version 17.0.16\n",
    *(f"26/01/12 10:14:{43 + i // 40:02d} INFO ExecutorPodsAllocator: Going to request 1 executors from "
      f"Kubernetes for ResourceProfile Id: 0, target: 5, known: {i % 5}, sharedSlotFromPendingPods: 2147483647.\n"
      for i in range(240)),  # more than the 200 lines a client asks for: the tail must still hold the error
    "26/01/12 10:14:55 INFO KubernetesClusterSchedulerBackend: SchedulerBackend is ready for scheduling "
    "beginning after reached minRegisteredResourcesRatio: 0.8\n",
    "error: no file matches 's3://bucket/x/*.root'\n",
    "check the path or glob (and for s3:// the bucket name)\n",
    "26/01/12 10:14:58 INFO SparkContext: Invoking stop() from shutdown hook\n",
    "26/01/12 10:14:58 INFO SparkContext: SparkContext is stopping with exitCode 0 from run at "
    "Executors.java:572.\n",
    "26/01/12 10:14:58 INFO SparkUI: Stopped Spark web UI at http://topoflow-ingest-driver-svc.topoflow.svc:4040\n",
    "26/01/12 10:14:58 INFO KubernetesClusterSchedulerBackend: Shutting down all executors\n",
    "26/01/12 10:14:58 WARN ExecutorPodsWatchSnapshotSource: Kubernetes client has been closed.\n",
    "26/01/12 10:14:58 INFO BlockManager: BlockManager stopped\n",
    "26/01/12 10:14:58 INFO SparkContext: Successfully stopped SparkContext\n",
    "26/01/12 10:14:58 INFO ShutdownHookManager: Shutdown hook called\n",
    "26/01/12 10:14:58 INFO ShutdownHookManager: Deleting directory /tmp/spark-5f0c1a7e-61d2-4c8e-9a0b-3c1d2e4f5a6b\n",
])
# What a driver that hit a bug writes: a chained Python traceback (exit code 1), then Spark's shutdown
CRASH_ERROR = DRIVER_ERROR.replace("ExitCode: 2", "ExitCode: 1")
CRASH_LOG = """26/01/12 10:14:55 INFO SparkContext: Running Spark version 4.3.0
Traceback (most recent call last):
  File "/usr/local/lib/python3.11/site-packages/topoflow/ingest.py", line 97, in _events
    n = tree.num_entries
        ^^^^^^^^^^^^^^^^
AttributeError: 'NoneType' object has no attribute 'num_entries'

During handling of the above exception, another exception occurred:

Traceback (most recent call last):
  File "/opt/topoflow/entry.py", line 6, in <module>
    runpy.run_module("topoflow.cli", run_name="__main__", alter_sys=True)
  File "<frozen runpy>", line 226, in run_module
  File "/usr/local/lib/python3.11/site-packages/topoflow/cli.py", line 316, in main
    args.run(load_config(args.config, overrides), args)
  File "/usr/local/lib/python3.11/site-packages/topoflow/ingest.py", line 99, in _events
    raise RuntimeError(f"cannot count the events of {url}")
RuntimeError: cannot count the events of root://eos.example//store/qcd/1.root
26/01/12 10:14:58 INFO SparkContext: Invoking stop() from shutdown hook
26/01/12 10:14:58 INFO ShutdownHookManager: Shutdown hook called
"""
SCRIPTS = {  # "" is a new application: the operator has not written a status yet
    "completes": [("", None), ("SUBMITTED", None), ("RUNNING", None), ("SUCCEEDING", None), ("COMPLETED", None)],
    "driver_fails": [("", None), ("SUBMITTED", None), ("RUNNING", None), ("FAILING", DRIVER_ERROR),
                     ("FAILED", DRIVER_ERROR)],
    "driver_crashes": [("", None), ("SUBMITTED", None), ("RUNNING", None), ("FAILING", CRASH_ERROR),
                       ("FAILED", CRASH_ERROR)],
    "submission_fails": [("", None), ("SUBMISSION_FAILED", SUBMIT_ERROR)],
    "runs_forever": [("", None), ("SUBMITTED", None), ("RUNNING", None)],
}
DRIVER_LOGS = {"driver_fails": DRIVER_LOG, "driver_crashes": CRASH_LOG}  # no driver pod in the others


class StandInAPI:
    """The server and its state; ``host`` is what ``kubernetes.client.Configuration`` needs."""

    def __init__(self, scenario: str = "completes", user: str = "system:serviceaccount:topoflow:topoflow-pipeline"):
        self.user = user
        self.play(scenario)
        self.forbidden: set[str] = set()  # verbs on sparkapplications answered with 403, and "pods/log"
        self.log_queries: list[dict] = []  # the query of each pod log request
        self.objects: dict[tuple[str, str], dict] = {}  # (namespace, name) -> object
        self.steps: dict[tuple[str, str], int] = {}
        self.requests: list[tuple[str, str | None]] = []
        self.lock = threading.Lock()
        self._http = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)  # port 0: the system picks a free one
        self._http.api = self
        self.host = f"http://127.0.0.1:{self._http.server_port}"

    def start(self) -> StandInAPI:
        threading.Thread(target=self._http.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def stop(self) -> None:
        self._http.shutdown()
        self._http.server_close()

    def play(self, scenario: str) -> None:
        """Play ``scenario`` of SCRIPTS: the operator's steps and the driver's log."""
        self.script, self.driver_log = SCRIPTS[scenario], DRIVER_LOGS.get(scenario)

    def client(self):
        """A real ``kubernetes.client.ApiClient`` pointed at this server."""
        from kubernetes import client

        return client.ApiClient(client.Configuration(host=self.host))

    def handle(self, method: str, path: str, body: dict | None, query: dict | None = None) -> tuple[int, dict | str]:
        """Answer one request: (HTTP status, JSON body, or the text of a log)."""
        if method == "GET" and (log := POD_LOG.fullmatch(path)):
            with self.lock:
                self.requests.append(("log", log[2]))
                return self._log(*log.groups(), query or {})
        parts = path[len(PREFIX):].split("/") if path.startswith(PREFIX) else []
        if len(parts) not in (2, 3) or parts[1] != PLURAL:
            return _status(404, "NotFound", "the server could not find the requested resource")
        namespace, name = parts[0], parts[2] if len(parts) == 3 else None
        verb = {("POST", False): "create", ("GET", True): "get", ("DELETE", True): "delete"}.get((method, bool(name)))
        with self.lock:
            self.requests.append((verb or method, name))
            if verb is None:
                return _status(405, "MethodNotAllowed", "this stand-in serves only create, get and delete")
            if verb in self.forbidden:
                return self._forbidden(verb, PLURAL, GROUP, namespace, name)
            if verb == "create":
                return self._create(namespace, body)
            key = (namespace, name)
            if key not in self.objects:
                return _status(404, "NotFound", f'{PLURAL}.{GROUP} "{name}" not found', name)
            if verb == "delete":
                return 200, self.objects.pop(key)
            self._advance(key)
            return 200, self.objects[key]

    def _create(self, namespace: str, body: dict) -> tuple[int, dict]:
        name = (body.get("metadata") or {}).get("name")
        try:
            validate(body)
        except CRDValidationError as e:
            return _status(422, "Invalid", f'{KIND}.{GROUP} "{name}" is invalid: {e}', name)
        if body["metadata"].get("namespace", namespace) != namespace:
            return _status(400, "BadRequest", "the namespace of the provided object does not match the namespace "
                                              "sent on the request")
        if (namespace, name) in self.objects:
            return _status(409, "AlreadyExists", f'{PLURAL}.{GROUP} "{name}" already exists', name)
        obj = {k: v for k, v in body.items() if k != "status"}  # status is a subresource: only the operator sets it
        obj["metadata"] = {**body["metadata"], "namespace": namespace, "uid": f"uid-{len(self.requests)}",
                           "resourceVersion": "1", "generation": 1, "creationTimestamp": _now()}
        self.objects[(namespace, name)] = obj
        self.steps[(namespace, name)] = -1
        return 201, obj

    def _advance(self, key: tuple[str, str]) -> None:
        """The operator's next reconcile: one step along the script, staying at its last state."""
        step = self.steps[key] = min(self.steps[key] + 1, len(self.script) - 1)
        state, error = self.script[step]
        if not state:
            return
        obj, name = self.objects[key], key[1]
        status = obj.setdefault("status", {"submissionAttempts": 1, "driverInfo": {"podName": f"{name}-driver"}})
        status["applicationState"] = {"state": state, **({"errorMessage": error} if error else {})}
        if state in ("COMPLETED", "FAILED"):
            status.setdefault("terminationTime", _now())

    def _log(self, namespace: str, pod: str, query: dict) -> tuple[int, dict | str]:
        """The driver's log, its last ``tailLines`` lines; only an application's driver pod has one."""
        self.log_queries.append(query)
        if "pods/log" in self.forbidden:
            return self._forbidden("get", "pods/log", "", namespace, pod)
        if self.driver_log is None or (namespace, pod.removesuffix("-driver")) not in self.objects:
            return _status(404, "NotFound", f'pods "{pod}" not found', pod, "pods", "")
        if query.get("container", DRIVER_CONTAINER) != DRIVER_CONTAINER:
            return _status(400, "BadRequest", f"container {query['container']} is not valid for pod {pod}")
        lines = self.driver_log.splitlines(keepends=True)
        return 200, "".join(lines[-int(query["tailLines"]):] if "tailLines" in query else lines)

    def _forbidden(self, verb: str, resource: str, group: str, namespace: str,
                   name: str | None) -> tuple[int, dict]:
        """403 as the RBAC authorizer words it; a subresource (pods/log) is named by its parent's object."""
        kind = resource.partition("/")[0]
        what = f"{kind}.{group}" if group else kind
        what = f'{what} "{name}"' if name else what
        return _status(403, "Forbidden", f'{what} is forbidden: User "{self.user}" cannot {verb} resource '
                                         f'"{resource}" in API group "{group}" in the namespace "{namespace}"',
                       name, kind, group)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the client expects

    def _answer(self, method: str) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length)) if length else None
        path, _, query = self.path.partition("?")
        code, answer = self.server.api.handle(method, path, body, dict(parse_qsl(query)))
        text = isinstance(answer, str)  # a log
        data = answer.encode() if text else json.dumps(answer).encode()
        self.send_response(code)
        self.send_header("Content-Type", "text/plain" if text else "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self._answer("GET")

    def do_POST(self):
        self._answer("POST")

    def do_DELETE(self):
        self._answer("DELETE")

    def log_message(self, *args):  # quiet: tests read `requests` instead
        pass


def _status(code: int, reason: str, message: str, name: str | None = None, kind: str = PLURAL,
            group: str = GROUP) -> tuple[int, dict]:
    """A Kubernetes ``Status`` object, as the API server answers errors."""
    details = {"name": name, "group": group, "kind": kind} if name else {"group": group, "kind": kind}
    return code, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
                  "reason": reason, "details": details, "code": code}


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
