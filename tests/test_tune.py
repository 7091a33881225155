"""``topoflow tune`` (Spark backend): trials run in parallel Spark tasks through the real training code, the best
configuration retrains to the same objective, median stopping ends bad trials, failures are recorded, a killed
study continues without repeating finished trials, and invalid spaces are refused before any trial runs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

import synthetic
from topoflow.config import Config, EarlyStopping, TuneConfig, load_config
from topoflow.errors import ConfigError, TopoflowError

pytestmark = pytest.mark.spark


@pytest.fixture(scope="module")
def prepared(spark, tmp_path_factory):
    """Separable synthetic events prepared by topoflow (HLF trials take seconds)."""
    return synthetic.prepared(spark, tmp_path_factory.mktemp("tune"), 300)


def study_config(prepared, output, **tune) -> Config:
    cfg = Config()
    cfg.train.model, cfg.train.data, cfg.train.epochs = "hlf", str(prepared), tune.pop("epochs", 3)
    cfg.tune = TuneConfig.model_validate({"output": str(output), **tune})
    return cfg


def test_a_tiny_study_runs_trials_in_parallel_and_its_best_config_retrains_to_its_metric(spark, prepared, tmp_path):
    from topoflow.train import fit
    from topoflow.tune import tune

    space = {"learning_rate": {"low": 1e-3, "high": 3e-2, "scale": "log"}, "hlf_units": {"choices": [[16], [32, 16]]}}
    cfg = study_config(prepared, tmp_path / "study", parameters=space, trials=3, parallelism=2, algorithm="random")
    lines: list[str] = []
    result = tune(cfg, spark, log=lines.append)
    assert [r["state"] for r in result.rows] == ["complete"] * 3, result.rows
    assert sum(line.startswith("trial ") for line in lines) == 3
    values = [r["value"] for r in result.rows]
    assert values == sorted(values, reverse=True) and result.best["value"] == max(values)
    for r in result.rows:
        assert 1e-3 <= r["params"]["learning_rate"] <= 3e-2 and r["params"]["hlf_units"] in ([16], [32, 16])
        assert r["curve"][-1] == r["value"] and r["epochs"] == 3
    # the first two trials ran at the same time, in two processes
    first, second = sorted((r for r in result.rows if r["number"] < 2), key=lambda r: r["started"])
    assert second["started"] < first["started"] + first["seconds"]

    out = tmp_path / "study"
    assert json.loads((out / "trials.json").read_text()) == result.rows
    table = pq.read_table(out / "trials.parquet").to_pydict()
    assert sorted(table["number"]) == [0, 1, 2] and len(table["learning_rate"]) == 3
    assert all(json.loads(v) in ([16], [32, 16]) for v in table["hlf_units"])
    assert (out / "trials.png").read_bytes()[:4] == b"\x89PNG"
    assert "best first" in result.table() and str(out / "best.yaml") in result.table()

    best = load_config(out / "best.yaml")  # what `topoflow train --config best.yaml` reads
    for name, value in result.best["params"].items():
        assert getattr(best.train, name) == value
    best.train.checkpoint_dir = str(tmp_path / "retrain")
    fitted = fit(best, restart=True, show_progress=False)
    assert fitted.history["val_auc"][-1] == pytest.approx(result.best["value"], abs=1e-6)


def test_median_stopping_ends_a_bad_trial_early(spark, prepared, tmp_path):
    from topoflow.tune import tune

    # grid order is drawn with tune.seed; seed 0 runs the good learning rate first (checked below)
    cfg = study_config(prepared, tmp_path / "study", epochs=4, algorithm="grid", parallelism=1, seed=0,
                       parameters={"learning_rate": {"choices": [0.01, 1e-7]}},
                       early_stopping={"min_trials": 1, "start_epoch": 2})
    result = tune(cfg, spark, log=lambda line: None)
    by_number = sorted(result.rows, key=lambda r: r["number"])
    assert by_number[0]["params"]["learning_rate"] == 0.01, "precondition: the good trial runs first"
    good, bad = by_number
    assert good["state"] == "complete" and good["epochs"] == 4
    assert bad["state"] == "stopped" and bad["epochs"] == 2, bad
    assert max(bad["curve"]) < sum(good["curve"][:2]) / 2  # the rule that stopped it


def test_median_rule_is_katibs():
    """Katib 0.19: threshold = mean over completed trials of each one's average over its first start_step values
    (medianstop/service.py); the trial's best value so far is compared once, at its start_step-th report
    (file-metricscollector/main.go, updateStopRules)."""
    from topoflow.tune import median_stop

    es = EarlyStopping(min_trials=2, start_epoch=2)
    completed = [[0.6, 0.8, 0.9], [0.7, 0.9, 0.95], [0.5, 0.6]]  # averages 0.7, 0.8, 0.55: threshold 0.6833
    assert median_stop([0.5, 0.68], completed, "maximize", es)
    assert not median_stop([0.69, 0.5], completed, "maximize", es)  # its best so far counts
    assert not median_stop([0.1], completed, "maximize", es)  # before start_epoch
    assert not median_stop([0.1, 0.1, 0.1], completed, "maximize", es)  # after it: checked once only
    assert median_stop([0.9, 0.8], [[0.5, 0.6], [0.4, 0.5]], "minimize", es)  # losses: lower is better
    assert not median_stop([0.5, 0.1], completed, "maximize", EarlyStopping(min_trials=2, start_epoch=2, enabled=False))
    assert not median_stop([0.5, 0.1], completed[:1], "maximize", es)  # too few completed trials


def test_a_failing_trial_is_recorded_and_the_study_completes(spark, prepared, tmp_path):
    from topoflow.tune import tune

    broken = tmp_path / "broken"
    shutil.copytree(prepared, broken)
    for part in (broken / "train").glob("*.parquet"):
        part.write_bytes(part.read_bytes()[: len(part.read_bytes()) // 3])  # truncated mid-file
    cfg = study_config(prepared, tmp_path / "study", algorithm="grid", epochs=2,
                       parameters={"data": {"choices": [str(prepared), str(broken)]}})
    result = tune(cfg, spark, log=lambda line: None)
    states = {r["params"]["data"]: r for r in result.rows}
    assert states[str(prepared)]["state"] == "complete"
    failed = states[str(broken)]
    assert failed["state"] == "failed" and failed["value"] is None
    assert "parquet" in failed["error"].lower() or "broken" in failed["error"], failed["error"]
    assert json.loads((tmp_path / "study" / "trials.json").read_text())[1]["error"] == failed["error"]


def test_a_killed_study_continues_without_repeating_finished_trials(prepared, tmp_path):
    out = tmp_path / "study"
    (tmp_path / "space.yaml").write_text(yaml.safe_dump({
        "parameters": {"learning_rate": {"low": 1e-3, "high": 3e-2, "scale": "log"}},
        "algorithm": "random", "trials": 4, "parallelism": 1, "output": str(out)}))
    command = [sys.executable, "-m", "topoflow.cli", "tune", "--model", "hlf", "--data", str(prepared), "--space",
               str(tmp_path / "space.yaml"), "--set", "train.epochs=2", "--master", "local[1]", "--no-progress"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:  # wait for two finished trials, then kill it all (Spark JVM too)
            rows = json.loads((out / "trials.json").read_text()) if (out / "trials.json").exists() else []
            if sum(r["state"] == "complete" for r in rows) >= 2:
                break
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            time.sleep(0.2)
        else:
            pytest.fail("two trials did not finish in 300 s")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    before = {r["number"]: r for r in rows if r["state"] == "complete"}

    again = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "continuing study hlf" in again.stdout
    rows = json.loads((out / "trials.json").read_text())
    finished = [r for r in rows if r["state"] == "complete"]
    assert len(finished) == 4
    for number, row in before.items():  # kept as they were, not trained again
        kept = next(r for r in rows if r["number"] == number)
        assert kept["value"] == row["value"] and kept["started"] == row["started"]
    interrupted = [r for r in rows if r["state"] == "interrupted"]
    assert len(rows) == 4 + len(interrupted) and len(interrupted) <= 1  # at most the trial in flight is lost
    assert again.stdout.count("complete:") == 4 - len(before)


@pytest.mark.parametrize("space, message", [
    ({"learning_rate": {"low": 0.01, "high": 0.001}}, "empty range"),
    ({"learning_rate": {"low": 0.0, "high": 0.1, "scale": "log"}}, "log scale needs low > 0"),
    ({"learnig_rate": {"low": 0.001, "high": 0.1}}, "did you mean learning_rate"),
    ({"model": {"choices": ["hlf", "gru"]}}, "not a train setting one can tune"),
    ({"dropout": {"low": 0.0, "high": 1.0}}, "1.0 is not a valid train.dropout"),
    ({"gru_units": {"low": 8, "high": 64.5}}, "whole low, high and step"),
    ({"epochs": {"low": 1, "high": 4, "step": 1.5}}, "whole low, high and step"),
    ({"batch_size": {"choices": []}}, "choices is empty"),
    ({"hlf_units": {"low": 1, "high": 4}}, "give choices"),
    ({}, "no parameters to tune"),
])
def test_invalid_spaces_are_refused_before_any_trial_runs(tmp_path, space, message):
    from topoflow.cli import main

    (tmp_path / "space.yaml").write_text(yaml.safe_dump({"parameters": space, "output": str(tmp_path / "study")}))
    with pytest.raises(ConfigError, match=message):
        load_config(sections={"tune": tmp_path / "space.yaml"})
    assert main(["tune", "--space", str(tmp_path / "space.yaml"), "--data", str(tmp_path / "none")]) == 2
    assert not (tmp_path / "study").exists()


def test_the_grid_needs_steps_and_a_continued_study_the_same_space(prepared, tmp_path, capsys):
    from topoflow.cli import main
    from topoflow.tune import Study

    (tmp_path / "grid.yaml").write_text("algorithm: grid\nparameters: {dropout: {low: 0.0, high: 0.4}}\n")
    assert main(["tune", "--space", str(tmp_path / "grid.yaml")]) == 2
    assert "grid algorithm needs a step (or choices) for dropout" in capsys.readouterr().err
    assert f"in file {tmp_path / 'grid.yaml'}" in str(pytest.raises(ConfigError, load_config,
                                                                       sections={"tune": tmp_path / "grid.yaml"}).value)

    with pytest.raises(ConfigError, match=r"tune.output: unknown placeholder 'modl'"):
        load_config(overrides=["tune.output=out/{modl}"])

    cfg = study_config(prepared, tmp_path / "study")
    Study("s", str(tmp_path / "study"), cfg)
    cfg.tune.parameters = {"dropout": {"low": 0.0, "high": 0.4}}
    with pytest.raises(TopoflowError, match="started with other parameters settings"):
        Study("s", str(tmp_path / "study"), cfg)


def test_the_example_space_loads_and_emits_the_same_katib_space():
    from topoflow import katib

    configs = Path(__file__).parents[1] / "configs"
    cfg = load_config(configs / "default.yaml", ["train.model=hlf"], sections={"tune": configs / "tune-hlf.yaml"})
    assert cfg.tune.parameters["hlf_units"].type == "categorical" and cfg.tune.parameters["learning_rate"].type == "float"
    spec = katib.experiment(cfg)["spec"]
    assert [p["name"] for p in spec["parameters"]] == list(cfg.tune.parameters)
    assert spec["maxTrialCount"] == cfg.tune.trials and spec["earlyStopping"]["algorithmName"] == "medianstop"


def test_tune_emits_a_katib_experiment_of_the_same_space(tmp_path, capsys):
    from crds import validate
    from topoflow.cli import main

    configs = Path(__file__).parents[1] / "configs"
    out = tmp_path / "experiment.yaml"
    assert main(["tune", "--model", "hlf", "--space", str(configs / "tune-hlf.yaml"), "--backend", "katib",
                 "--emit", str(out)]) == 0
    assert f"kubectl apply -n topoflow -f {out}" in capsys.readouterr().out
    obj = yaml.safe_load(out.read_text())
    validate(obj)
    space = yaml.safe_load((configs / "tune-hlf.yaml").read_text())
    assert obj["metadata"]["name"] == "hlf" and obj["spec"]["maxTrialCount"] == space["trials"]
    assert {p["name"]: p["parameterType"] for p in obj["spec"]["parameters"]} == {
        "learning_rate": "double", "hlf_units": "categorical", "batch_size": "categorical"}
    assert main(["tune", "--emit", str(out)]) == 2 and "--backend katib" in capsys.readouterr().err


def test_a_continued_grid_queues_the_points_of_interrupted_trials_again(prepared, tmp_path):
    from topoflow.tune import INTERRUPTED, Study

    cfg = study_config(prepared, tmp_path / "study", algorithm="grid", parameters={"batch_size": {"choices": [32, 64, 128]}})
    study = Study("g", str(tmp_path / "study"), cfg)
    trial, params = study.ask()  # in flight when the run is killed
    study = Study("g", str(tmp_path / "study"), cfg)  # the next run
    assert study.interrupted == 1
    rows = study.result().rows
    assert [r["state"] for r in rows] == ["interrupted"] and rows[0]["error"] == INTERRUPTED
    queued = sorted(json.loads(t.system_attrs["fixed_params"]["batch_size"]) for t in study.study.trials
                    if t.state.name == "WAITING")
    assert queued == [32, 64, 128], "the interrupted point is queued again"


def test_a_trial_whose_worker_process_dies_is_recorded_with_the_cause(spark):
    from topoflow.spark import job_error
    from topoflow.tune import _job_failure

    with pytest.raises(Exception) as died:  # what a trial killed by the OOM killer or a segfault looks like
        spark.sparkContext.parallelize([0], 1).map(lambda _: os._exit(3)).collect()
    assert _job_failure(str(job_error(died.value))).startswith("Python worker exited unexpectedly (crashed)")
    assert spark.sparkContext.parallelize([1], 1).map(lambda x: x + 1).collect() == [2]  # the session goes on
