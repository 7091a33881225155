"""topoflow.deploy and the pipeline's deploy decision: the InferenceService it builds (checked against
KServe's CRD), the launcher against a stand-in API server (tests/k8s_api.py) that the real ``kubernetes``
client talks to and that moves the service's status as KServe's controller does, and the choice of the model
to serve from evaluate's metrics."""

from __future__ import annotations

import functools
import json
import subprocess
import sys

import numpy as np
import pytest

from crds import validate
from k8s_api import KSERVE_FINALIZER, LOAD_ERROR, StandInAPI, as_submitted
from topoflow import CLASSES, images, steps
from topoflow.cli import _STAGE_OVERRIDES, _parser
from topoflow.config import Config, ServeConfig, load_config
from topoflow.deploy import CONTAINER, MODEL_DIR, deploy, inference_service
from topoflow.errors import ConfigError, TopoflowError
from topoflow.metrics import metrics
from topoflow.steps import config_text

NS, URL = "topoflow", "s3://topoflow-data/models/inclusive"
SERVICE_URL = "http://topoflow.topoflow.example.com"  # what the stand-in's KServe reports


@pytest.fixture
def k8s():
    server = StandInAPI().start()
    yield server
    server.stop()


def _cfg(**deploy) -> Config:
    cfg = Config()
    cfg.deploy = cfg.deploy.model_copy(update={"timeout_s": 5, **deploy})
    return cfg


def _deploy(k8s, url=URL, cfg=None, **kwargs):
    """deploy() against the stand-in, fast polling; (its URL or the error it raised, the lines it logged)."""
    lines: list[str] = []
    try:
        result = deploy(url, cfg or _cfg(), namespace=NS, client=k8s.client(), log=lines.append, poll_s=0.01,
                        **kwargs)
    except TopoflowError as e:
        result = e
    return result, lines


def _service(k8s) -> dict:
    (obj,) = k8s.services()
    return obj


# ---- the object --------------------------------------------------------------------------------------

def test_custom_predictor_runs_topoflow_serve_on_the_downloaded_model():
    cfg = _cfg(cpu="1500m", memory="3Gi", min_replicas=0, max_replicas=7, concurrency_target=16)
    cfg.serve.max_wait_ms = 5.0
    obj = inference_service(URL, cfg, namespace=NS)
    validate(obj)
    assert obj["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "Knative"
    predictor = obj["spec"]["predictor"]
    assert {k: predictor[k] for k in ("minReplicas", "maxReplicas", "scaleMetric", "scaleTarget")} == {
        "minReplicas": 0, "maxReplicas": 7, "scaleMetric": "concurrency", "scaleTarget": 16}
    assert predictor["serviceAccountName"] == "topoflow-serve" and predictor["automountServiceAccountToken"] is False
    (c,) = predictor["containers"]
    assert (c["name"], c["image"]) == (CONTAINER, images.SERVE)
    assert c["env"] == [{"name": "STORAGE_URI", "value": URL}]  # KServe's storage initializer downloads it
    assert c["ports"] == [{"name": "http1", "containerPort": 8080, "protocol": "TCP"}]
    assert c["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": 8080}
    assert c["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": 8080}
    assert c["resources"]["requests"] == c["resources"]["limits"] == {"cpu": "1500m", "memory": "3Gi"}
    assert c["terminationMessagePolicy"] == "FallbackToLogsOnError"
    _locked_down(predictor, c, images.UID)

    # the image's entry point is `topoflow serve`: its command line gives these settings
    args = _parser().parse_args(["serve", *c["args"]])
    served = load_config(overrides=args.overrides + _STAGE_OVERRIDES["serve"](args)).serve
    assert served.model_dump() == {**ServeConfig().model_dump(), "model": MODEL_DIR, "host": "0.0.0.0",
                                   "max_wait_ms": 5.0}


def test_triton_runtime_serves_the_exports_triton_repository():
    obj = inference_service(URL + "/", _cfg(runtime="triton"), namespace=NS)
    validate(obj)
    predictor = obj["spec"]["predictor"]
    assert "containers" not in predictor
    model = predictor["model"]
    assert model["modelFormat"] == {"name": "onnx"} and model["runtime"] == "kserve-tritonserver"
    assert (model["protocolVersion"], model["storageUri"]) == ("v2", URL + "/triton")
    assert model["resources"]["requests"] == model["resources"]["limits"] == {"cpu": "2", "memory": "2Gi"}
    assert (predictor["scaleMetric"], predictor["scaleTarget"]) == ("concurrency", 32)
    _locked_down(predictor, model, 1000)  # the user KServe's Triton runtime runs as


def _locked_down(predictor: dict, container: dict, uid: int) -> None:
    """What the namespace's "restricted" Pod Security Standard asks, and a writable /tmp."""
    pod, sc = predictor["securityContext"], container["securityContext"]
    assert pod["runAsNonRoot"] is True and pod["runAsUser"] == uid and pod["seccompProfile"]["type"] == "RuntimeDefault"
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]} and sc["runAsNonRoot"] is True
    assert container["volumeMounts"] == [{"name": "tmp", "mountPath": "/tmp"}]
    assert predictor["volumes"][0]["name"] == "tmp" and "emptyDir" in predictor["volumes"][0]


def test_replicas_must_be_ordered():
    with pytest.raises(ConfigError, match=r"deploy.min_replicas \(5\) exceeds deploy.max_replicas \(2\)"):
        inference_service(URL, _cfg(min_replicas=5, max_replicas=2), namespace=NS)


# ---- the launcher --------------------------------------------------------------------------------------

def test_a_new_service_is_created_and_its_url_returned_once_ready(k8s):
    url, lines = _deploy(k8s)
    assert url == SERVICE_URL
    obj = _service(k8s)
    validate(as_submitted(obj))  # the stand-in's status too has KServe's shape
    assert obj["status"]["components"]["predictor"]["latestReadyRevision"] == "topoflow-predictor-00001"
    assert [v for v, _ in k8s.requests] == ["get", "create", "get", "get", "get"]
    assert lines == [
        f"created InferenceService {NS}/topoflow serving {URL}",
        f"InferenceService {NS}/topoflow: waiting for KServe's controller to take it up (no status yet)",
        f"InferenceService {NS}/topoflow: PredictorReady is Unknown (RevisionMissing: Configuration "
        '"topoflow-predictor" is waiting for a Revision to become ready.)',
        f"InferenceService {NS}/topoflow: Ready at {SERVICE_URL}"]


def test_an_existing_service_is_updated_not_duplicated(k8s):
    assert _deploy(k8s)[0] == SERVICE_URL
    k8s.interfere = 1  # KServe's controller writes the object between our read and our replace: 409, retried
    url, lines = _deploy(k8s, "s3://topoflow-data/models/gru")
    assert url == SERVICE_URL
    obj = _service(k8s)
    assert obj["metadata"]["generation"] == 2 and obj["metadata"]["finalizers"] == [KSERVE_FINALIZER]
    assert obj["spec"]["predictor"]["containers"][0]["env"][0]["value"] == "s3://topoflow-data/models/gru"
    assert obj["metadata"]["annotations"]["topoflow/model-url"] == "s3://topoflow-data/models/gru"
    assert obj["status"]["components"]["predictor"]["latestReadyRevision"] == "topoflow-predictor-00002"
    verbs = [v for v, _ in k8s.requests]
    assert verbs.count("create") == 1 and verbs.count("update") == 2  # the first met the Conflict
    # the previous generation's Ready did not end the wait
    assert f"InferenceService {NS}/topoflow: Ready for an earlier spec; waiting for generation 2 to roll out" in lines
    assert lines[0] == f"updated InferenceService {NS}/topoflow to serve s3://topoflow-data/models/gru (generation 2)"


def test_a_predictor_that_never_gets_ready_times_out_naming_the_condition(k8s):
    k8s.play_kserve("predictor_fails")
    error, _ = _deploy(k8s, cfg=_cfg(timeout_s=0.3))
    assert isinstance(error, TopoflowError)
    text = str(error)
    assert text.startswith(f"InferenceService {NS}/topoflow not Ready after 0.3 s: PredictorReady is False "
                           '(RevisionFailed: Revision "topoflow-predictor-00001" failed with message: Container '
                           f"failed with: {LOAD_ERROR}.)\n")
    assert f"the model failed to load (ModelLoadFailed, exit code 2): {LOAD_ERROR}\n" in text
    assert f"kubectl logs -n {NS} -l serving.kserve.io/inferenceservice=topoflow -c {CONTAINER}" in text
    assert "deploy.timeout_s" in text
    assert len(k8s.services()) == 1 and "delete" not in {v for v, _ in k8s.requests}


@pytest.mark.parametrize("verb", ["create", "update"])
def test_forbidden_is_an_rbac_error_naming_the_verb(k8s, verb):
    if verb == "update":
        _deploy(k8s)
    k8s.forbidden = {verb}
    error, _ = _deploy(k8s, "s3://topoflow-data/models/hlf")
    text = str(error)
    assert text.startswith(f"not allowed to {verb} inferenceservices.serving.kserve.io in namespace '{NS}' "
                           "(403 Forbidden, RBAC): ")
    assert f'User "{k8s.user}" cannot {verb} resource "inferenceservices" in API group "serving.kserve.io"' in text
    assert f"must allow verb '{verb}' on resource 'inferenceservices' in API group 'serving.kserve.io'" in text


def test_a_webhooks_refusal_is_not_mistaken_for_rbac(k8s):
    """KServe's validating webhook answers 403 too: here, a service created in Standard mode cannot move to
    Knative."""
    _deploy(k8s)
    _service(k8s)["status"]["deploymentMode"] = "Standard"
    error, _ = _deploy(k8s, "s3://topoflow-data/models/hlf")
    assert str(error) == (
        f"cannot update inferenceservices.serving.kserve.io in namespace '{NS}': refused by KServe's admission "
        'webhook: admission webhook "inferenceservice.kserve-webhook-server.validator" denied the request: '
        "update rejected: deploymentMode cannot be changed from 'Standard' to 'Knative'")


def test_an_invalid_object_is_refused_naming_the_field(k8s, monkeypatch):
    monkeypatch.setattr("topoflow.images.UID", "serve")  # a name where the CRD wants a number
    error, _ = _deploy(k8s)
    text = str(error)
    assert text.startswith(f"cannot create inferenceservices.serving.kserve.io in namespace '{NS}' (422 ")
    assert "$.spec.predictor.securityContext.runAsUser: 'serve' is not of type 'integer'" in text
    assert not k8s.services()


# ---- the pipeline's choice and step --------------------------------------------------------------------

def _results(*models: tuple[str, float, float], events: int = 300) -> dict[str, dict]:
    """Evaluate's results, as metrics() reports them with the model's URL, for models given as (name, how
    strongly the true class stands out (larger: better AUC), the fraction of W+jets events taken for QCD)."""
    rng = np.random.default_rng(3)
    y = np.repeat(np.arange(3), events)
    out = {}
    for name, strength, confused in models:
        seen = y.copy()
        wjets = np.flatnonzero(y == CLASSES.index("wjets"))
        seen[wjets[:int(confused * len(wjets))]] = CLASSES.index("qcd")
        logits = rng.normal(size=(len(y), 3)) + strength * np.eye(3)[seen]
        prob = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
        out[name] = metrics(y, prob) | {"model_url": f"s3://topoflow-data/models/{name}", "history": {}}
    return out


def _config_text(**deploy) -> str:
    cfg = Config()
    cfg.deploy = cfg.deploy.model_copy(update=deploy)
    return config_text(cfg)


GOOD = 6.0  # every class AUC ≈ 1


def test_the_best_model_by_mean_auc_is_deployed_when_its_worst_class_passes():
    results = _results(("hlf", 2.0, 0), ("inclusive", GOOD, 0), ("gru", 3.0, 0))
    lines: list[str] = []
    choice = steps.choose(_config_text(min_auc=0.95), results, log=lines.append)
    assert (choice.model, choice.url, choice.deploy) == ("inclusive", "s3://topoflow-data/models/inclusive", True)
    assert choice.to_serve == choice.url  # evaluate's output, which opens the pipeline's deploy gate
    aucs = results["inclusive"]["auc"]
    assert choice.mean_auc == pytest.approx(np.mean(list(aucs.values())))
    assert min(aucs.values()) >= 0.95 and choice.worst == min(aucs, key=aucs.get)
    assert lines == [f"best model: inclusive (mean test AUC {choice.mean_auc:.4f}, {choice.url}); deploying: "
                     f"its smallest AUC, {choice.worst} {aucs[choice.worst]:.4f}, reaches deploy.min_auc 0.95"]


def test_a_best_model_weak_on_one_class_is_not_deployed():
    """Its mean AUC is the best, but it loses W+jets: a trigger must keep every topology."""
    results = _results(("inclusive", GOOD, 0.2), ("hlf", 1.5, 0))
    assert np.mean(list(results["inclusive"]["auc"].values())) > np.mean(list(results["hlf"]["auc"].values()))
    choice = steps.choose(_config_text(min_auc=0.9), results, log=lambda line: None)
    assert (choice.model, choice.worst, choice.deploy, choice.to_serve) == ("inclusive", "wjets", False, "")
    assert choice.why == f"its wjets AUC {results['inclusive']['auc']['wjets']:.4f} is below deploy.min_auc 0.9"
    assert min(results["hlf"]["auc"].values()) > 0.9, "the other model would pass, but it is not the best"
    assert steps.choose(_config_text(min_auc=0.85), results, log=lambda line: None).deploy  # a laxer threshold


def test_no_deployment_when_disabled_or_when_a_class_cannot_be_judged():
    results = _results(("inclusive", GOOD, 0))
    choice = steps.choose(_config_text(enabled=False), results, log=lambda line: None)
    assert not choice.deploy and choice.why == "deploy.enabled is false"
    results["inclusive"]["auc"]["wjets"] = None  # what metrics() reports when the test split lacks a class
    choice = steps.choose(_config_text(), results, log=lambda line: None)
    assert not choice.deploy and choice.why == "the test split has no wjets events: its AUC is undefined"


def test_the_step_deploys_only_inside_the_cluster(k8s, monkeypatch):
    lines: list[str] = []
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)  # as in `topoflow pipeline run --local`
    assert steps.deploy(_config_text(), URL, log=lines.append) == ""
    assert lines[-1].startswith("deploy skipped: not running in a Kubernetes pod (a local run)")
    assert steps.deploy(_config_text(enabled=False), URL, log=lines.append) == ""
    assert lines[-1] == "deploy skipped: deploy.enabled is false"
    assert not k8s.requests

    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")  # a pipeline pod: its service account's client
    monkeypatch.setattr("topoflow.kube.default_client", k8s.client)
    monkeypatch.setattr("topoflow.deploy.deploy", functools.partial(deploy, poll_s=0.01))
    cfg = Config()
    cfg.pipeline.namespace, cfg.deploy.name, cfg.deploy.timeout_s = "serving", "lhc-trigger", 5
    assert steps.deploy(config_text(cfg), URL, log=lines.append).startswith("http://lhc-trigger.serving.")
    assert [o["metadata"]["namespace"] for o in k8s.services()] == ["serving"]


def test_the_deploy_step_needs_only_the_launcher_image():
    """The deploy component runs in topoflow-base (kfp and the Kubernetes client): no storage, no numerics."""
    code = ("import sys, topoflow.steps, topoflow.deploy, components; "
            "print(json.dumps(sorted(m for m in ('fsspec', 'numpy', 'pyarrow', 'tensorflow') if m in sys.modules)))")
    out = subprocess.run([sys.executable, "-c", f"import json; {code}"], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == []
