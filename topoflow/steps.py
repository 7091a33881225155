"""The steps of the Kubeflow pipeline as plain functions: each takes the configuration as YAML text
and the URLs the step before produced, runs one stage, and returns the URL it wrote. A component
body (``components/``) calls exactly one of them, so the pipeline runs the very code the CLI runs.

On a cluster the Spark stages (ingest, prepare) are launched as SparkApplications when
``pipeline.spark_launcher`` is ``kubernetes``; otherwise Spark runs in the step's own process.
"""

from __future__ import annotations

import base64
import json
from html import escape as html_escape
from pathlib import Path


from topoflow import CLASSES, images, storage
from topoflow.config import Config, load_config

def config_text(cfg: Config) -> str:
    """The configuration for a pipeline parameter: never a secret (tasks get them from Kubernetes
    Secrets as environment variables). One line of JSON, which YAML reads: kfp copies a default
    value into a comment of the compiled file, and a multi-line one would break that file."""
    return json.dumps(cfg.public_dump(), sort_keys=True)


def record(artifact, url: str, text: str) -> None:
    """Point a kfp artifact at the data a stage wrote (the data stay where the config puts them:
    Spark executors on other pods must reach them) and keep the stage's manifest in it."""
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


def train(text: str, prepared: str, model: str) -> str:
    """Train ``model``; a retried pod that finds its checkpoint (on a volume) continues it."""
    from topoflow.train import STATE, train as run

    cfg = load_config(text=text)
    cfg.train.data, cfg.train.model = prepared, model
    state = Path(cfg.train.resolved(cfg.train.checkpoint_dir)) / STATE
    return run(cfg, resume=state.exists(), show_progress=False).output


def evaluate(text: str, prepared: str, models: dict[str, str], metrics=None, classification=None,
             markdown=None, html=None):
    """Evaluate the trained models and fill the kfp outputs: scalar ``metrics``, a confusion matrix
    and the tt̄ ROC curve per model (``classification``: name → artifact), the report as Markdown
    and as HTML with its plots."""
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
    from topoflow.prepare import prepare as run_prepare

    print({"ingest": run_ingest, "prepare": run_prepare}[stage](cfg, show_progress=False).table())
