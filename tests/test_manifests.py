"""Kubernetes manifests (k8s/) and container images (images/), checked offline.

Every kustomization renders (kubectl's kustomize); every rendered object validates strictly, core
kinds with kubernetes-validate and custom resources against the upstream CRDs (tests/crds.py);
pods are locked down, least privilege and default-deny hold, images carry the package version;
checkov and hadolint pass; each image installs extras that pyproject.toml defines.
kubectl, checkov and hadolint come from the scanner environment .venv-scan (`make scan-env`).
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

from crds import CRDValidationError, validate

REPO = Path(__file__).resolve().parents[1]
SCAN_BIN = Path(os.environ.get("TOPOFLOW_SCAN_BIN", REPO / ".venv-scan" / "bin"))
KUSTOMIZATIONS = ["base", "overlays/dev", "overlays/gpu", "overlays/triton", "overlays/tune", "overlays/bigdl"]
# what the tune overlay's Experiment is made from (k8s/overlays/tune/experiment-hlf.yaml says so)
TUNE_OVERRIDES = ["train.model=hlf", "pipeline.gpus=0"]
# what the gpu overlay's TFJob and the bigdl overlay's SparkApplication are made from (their headers say so)
GPU_OVERRIDES = ["train.engine=multiworker", "pipeline.gpus=1", "pipeline.train_cpu='8'", "pipeline.train_memory=32Gi",
                 "pipeline.pvc=topoflow-checkpoints"]
BIGDL_OVERRIDES = ["train.engine=bigdl", "train.workers=4"]
# what each overlay adds to the base's objects (kind -> count); both training overlays replace the base's Job
ADDED = {"overlays/tune": {"Experiment": 1}, "overlays/gpu": {"Job": -1, "TFJob": 1, "PersistentVolumeClaim": 1},
         "overlays/bigdl": {"Job": -1, "SparkApplication": 1}}
DOCKERFILES = sorted(p.parent.name for p in (REPO / "images").glob("*/Dockerfile"))
# image -> the extras it installs: its tier, and kfp (pipeline) for the components that run in it
TIER_EXTRAS = {"spark": {"spark", "generate", "pipeline"}, "train": {"train", "pipeline"}, "base": {"pipeline"},
               "serve": {"serve"}, "bigdl": {"train"}}
KUBERNETES_VERSION = "1.32.0"  # the oldest API we validate against
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
VERSION = PYPROJECT["project"]["version"]
UID = 10001  # USER of every image, runAsUser of every pod


def tool(name: str) -> Path:
    path = SCAN_BIN / name
    if not path.is_file():
        message = f"{name} not found in {SCAN_BIN}: run `make scan-env`"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict[str, tuple[Path, list[dict]]]:
    """kustomization -> (rendered file, its objects)."""
    kubectl, out = tool("kubectl"), tmp_path_factory.mktemp("rendered")
    result = {}
    for name in KUSTOMIZATIONS:
        run = subprocess.run([kubectl, "kustomize", REPO / "k8s" / name], capture_output=True, text=True)
        assert run.returncode == 0, f"k8s/{name} does not render:\n{run.stderr}"
        path = out / f"{name.replace('/', '-')}.yaml"
        path.write_text(run.stdout)
        result[name] = (path, [d for d in yaml.safe_load_all(run.stdout) if d])
    return result


def objects(rendered, name, kind=None) -> list[dict]:
    return [o for o in rendered[name][1] if kind is None or o["kind"] == kind]


def one(rendered, name, kind, obj_name) -> dict:
    (found,) = [o for o in objects(rendered, name, kind) if o["metadata"]["name"] == obj_name]
    return found


def pods(rendered, name) -> list[tuple[str, dict, dict, dict]]:
    """(where, pod-level security context, container, pod labels) of every pod an object makes;
    SparkApplication pods are shown as the operator makes them (spark-role label, container), an
    InferenceService's predictor by its serving container (its own, or the runtime's `model`, no image),
    a Katib Experiment's trial pod with the trial label Katib's webhook adds, a TFJob's worker pod with the labels
    the training operator adds."""
    out = []
    for o in objects(rendered, name):
        where = f"{o['kind']}/{o['metadata']['name']}"
        if o["kind"] == "Job":
            spec = o["spec"]["template"]["spec"]
            for c in spec["containers"]:
                out.append((where, spec["securityContext"], c, o["spec"]["template"]["metadata"]["labels"]))
        elif o["kind"] == "SparkApplication":
            for role in ("driver", "executor"):
                s = o["spec"][role]
                container = {"securityContext": s["securityContext"], "volumeMounts": s["volumeMounts"],
                             "env": s.get("env", []), "image": o["spec"]["image"]}
                out.append((f"{where}.{role}", s["podSecurityContext"], container,
                            {**s["labels"], "spark-role": role}))
        elif o["kind"] == "InferenceService":
            p = o["spec"]["predictor"]
            for c in p.get("containers") or [{**p["model"], "image": None}]:
                out.append((f"{where}.predictor", p["securityContext"], c, p["labels"]))
        elif o["kind"] == "TFJob":
            template = o["spec"]["tfReplicaSpecs"]["Worker"]["template"]
            labels = {**template["metadata"]["labels"], "training.kubeflow.org/job-name": o["metadata"]["name"],
                      "training.kubeflow.org/replica-type": "worker", "training.kubeflow.org/replica-index": "0"}
            for c in template["spec"]["containers"]:
                out.append((f"{where}.worker", template["spec"]["securityContext"], c, labels))
        elif o["kind"] == "Experiment":
            template = o["spec"]["trialTemplate"]["trialSpec"]["spec"]["template"]
            labels = {**template["metadata"]["labels"], "katib.kubeflow.org/trial": f"{o['metadata']['name']}-x"}
            for c in template["spec"]["containers"]:
                out.append((f"{where}.trial", template["spec"]["securityContext"], c, labels))
    return out


# ---- tests/crds.py itself -------------------------------------------------------------------

SPARK_APP = {
    "apiVersion": "sparkoperator.k8s.io/v1beta2", "kind": "SparkApplication",
    "metadata": {"name": "ingest", "namespace": "topoflow", "labels": {"app.kubernetes.io/name": "x"}},
    "spec": {"type": "Python", "mode": "cluster", "sparkVersion": "4.3.0", "image": "topoflow-spark:0.1.0",
             "mainApplicationFile": "local:///opt/topoflow/main.py", "arguments": ["ingest"],
             "driver": {"cores": 1, "coreLimit": "1", "memory": "2g"},
             "executor": {"instances": 2, "cores": 1, "memory": "2g"}},
}


def test_crds_accepts_a_valid_spark_application():
    validate(copy.deepcopy(SPARK_APP))


@pytest.mark.parametrize("change, message", [
    (lambda a: a["spec"]["driver"].update(coress=1), r"\$\.spec\.driver\.coress: unknown field"),
    (lambda a: a["spec"]["executor"].update(instances="two"), r"\$\.spec\.executor\.instances: 'two' is not of type"),
    (lambda a: a["spec"].update(type="Perl"), r"\$\.spec\.type: 'Perl' is not one of"),
    (lambda a: a["spec"].pop("mainApplicationFile"), r"\$\.spec: 'mainApplicationFile' is a required property"),
    (lambda a: a["metadata"].update(name="Ingest_1"), r"\$\.metadata\.name: 'Ingest_1' does not match"),
    (lambda a: a["metadata"].update(nmespace="x"), r"\$\.metadata\.nmespace: unknown field"),
    (lambda a: a.update(kind="SparkApp"), r"no CRD schema for apiVersion .* kind 'SparkApp'"),
])
def test_crds_refuses(change, message):
    app = copy.deepcopy(SPARK_APP)
    change(app)
    with pytest.raises(CRDValidationError, match=message):
        validate(app)


def test_crds_int_or_string_and_katib_openapi():
    tfjob = {"apiVersion": "kubeflow.org/v1", "kind": "TFJob", "metadata": {"name": "t"}, "spec": {"tfReplicaSpecs": {
        "Worker": {"template": {"spec": {"containers": [{"name": "tensorflow", "image": "x:1",
                                                        "resources": {"limits": {"cpu": 2, "memory": "1Gi"}}}]}}}}}}
    validate(tfjob)  # a quantity may be a number or a string
    experiment = {"apiVersion": "kubeflow.org/v1beta1", "kind": "Experiment", "metadata": {"name": "e"},
                  "spec": {"objective": {"type": "maximize", "objectiveMetricName": "auc", "goal": "high"}}}
    with pytest.raises(CRDValidationError, match=r"\$\.spec\.objective\.goal: 'high' is not of type 'number'"):
        validate(experiment)  # Katib's CRDs carry no schema: its OpenAPI document is used


# ---- rendering and validation -----------------------------------------------------------------

EXPECTED = {"Namespace": 1, "ServiceAccount": 5, "Role": 2, "RoleBinding": 2, "ConfigMap": 1,
            "NetworkPolicy": 9, "SparkApplication": 3, "Job": 1, "InferenceService": 1}


def expected(name: str) -> dict[str, int]:
    counts = dict(EXPECTED)
    for kind, n in ADDED.get(name, {}).items():
        counts[kind] = counts.get(kind, 0) + n
    return {k: n for k, n in counts.items() if n}


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_renders_the_expected_objects(rendered, name):
    kinds = {}
    for o in objects(rendered, name):
        kinds[o["kind"]] = kinds.get(o["kind"], 0) + 1
    assert kinds == expected(name)  # only tune starts a study, only gpu a TFJob, only bigdl a BigDL training


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_every_object_validates_strictly(rendered, name):
    import kubernetes_validate

    custom = []
    for o in objects(rendered, name):
        try:
            kubernetes_validate.validate(o, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.SchemaNotFoundError:  # not a core kind: a custom resource
            validate(o)
            custom.append(o["kind"])
    kinds = expected(name)
    assert sorted(custom) == sorted(k for k in ("Experiment", "InferenceService", "SparkApplication", "TFJob")
                                    for _ in range(kinds.get(k, 0)))


def test_core_validation_is_strict(rendered):
    import kubernetes_validate

    job = copy.deepcopy(one(rendered, "base", "Job", "topoflow-train-inclusive"))
    job["spec"]["template"]["spec"]["containers"][0]["resource"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(job, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_namespaced_and_labelled(rendered, name):
    for o in objects(rendered, name):
        meta = o["metadata"]
        assert o["kind"] not in ("ClusterRole", "ClusterRoleBinding", "Secret"), meta["name"]
        if o["kind"] != "Namespace":
            assert meta.get("namespace") == "topoflow", f"{o['kind']}/{meta['name']} outside namespace topoflow"
        assert meta["labels"].get("app.kubernetes.io/part-of") == "topoflow", meta["name"]
        assert meta["labels"].get("app.kubernetes.io/component") in (
            "platform", "ingest", "prepare", "predict", "train", "serve", "tune")
    ns = one(rendered, name, "Namespace", "topoflow")
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    # Katib injects its metrics collector (and v0.19 accepts Experiments) only in namespaces labelled so
    assert ns["metadata"]["labels"]["katib.kubeflow.org/metrics-collector-injection"] == "enabled"


# ---- least privilege ----------------------------------------------------------------------------

def rules(rendered, role) -> set[tuple[str, str, str]]:
    return {(g, r, v) for rule in one(rendered, "base", "Role", role)["rules"]
            for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}


def test_pipeline_role_is_exactly_what_the_runner_needs(rendered):
    apps = {("sparkoperator.k8s.io", "sparkapplications", v) for v in ("create", "get", "list", "watch", "delete")}
    logs = {("", r, v) for r in ("pods", "pods/log") for v in ("get", "list")}
    serving = {("serving.kserve.io", "inferenceservices", v) for v in ("create", "get", "update")}  # topoflow.deploy
    tuning = {("kubeflow.org", "experiments", v) for v in ("create", "get", "update")}  # topoflow.katib
    training = {("kubeflow.org", "tfjobs", v) for v in ("create", "get", "delete")}  # topoflow.tfjob
    assert rules(rendered, "topoflow-pipeline") == apps | logs | serving | tuning | training


def test_spark_driver_role_manages_executors_only(rendered):
    granted = rules(rendered, "topoflow-spark")
    assert {r for _, r, _ in granted} == {"pods", "services", "configmaps"}
    assert {g for g, _, _ in granted} == {""}
    assert not any("*" in x for rule in granted for x in rule)


def test_bindings_and_tokens(rendered):
    for b in objects(rendered, "base", "RoleBinding"):
        assert b["roleRef"]["kind"] == "Role"
        assert b["subjects"] == [{"kind": "ServiceAccount", "name": b["roleRef"]["name"], "namespace": "topoflow"}]
    for sa in ("topoflow-spark-executor", "topoflow-train", "topoflow-serve"):  # no API access: no token
        assert one(rendered, "base", "ServiceAccount", sa)["automountServiceAccountToken"] is False
    predictor = one(rendered, "base", "InferenceService", "topoflow")["spec"]["predictor"]
    assert predictor["serviceAccountName"] == "topoflow-serve" and predictor["automountServiceAccountToken"] is False
    # KServe's storage initializer finds the S3 keys through the account's Secrets (created by hand)
    assert one(rendered, "base", "ServiceAccount", "topoflow-serve")["secrets"] == [{"name": "topoflow-serve-s3"}]
    job = one(rendered, "base", "Job", "topoflow-train-inclusive")["spec"]["template"]["spec"]
    assert job["automountServiceAccountToken"] is False
    for app in objects(rendered, "base", "SparkApplication"):
        assert app["spec"]["driver"]["serviceAccount"] == "topoflow-spark"
        assert app["spec"]["executor"]["serviceAccount"] == "topoflow-spark-executor"


# ---- pods -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_pods_are_locked_down(rendered, name):
    found = pods(rendered, name)
    # three drivers, three executor templates, one training pod, the predictor (and the tune overlay's trial pod, the
    # gpu overlay's worker instead of the Job, the bigdl overlay's driver and executors instead of it)
    assert len(found) == 8 + {"overlays/tune": 1, "overlays/bigdl": 1}.get(name, 0)
    for where, pod, c, _ in found:
        sc = c["securityContext"]
        uid = 1000 if c.get("runtime") == "kserve-tritonserver" else UID  # the user KServe's runtime runs Triton as
        assert pod["runAsNonRoot"] is True and pod["runAsUser"] == uid, where
        assert pod["seccompProfile"] == {"type": "RuntimeDefault"}, where
        assert sc["runAsNonRoot"] is True and sc.get("runAsUser", uid) == uid, where
        assert sc["readOnlyRootFilesystem"] is True, where
        assert sc["allowPrivilegeEscalation"] is False, where
        assert sc["capabilities"] == {"drop": ["ALL"]}, where
        assert sc["seccompProfile"] == {"type": "RuntimeDefault"}, where
        assert any(m["mountPath"] == "/tmp" for m in c["volumeMounts"]), f"{where}: no writable /tmp"
        for env in c.get("env", []):  # secrets by reference only
            assert "value" not in env or not re.search(r"SECRET|KEY|TOKEN|PASSWORD", env["name"]), where
            if "valueFrom" in env:
                assert env["valueFrom"]["secretKeyRef"]["name"] == "topoflow-s3", where


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_requests_and_limits_everywhere(rendered, name):
    for app in objects(rendered, name, "SparkApplication"):
        for role in ("driver", "executor"):  # Spark sets memory request = limit = memory + overhead
            s = app["spec"][role]
            assert s["cores"] and s["coreRequest"] and s["coreLimit"] and s["memory"]
    for job in objects(rendered, name, "Job"):
        for c in job["spec"]["template"]["spec"]["containers"]:
            for which in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"][which]), f"{c['name']}: {which}"
    for where, _, c, _ in pods(rendered, name):
        # guaranteed pods: Knative's concurrency target per replica holds; trials and workers run alike
        if where.startswith(("InferenceService/", "Experiment/", "TFJob/")):
            assert c["resources"]["requests"] == c["resources"]["limits"] and {"cpu", "memory"} <= set(
                c["resources"]["limits"]), where


def test_gpu_only_in_the_gpu_overlay(rendered):
    def train(name):
        return one(rendered, name, "Job", "topoflow-train-inclusive")["spec"]["template"]["spec"]

    gpu = one(rendered, "overlays/gpu", "TFJob", "topoflow-inclusive")["spec"]["tfReplicaSpecs"]["Worker"]["template"][
        "spec"]
    limits = gpu["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == gpu["containers"][0]["resources"]["requests"]["nvidia.com/gpu"] == "1"
    assert gpu["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in gpu["tolerations"]
    for name in ("base", "overlays/dev"):
        assert "nvidia.com/gpu" not in json.dumps(train(name))


def test_dev_is_smaller_than_base(rendered):
    for app in ("topoflow-ingest", "topoflow-prepare", "topoflow-predict"):
        base, dev = (one(rendered, n, "SparkApplication", app)["spec"]["executor"] for n in ("base", "overlays/dev"))
        assert dev["instances"] < base["instances"] and dev["cores"] <= base["cores"]
    base, dev = (one(rendered, n, "Job", "topoflow-train-inclusive")["spec"]["template"]["spec"]["containers"][0]
                 for n in ("base", "overlays/dev"))
    assert int(dev["resources"]["limits"]["cpu"]) < int(base["resources"]["limits"]["cpu"])


# ---- what runs ------------------------------------------------------------------------------------

def test_spark_applications_run_the_cli(rendered):
    """As the pipeline's SparkApplications do (topoflow.sparkapp): same entry file, same Spark."""
    from topoflow import sparkapp

    dockerfile = (REPO / "images" / "spark" / "Dockerfile").read_text()
    for stage in sparkapp.SPARK_STAGES:  # each has its manifest
        spec = one(rendered, "base", "SparkApplication", f"topoflow-{stage}")["spec"]
        assert spec["type"] == "Python" and spec["mode"] == "cluster"
        main = spec["mainApplicationFile"].removeprefix("local://")
        assert f"images/spark/entry.py {main}" in dockerfile, f"{main} is not in the spark image"
        assert spec["mainApplicationFile"] == sparkapp.ENTRY and spec["sparkVersion"] == sparkapp.SPARK_VERSION
        assert spec["arguments"][:3] == [stage, "--config", "/etc/topoflow/config.yaml"]
        mounts = {m["mountPath"]: m for m in spec["driver"]["volumeMounts"]}
        assert mounts["/etc/topoflow/config.yaml"]["subPath"] == "config.yaml"
        ports = {spec["sparkConf"][k] for k in ("spark.driver.port", "spark.blockManager.port")}
        policy = one(rendered, "base", "NetworkPolicy", "allow-spark-driver-executor")["spec"]
        assert ports == {str(p["port"]) for p in policy["ingress"][0]["ports"]}
    assert "runpy.run_module(\"topoflow.cli\"" in (REPO / "images" / "spark" / "entry.py").read_text()
    job = one(rendered, "base", "Job", "topoflow-train-inclusive")["spec"]["template"]["spec"]["containers"][0]
    assert job["args"][:5] == ["train", "--config", "/etc/topoflow/config.yaml", "--model", "inclusive"]


@pytest.mark.parametrize("name, runtime", [("base", "topoflow"), ("overlays/triton", "triton")])
def test_the_inference_service_is_what_the_deploy_step_builds(rendered, name, runtime):
    """kubectl apply -k and the pipeline's deploy step serve the same thing (config defaults, this model URL)."""
    from topoflow.config import Config
    from topoflow.deploy import inference_service

    manifest = one(rendered, name, "InferenceService", "topoflow")
    cfg = Config()
    cfg.deploy.runtime = runtime
    built = inference_service(manifest["metadata"]["annotations"]["topoflow/model-url"], cfg, namespace="topoflow")
    assert manifest["spec"] == built["spec"]
    assert {k: manifest["metadata"][k] for k in ("labels", "annotations")} == {
        k: built["metadata"][k] for k in ("labels", "annotations")}


def test_the_experiment_is_what_topoflow_katib_builds(rendered):
    """kubectl apply -k overlays/tune and the pipeline's Katib backend start the same study (the cluster config,
    TUNE_OVERRIDES); base alone starts none."""
    from topoflow import katib
    from topoflow.config import load_config

    manifest = one(rendered, "overlays/tune", "Experiment", "hlf")
    built = katib.experiment(load_config(REPO / "k8s" / "base" / "topoflow.yaml", overrides=TUNE_OVERRIDES),
                             namespace="topoflow")
    assert manifest == built, "k8s/overlays/tune/experiment-hlf.yaml differs from what katib.experiment builds; " \
        "below its header, put:\n" + yaml.safe_dump(built, sort_keys=False, width=120)
    assert not objects(rendered, "base", "Experiment")
    (job,) = [katib_job(o) for o in objects(rendered, "overlays/tune", "Experiment")]
    import kubernetes_validate

    kubernetes_validate.validate(job, KUBERNETES_VERSION, strict=True)  # Katib turns it into a batch/v1 Job


def _yaml(obj: dict) -> str:
    """YAML to paste into a manifest: no anchors or aliases."""
    class NoAliases(yaml.SafeDumper):
        def ignore_aliases(self, data):
            return True

    return yaml.dump(obj, Dumper=NoAliases, sort_keys=False, width=120)


def test_the_tfjob_is_what_topoflow_tfjob_builds(rendered):
    """kubectl apply -k overlays/gpu and the pipeline's multiworker train step start the same training (the cluster
    config, GPU_OVERRIDES); only the gpu overlay starts one."""
    from topoflow import tfjob
    from topoflow.config import load_config

    manifest = one(rendered, "overlays/gpu", "TFJob", "topoflow-inclusive")
    built = tfjob.tfjob(load_config(REPO / "k8s" / "base" / "topoflow.yaml", overrides=GPU_OVERRIDES),
                        namespace="topoflow")
    assert manifest == built, "k8s/overlays/gpu/tfjob-inclusive.yaml differs from what tfjob.tfjob builds; below " \
        "its header, put:\n" + _yaml(built)
    spec = manifest["spec"]["tfReplicaSpecs"]["Worker"]["template"]["spec"]
    claim = one(rendered, "overlays/gpu", "PersistentVolumeClaim", "topoflow-checkpoints")
    assert {"persistentVolumeClaim": {"claimName": claim["metadata"]["name"]}, "name": "data"} in spec["volumes"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]  # every worker reads the chief's checkpoint
    assert [n for n in KUSTOMIZATIONS if objects(rendered, n, "TFJob")] == ["overlays/gpu"]


def test_the_bigdl_application_is_what_sparkapp_builds(rendered):
    """kubectl apply -k overlays/bigdl and the pipeline's bigdl train step run the same BigDL training."""
    from topoflow import sparkapp
    from topoflow.config import load_config

    manifest = one(rendered, "overlays/bigdl", "SparkApplication", "topoflow-train-bigdl")
    built = sparkapp.spark_application(
        "train", load_config(REPO / "k8s" / "base" / "topoflow.yaml", overrides=BIGDL_OVERRIDES),
        name="topoflow-train-bigdl", namespace="topoflow", image=sparkapp.BIGDL_IMAGE,
        service_account="topoflow-spark", secret="topoflow-s3")
    assert manifest == built, "k8s/overlays/bigdl/spark-train-bigdl.yaml differs from what " \
        "sparkapp.spark_application builds; below its header, put:\n" + _yaml(built)
    ports = {manifest["spec"]["sparkConf"][k] for k in ("spark.driver.port", "spark.blockManager.port")}
    policy = one(rendered, "base", "NetworkPolicy", "allow-spark-driver-executor")["spec"]
    assert ports == {str(p["port"]) for p in policy["ingress"][0]["ports"]}


def katib_job(experiment: dict) -> dict:
    """The trial Job as Katib creates it: named after the trial, the template's placeholders filled."""
    job = json.loads(re.sub(r"\$\{trialParameters\.\w+\}", "1", json.dumps(experiment["spec"]["trialTemplate"]
                                                                           ["trialSpec"])))
    return {**job, "metadata": {"name": f"{experiment['metadata']['name']}-abcd1234", "namespace": "topoflow"}}


def test_config_map_is_a_valid_topoflow_config(rendered, tmp_path):
    from topoflow import sparkapp
    from topoflow.config import load_config

    cm = one(rendered, "base", "ConfigMap", "topoflow-config")
    (tmp_path / "config.yaml").write_text(cm["data"]["config.yaml"])
    cfg = load_config(tmp_path / "config.yaml")
    assert cfg.spark.master == sparkapp.IN_CLUSTER_MASTER, "a local master would ignore the executors"
    urls = [*(u for us in cfg.ingest.datasets.values() for u in us), cfg.generate.output, cfg.ingest.output,
            cfg.prepare.input, cfg.prepare.output, cfg.predict.model, *cfg.predict.inputs, cfg.predict.output,
            cfg.train.data, cfg.train.output, *cfg.evaluate.models, cfg.evaluate.output]
    assert sorted(cfg.ingest.datasets) == ["qcd", "ttbar", "wjets"]
    assert all(u.startswith("s3://") for u in urls), urls
    assert cfg.storage.s3_access_key_id is None and cfg.storage.s3_secret_access_key is None
    assert cfg.pipeline.namespace == "topoflow" and cfg.pipeline.s3_secret == "topoflow-s3"
    assert cfg.pipeline.spark_service_account == "topoflow-spark"
    assert cfg.train.checkpoint_dir.startswith("/var/lib/topoflow/")  # the Job's writable volume


def test_each_stage_applies_alone_on_the_platform(rendered):
    """`kubectl apply -k … -l app.kubernetes.io/component=<stage>` after the platform: every service
    account and ConfigMap a stage names is a platform object."""
    everything = objects(rendered, "overlays/dev")
    platform = {(o["kind"], o["metadata"]["name"]) for o in everything
                if o["metadata"]["labels"]["app.kubernetes.io/component"] == "platform"}
    everything += [o for o in objects(rendered, "overlays/tune") if o["kind"] == "Experiment"]
    trainings = [o for n in ("overlays/gpu", "overlays/bigdl") for o in objects(rendered, n)  # the TFJob, BigDL's
                 if o["kind"] in ("TFJob", "SparkApplication") and o["metadata"]["labels"]["app.kubernetes.io/component"]
                 == "train"]
    for stage in ("ingest", "prepare", "predict", "train", "serve", "tune"):
        chosen = [o for o in everything if o["metadata"]["labels"]["app.kubernetes.io/component"] == stage]
        assert len(chosen) == 1, stage
        chosen = chosen + trainings if stage == "train" else chosen
        text = json.dumps(chosen)
        accounts = re.findall(r'"serviceAccount(?:Name)?": "([^"]+)"', text)
        maps = re.findall(r'"configMap": \{"name": "([^"]+)"', text)
        # the predictor and the trials read no config: their arguments say it all
        assert accounts and (maps or stage in ("serve", "tune"))
        for kind, ref in [*(("ServiceAccount", a) for a in accounts), *(("ConfigMap", m) for m in maps)]:
            assert (kind, ref) in platform, f"{stage} needs {kind}/{ref}, not in the platform"


def selects(selector: dict, labels: dict) -> bool:
    ok = all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())
    for e in selector.get("matchExpressions", []):
        ok &= {"In": lambda: labels.get(e["key"]) in e["values"], "Exists": lambda: e["key"] in labels,
               "NotIn": lambda: labels.get(e["key"]) not in e["values"],
               "DoesNotExist": lambda: e["key"] not in labels}[e["operator"]]()
    return ok


def test_network_policies_deny_by_default_and_allow_what_each_pod_needs(rendered):
    policies = {p["metadata"]["name"]: p["spec"] for p in objects(rendered, "base", "NetworkPolicy")}
    assert policies["default-deny"] == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
    # a study's suggestion pod, which Katib creates in the namespace with these labels (util.SuggestionLabels)
    suggestion = ("Suggestion/hlf", None, None, {"katib.kubeflow.org/suggestion": "hlf",
                                                 "katib.kubeflow.org/experiment": "hlf",
                                                 "deployment": "hlf-tpe", "sidecar.istio.io/inject": "false"})
    overlays = [p for n in ("overlays/tune", "overlays/gpu", "overlays/bigdl") for p in pods(rendered, n)]
    for where, _, _, labels in [*overlays, suggestion]:
        applied = {n for n, p in policies.items() if selects(p["podSelector"], labels)}
        need = {"default-deny", "allow-dns", "allow-storage-egress"}
        if labels.get("spark-role"):
            need.add("allow-spark-driver-executor")
        if labels.get("spark-role") == "driver":
            need.add("allow-kube-api-egress")  # drivers create their executor pods
        if where.startswith("InferenceService/"):
            need.add("allow-serving-ingress")
        if where.startswith("Experiment/"):
            need.add("allow-katib-trial")
        if where.startswith("Suggestion/"):
            need.add("allow-katib-suggestion")
        if where.startswith("TFJob/"):
            need.add("allow-tfjob-workers")
        assert applied == need, where
    dns = policies["allow-dns"]["egress"][0]
    assert {(p["protocol"], p["port"]) for p in dns["ports"]} == {("UDP", 53), ("TCP", 53)}

    # the predictor takes requests only on the serving ports, only from Knative and the ingress gateway
    serving = policies["allow-serving-ingress"]
    assert serving["policyTypes"] == ["Ingress"]
    allowed = {(peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"], port["port"])
               for rule in serving["ingress"] for peer in rule["from"] for port in rule["ports"]}
    assert allowed == {("istio-system", 8012), ("istio-system", 8080), ("knative-serving", 8012),
                       ("knative-serving", 8080), ("knative-serving", 9090)}
    assert all(set(peer) == {"namespaceSelector"} for rule in serving["ingress"] for peer in rule["from"])

    # Katib: the trial's collector reports to katib-db-manager and may tell the early-stopping service to stop
    # it; the suggestion pod answers Katib's controller and the trials (Katib v0.19's ports and labels)
    def peers(rules, direction):
        return {(peer.get("namespaceSelector", {}).get("matchLabels", {}).get("kubernetes.io/metadata.name"),
                 json.dumps(peer.get("podSelector"), sort_keys=True), port["port"])
                for rule in rules for peer in rule[direction] for port in rule["ports"]}

    db = ("kubeflow", json.dumps({"matchLabels": {"katib.kubeflow.org/component": "db-manager"}}), 6789)
    suggestions = json.dumps({"matchExpressions": [{"key": "katib.kubeflow.org/suggestion", "operator": "Exists"}]})
    trials = json.dumps({"matchExpressions": [{"key": "katib.kubeflow.org/trial", "operator": "Exists"}]})
    trial, suggestion = policies["allow-katib-trial"], policies["allow-katib-suggestion"]
    assert trial["policyTypes"] == ["Egress"]
    assert peers(trial["egress"], "to") == {db, (None, suggestions, 6788)}
    controller = json.dumps({"matchLabels": {"katib.kubeflow.org/component": "controller"}})
    assert peers(suggestion["ingress"], "from") == {("kubeflow", controller, 6789), ("kubeflow", controller, 6788),
                                                   (None, trials, 6788)}
    assert {db, (None, "null", 443), (None, "null", 6443)} == peers(suggestion["egress"], "to")

    # a TFJob's workers reach each other's TensorFlow server on the port of TF_CONFIG, nothing else
    from topoflow import tfjob

    workers = policies["allow-tfjob-workers"]
    selector = json.dumps(workers["podSelector"], sort_keys=True)
    assert peers(workers["ingress"], "from") == peers(workers["egress"], "to") == {
        (None, selector, tfjob.PORT["containerPort"])}


def test_images_carry_the_package_version(rendered):
    from topoflow import images

    kustomization = yaml.safe_load((REPO / "k8s" / "base" / "kustomization.yaml").read_text())
    assert {i["newTag"] for i in kustomization["images"]} == {VERSION}
    from topoflow.sparkapp import BIGDL_IMAGE

    for name in KUSTOMIZATIONS:
        used = {c["image"] for _, _, c, _ in pods(rendered, name)} - {None}  # None: Triton's runtime image
        assert used == {images.SPARK, BIGDL_IMAGE if name == "overlays/bigdl" else images.TRAIN} | (
            {images.SERVE} if name != "overlays/triton" else set()), used
    for tier in DOCKERFILES:
        text = (REPO / "images" / tier / "Dockerfile").read_text()
        assert f"ARG TOPOFLOW_VERSION={VERSION}\n" in text, tier


# ---- images ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("tier", DOCKERFILES)
def test_dockerfile_shape(tier):
    text = (REPO / "images" / tier / "Dockerfile").read_text()
    froms = re.findall(r"^FROM\s+(\S+)", text, re.M)
    assert len(froms) >= 2, f"{tier}: not multi-stage"
    for image in froms:
        assert re.fullmatch(r"[\w./-]+:[\w.-]+", image) and not image.endswith(":latest"), f"{tier}: {image}"
    runtime = text.split("\nFROM ")[-1]
    assert re.search(rf"^USER {UID}:{UID}$", runtime, re.M), f"{tier}: runtime stage not USER {UID}"
    assert not re.search(r"\b(gcc|g\+\+|build-essential|clang|cmake|make|pip wheel)\b", runtime), tier
    assert text.startswith("# syntax=") and "\n# topoflow-" in text, f"{tier}: no comment header"


@pytest.mark.parametrize("tier", DOCKERFILES)
def test_dockerfile_extras_exist(tier):
    text = (REPO / "images" / tier / "Dockerfile").read_text()
    named = {e for group in re.findall(r"(?:\.|topoflow)\[([\w,]+)\]", text) for e in group.split(",")}
    assert named == TIER_EXTRAS[tier], f"{tier} installs {named}"
    extras = PYPROJECT["project"].get("optional-dependencies", {})
    assert named <= set(extras), f"{tier}: extras {sorted(named - set(extras))} not in pyproject.toml"


def test_components_run_in_images_that_have_kfp():
    """A component with install_kfp_package=False runs kfp's executor from its image's own packages."""
    source = (REPO / "components" / "__init__.py").read_text()
    used = re.findall(r"@dsl\.component\(base_image=images\.(\w+)(, install_kfp_package=False)?", source)
    assert used
    for constant, no_install in used:
        tier = constant.lower()
        assert tier in TIER_EXTRAS, f"components use images.{constant}, which images/ does not build"
        assert not no_install or "pipeline" in TIER_EXTRAS[tier], f"images/{tier} lacks kfp"


@pytest.mark.parametrize("tier", DOCKERFILES)
def test_hadolint(tier):
    run = subprocess.run([tool("hadolint"), "--no-color", REPO / "images" / tier / "Dockerfile"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


def test_checkov(rendered):
    files = [str(path) for path, _ in rendered.values()]
    files += [str(REPO / "images" / t / "Dockerfile") for t in DOCKERFILES]
    run = subprocess.run([tool("checkov"), "--config-file", REPO / "k8s" / ".checkov.yaml", "-o", "json",
                          *(a for f in files for a in ("-f", f))], capture_output=True, text=True, cwd=REPO)
    reports = json.loads(run.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    summary = {r["check_type"]: r["summary"] for r in reports}
    assert set(summary) == {"kubernetes", "dockerfile"}, run.stdout[:2000] + run.stderr[-2000:]
    failed = [f"{c['check_id']} {c['check_name']}: {c['resource']} ({c['file_path']})"
              for r in reports for c in r["results"]["failed_checks"]]
    assert not failed, "\n".join(failed)
    assert all(s["parsing_errors"] == 0 and s["passed"] > 0 for s in summary.values()), summary
    assert run.returncode == 0, run.stderr[-2000:]


def test_every_checkov_skip_has_a_reason():
    lines = (REPO / "k8s" / ".checkov.yaml").read_text().splitlines()
    skips = [i for i, line in enumerate(lines) if re.match(r"\s+- CKV", line)]
    assert skips
    for i in skips:
        assert lines[i - 1].strip().startswith("#"), f"no reason above {lines[i].strip()}"
