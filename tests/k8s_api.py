"""A stand-in Kubernetes API server for SparkApplications, InferenceServices and Katib Experiments, on 127.0.0.1,
that the real ``kubernetes`` client talks to over HTTP (no API server can be installed here; see
../shared/STACK.md).

It serves create, get, update (PUT) and delete of ``sparkoperator.k8s.io/v1beta2`` SparkApplications,
``serving.kserve.io/v1beta1`` InferenceServices and ``kubeflow.org/v1beta1`` Experiments, and refuses what a
real server refuses with its Status objects: 404 NotFound, 409 AlreadyExists, 422 Invalid for objects that
fail ``crds.validate`` and for an update without ``metadata.resourceVersion`` (custom resources demand one),
409 Conflict for a stale one, 403 Forbidden for the verbs a test forbids, worded as the RBAC authorizer words
it. ``status`` is a subresource: create and update ignore it, ``metadata.generation`` counts spec changes.

It plays the operators. Each GET of a SparkApplication moves it one step along the server's ``script`` of
(state, errorMessage), the transitions the Spark operator makes with ``restartPolicy: Never``. Each GET of an
InferenceService moves it one step along ``serving`` (KServe's controller in Knative mode, see ISVC_SCRIPTS),
starting again at every new generation; its validating webhook refuses a change of deployment mode as KServe's
does (403, "admission webhook ... denied the request"). It also serves the driver pod's log
(``GET /api/v1/namespaces/{ns}/pods/{app}-driver/log``, plain text, ``tailLines`` and ``container``
honoured): the scenario's ``driver_log``, what the driver printed.

Each GET of an Experiment moves it one step along ``study`` (Katib v0.19's experiment controller, see
EXPERIMENT_SCRIPTS and :func:`reconcile_experiment`), starting again when a spec change restarts it. Katib's
validating webhook is played too: it refuses an Experiment in a namespace without the metrics-collector
injection label, and a change of anything but the trial counts, or a restart Katib does not allow (400,
"admission webhook ... denied the request", as Katib answers). Namespaces can be read
(``GET /api/v1/namespaces/{name}``), with the labels of ``namespaces``.

Each GET of a ``kubeflow.org/v1`` TFJob moves it one step along ``training`` (the training operator v1.9.0, see
TFJOB_SCRIPTS and :func:`reconcile_tfjob`), which also keeps its worker pods, owned by the job (a restart replaces
a pod by one of a new UID, as ``restartPolicy: ExitCode`` does): they are listed
(``GET /api/v1/namespaces/{ns}/pods?labelSelector=…``, equality terms) and a failed worker's log is served.

Every request is recorded in ``requests`` as (verb, name) so tests can see what the client did.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import threading
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl

from crds import CRDValidationError, validate

KINDS = {"sparkapplications": ("sparkoperator.k8s.io", "v1beta2", "SparkApplication"),  # plural -> served as
         "inferenceservices": ("serving.kserve.io", "v1beta1", "InferenceService"),
         "experiments": ("kubeflow.org", "v1beta1", "Experiment"),
         "tfjobs": ("kubeflow.org", "v1", "TFJob")}
RESOURCE = re.compile(r"/apis/([^/]+)/([^/]+)/namespaces/([^/]+)/([^/]+)(?:/([^/]+))?")
POD_LOG = re.compile(r"/api/v1/namespaces/([^/]+)/pods/([^/]+)/log")
NAMESPACE = re.compile(r"/api/v1/namespaces/([^/]+)")
PODS = re.compile(r"/api/v1/namespaces/([^/]+)/pods")
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

# KServe's controller in Knative mode, one reconcile per GET, for each generation of the spec: "" leaves the
# status as it was (nothing yet for a new service; for an updated one the previous generation's, Ready included),
# then the states of ISVC_STATUS below.
ISVC_SCRIPTS = {
    "becomes_ready": ["", "deploying", "ready"],
    "predictor_fails": ["", "deploying", "failed"],  # the container exits while loading the model, again and again
}
# What `topoflow serve` prints when /mnt/models holds no export (its termination message: FallbackToLogsOnError)
LOAD_ERROR = ("error: no model_card.json: not a folder written by topoflow train\nin file /mnt/models\n"
              "re-export the model with topoflow train")
KSERVE_FINALIZER = "inferenceservice.finalizers"
# metadata the API server owns: it checks them itself (crds.validate knows only what clients set)
SERVER_FIELDS = ("uid", "resourceVersion", "generation", "creationTimestamp", "managedFields")
WEBHOOK = "inferenceservice.kserve-webhook-server.validator"

# Katib's experiment controller, one reconcile per GET, from the creation or a restart: "" leaves the status as it
# was, then the transitions of reconcile_experiment
EXPERIMENT_SCRIPTS = {
    "succeeds": ["", "created", "running", "succeeded"],
    "fails": ["", "created", "running", "failed"],  # maxFailedTrialCount trials failed or without metrics
    "runs_forever": ["", "created", "running"],
}
INJECTION_LABEL = "katib.kubeflow.org/metrics-collector-injection"  # Katib's webhook wants it "enabled"
KATIB_WEBHOOK = "validator.experiment.katib.kubeflow.org"
COUNTS = ("parallelTrialCount", "maxTrialCount", "maxFailedTrialCount")  # what a study may change
# What the best trial reported, as Katib's trial controller records it: (latest, min, max); the objective's
# last value is not its best one, so a client reading the wrong field is caught
OBSERVED = {"loss": ("0.2417", "0.2401", "0.8112"), "accuracy": ("0.9013", "0.512", "0.9031"),
            "auc": ("0.9744", "0.7012", "0.9751"), "val_loss": ("0.2688", "0.2652", "0.7933"),
            "val_accuracy": ("0.8891", "0.5533", "0.8925"), "val_auc": ("0.9671", "0.7208", "0.9703")}


# The training operator (v1.9.0), one reconcile per GET from the creation: "" leaves the status as it was, then the
# transitions of reconcile_tfjob
TFJOB_SCRIPTS = {
    "completes": ["", "created", "running", "succeeded"],
    "fails": ["", "created", "running", "failed"],  # worker 1 exits 2 (topoflow's error): not retried
    "restarts": ["", "created", "running", "restarting", "running", "succeeded"],  # worker 1 evicted (exit 143)
    "keeps_restarting": ["", "created", "running", *["restarting", "running"] * 5],
    "crash_loops": ["", "created", "running", "restarted"],  # worker 1 killed for memory (exit 137) again and
    # again, faster than the polls: each poll finds a new pod, failed, and never the Restarting condition
    "runs_forever": ["", "created", "running"],
}
TF_CONTAINER = "tensorflow"
WORKER_ERROR = ("error: no validation split in 's3://topoflow-data/prepared' (prepared by an older topoflow)\n"
                "re-run topoflow prepare on the ingested dataset")
WORKER_LOG = "".join([  # TensorFlow's start-up logging, then topoflow's error block
    "2026-01-12 10:14:41.123456: I tensorflow/core/util/port.cc:153] oneDNN custom operations are on.\n",
    *(f"2026-01-12 10:14:4{i % 10}.0: I tensorflow/core/distributed_runtime/rpc/grpc_server_lib.cc:467] Started "
      f"server with target: grpc://topoflow-x-worker-1.topoflow.svc:2222 ({i})\n" for i in range(240)),
    WORKER_ERROR, "\n",
])


class StandInAPI:
    """The server and its state; ``host`` is what ``kubernetes.client.Configuration`` needs."""

    def __init__(self, scenario: str = "completes", user: str = "system:serviceaccount:topoflow:topoflow-pipeline"):
        self.user = user
        self.play(scenario)
        self.serving = ISVC_SCRIPTS["becomes_ready"]
        self.study = EXPERIMENT_SCRIPTS["succeeds"]
        self.training = TFJOB_SCRIPTS["completes"]
        self.pods: dict[tuple[str, str], dict] = {}  # (namespace, name) -> the TFJobs' worker pods
        self.namespaces = {"topoflow": {INJECTION_LABEL: "enabled"}}  # name -> labels of the namespaces that exist
        self.forbidden: set[str] = set()  # verbs on custom resources answered with 403, "pods/log", "namespaces"
        self.interfere = 0  # how many updates find the object changed by the controller since it was read (409)
        self.log_queries: list[dict] = []  # the query of each pod log request
        self.objects: dict[tuple[str, str, str], dict] = {}  # (plural, namespace, name) -> object
        self.steps: dict[tuple[str, str, str], int] = {}
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

    def play_kserve(self, scenario: str) -> None:
        """Play ``scenario`` of ISVC_SCRIPTS for InferenceServices' next generations."""
        self.serving = ISVC_SCRIPTS[scenario]

    def play_katib(self, scenario: str) -> None:
        """Play ``scenario`` of EXPERIMENT_SCRIPTS: the steps Experiments take from their next reconcile on."""
        self.study = EXPERIMENT_SCRIPTS[scenario]

    def play_tfjob(self, scenario: str) -> None:
        """Play ``scenario`` of TFJOB_SCRIPTS: the steps TFJobs take from their next reconcile on."""
        self.training = TFJOB_SCRIPTS[scenario]

    def tfjobs(self) -> list[dict]:
        return [o for (plural, *_), o in self.objects.items() if plural == "tfjobs"]

    def experiments(self) -> list[dict]:
        return [o for (plural, *_), o in self.objects.items() if plural == "experiments"]

    def applications(self) -> list[dict]:
        return [o for (plural, *_), o in self.objects.items() if plural == "sparkapplications"]

    def services(self) -> list[dict]:
        return [o for (plural, *_), o in self.objects.items() if plural == "inferenceservices"]

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
        if method == "GET" and (pods := PODS.fullmatch(path)):
            with self.lock:
                self.requests.append(("list", "pods"))
                return self._pods(pods[1], (query or {}).get("labelSelector", ""))
        if method == "GET" and (ns := NAMESPACE.fullmatch(path)):
            with self.lock:
                self.requests.append(("namespace", ns[1]))
                return self._namespace(ns[1])
        match = RESOURCE.fullmatch(path)
        group, version, namespace, plural, name = match.groups() if match else (None,) * 5
        if KINDS.get(plural, (None, None))[:2] != (group, version):
            return _status(404, "NotFound", "the server could not find the requested resource")
        verb = {("POST", False): "create", ("GET", True): "get", ("PUT", True): "update",
                ("DELETE", True): "delete"}.get((method, bool(name)))
        with self.lock:
            self.requests.append((verb or method, name))
            if verb is None:
                return _status(405, "MethodNotAllowed", "this stand-in serves only create, get, update and delete")
            if verb in self.forbidden:
                return self._forbidden(verb, plural, group, namespace, name)
            if verb == "create":
                return self._create(plural, namespace, body)
            key = (plural, namespace, name)
            if key not in self.objects:
                return _status(404, "NotFound", f'{plural}.{group} "{name}" not found', name, plural, group)
            if verb == "delete":
                self.pods = {k: p for k, p in self.pods.items()  # owner references take the pods along
                             if p["metadata"]["labels"].get(TFJOB_LABEL) != name or k[0] != namespace}
                return 200, self.objects.pop(key)
            if verb == "update":
                return self._update(key, body)
            self._advance(key)
            return 200, self.objects[key]

    def _refused(self, plural: str, namespace: str, name: str | None, body: dict) -> tuple[int, dict] | None:
        """What create and update refuse alike: an object the CRD does not allow, or one for another namespace."""
        group, _, kind = KINDS[plural]
        try:
            validate(as_submitted(body))
        except CRDValidationError as e:
            return _status(422, "Invalid", f'{kind}.{group} "{name}" is invalid: {e}', name, plural, group)
        if body["metadata"].get("namespace", namespace) != namespace:
            return _status(400, "BadRequest", "the namespace of the provided object does not match the namespace "
                                              "sent on the request")
        return None

    def _create(self, plural: str, namespace: str, body: dict) -> tuple[int, dict]:
        name = (body.get("metadata") or {}).get("name")
        if refused := self._refused(plural, namespace, name, body):
            return refused
        if plural == "experiments" and self.namespaces.get(namespace, {}).get(INJECTION_LABEL) != "enabled":
            return _katib_denied(f'Cannot create the Experiment "{name}" in namespace "{namespace}": the namespace '
                                 'lacks label "katib.kubeflow.org/metrics-collector-injection: enabled"', name)
        if (plural, namespace, name) in self.objects:
            return _status(409, "AlreadyExists", f'{plural}.{KINDS[plural][0]} "{name}" already exists', name, plural,
                           KINDS[plural][0])
        obj = {k: v for k, v in body.items() if k != "status"}  # status is a subresource: only the operator sets it
        obj["metadata"] = {**body["metadata"], "namespace": namespace, "uid": f"uid-{len(self.requests)}",
                           "resourceVersion": "1", "generation": 1, "creationTimestamp": _now()}
        self.objects[(plural, namespace, name)] = obj
        self.steps[(plural, namespace, name)] = -1
        return 201, obj

    def _update(self, key: tuple[str, str, str], body: dict) -> tuple[int, dict]:
        """PUT: the whole object but its status, at the resourceVersion the client read; the generation counts
        spec changes, and a new generation starts KServe's script again."""
        plural, namespace, name = key
        group, _, kind = KINDS[plural]
        old, meta = self.objects[key], body.get("metadata") or {}
        if meta.get("name") != name:
            return _status(400, "BadRequest", f'the name of the object ({meta.get("name")}) does not match the name '
                                              f"on the URL ({name})")
        if refused := self._refused(plural, namespace, name, body):
            return refused
        if self.interfere:  # the controller wrote the object after the client read it
            self.interfere -= 1
            self._touch(old)
        if not meta.get("resourceVersion"):
            return _status(422, "Invalid", f'{kind}.{group} "{name}" is invalid: metadata.resourceVersion: Invalid '
                                           "value: 0x0: must be specified for an update", name, plural, group)
        if meta["resourceVersion"] != old["metadata"]["resourceVersion"]:
            return _status(409, "Conflict", f'Operation cannot be fulfilled on {plural}.{group} "{name}": the object '
                                            "has been modified; please apply your changes to the latest version and "
                                            "try again", name, plural, group)
        if plural == "inferenceservices" and (denied := _kserve_webhook(old, body)):
            return _status(403, "Forbidden", f'admission webhook "{WEBHOOK}" denied the request: {denied}')
        if plural == "experiments" and (denied := _katib_webhook(old, body)):
            return _katib_denied(denied, name)
        new = {**{k: v for k, v in body.items() if k != "status"}, "metadata": {
            **meta, **{k: old["metadata"][k] for k in ("uid", "creationTimestamp", "generation", "namespace")}}}
        if "status" in old:
            new["status"] = old["status"]
        if new.get("spec") != old.get("spec"):
            new["metadata"]["generation"] += 1
            self.steps[key] = -1
        self.objects[key] = new
        self._touch(new)
        return 200, new

    def _advance(self, key: tuple[str, str, str]) -> None:
        """The operator's next reconcile: one step along its script, staying at the last state."""
        plural, _, name = key
        obj = self.objects[key]
        script = {"sparkapplications": self.script, "inferenceservices": self.serving,
                  "tfjobs": self.training}.get(plural, self.study)
        step = self.steps[key] = min(self.steps[key] + 1, len(script) - 1)
        if plural == "tfjobs":
            if script[step]:
                reconcile_tfjob(obj, script[step], self.pods)
                self._touch(obj)
            return
        if plural == "experiments":
            if script[step]:
                reconcile_experiment(obj, script[step])
                self._touch(obj)
            return
        if plural == "inferenceservices":
            if script[step]:
                obj["metadata"].setdefault("finalizers", [KSERVE_FINALIZER])
                obj["status"] = isvc_status(obj, script[step])
                self._touch(obj)
            return
        state, error = script[step]
        if not state:
            return
        status = obj.setdefault("status", {"submissionAttempts": 1, "driverInfo": {"podName": f"{name}-driver"}})
        status["applicationState"] = {"state": state, **({"errorMessage": error} if error else {})}
        if state in ("COMPLETED", "FAILED"):
            status.setdefault("terminationTime", _now())

    @staticmethod
    def _touch(obj: dict) -> None:
        """Every write, the status subresource's too, gives the object a new resourceVersion."""
        obj["metadata"]["resourceVersion"] = str(int(obj["metadata"]["resourceVersion"]) + 1)

    def _log(self, namespace: str, pod: str, query: dict) -> tuple[int, dict | str]:
        """The driver's log, its last ``tailLines`` lines; only an application's driver pod has one."""
        self.log_queries.append(query)
        if "pods/log" in self.forbidden:
            return self._forbidden("get", "pods/log", "", namespace, pod)
        if (namespace, pod) in self.pods:  # a TFJob's worker: only one that exited 2 printed an error
            if query.get("container", TF_CONTAINER) != TF_CONTAINER:
                return _status(400, "BadRequest", f"container {query['container']} is not valid for pod {pod}")
            state = self.pods[(namespace, pod)]["status"]["containerStatuses"][0]["state"]
            code = state.get("terminated", {}).get("exitCode")
            log = WORKER_LOG if code == 2 else WORKER_LOG.removesuffix(f"{WORKER_ERROR}\n") if code else ""
            lines = log.splitlines(keepends=True)
            return 200, "".join(lines[-int(query["tailLines"]):] if "tailLines" in query else lines)
        if self.driver_log is None or ("sparkapplications", namespace, pod.removesuffix("-driver")) not in self.objects:
            return _status(404, "NotFound", f'pods "{pod}" not found', pod, "pods", "")
        if query.get("container", DRIVER_CONTAINER) != DRIVER_CONTAINER:
            return _status(400, "BadRequest", f"container {query['container']} is not valid for pod {pod}")
        lines = self.driver_log.splitlines(keepends=True)
        return 200, "".join(lines[-int(query["tailLines"]):] if "tailLines" in query else lines)

    def _pods(self, namespace: str, selector: str) -> tuple[int, dict]:
        """The pods whose labels match every ``key=value`` term of ``selector``."""
        if "pods" in self.forbidden:
            return self._forbidden("list", "pods", "", namespace, None)
        terms = dict(t.split("=", 1) for t in selector.split(",") if t)
        items = [p for (ns, _), p in sorted(self.pods.items())
                 if ns == namespace and all(p["metadata"]["labels"].get(k) == v for k, v in terms.items())]
        return 200, {"apiVersion": "v1", "kind": "PodList", "metadata": {"resourceVersion": "1"}, "items": items}

    def _namespace(self, name: str) -> tuple[int, dict]:
        """A Namespace (cluster-scoped: a namespaced Role cannot grant reading it)."""
        if "namespaces" in self.forbidden:
            return self._forbidden("get", "namespaces", "", None, name)
        if name not in self.namespaces:
            return _status(404, "NotFound", f'namespaces "{name}" not found', name, "namespaces", "")
        labels = {"kubernetes.io/metadata.name": name, **self.namespaces[name]}
        meta = {"name": name, "uid": f"uid-ns-{name}", "resourceVersion": "1", "creationTimestamp": _now(),
                "labels": labels}
        return 200, {"apiVersion": "v1", "kind": "Namespace", "metadata": meta, "spec": {"finalizers": ["kubernetes"]},
                     "status": {"phase": "Active"}}

    def _forbidden(self, verb: str, resource: str, group: str, namespace: str | None,
                   name: str | None) -> tuple[int, dict]:
        """403 as the RBAC authorizer words it; a subresource (pods/log) is named by its parent's object, a
        cluster-scoped resource (namespace None) by its scope."""
        kind = resource.partition("/")[0]
        what = f"{kind}.{group}" if group else kind
        what = f'{what} "{name}"' if name else what
        scope = f'in the namespace "{namespace}"' if namespace else "at the cluster scope"
        return _status(403, "Forbidden", f'{what} is forbidden: User "{self.user}" cannot {verb} resource '
                                         f'"{resource}" in API group "{group}" {scope}', name, kind, group)


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

    def do_PUT(self):
        self._answer("PUT")

    def do_DELETE(self):
        self._answer("DELETE")

    def log_message(self, *args):  # quiet: tests read `requests` instead
        pass


def as_submitted(obj: dict) -> dict:
    """``obj`` without the metadata the API server owns, as ``crds.validate`` checks it."""
    meta = {k: v for k, v in (obj.get("metadata") or {}).items() if k not in SERVER_FIELDS}
    return {**obj, "metadata": meta}


def isvc_status(obj: dict, state: str) -> dict:
    """An InferenceService's status as KServe's controller writes it in Knative mode (conditions after Knative's
    living condition set: Ready follows the last dependent marked), for the object's generation in ``state``:
    deploying (the revision is starting), ready, or failed (its container exits while loading the model)."""
    name, namespace, generation = obj["metadata"]["name"], obj["metadata"]["namespace"], obj["metadata"]["generation"]
    revision, now = f"{name}-predictor-{generation:05d}", _now()
    host = f"{name}-predictor.{namespace}"

    def conditions(**states):  # type -> (status, reason, message)
        return [{"type": t, "status": s, "lastTransitionTime": now, **({"reason": r} if r else {}),
                 **({"message": m} if m else {})} for t, (s, r, m) in sorted(states.items())]

    predictor = {"latestCreatedRevision": revision}
    if state == "deploying":
        missing = ("RevisionMissing", f'Configuration "{name}-predictor" is waiting for a Revision to become ready.')
        states = conditions(IngressReady=("Unknown", "Predictor ingress not created", None),
                            LatestDeploymentReady=("Unknown", "PredictorConfigurationReady not ready", None),
                            PredictorConfigurationReady=("Unknown", None, None),
                            PredictorReady=("Unknown", *missing), PredictorRouteReady=("Unknown", *missing),
                            Ready=("Unknown", "Predictor ingress not created", None),
                            RoutesReady=("Unknown", "PredictorRouteReady not ready", None))
        model = {"transitionStatus": "InProgress", "states": {"activeModelState": "", "targetModelState": "Loading"},
                 "copies": {"failedCopies": 0, "totalCopies": 0}}
    elif state == "failed":
        failed = ("RevisionFailed", f'Revision "{revision}" failed with message: Container failed with: {LOAD_ERROR}.')
        states = conditions(IngressReady=("False", "Predictor ingress not created", None),
                            LatestDeploymentReady=("False", "PredictorConfigurationReady not ready", None),
                            PredictorConfigurationReady=("False", *failed), PredictorReady=("False", *failed),
                            PredictorRouteReady=("False", *failed),
                            Ready=("False", "Predictor ingress not created", None),
                            RoutesReady=("False", "PredictorRouteReady not ready", None))
        model = {"transitionStatus": "BlockedByFailedLoad",
                 "states": {"activeModelState": "", "targetModelState": "FailedToLoad"},
                 "lastFailureInfo": {"reason": "ModelLoadFailed", "message": LOAD_ERROR, "exitCode": 2},
                 "copies": {"failedCopies": 0, "totalCopies": 0}}
    else:
        states = conditions(**{t: ("True", None, None) for t in (
            "IngressReady", "LatestDeploymentReady", "PredictorConfigurationReady", "PredictorReady",
            "PredictorRouteReady", "Ready", "RoutesReady")})
        predictor |= {"latestReadyRevision": revision, "latestRolledoutRevision": revision,
                      "traffic": [{"revisionName": revision, "percent": 100, "latestRevision": True}],
                      "url": f"http://{host}.example.com", "address": {"url": f"http://{host}.svc.cluster.local"}}
        if generation > 1:
            predictor["previousRolledoutRevision"] = f"{name}-predictor-{generation - 1:05d}"
        model = {"transitionStatus": "UpToDate", "states": {"activeModelState": "Loaded", "targetModelState": "Loaded"},
                 "copies": {"failedCopies": 0, "totalCopies": 1}}
    # the mode is recorded at the first reconcile (from the annotation; KServe's default is Standard) and kept
    mode = (obj.get("status") or {}).get("deploymentMode") or \
        obj["metadata"].get("annotations", {}).get("serving.kserve.io/deploymentMode", "Standard")
    status = {"conditions": states, "components": {"predictor": predictor}, "modelStatus": model,
              "deploymentMode": mode, "observedGeneration": generation}
    if state == "ready":
        status |= {"url": f"http://{name}.{namespace}.example.com",
                   "address": {"url": f"http://{name}.{namespace}.svc.cluster.local"}}
    return status


def _kserve_webhook(old: dict, new: dict) -> str | None:
    """What KServe's validating webhook refuses of an update here: a change of deployment mode (the mode the
    controller recorded in the status stays, ``validateDeploymentMode``)."""
    recorded = (old.get("status") or {}).get("deploymentMode")
    wanted = new["metadata"].get("annotations", {}).get("serving.kserve.io/deploymentMode")
    if recorded and wanted and wanted != recorded:
        return f"update rejected: deploymentMode cannot be changed from '{recorded}' to '{wanted}'"
    return None


def reconcile_experiment(obj: dict, state: str) -> None:
    """One reconcile of Katib's experiment controller (v0.19: ``experiment_controller.go``, ``util/status_util.go``,
    conditions set as ``experiments/v1beta1/util.go`` sets them) moving ``obj`` to ``state``:

    - created: a new study is marked Created; a finished one whose maxTrialCount grew is marked Restarting (its
      Succeeded condition removed);
    - running: ``parallelTrialCount`` trials run beside those that succeeded before;
    - succeeded: ``maxTrialCount`` trials succeeded (reason ExperimentMaxTrialsReached);
    - failed: one trial succeeded, and ``maxFailedTrialCount`` failed, the last of them without metrics (both
      count as failed; reason ExperimentFailed).

    The best trial's assignments are each parameter's lowest value (its first for a list), its metrics OBSERVED."""
    spec, name, now = obj["spec"], obj["metadata"]["name"], _now()
    status = obj.setdefault("status", {})
    conditions = status.setdefault("conditions", [])

    def holds(kind: str) -> bool:
        return any(c["type"] == kind and c["status"] == "True" for c in conditions)

    def mark(kind: str, value: str, reason: str, message: str) -> None:  # setCondition: replace, move to the end
        old = next((c for c in conditions if c["type"] == kind), None)
        if old and (old["status"], old["reason"]) == (value, reason):
            return
        since = old["lastTransitionTime"] if old and old["status"] == value else now
        conditions[:] = [c for c in conditions if c["type"] != kind] + [{
            "type": kind, "status": value, "reason": reason, "message": message, "lastUpdateTime": now,
            "lastTransitionTime": since}]

    def end(kind: str, reason: str, message: str) -> None:
        running = next(c for c in conditions if c["type"] == "Running")
        mark("Running", "False", running["reason"], running["message"])
        mark(kind, "True", reason, message)
        status["completionTime"] = now

    if state == "created":
        if not holds("Created"):
            status["startTime"] = now
            mark("Created", "True", "ExperimentCreated", "Experiment is created")
        elif holds("Succeeded"):
            conditions[:] = [c for c in conditions if c["type"] != "Succeeded"]
            mark("Restarting", "True", "ExperimentRestarting", "Experiment is restarted")
        return
    names = [f"{name}-{hashlib.sha256(f'{name}/{i}'.encode()).hexdigest()[:8]}"  # Katib: name + 8 random characters
             for i in range(spec["maxTrialCount"] + 1)]
    done = status.get("trialsSucceeded", 0)
    if state == "running":
        running = min(spec["parallelTrialCount"], spec["maxTrialCount"] - done)
        _trials(status, spec, succeeded=names[:done], running=names[done:done + running])
        mark("Running", "True", "ExperimentRunning", "Experiment is running")
    elif state == "succeeded":
        _trials(status, spec, succeeded=names[:spec["maxTrialCount"]])
        end("Succeeded", "ExperimentMaxTrialsReached", "Experiment has succeeded because max trial count has reached")
    else:
        failed = spec["maxFailedTrialCount"]
        _trials(status, spec, succeeded=names[:1], failed=names[1:failed], metricsUnavailable=names[failed:failed + 1])
        end("Failed", "ExperimentFailed", "Experiment has failed because max failed count has reached")


POD_UIDS = itertools.count(1)  # the API server gives every pod it creates a new UID
TFJOB_LABEL, TYPE_LABEL, INDEX_LABEL = ("training.kubeflow.org/job-name", "training.kubeflow.org/replica-type",
                                       "training.kubeflow.org/replica-index")  # what the operator puts on its pods


def reconcile_tfjob(obj: dict, state: str, pods: dict[tuple[str, str], dict]) -> None:
    """One reconcile of the training operator (v1.9.0: ``controller.v1/tensorflow/tfjob_controller.go``
    UpdateJobStatus, ``controller.v1/common/pod.go``, conditions set as ``pkg/util/status.go`` sets them) moving a
    Worker-only TFJob to ``state``, and its worker pods (``pods``) with it:

    - created: Created (the creation event's reason and message);
    - running: every worker runs; Running replaces Restarting;
    - restarting: worker 1 was evicted (exit 143, retryable under ExitCode): its pod is deleted and created anew
      (a new UID at the same replica index), Restarting replaces Running;
    - restarted: the same, Running set again within the reconcile (which drops Restarting), and worker 1's new pod
      already killed for memory (exit 137) before the operator's next reconcile deletes it;
    - succeeded: every worker exited 0 (worker 0 decides); Running turns False, Succeeded;
    - failed: worker 1 exited 2 (not retryable under ExitCode); Running turns False, Failed with pod.go's message.

    Once Failed, no condition changes (setCondition)."""
    meta, spec, now = obj["metadata"], obj["spec"], _now()
    name, namespace = meta["name"], meta["namespace"]
    status = obj.setdefault("status", {})
    conditions = status.setdefault("conditions", [])
    if any(c["type"] == "Failed" and c["status"] == "True" for c in conditions):
        return

    def mark(kind: str, reason: str, message: str) -> None:  # setCondition and filterOutCondition
        old = next((c for c in conditions if c["type"] == kind), None)
        if old and (old["status"], old["reason"]) == ("True", reason):
            return
        kept = []
        for c in conditions:
            if c["type"] == kind or {kind, c["type"]} == {"Running", "Restarting"}:
                continue
            if kind in ("Succeeded", "Failed") and c["type"] == "Running":
                c = {**c, "status": "False"}
            kept.append(c)
        conditions[:] = [*kept, {"type": kind, "status": "True", "reason": reason, "message": message,
                                 "lastUpdateTime": now, "lastTransitionTime": now}]

    workers = spec["tfReplicaSpecs"]["Worker"]["replicas"]
    phases = {"created": "Pending", "running": "Running", "restarting": "Running", "restarted": "Running",
              "succeeded": "Succeeded", "failed": "Running"}
    failing = min(1, workers - 1)
    owner = {"apiVersion": "kubeflow.org/v1", "kind": "TFJob", "name": name, "uid": meta["uid"], "controller": True,
             "blockOwnerDeletion": True}
    for i in range(workers):
        phase, code = phases[state], 0
        if state in ("failed", "restarted") and i == failing:
            phase, code = "Failed", 2 if state == "failed" else 137
        pod = f"{name}-worker-{i}"
        old = pods.get((namespace, pod))
        recreated = (not old or old["metadata"]["ownerReferences"][0]["uid"] != meta["uid"]  # another job's
                     or i == failing and state in ("restarting", "restarted"))
        uid = f"uid-pod-{next(POD_UIDS)}" if recreated else old["metadata"]["uid"]
        terminated = {"terminated": {"exitCode": code, "reason": "Completed" if code == 0 else "Error"}}
        pods[(namespace, pod)] = {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": pod, "namespace": namespace, "uid": uid, "ownerReferences": [owner], "labels": {
                **spec["tfReplicaSpecs"]["Worker"]["template"]["metadata"].get("labels", {}), TFJOB_LABEL: name,
                TYPE_LABEL: "worker", INDEX_LABEL: str(i)}},
            "status": {"phase": phase, "containerStatuses": [{
                "name": TF_CONTAINER, "ready": phase == "Running", "restartCount": 0, "image": "topoflow-train",
                "imageID": "", "state": terminated if phase in ("Succeeded", "Failed") else {"running": {}}}]}}
    count = {"Running": "active", "Succeeded": "succeeded", "Failed": "failed"}  # core/status.go: Pending is none
    replicas: dict[str, int] = {}
    for (ns, _), p in pods.items():
        if ns == namespace and p["metadata"]["labels"][TFJOB_LABEL] == name and p["status"]["phase"] in count:
            replicas[count[p["status"]["phase"]]] = replicas.get(count[p["status"]["phase"]], 0) + 1
    status["replicaStatuses"] = {"Worker": {**replicas, "selector": f"{TFJOB_LABEL}={name},{TYPE_LABEL}=worker"}}
    status.setdefault("startTime", now)
    status["lastReconcileTime"] = now
    if state == "created":
        mark("Created", "TFJobCreated", f"TFJob {name} is created.")
    elif state == "running":
        mark("Running", "TFJobRunning", f"TFJob {namespace}/{name} is running.")
    elif state in ("restarting", "restarted"):
        mark("Restarting", "TFJobRestarting", f"job {name} is restarting because Worker replica(s) failed.")
        if state == "restarted":
            mark("Running", "TFJobRunning", f"TFJob {namespace}/{name} is running.")
    elif state == "succeeded":
        status.setdefault("completionTime", now)
        mark("Succeeded", "TFJobSucceeded", f"TFJob {namespace}/{name} successfully completed.")
    else:
        status.setdefault("completionTime", now)
        mark("Failed", "TFJobFailed", f'job "{name}" is failing because "Worker" replica(s) failed.')


def _trials(status: dict, spec: dict, **lists: list[str]) -> None:
    """The trial counts and lists of an Experiment's status (empty ones left out, as Katib's omitempty does) and
    its best trial, the first that succeeded."""
    for kind in ("succeeded", "running", "failed", "metricsUnavailable"):
        names = lists.get(kind, [])
        count = "trialMetricsUnavailable" if kind == "metricsUnavailable" else f"trials{kind[0].upper()}{kind[1:]}"
        for key, value in ((f"{kind}TrialList", names), (count, len(names))):
            status.pop(key, None)
            if value:
                status[key] = value
    status["trials"] = sum(len(v) for v in lists.values())
    if lists.get("succeeded"):
        objective = spec["objective"]
        status["currentOptimalTrial"] = {
            "bestTrialName": lists["succeeded"][0],
            "parameterAssignments": [{"name": p["name"], "value": p["feasibleSpace"]["list"][0]
                                      if p["parameterType"] == "categorical" else p["feasibleSpace"]["min"]}
                                     for p in spec["parameters"]],
            "observation": {"metrics": [
                dict(zip(("name", "latest", "min", "max"), (m, *OBSERVED.get(m, ("0.5", "0.5", "0.5")))))
                for m in (objective["objectiveMetricName"], *objective.get("additionalMetricNames", []))]}}


def _katib_webhook(old: dict, new: dict) -> str | None:
    """What Katib's validating webhook refuses of an update (``validator.go``): any spec change but the trial
    counts; a restart of a finished study unless it succeeded by reaching maxTrialCount with resumePolicy
    LongRunning or FromVolume; a maxTrialCount not above the trials it has."""
    if new["spec"] == old["spec"]:
        return None
    status = old.get("status") or {}
    done = {c["type"]: c for c in status.get("conditions", []) if c["status"] == "True"}
    problems = []
    if ("Failed" in done or "Succeeded" in done) and not (
            done.get("Succeeded", {}).get("reason") == "ExperimentMaxTrialsReached"
            and old["spec"].get("resumePolicy") in ("LongRunning", "FromVolume")):
        problems.append(f"spec.resumePolicy: Invalid value: \"{new['spec'].get('resumePolicy', '')}\": Experiment can "
                        "be restarted if it is in succeeded state by reaching max trials and spec.resumePolicy = "
                        "LongRunning or spec.resumePolicy = FromVolume, when experiment is completed")
    if new["spec"].get("maxTrialCount", 1 << 31) <= status.get("trials", 0):
        problems.append(f"spec.maxTrialCount: Invalid value: {new['spec']['maxTrialCount']}: must be greater than "
                        "status.trials count")
    if {k: v for k, v in new["spec"].items() if k not in COUNTS} != {k: v for k, v in old["spec"].items()
                                                                    if k not in COUNTS}:
        problems.append("spec: Forbidden: only spec.parallelTrialCount, spec.maxTrialCount and "
                        "spec.maxFailedTrialCount are editable")
    if not problems:
        return None
    return problems[0] if len(problems) == 1 else f"[{', '.join(problems)}]"  # as field.ErrorList aggregates


def _katib_denied(message: str, name: str | None) -> tuple[int, dict]:
    """Katib's webhook answers its refusals with 400 (``admission.Errored(http.StatusBadRequest, …)``)."""
    return _status(400, "BadRequest", f'admission webhook "{KATIB_WEBHOOK}" denied the request: {message}', name,
                   "experiments", KINDS["experiments"][0])


def _status(code: int, reason: str, message: str, name: str | None = None, kind: str = "sparkapplications",
            group: str = KINDS["sparkapplications"][0]) -> tuple[int, dict]:
    """A Kubernetes ``Status`` object, as the API server answers errors."""
    details = {"name": name, "group": group, "kind": kind} if name else {"group": group, "kind": kind}
    return code, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
                  "reason": reason, "details": details, "code": code}


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
