"""Evaluation: the report's numbers match independent computations, their uncertainties match the
real spread, small test splits are called out, a model folder that is damaged or belongs to other
data is one clear error naming the URL and the fix, and an ingested dataset is judged through each
model's own preprocessing."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest

from conftest import train_config
from test_train import synthetic_prepared  # noqa: F401 (a module fixture shared with the training tests)
from topoflow import CLASSES
from topoflow.config import Config
from topoflow.errors import BadInputError
from topoflow.preprocessing import Preprocessing


def _pairwise_auc(s: np.ndarray, b: np.ndarray) -> float:
    """The AUC's definition: P(signal score > background score), ties counting half."""
    return ((s[:, None] > b[None, :]).sum() + 0.5 * (s[:, None] == b[None, :]).sum()) / (len(s) * len(b))


def _random_scores(y: np.ndarray, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    prob = rng.dirichlet(np.ones(3), len(y)) + np.eye(3)[y] * 0.3
    return prob / prob.sum(axis=1, keepdims=True)


def test_roc_auc_matches_pairwise_definition():
    from topoflow.metrics import metrics, roc_curve

    y = np.random.default_rng(1).integers(0, 3, 400)
    prob = _random_scores(y)
    result = metrics(y, prob)
    for k, c in enumerate(CLASSES):
        assert result["auc"][c] == pytest.approx(_pairwise_auc(prob[y == k, k], prob[y != k, k]), abs=1e-12)
    fpr, tpr = roc_curve(y == 1, prob[:, 1])
    assert result["trigger"]["ttbar"]["efficiency_at_fpr_0.1"] == pytest.approx(np.interp(0.1, fpr, tpr))
    assert np.array(result["confusion"]).sum() == 400
    assert result["accuracy"] == pytest.approx((prob.argmax(1) == y).mean())


@pytest.mark.parametrize("decimals", [None, 0], ids=["distinct-scores", "many-ties"])
def test_auc_bootstrap_std_matches_resampling_and_true_spread(decimals):
    """On 300 + 300 binormal events: the fast bootstrap agrees with a slow per-resample reference
    on the same events, and with the spread of the AUC over independent samples (the truth)."""
    from topoflow.metrics import auc_std

    rng = np.random.default_rng(7)

    def sample():
        s, b = rng.normal(1, 1, 300), rng.normal(0, 1, 300)
        return (s, b) if decimals is None else (s.round(decimals), b.round(decimals))

    s, b = sample()
    fast = auc_std(np.r_[np.ones(300, bool), np.zeros(300, bool)], np.r_[s, b])
    slow = np.std([_pairwise_auc(rng.choice(s, 300), rng.choice(b, 300)) for _ in range(300)])
    spread = np.std([_pairwise_auc(*sample()) for _ in range(300)])
    assert fast == pytest.approx(slow, rel=0.25) and fast == pytest.approx(spread, rel=0.25), (fast, slow, spread)
    assert auc_std(np.r_[np.ones(300, bool), np.zeros(300, bool)], np.r_[s, b]) == fast, "seeded"


def test_small_test_split_is_called_out():
    from topoflow.evaluate import Report, markdown
    from topoflow.metrics import metrics

    y = np.repeat([0, 1, 2], [500, 100, 42])
    result = metrics(y, _random_scores(y))
    assert result["events_per_class"] == {"qcd": 500, "ttbar": 100, "wjets": 42}
    assert len(result["cautions"]) == 1 and re.search(r"only 42 .*\(wjets\) events evaluated",
                                                      result["cautions"][0])
    report_md = markdown({"hlf": result}, "s3://b/prepared")
    assert result["cautions"][0] in report_md and "test split of `s3://b/prepared` (642 events" in report_md
    assert result["cautions"][0] in Report("out/report", {"hlf": result}).table()


def test_fingerprint_follows_the_parameters_not_where_they_were_fitted():
    rng = np.random.default_rng(0)
    pre = Preprocessing(rng.random(14), rng.random(14) + 1, rng.random(19), rng.random(19) + 1,
                        {"source": "s3://a/ingested", "events": 1000})
    moved = Preprocessing.from_json(pre.to_json())
    moved.fitted_on = {"source": "/elsewhere/ingested", "events": 1000}
    assert moved.fingerprint() == pre.fingerprint() and re.fullmatch(r"[0-9a-f]{16}", pre.fingerprint())
    other = Preprocessing.from_json(pre.to_json())
    other.particle_std[3] *= 1.001
    assert other.fingerprint() != pre.fingerprint()


def test_roc_plot_spans_the_resolvable_false_positive_rates(tmp_path, monkeypatch):
    """The ROC x-axis starts at 1/(background events); chance is the diagonal tpr = fpr, sampled
    along the log axis; training curves have whole-epoch ticks."""
    from topoflow import plots
    from topoflow.metrics import metrics

    y = np.repeat([0, 1, 2], [300, 150, 50])
    prob = _random_scores(y)
    results = {"hlf": metrics(y, prob) | {"history": {"loss": [1.0, 0.8, 0.7], "accuracy": [0.5, 0.6, 0.7]}}}
    figures = {}
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.setdefault(path.name, fig))
    plots.report_plots(tmp_path, results, {"hlf": (y, prob)})
    for k, c in enumerate(CLASSES):
        assert plots.roc_xlim(y, k) == (1 / (y != k).sum(), 1.0)
        ax = figures[f"roc_{c}.png"].axes[0]
        assert ax.get_xlim() == pytest.approx(plots.roc_xlim(y, k))
        chance = next(line for line in ax.get_lines() if line.get_label() == "chance")
        fpr, tpr = chance.get_data()
        assert len(fpr) >= 50 and fpr[0] == pytest.approx(1 / (y != k).sum()) and np.array_equal(fpr, tpr)
    ticks = figures["training_hlf.png"].axes[0].get_xticks()
    assert np.array_equal(ticks, ticks.round()), ticks


@pytest.fixture(scope="module")
def trained(synthetic_prepared, tmp_path_factory):  # noqa: F811
    """HLF and inclusive models trained on the synthetic dataset: {model: folder}."""
    from topoflow.train import train

    base = tmp_path_factory.mktemp("trained")
    for model in ("hlf", "inclusive"):
        train(train_config(synthetic_prepared, base, model, epochs=3, batch_size=64, learning_rate=0.01),
              show_progress=False)
    return {m: base / "models" / m for m in ("hlf", "inclusive")}


@pytest.mark.spark
def test_evaluate_report_compares_models(synthetic_prepared, trained, tmp_path):  # noqa: F811
    from topoflow.evaluate import evaluate
    from topoflow.metrics import MIN_TEST_EVENTS

    cfg = Config()
    cfg.evaluate.data = str(synthetic_prepared)
    cfg.evaluate.models = [str(trained[m]) for m in ("hlf", "inclusive")]
    cfg.evaluate.output = str(tmp_path / "report")
    report = evaluate(cfg)
    assert set(report.results) == {"hlf", "inclusive"}
    stds = [r["auc_std"][c] for r in report.results.values() for c in CLASSES]
    assert all(r["auc"][c] > 0.6 for r in report.results.values() for c in CLASSES)
    assert all(0 <= s < 0.1 for s in stds) and max(stds) > 0, "0 only where a model separates perfectly"
    out = tmp_path / "report"
    for name in ("report.json", "report.md", "roc_ttbar.png", "confusion_hlf.png", "scores_inclusive.png",
                 "training_hlf.png"):
        assert (out / name).stat().st_size > 0, name
    saved = json.loads((out / "report.json").read_text())["hlf"]
    per_class = json.loads((synthetic_prepared / "test" / "_manifest.json").read_text())["rows_per_class"]
    test_rows = sum(per_class.values())
    assert saved["events_per_class"] == per_class and saved["events"] == test_rows, "the whole test split"
    small = [c for c, n in saved["events_per_class"].items() if n < MIN_TEST_EVENTS]
    assert small and [re.search(r"\((\w+)\) events", line)[1] for line in saved["cautions"]] == small
    md, table = (out / "report.md").read_text(), report.table()
    assert "tt̄" in md and f"test split of `{synthetic_prepared}` ({test_rows:,} events" in md
    auc = f"{saved['auc']['qcd']:.4f} ± {saved['auc_std']['qcd']:.4f}"
    assert auc in md and auc in table
    assert all(line in md and line in table for line in saved["cautions"])


def _truncate(path):
    path.write_bytes(path.read_bytes()[:2000])


@pytest.mark.spark
@pytest.mark.parametrize("damage, problem", [
    (lambda m: (m / "model_card.json").unlink(), "no model_card.json: not a folder written by topoflow train"),
    (lambda m: _truncate(m / "model.keras"), "Keras cannot load model.keras .* truncated, corrupt"),
    (lambda m: (m / "preprocessing.json").unlink(), "no preprocessing.json"),
], ids=["no-card", "truncated-keras", "no-preprocessing"])
def test_damaged_model_folder_is_a_clear_cli_error(synthetic_prepared, trained, tmp_path, capsys,  # noqa: F811
                                                   damage, problem):
    from topoflow.cli import main

    model = shutil.copytree(trained["hlf"], tmp_path / "model")
    damage(model)
    code = main(["evaluate", "--model", str(model), "--data", str(synthetic_prepared),
                 "--output", str(tmp_path / "report")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and re.search(problem, err), err
    assert str(model) in err and "re-export the model with topoflow train" in err and "Traceback" not in err
    assert all(p.startswith(str(tmp_path)) for p in re.findall(r"/\S+", err)), f"a path not the user's: {err}"
    assert not (tmp_path / "report").exists()


def test_missing_model_folder_is_a_clear_error(tmp_path):
    from topoflow.export import load

    nowhere = str(tmp_path / "nowhere")
    with pytest.raises(BadInputError, match=f"(?s)no model.keras.*{re.escape(nowhere)}.*topoflow train"):
        load(nowhere, Config().storage)


@pytest.mark.spark
def test_model_and_data_must_share_the_preprocessing(synthetic_prepared, trained, tmp_path, capsys):  # noqa: F811
    """A copy of the training data (fitted_on differs) is the same data; data scaled otherwise is not."""
    from topoflow.cli import main
    from topoflow.evaluate import predict

    data = shutil.copytree(synthetic_prepared, tmp_path / "copied")
    pre = Preprocessing.load(str(data), Config().storage)
    pre.fitted_on = {"source": "elsewhere"}
    (data / "preprocessing.json").write_text(pre.to_json())
    y, prob, _ = predict(str(trained["hlf"]), str(data), Config())
    assert len(y) == len(prob) > 0

    pre.hlf_max = pre.hlf_max * 2  # as if prepared from other events
    (data / "preprocessing.json").write_text(pre.to_json())
    code = main(["evaluate", "--model", str(trained["hlf"]), "--data", str(data), "--output", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    assert str(trained["hlf"]) in err and str(data) in err
    assert "evaluate on the dataset the model was trained on" in err and "retrain on this one" in err


def _event_ids(url) -> list[tuple[str, int]]:
    """(source_file, entry) of a dataset's events, in the order evaluation streams them."""
    import pyarrow.parquet as pq

    from topoflow.datasource import parquet_files

    tables = [pq.read_table(p, columns=["source_file", "entry"]) for p in parquet_files(str(url), Config().storage)]
    return [(f, e) for t in tables for f, e in zip(t["source_file"].to_pylist(), t["entry"].to_pylist())]


@pytest.mark.spark
def test_evaluate_on_an_ingested_dataset_applies_each_models_preprocessing(synthetic_prepared, trained,  # noqa: F811
                                                                          tmp_path):
    """The models judged on the raw events their data was prepared from: every event counts, and
    an event of the prepared test split gets the probabilities it gets there."""
    from topoflow.evaluate import evaluate, is_ingested, predict

    ingested, sc = synthetic_prepared.parent / "in", Config().storage  # what the fixture prepared
    assert is_ingested(str(ingested), sc) and not is_ingested(str(synthetic_prepared), sc)
    assert not is_ingested(str(synthetic_prepared / "test"), sc), "a prepared split is scaled already"
    cfg = Config()
    cfg.evaluate.data, cfg.evaluate.output = str(ingested), str(tmp_path / "report")
    cfg.evaluate.models = [str(trained[m]) for m in ("hlf", "inclusive")]
    cfg.evaluate.batch_size = 100  # other batches (and padding) than the test split's
    report = evaluate(cfg)
    row = {event: i for i, event in enumerate(_event_ids(ingested))}
    test_rows = [row[event] for event in _event_ids(synthetic_prepared / "test")]
    for name in ("hlf", "inclusive"):
        y, prob = report.curves[name]
        assert len(y) == len(row) == 1200 and report.results[name]["events"] == 1200, "every event"
        test_y, test_prob, _ = predict(str(trained[name]), str(synthetic_prepared), Config())
        np.testing.assert_array_equal(y[test_rows], test_y)
        np.testing.assert_allclose(prob[test_rows], test_prob, atol=1e-5)
    md = (tmp_path / "report" / "report.md").read_text()
    assert f"on the ingested dataset `{ingested}`, every event (1,200 events" in md
    assert "with each model's own preprocessing" in md and "test split of" not in md
