"""``topoflow pipeline``: compile the Kubeflow pipeline to YAML, submit a run to Kubeflow Pipelines,
or run the same pipeline locally with ``kfp.local`` (imports kfp: the ``pipeline`` extra)."""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

from topoflow.config import Config
from topoflow.errors import ConfigError, TopoflowError
from topoflow.steps import config_text


def compile_pipeline(cfg: Config, path: str | Path) -> Path:
    """Write the pipeline for ``cfg`` as Kubeflow Pipelines v2 YAML (IR) to ``path``."""
    from kfp import compiler

    from pipelines.topoflow_pipeline import build

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(build(cfg), str(path))
    return path


def submit(cfg: Config, host: str, token: str | None = None, experiment: str = "topoflow",
           run_name: str | None = None) -> str:
    """Submit a run of the compiled pipeline to the Kubeflow Pipelines API at ``host``; returns
    the run id. The config travels as the run's ``config`` parameter, without secrets."""
    import kfp

    with tempfile.TemporaryDirectory() as tmp:
        package = compile_pipeline(cfg, Path(tmp) / "topoflow.yaml")
        try:
            client = kfp.Client(host=host, existing_token=token)
            run = client.create_run_from_pipeline_package(
                str(package), arguments={"config": config_text(cfg)}, run_name=run_name,
                experiment_name=experiment, namespace=cfg.pipeline.namespace)
        except Exception as e:  # kfp_server_api's ApiException, urllib3's errors: one clear message
            status = getattr(e, "status", None)
            hint = {401: "the token is missing or expired: pass --token or --token-file",
                    403: f"this identity may not create runs in namespace {cfg.pipeline.namespace!r}"}.get(
                        status, "check --host (the Kubeflow Pipelines API URL) and that it is reachable")
            raise TopoflowError(f"cannot submit the run to {host}: {getattr(e, 'reason', None) or e}\n{hint}") from None
    return run.run_id


def run_local(cfg: Config, pipeline_root: str | Path = "out/kfp-local") -> None:
    """Run the whole pipeline here with ``kfp.local`` (each step a subprocess of this Python):
    Spark runs locally, kfp-kubernetes settings are ignored."""
    from kfp import local

    from pipelines.topoflow_pipeline import build

    cfg = cfg.model_copy(deep=True)
    cfg.pipeline.spark_launcher = "local"
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(pipeline_root),
               raise_on_error=True)
    with warnings.catch_warnings():  # images, resources and Kubernetes settings mean nothing here
        warnings.filterwarnings("ignore", message=".*no effect in the current local runner")
        warnings.filterwarnings("ignore", message=".*non-Python base image")
        build(cfg)()


def read_token(token: str | None, token_file: str | None) -> str | None:
    """The API token from --token, --token-file or KF_PIPELINES_TOKEN (in that order)."""
    if token_file:
        try:
            return Path(token_file).read_text().strip()
        except OSError as e:
            raise ConfigError(f"cannot read the token file {token_file!r}: {e.strerror}") from None
    return token or os.environ.get("KF_PIPELINES_TOKEN")
