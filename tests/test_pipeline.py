"""The Kubeflow pipeline: the compiled YAML is what the config says (components, parameters,
artifact types, resources, GPU, secrets, placement), and `kfp.local` runs the same pipeline to the
same outputs as the CLI stages."""

import json  # no `from __future__ import annotations`: kfp reads the types of a component defined here
import time

import numpy as np
import pytest
import yaml

from conftest import SAMPLES, free_port
from topoflow import images
from topoflow.cli import main
from topoflow.config import Config

SECRET = "pipeline-secret-0123456789"


def _compiled(cfg: Config, tmp_path) -> tuple[dict, dict]:
    from topoflow.pipeline import compile_pipeline

    docs = list(yaml.safe_load_all(compile_pipeline(cfg, tmp_path / "p.yaml").read_text()))
    platform = docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"] if len(docs) > 1 else {}
    return docs[0], platform


def test_compiled_pipeline_is_what_the_config_says(tmp_path):
    cfg = Config()
    cfg.storage.s3_access_key_id, cfg.storage.s3_secret_access_key = "key-id-0123", SECRET
    cfg.pipeline.pvc, cfg.pipeline.xrootd_secret, cfg.pipeline.train_memory = "topoflow-data", "eos-proxy", "12Gi"
    spec, platform = _compiled(cfg, tmp_path)
    text = (tmp_path / "p.yaml").read_text()
    assert SECRET not in text and "key-id-0123" not in text, "no secret in the pipeline spec"

    tasks = spec["root"]["dag"]["tasks"]
    every = _every_task(spec)
    assert sorted(t["taskInfo"]["name"] for t in tasks.values()) == [
        "condition-branches-1", "evaluate", "generate", "good-enough-to-serve", "ingest", "prepare", "train gru",
        "train hlf", "train inclusive"]
    assert Config.model_validate(yaml.safe_load(spec["root"]["inputDefinitions"]["parameters"]["config"]["defaultValue"])) \
        .pipeline == cfg.pipeline, "the config parameter is the config"
    assert spec["root"]["inputDefinitions"]["parameters"]["tune"]["defaultValue"] is False  # tune.enabled

    # when the tune parameter is true each model is tuned first and trains with its tune task's settings; else
    # one task answers "no settings" for all
    (untuned,) = [t for t in every.values() if t["componentRef"]["name"] == "comp-untuned"]
    assert every[untuned["_condition"]]["taskInfo"]["name"] == "no-tuning"
    branches = spec["components"]["comp-condition-branches-1"]["dag"]["outputs"]["parameters"]
    for model in cfg.pipeline.models:
        (train,) = [t for t in tasks.values() if t["taskInfo"]["name"] == f"train {model}"]
        assert train["inputs"]["parameters"]["model_name"]["runtimeValue"]["constant"] == model
        (tune,) = [(name, t) for name, t in every.items() if t["componentRef"]["name"].startswith("comp-tune")
                   and t["inputs"]["parameters"]["model_name"]["runtimeValue"]["constant"] == model]
        assert every[tune[1]["_condition"]]["triggerPolicy"]["condition"] == \
            "inputs.parameter_values['pipelinechannel--tune'] == true"
        chosen = train["inputs"]["parameters"]["tuned"]["taskOutputParameter"]
        assert chosen["producerTask"] == "condition-branches-1"
        assert {(s["producerSubtask"], s["outputParameterKey"]) for s in branches[chosen["outputParameterKey"]]
                ["valueFromOneof"]["parameterSelectors"]} == {(tune[1]["_condition"], f"pipelinechannel--{tune[0]}-Output"),
                                                              (untuned["_condition"], "pipelinechannel--untuned-Output")}

    def artifacts(component: str, side: str) -> dict[str, str]:
        defs = spec["components"][f"comp-{component}"][f"{side}Definitions"]["artifacts"]
        return {k: v["artifactType"]["schemaTitle"] for k, v in defs.items()}

    assert artifacts("ingest", "output") == {"ingested": "system.Dataset"}
    assert artifacts("train", "output") == {"model": "system.Model"}
    assert artifacts("evaluate", "input") == {"prepared": "system.Dataset", "hlf": "system.Model",
                                              "gru": "system.Model", "inclusive": "system.Model"}
    assert sorted(set(artifacts("evaluate", "output").values())) == [
        "system.ClassificationMetrics", "system.HTML", "system.Markdown", "system.Metrics"]

    # deploy runs after evaluate, only when evaluate chose a model (its output: the URL, or ""), on that URL
    (gate,) = [t for t in tasks.values() if t["taskInfo"]["name"] == "good-enough-to-serve"]
    assert gate["dependentTasks"] == ["evaluate"]
    assert gate["triggerPolicy"]["condition"] == "inputs.parameter_values['pipelinechannel--evaluate-Output'] != ''"
    outputs = spec["components"]["comp-evaluate"]["outputDefinitions"]["parameters"]
    assert {k: v["parameterType"] for k, v in outputs.items()} == {"Output": "STRING"}
    deploy = spec["components"][gate["componentRef"]["name"]]["dag"]["tasks"]["deploy"]
    assert deploy["inputs"]["parameters"]["model_url"] == {"componentInputParameter": "pipelinechannel--evaluate-Output"}

    executors = spec["deploymentSpec"]["executors"]
    assert executors["exec-ingest"]["container"]["image"] == images.SPARK
    assert executors["exec-train"]["container"]["image"] == images.TRAIN == executors["exec-tune"]["container"]["image"]
    assert executors["exec-deploy"]["container"]["image"] == images.BASE == executors["exec-untuned"]["container"]["image"]
    for name, ex in executors.items():
        res = ex["container"]["resources"]
        assert res["cpuLimit"] == res["cpuRequest"] and res["memoryLimit"] == res["memoryRequest"], name
        if name in ("exec-deploy", "exec-untuned"):  # no data, no keys: deploy only talks to the API server
            assert name not in platform
            continue
        env = {e["envVar"] for s in platform[name]["secretAsEnv"] for e in s["keyToEnv"]}
        assert env == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}, name
        assert platform[name]["secretAsEnv"][0]["secretName"] == "topoflow-s3"
        assert platform[name]["secretAsVolume"][0]["secretName"] == "eos-proxy"
        assert platform[name]["pvcMount"][0]["mountPath"] == "/data"
        is_train = name.startswith("exec-train")
        assert ("accelerator" in res) == is_train, name
        assert ("tolerations" in platform[name]) == is_train and ("nodeSelector" in platform[name]) == is_train
    train = executors["exec-train"]["container"]["resources"]
    assert train["accelerator"]["resourceType"] == "nvidia.com/gpu" and int(train["accelerator"]["resourceCount"]) == 1
    assert train["resourceMemoryLimit"] == "12Gi" and train["resourceCpuLimit"] == cfg.pipeline.train_cpu
    assert platform["exec-train"]["tolerations"] == [{"effect": "NoSchedule", "key": "nvidia.com/gpu", "operator": "Exists"}]


def _every_task(spec: dict) -> dict[str, dict]:
    """Every task of the pipeline, in conditions too, by name; each with ``_condition``: the condition task it
    sits in."""
    found: dict[str, dict] = {}

    def walk(dag: dict, condition: str | None) -> None:
        for name, task in dag["tasks"].items():
            found[name] = {**task, "_condition": condition}
            inner = spec["components"][task["componentRef"]["name"]].get("dag")
            if inner:
                walk(inner, name)

    walk(spec["root"]["dag"], None)
    return found


def test_cpu_only_pipeline_asks_for_no_gpu(tmp_path):
    cfg = Config()
    cfg.pipeline.gpus, cfg.pipeline.s3_secret, cfg.pipeline.models = 0, None, ["hlf"]
    spec, platform = _compiled(cfg, tmp_path)
    assert "accelerator" not in spec["deploymentSpec"]["executors"]["exec-train"]["container"]["resources"]
    assert platform == {}, "no secret, GPU placement or volume asked for"
    assert sorted(spec["root"]["dag"]["tasks"]["evaluate"]["inputs"]["artifacts"]) == ["hlf", "prepared"]


@pytest.mark.parametrize("engine", ["multiworker", "bigdl"])
def test_a_launching_train_task_is_small(tmp_path, engine):
    """With a distributed engine the train task only launches a TFJob or SparkApplication and waits: the pipeline's
    task sizes, no GPU, no GPU node; the keys still (it reads the export's manifest)."""
    cfg = Config()
    cfg.train.engine, cfg.pipeline.models = engine, ["hlf"]
    spec, platform = _compiled(cfg, tmp_path)
    res = spec["deploymentSpec"]["executors"]["exec-train"]["container"]["resources"]
    assert "accelerator" not in res and res["resourceCpuLimit"] == cfg.pipeline.cpu
    assert res["resourceMemoryLimit"] == cfg.pipeline.memory
    assert "nodeSelector" not in platform["exec-train"] and "tolerations" not in platform["exec-train"]
    assert platform["exec-train"]["secretAsEnv"][0]["secretName"] == "topoflow-s3"


@pytest.mark.parametrize("engine, in_cluster, launched", [
    ("multiworker", True, "tfjob"), ("bigdl", True, "sparkapp"), ("keras", True, "local"),
    ("multiworker", False, "local"), ("bigdl", False, "local")])
def test_the_train_step_launches_distributed_engines_only_in_the_cluster(monkeypatch, engine, in_cluster, launched):
    from topoflow import sparkapp, steps, tfjob
    from topoflow import train as training

    calls = []
    monkeypatch.setattr(steps.kube, "in_cluster", lambda: in_cluster)
    monkeypatch.setattr(tfjob, "run", lambda cfg, namespace, log: calls.append(("tfjob", cfg)) or "s3://b/m/tf")
    monkeypatch.setattr(sparkapp, "run_stage", lambda stage, cfg, **kw: calls.append(("sparkapp", cfg, stage, kw)))
    monkeypatch.setattr(training, "train", lambda cfg, **kw: calls.append(("local", cfg, kw)) or
                        training.TrainResult(cfg.train.model, "s3://b/m/local", 1))
    cfg = Config()
    cfg.train.engine, cfg.train.output = engine, "s3://b/m/{model}"
    url = steps.train(steps.config_text(cfg), "s3://b/prepared", "gru", '{"dropout": 0.1}', log=lambda line: None)
    ((kind, sent, *rest),) = calls
    assert kind == launched and (sent.train.model, sent.train.data, sent.train.dropout) == ("gru", "s3://b/prepared", 0.1)
    assert url == {"tfjob": "s3://b/m/tf", "sparkapp": "s3://b/m/gru", "local": "s3://b/m/local"}[launched]
    if launched == "sparkapp":
        assert rest[0] == "train" and rest[1]["image"] == sparkapp.BIGDL_IMAGE
    if launched == "local":
        assert rest[0]["resume"] == "auto"


def test_predict_component_compiles(tmp_path):
    """Not in topoflow's pipeline (users compose it): alone it compiles to the spark image, a Model in, a Dataset out."""
    from kfp import compiler

    import components

    compiler.Compiler().compile(components.predict, str(tmp_path / "predict.yaml"))
    spec = yaml.safe_load((tmp_path / "predict.yaml").read_text())
    (container,) = (ex["container"] for ex in spec["deploymentSpec"]["executors"].values())
    assert container["image"] == images.SPARK and "steps.predict(" in container["command"][-1]
    kinds = {k: v["artifactType"]["schemaTitle"] for side in ("input", "output")
             for k, v in spec["root"][f"{side}Definitions"]["artifacts"].items()}
    assert kinds == {"model": "system.Model", "predictions": "system.Dataset"}
    assert list(spec["root"]["inputDefinitions"]["parameters"]) == ["config"]


def test_submit_to_an_unreachable_host_is_a_clear_error(capsys):
    host = f"http://127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    assert main(["pipeline", "submit", "--host", host, "--token", "t"]) == 2
    err = capsys.readouterr().err
    assert f"cannot submit the run to {host}" in err and "Traceback" not in err
    assert time.monotonic() - t0 < 60
    assert main(["pipeline", "run"]) == 2 and "--local" in capsys.readouterr().err


@pytest.mark.spark
@pytest.mark.slow
def test_local_pipeline_run_equals_the_cli_stages(spark, delphes_dir, tmp_path, monkeypatch):
    """`topoflow pipeline run --local` (kfp.local, every step a subprocess) writes what the stages
    write when called one by one: with tuning on, its train step trains the best trial's settings; its deploy
    step runs, and reaches for no cluster."""
    from test_ingest import read_dataset
    from topoflow.ingest import ingest
    from topoflow.pipeline import run_local
    from topoflow.preprocessing import Preprocessing
    from topoflow.prepare import prepare
    from topoflow.train import train

    def config(base):
        cfg = Config()
        cfg.spark.master, cfg.spark.driver_memory = "local[1]", "1g"
        cfg.ingest.datasets = {c: [str(delphes_dir / f)] for c, f in SAMPLES.items()}
        cfg.ingest.output, cfg.prepare.output = str(base / "ingested"), str(base / "prepared")
        cfg.prepare.input, cfg.prepare.balance, cfg.prepare.test_fraction = str(base / "ingested"), False, 0.3
        cfg.train.data, cfg.train.model, cfg.train.epochs, cfg.train.batch_size = str(base / "prepared"), "hlf", 2, 16
        cfg.train.output, cfg.train.checkpoint_dir = str(base / "models/{model}"), str(base / "ckpt/{model}")
        cfg.evaluate.output, cfg.pipeline.models = str(base / "report"), ["hlf"]
        cfg.deploy.min_auc = 0.0  # any model with every class in the test split passes
        cfg.tune.output = str(base / "tuning/{name}")
        return cfg

    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)  # not a pod, whatever runs the tests
    tuned = config(tmp_path / "kfp")
    tuned.tune = {"enabled": True, "output": tuned.tune.output, "algorithm": "grid", "parallelism": 1,
                  "parameters": {"learning_rate": {"choices": [0.003, 0.03]}}}
    run_local(tuned, tmp_path / "kfp-root")
    chosen = json.loads(json.loads(next((tmp_path / "kfp-root").rglob("tune/executor_output.json")).read_text())
                        ["parameterValues"]["Output"])
    trials = json.loads((tmp_path / "kfp/tuning/hlf/trials.json").read_text())
    assert len(trials) == 2 and chosen == trials[0]["params"], "the tune step passes the best trial's settings"
    cli = config(tmp_path / "cli")
    ingest(cli, spark, show_progress=False)
    prepare(cli, spark, show_progress=False)
    cli.train.learning_rate = chosen["learning_rate"]
    trained = train(cli, show_progress=False)

    kfp, ref = tmp_path / "kfp", tmp_path / "cli"
    assert read_dataset(kfp / "ingested").keys() == read_dataset(ref / "ingested").keys()
    same = [Preprocessing.load(str(d / "prepared"), cli.storage).fingerprint() for d in (kfp, ref)]
    assert same[0] == same[1], "the same scalers (only the source URL they name differs)"
    for split in ("train", "validation", "test"):
        assert json.loads((kfp / f"prepared/{split}/_manifest.json").read_text())["rows_per_class"] == \
            json.loads((ref / f"prepared/{split}/_manifest.json").read_text())["rows_per_class"]
    card = json.loads((kfp / "models/hlf/model_card.json").read_text())
    np.testing.assert_allclose(card["history"]["loss"], trained.history["loss"], rtol=1e-5)
    report = json.loads((kfp / "report/report.json").read_text())
    assert list(report) == ["hlf"] and report["hlf"]["events"] > 0
    evaluated = next((tmp_path / "kfp-root").rglob("evaluate"))
    assert "<img src=\"data:image/png;base64," in (evaluated / "report_html").read_text()
    assert "test split" in (evaluated / "report_md").read_text()
    logged = {name: a["artifacts"][0]["metadata"]
              for name, a in json.loads((evaluated / "executor_output.json").read_text())["artifacts"].items()}
    assert logged["metrics"]["hlf_accuracy"] == pytest.approx(report["hlf"]["accuracy"])
    assert logged["hlf_classification"]["confusionMatrix"]["rows"][1]["row"] == report["hlf"]["confusion"][1]
    assert logged["hlf_classification"]["confidenceMetrics"][-1]["recall"] == 1.0, "the ROC curve ends at (1, 1)"
    chosen = json.loads((evaluated / "executor_output.json").read_text())["parameterValues"]["Output"]
    judged = None not in report["hlf"]["auc"].values()  # these few test events may lack a class
    assert chosen == (str(kfp / "models/hlf") if judged else "")
    assert [p.parent.name for p in (tmp_path / "kfp-root").rglob("deploy/executor_output.json")] == (
        ["deploy"] if judged else [])


@pytest.mark.filterwarnings("ignore:.*non-Python base image", "ignore:.*no effect in the current local runner")
def test_a_local_run_goes_through_the_deploy_gate_and_reaches_no_cluster(tmp_path, monkeypatch):
    """The gate of the pipeline behind a stand-in for evaluate, under kfp.local: a chosen model's URL opens it
    and the deploy step runs, and skips (no pod here); "" keeps it shut."""
    from kfp import dsl, local

    from pipelines.topoflow_pipeline import serve_if_chosen
    from topoflow.steps import config_text

    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    cfg = Config()

    @dsl.component(base_image=images.BASE, install_kfp_package=False)
    def chose(url: str) -> str:
        return url

    @dsl.pipeline
    def gate(config: str, url: str):
        serve_if_chosen(config, chose(url=url), cfg.pipeline)

    for url in ("s3://topoflow-data/models/inclusive", ""):
        root = tmp_path / (url and "chosen" or "none")
        local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root), raise_on_error=True)
        gate(config=config_text(cfg), url=url)
        outputs = [json.loads(p.read_text()) for p in root.rglob("deploy/executor_output.json")]
        assert [o["parameterValues"] for o in outputs] == ([{"Output": ""}] if url else [])


def test_pipeline_needs_its_extra_named(monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "kfp", None)
    assert main(["pipeline", "compile", "--output", "/nonexistent/p.yaml"]) == 2
    err = capsys.readouterr().err
    assert "pip install 'topoflow[pipeline]'" in err and "Traceback" not in err
