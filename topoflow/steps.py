"""The steps of the Kubeflow pipeline as plain functions: each takes the configuration as YAML text
and the URLs the step before produced, runs one stage, and returns the URL it wrote. A component
body (``components/``) calls exactly one of them, so the pipeline runs the very code the CLI runs.

On a cluster the Spark stages (ingest, prepare, predict) are launched as SparkApplications when
``pipeline.spark_launcher`` is ``kubernetes``; otherwise Spark runs in the step's own process. Tuning, when
enabled, runs a Katib Experiment (``tune.backend`` katib) or trials on the step's Spark. After evaluation,
:func:`choose` picks the model to serve and :func:`deploy` serves it with KServe.

Storage (fsspec) is imported where it is used: the deploy step runs in the small launcher image, which has
only the Kubernetes client.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from html import escape as html_escape
from pathlib import Path

from topoflow import CLASSES, images, kube
from topoflow.config import Config, DeployConfig, load_config

def config_text(cfg: Config) -> str:
    """The configuration for a pipeline parameter: never a secret (tasks get them from Kubernetes
    Secrets as environment variables). One line of JSON, which YAML reads: kfp copies a default
    value into a comment of the compiled file, and a multi-line one would break that file."""
    return json.dumps(cfg.public_dump(), sort_keys=True)


def record(artifact, url: str, text: str) -> None:
    """Point a kfp artifact at the data a stage wrote (the data stay where the config puts them:
    Spark executors on other pods must reach them) and keep the stage's manifest in it."""
    from topoflow import storage

    artifact.metadata["url"] = url
    Path(artifact.path).parent.mkdir(parents=True, exist_ok=True)
    content = json.dumps({"url": url}).encode()
    if url:
        fs, path = storage.filesystem(url, load_config(text=text).storage)
        manifest = storage.join(path, storage.MANIFEST)
        content = fs.cat(manifest) if fs.exists(manifest) else content
    Path(artifact.path).write_bytes(content)


def generate(text: str) -> str:
    """Generated Delphes-format files (``pipeline.generate``), or "" to read ``ingest.datasets``."""
    cfg = load_config(text=text)
    if not cfg.pipeline.generate:
        return ""
    from topoflow.generate import generate as run

    run(cfg, show_progress=False)
    return cfg.generate.output


def ingest(text: str, generated: str = "") -> str:
    from topoflow import storage

    cfg = load_config(text=text)
    if generated:
        cfg.ingest.datasets = {c: [storage.join(generated, f"{c}_*.root")] for c in CLASSES}
    _spark_stage("ingest", cfg)
    return cfg.ingest.output


def prepare(text: str, ingested: str) -> str:
    cfg = load_config(text=text)
    cfg.prepare.input = ingested
    _spark_stage("prepare", cfg)
    return cfg.prepare.output


def predict(text: str, model_url: str) -> str:
    """Score ``predict.inputs`` with the exported model at ``model_url``; the URL of the predictions."""
    cfg = load_config(text=text)
    cfg.predict.model = model_url
    _spark_stage("predict", cfg)
    return cfg.predict.output


def tune(text: str, prepared: str, model: str, log=print) -> str:
    """Tune ``model`` on ``prepared``; the best trial's train settings as JSON, for :func:`train`. With
    ``tune.backend`` katib, in a pod of the cluster, a Katib Experiment runs the trials; otherwise (the spark
    backend, or a local run, which never reaches for a cluster) trials run on the step's own Spark."""
    cfg = load_config(text=text)
    cfg.train.data, cfg.train.model = prepared, model
    if cfg.tune.backend == "katib" and kube.in_cluster():
        from topoflow.katib import run as run_katib

        params = run_katib(cfg, namespace=cfg.pipeline.namespace, log=log)["parameters"]
    else:
        if cfg.tune.backend == "katib":
            log("not running in a Kubernetes pod (a local run): tuning with the spark backend instead of Katib")
        if kube.in_cluster() and cfg.spark.master == "local[*]":  # a pod sees the node's cores, not its limit
            cfg.spark.master = f"local[{kube.whole_cpus(cfg.pipeline.train_cpu)}]"
        from topoflow.tune import tune as run

        result = run(cfg, log=log)
        log(result.table())
        params = result.best["params"]
    log(f"best {model} settings: {json.dumps(params)}")
    return json.dumps(params)


def train(text: str, prepared: str, model: str, tuned: str = "", log=print) -> str:
    """Train ``model`` (with the settings :func:`tune` chose, when given); the URL of its export. In a pod of the
    cluster the distributed engines get pods of their own: ``multiworker`` a TFJob (:mod:`topoflow.tfjob`),
    ``bigdl`` a SparkApplication in the BigDL image; this step only launches and waits. Otherwise (the keras
    engine, a local run) it trains here; a retried pod that finds its checkpoint (on a volume) continues it."""
    cfg = load_config(text=text)
    cfg.train.data, cfg.train.model = prepared, model
    for name, value in json.loads(tuned or "{}").items():
        setattr(cfg.train, name, value)
    pc = cfg.pipeline
    if launches(cfg):
        if cfg.train.engine == "multiworker":
            from topoflow.tfjob import run as run_tfjob

            return run_tfjob(cfg, namespace=pc.namespace, log=log)
        from topoflow import sparkapp

        sparkapp.run_stage("train", cfg, namespace=pc.namespace, image=sparkapp.BIGDL_IMAGE,
                           service_account=pc.spark_service_account, secret=pc.s3_secret, log=log)
        return cfg.train.resolved(cfg.train.output)
    from topoflow.train import train as run

    return run(cfg, resume="auto", show_progress=False).output


LAUNCHED_ENGINES = ("multiworker", "bigdl")  # on a cluster the train step starts their pods and only waits


def launches(cfg: Config) -> bool:
    """Whether the train step launches its training on other pods (a distributed engine, in a pod of the cluster)
    rather than training in its own."""
    return cfg.train.engine in LAUNCHED_ENGINES and kube.in_cluster()


def evaluate(text: str, prepared: str, models: dict[str, str], metrics=None, classification=None,
             markdown=None, html=None):
    """Evaluate the trained models and fill the kfp outputs: scalar ``metrics``, a confusion matrix
    and the tt̄ ROC curve per model (``classification``: name → artifact), the report as Markdown
    and as HTML with its plots."""
    from topoflow import storage
    from topoflow.evaluate import evaluate as run
    from topoflow.metrics import roc_points

    cfg = load_config(text=text)
    cfg.evaluate.data, cfg.evaluate.models = prepared, list(models.values())
    report = run(cfg)
    for name, r in report.results.items():
        if metrics is not None:
            metrics.log_metric(f"{name}_accuracy", r["accuracy"])
            for c in CLASSES:
                if r["auc"][c] is not None:
                    metrics.log_metric(f"{name}_auc_{c}", r["auc"][c])
        if classification and name in classification:
            out = classification[name]
            out.log_confusion_matrix(list(CLASSES), r["confusion"])
            y, prob = report.curves[name]
            k = CLASSES.index("ttbar")
            points = roc_points(y == k, prob[:, k])
            keep = _thin(len(points[0]))
            out.log_roc_curve(*([float(v) for v in p[keep]] for p in points))
    fs, path = storage.filesystem(report.output, cfg.storage)
    text_md = fs.cat(storage.join(path, "report.md")).decode()
    if markdown is not None:
        Path(markdown.path).write_text(text_md)
    if html is not None:
        pictures = "".join(
            f'<img src="data:image/png;base64,{base64.b64encode(fs.cat(p)).decode()}" style="max-width:48%">'
            for p in sorted(fs.glob(storage.join(path, "*.png"))))
        Path(html.path).write_text(f"<html><body><pre>{html_escape(text_md, quote=False)}</pre>{pictures}</body></html>")
    return report


@dataclass
class Choice:
    """The model to serve: the evaluated model with the best mean test AUC, and whether it is deployed."""

    model: str
    url: str
    mean_auc: float
    worst: str  # the class with the smallest AUC
    deploy: bool
    why: str

    @property
    def to_serve(self) -> str:
        """The URL to deploy, "" when none: the evaluate step's output, which gates the deploy step."""
        return self.url if self.deploy else ""


def choose(text: str, results: dict[str, dict], log=print) -> Choice:
    """Pick the model with the best mean one-against-the-rest AUC on the test split from the evaluate
    report's ``results`` (model name → :func:`topoflow.metrics.metrics` plus ``model_url``), and decide whether
    to deploy it: only when ``deploy.enabled`` and its *smallest* per-class AUC reaches ``deploy.min_auc``
    (a trigger that loses one topology is no good, however well it separates the others). A class the test
    split lacks has no AUC: the model cannot be judged and is not deployed."""
    dc: DeployConfig = load_config(text=text).deploy

    def mean(r: dict) -> float:
        aucs = [a for a in r["auc"].values() if a is not None]
        return sum(aucs) / len(aucs) if aucs else 0.0

    name = max(results, key=lambda n: mean(results[n]))
    aucs = results[name]["auc"]
    missing = [c for c, a in aucs.items() if a is None]
    worst = missing[0] if missing else min(aucs, key=aucs.get)
    if missing:
        deploy, why = False, f"the test split has no {', '.join(missing)} events: its AUC is undefined"
    elif aucs[worst] < dc.min_auc:
        deploy, why = False, f"its {worst} AUC {aucs[worst]:.4f} is below deploy.min_auc {dc.min_auc:g}"
    elif not dc.enabled:
        deploy, why = False, "deploy.enabled is false"
    else:
        deploy, why = True, f"its smallest AUC, {worst} {aucs[worst]:.4f}, reaches deploy.min_auc {dc.min_auc:g}"
    choice = Choice(name, results[name]["model_url"], mean(results[name]), worst, deploy, why)
    log(f"best model: {name} (mean test AUC {choice.mean_auc:.4f}, {choice.url}); "
        f"{'deploying' if deploy else 'not deploying'}: {why}")
    return choice


def deploy(text: str, model_url: str, log=print) -> str:
    """Serve ``model_url`` as the KServe InferenceService ``deploy.name`` in ``pipeline.namespace`` and return
    its URL, or "" when skipped: when ``deploy.enabled`` is false, and when not running in a pod of the
    cluster (``topoflow pipeline run --local``, a laptop): a local run never reaches for a cluster, not even
    the one a kubeconfig names."""
    cfg = load_config(text=text)
    if not cfg.deploy.enabled:
        log("deploy skipped: deploy.enabled is false")
        return ""
    if not kube.in_cluster():
        log(f"deploy skipped: not running in a Kubernetes pod (a local run); to serve {model_url}, run the "
            "pipeline on the cluster or apply k8s/ (component serve)")
        return ""
    from topoflow.deploy import deploy as run

    url = run(model_url, cfg, namespace=cfg.pipeline.namespace, log=log)
    log(f"serving {model_url} at {url}")
    return url


def _thin(n: int, most: int = 200):
    """At most ``most`` points of a curve (the KFP UI draws every one)."""
    import numpy as np

    return np.unique(np.linspace(0, n - 1, min(n, most)).round().astype(int))


def _spark_stage(stage: str, cfg: Config) -> None:
    if cfg.pipeline.spark_launcher == "kubernetes":
        from topoflow.sparkapp import run_stage

        pc = cfg.pipeline
        run_stage(stage, cfg, namespace=pc.namespace, image=images.SPARK, service_account=pc.spark_service_account,
                  secret=pc.s3_secret)
        return
    from topoflow.ingest import ingest as run_ingest
    from topoflow.predict import predict as run_predict
    from topoflow.prepare import prepare as run_prepare

    run = {"ingest": run_ingest, "prepare": run_prepare, "predict": run_predict}[stage]
    print(run(cfg, show_progress=False).table())
