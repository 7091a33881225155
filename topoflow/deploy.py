"""Serve an exported model on Kubernetes as a KServe InferenceService (``serving.kserve.io/v1beta1``).

:func:`inference_service` builds it from the ``deploy`` section, for one of two runtimes:

- ``topoflow``: a custom predictor, the ``topoflow-serve`` image running ``topoflow serve`` (raw events or
  features; KServe V1 and V2 REST). KServe's storage initializer downloads the model URL (``STORAGE_URI``) to
  /mnt/models before the container starts.
- ``triton``: KServe's Triton runtime (ClusterServingRuntime ``kserve-tritonserver``) on the export's Triton
  model repository ``<model>/triton`` (:mod:`topoflow.triton`: model inputs only, dynamic batching).

Both run in Knative mode, the one where KServe scales on in-flight requests (``scaleMetric: concurrency``) and
to zero; requests equal limits, and the pods pass the "restricted" Pod Security Standard.

:func:`deploy` creates the service or replaces the spec of the existing one and waits until it is Ready.
KServe's controller (``pkg/apis/serving/v1beta1/inference_service_status.go``) initialises the conditions
PredictorReady, IngressReady and Ready to Unknown; in Knative mode PredictorReady copies the Knative
Service's Ready condition (reason RevisionMissing while the first revision starts, RevisionFailed with the
revision's message when it fails), IngressReady turns True once the predictor is and the route exists, with
``status.url``; Ready is True when both are. After a replace the old Ready=True stays until the controller has
seen the new spec, so, as KServe's own Python client does, the wait also asks ``status.observedGeneration`` to
reach the object's generation. A container that fails to load the model leaves its termination message (the
tail of its log: ``terminationMessagePolicy: FallbackToLogsOnError``) in ``status.modelStatus.lastFailureInfo``.
"""

from __future__ import annotations

import json

from topoflow import images, kube
from topoflow.config import Config, ServeConfig
from topoflow.errors import ConfigError, TopoflowError

INFERENCE_SERVICE = kube.Resource("serving.kserve.io", "v1beta1", "inferenceservices", "InferenceService", "KServe")
CONTAINER = "kserve-container"  # the name KServe gives (and looks for in) the predictor's serving container
MODEL_DIR = "/mnt/models"  # where KServe's storage initializer puts the files of storageUri / STORAGE_URI
HTTP_PORT = ServeConfig.model_fields["http_port"].default
GRPC_PORT = ServeConfig.model_fields["grpc_port"].default
# Knative routes to exactly one container port, HTTP/1 ("http1") or gRPC ("h2c"): REST it is; topoflow serve's
# gRPC port listens inside the pod only
PORT = {"name": "http1", "containerPort": HTTP_PORT, "protocol": "TCP"}
TRITON_RUNTIME, TRITON_UID = "kserve-tritonserver", 1000  # KServe's runtime; the user it runs Triton as
POD_LABEL = "serving.kserve.io/inferenceservice"  # KServe's label on the service's pods
LABELS = {"app.kubernetes.io/name": "topoflow-serve", "app.kubernetes.io/component": "serve",
          "app.kubernetes.io/part-of": "topoflow"}  # k8s/'s NetworkPolicy for the predictor selects these
CONDITIONS = ("PredictorReady", "IngressReady", "Ready")  # in the order they become True
CONFLICTS = 5  # replace attempts when KServe's controller writes the object between our read and write


def inference_service(model_url: str, cfg: Config, *, namespace: str) -> dict:
    """The InferenceService serving the exported model folder at ``model_url`` as ``cfg.deploy`` says."""
    dc = cfg.deploy
    if dc.min_replicas > dc.max_replicas:
        raise ConfigError(f"deploy.min_replicas ({dc.min_replicas}) exceeds deploy.max_replicas ({dc.max_replicas})")
    resources = {"requests": {"cpu": dc.cpu, "memory": dc.memory}, "limits": {"cpu": dc.cpu, "memory": dc.memory}}
    uid = images.UID if dc.runtime == "topoflow" else TRITON_UID
    pod_security, container_security = kube.security_contexts(uid)
    writable = {"volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}]}  # the root filesystem is read-only
    if dc.runtime == "topoflow":
        server = {"containers": [{
            "name": CONTAINER,
            "image": images.SERVE,
            "args": serve_args(cfg),
            "env": [{"name": "STORAGE_URI", "value": model_url}],  # how a custom container asks for the download
            "ports": [PORT],
            "readinessProbe": {"httpGet": {"path": "/v2/health/ready", "port": HTTP_PORT}, "periodSeconds": 5},
            "livenessProbe": {"httpGet": {"path": "/v2/health/live", "port": HTTP_PORT}, "initialDelaySeconds": 10,
                              "periodSeconds": 10, "failureThreshold": 6},
            "resources": resources,
            "securityContext": container_security,
            "terminationMessagePolicy": "FallbackToLogsOnError",  # the `error:` block reaches the status
            **writable,
        }]}
    else:
        server = {"model": {
            "modelFormat": {"name": "onnx"},
            "runtime": TRITON_RUNTIME,  # named: kserve-openvino also claims ONNX
            "protocolVersion": "v2",
            "storageUri": f"{model_url.rstrip('/')}/triton",
            "resources": resources,
            "securityContext": container_security,
            **writable,
        }}
    return {
        "apiVersion": INFERENCE_SERVICE.api_version,
        "kind": INFERENCE_SERVICE.kind,
        "metadata": {
            "name": dc.name,
            "namespace": namespace,
            "labels": dict(LABELS),
            # Knative mode whatever the cluster's default: Standard mode's HPA cannot scale on concurrency
            "annotations": {"serving.kserve.io/deploymentMode": "Knative", "topoflow/model-url": model_url},
        },
        "spec": {"predictor": {
            "minReplicas": dc.min_replicas,
            "maxReplicas": dc.max_replicas,
            "scaleMetric": "concurrency",
            "scaleTarget": dc.concurrency_target,
            "labels": dict(LABELS),
            "serviceAccountName": dc.service_account,  # its Secrets give the storage initializer the S3 keys
            "automountServiceAccountToken": False,  # the predictor never calls the API server
            "securityContext": pod_security,
            "volumes": [{"name": "tmp", "emptyDir": {"sizeLimit": "1Gi"}}],
            **server,
        }},
    }


def serve_args(cfg: Config) -> list[str]:
    """The arguments of the image's ``topoflow serve``: the downloaded model, named after the service (so
    that requests go to /v2/models/<deploy.name>/infer), ONNX (the image has no TensorFlow), listening on the
    pod's address at the ports the service names, and any other ``serve`` setting that differs from its
    default."""
    tuned = cfg.serve.model_dump(exclude_defaults=True, exclude={"model", "name", "backend", "host", "http_port",
                                                                 "grpc_port"})
    return ["--model", MODEL_DIR, "--name", cfg.deploy.name, "--backend", "onnx", "--host", "0.0.0.0",
            "--http-port", str(HTTP_PORT), "--grpc-port", str(GRPC_PORT),
            *(arg for key, value in tuned.items() for arg in ("--set", f"serve.{key}={json.dumps(value)}"))]


def deploy(model_url: str, cfg: Config, *, namespace: str, client=None, log=print, poll_s: float = 5.0) -> str:
    """Serve ``model_url`` as the InferenceService ``deploy.name`` in ``namespace``: created, or the existing
    one's spec replaced; waits until it is Ready for this spec and returns ``status.url``. ``client`` is a
    ``kubernetes.client.ApiClient`` (default: the in-cluster service account, else the kubeconfig). Raises
    TopoflowError naming the condition still not True, and why, when ``deploy.timeout_s`` passes; the
    service is left in place (KServe keeps serving a previous revision that was Ready)."""
    from kubernetes import client as k8s

    body = inference_service(model_url, cfg, namespace=namespace)
    name = body["metadata"]["name"]
    crd = k8s.CustomObjectsApi(client or kube.default_client())
    _apply(crd, namespace, body, log)
    where = f"InferenceService {namespace}/{name}"
    try:
        obj = kube.wait(lambda: kube.call(crd, INFERENCE_SERVICE, "get", namespace, crd.get_namespaced_custom_object,
                                          name=name),
                        lambda obj: f"{where}: {_pending(obj) or 'Ready at ' + obj['status']['url']}",
                        lambda obj: _pending(obj) is None, cfg.deploy.timeout_s, poll_s, log)
    except kube.TimedOut as e:
        raise TopoflowError(_not_ready(where, e.last, cfg.deploy.timeout_s)) from None
    return obj["status"]["url"]


def _apply(crd, namespace: str, body: dict, log) -> None:
    """Create ``body``, or replace the existing service's spec, labels and annotations with its own. The rest
    of the existing metadata stays (KServe's finalizer among it); the replace carries the resourceVersion it
    read, which the API server demands of a custom resource, and is retried on a 409 Conflict."""
    name, url = body["metadata"]["name"], body["metadata"]["annotations"]["topoflow/model-url"]
    for _ in range(CONFLICTS):
        old = kube.call(crd, INFERENCE_SERVICE, "get", namespace, crd.get_namespaced_custom_object, name=name,
                        missing_ok=True)
        try:
            if not old:
                kube.call(crd, INFERENCE_SERVICE, "create", namespace, crd.create_namespaced_custom_object, body=body)
                log(f"created InferenceService {namespace}/{name} serving {url}")
                return
            meta = old["metadata"]
            new = {**body, "metadata": {**meta, "labels": {**meta.get("labels", {}), **body["metadata"]["labels"]},
                                        "annotations": {**meta.get("annotations", {}),
                                                        **body["metadata"]["annotations"]}}}
            obj = kube.call(crd, INFERENCE_SERVICE, "update", namespace, crd.replace_namespaced_custom_object,
                            name=name, body=new)
            log(f"updated InferenceService {namespace}/{name} to serve {url} "
                f"(generation {obj['metadata']['generation']})")
            return
        except kube.Conflict:  # created or written by someone else since the read: read again
            continue
    raise TopoflowError(f"InferenceService {namespace}/{name} kept changing while being updated ({CONFLICTS} "
                        "conflicts): is another deployment of it running?")


def _condition(status: dict, kind: str) -> dict:
    return next((c for c in status.get("conditions", []) if c.get("type") == kind), {"status": "Unknown"})


def _pending(obj: dict) -> str | None:
    """What the service still waits for, in words, or None when it is Ready for its current spec."""
    status, generation = obj.get("status") or {}, obj["metadata"].get("generation", 1)
    if not status.get("conditions"):
        return "waiting for KServe's controller to take it up (no status yet)"
    for kind in CONDITIONS:
        c = _condition(status, kind)
        if c["status"] != "True":
            why = ": ".join(x for x in (c.get("reason"), c.get("message")) if x)
            return f"{kind} is {c['status']}" + (f" ({why})" if why else "")
    if status.get("observedGeneration", 0) < generation:
        return f"Ready for an earlier spec; waiting for generation {generation} to roll out"
    return None if status.get("url") else "Ready but without a URL yet"


def _not_ready(where: str, obj: dict, timeout_s: float) -> str:
    """The time-out error: which condition is not True and why, the model's load failure if KServe saw one,
    and where to look."""
    namespace, name = obj["metadata"]["namespace"], obj["metadata"]["name"]
    lines = [f"{where} not Ready after {timeout_s:g} s: {_pending(obj)}"]
    failure = ((obj.get("status") or {}).get("modelStatus") or {}).get("lastFailureInfo")
    if failure:
        lines.append(f"the model failed to load ({failure.get('reason', 'no reason')}, exit code "
                     f"{failure.get('exitCode', '?')}): {failure.get('message', '').strip()}")
    if not obj.get("status"):
        lines.append("is KServe's controller running? kubectl get pods -n kserve")
    lines += [f"it is left as it is; its pods: kubectl get pods -n {namespace} -l {POD_LABEL}={name}",
              f"the server's log: kubectl logs -n {namespace} -l {POD_LABEL}={name} -c {CONTAINER}",
              "allow more time with deploy.timeout_s, or fix the cause and deploy again"]
    return "\n".join(lines)
