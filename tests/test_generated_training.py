"""The classifiers on generated events (twice the `make run` dataset: about 4,000 selected events
per class after balancing): each model trains, all beat chance clearly, the inclusive model is
not worse than the HLF one, judged against the test split's own statistical spread, and both, trained
on generated events only, separate the real Delphes tt̄ and W+jets events of the shared samples.

The size matters: the inclusive model gains more from data than the HLF one. Its mean AUC trails
by ≈ 0.010 with 800 training events per class and ≈ 0.005 with 1,600, and leads with 3,200
(README, "Training on generated events")."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest

from conftest import train_config
from topoflow import CLASSES
from topoflow.config import Config

# Generation takes ≈ 10 min of a quiet 2-core machine (the first test pays it): 2.5× headroom.
pytestmark = [pytest.mark.slow, pytest.mark.spark, pytest.mark.timeout(2400)]
EVENTS = {"qcd": 24000, "ttbar": 6000, "wjets": 6000}  # twice configs/default.yaml
CACHE = Path(os.environ.get("TOPOFLOW_TEST_CACHE", Path.home() / ".cache" / "topoflow-tests"))


def _generated(cfg: Config) -> Path:
    """The generated ROOT files, made once per generator version, settings and seed: a cache keyed
    by the source of the modules that make events (not ``validate.py``, which only reads them), so that
    a change to the generator regenerates them."""
    from topoflow import generate

    modules = sorted(p for p in Path(generate.__file__).parent.glob("*.py") if p.name != "validate.py")
    source = b"".join(p.read_bytes() for p in modules)
    key = hashlib.sha256(source + cfg.generate.model_dump_json(exclude={"output", "workers"}).encode()).hexdigest()
    cfg.generate.output = str(CACHE / f"generated-{key[:16]}")
    if not (Path(cfg.generate.output) / "_manifest.json").exists():
        generate.generate(cfg, show_progress=False)
    return Path(cfg.generate.output)


@pytest.fixture(scope="module")
def generated_prepared(spark, tmp_path_factory):
    from topoflow.ingest import ingest
    from topoflow.prepare import prepare

    base = tmp_path_factory.mktemp("generated")
    cfg = Config()
    cfg.generate.events, cfg.generate.workers = EVENTS, 2
    root = _generated(cfg)
    cfg.ingest.datasets = {c: [str(root / f"{c}_*.root")] for c in EVENTS}
    cfg.ingest.output = str(base / "ingested")
    ingest(cfg, spark, show_progress=False)
    cfg.prepare.input, cfg.prepare.output = str(base / "ingested"), str(base / "prepared")
    summary = prepare(cfg, spark, show_progress=False)
    assert min(summary.counts["train"].values()) > 2500, "a few thousand events per class"
    return base / "prepared"


def _train(data, tmp_path, model, **train) -> Config:
    from topoflow.train import train as run

    cfg = train_config(data, tmp_path, model, **train)
    run(cfg, show_progress=False)
    return cfg


@pytest.mark.parametrize("model", ["hlf", "gru", "inclusive"])
def test_each_model_trains_a_few_steps(generated_prepared, tmp_path, model):
    from topoflow.evaluate import predict

    # 20 steps: the loss reported is the mean over the steps, the first ones included (5 left the GRU's at 1.2 ln 3)
    cfg = _train(generated_prepared, tmp_path, model, epochs=1, steps_per_epoch=20)
    y, prob, card = predict(cfg.train.resolved(cfg.train.output), str(generated_prepared), cfg)
    assert len(y) > 1000 and np.isfinite(prob).all() and np.allclose(prob.sum(axis=1), 1, atol=1e-5)
    assert card["history"]["loss"][0] < np.log(3) * 1.2, "a few steps already move the loss off chance"


def test_models_beat_chance_and_inclusive_is_not_worse(generated_prepared, real_ingested, tmp_path):
    from topoflow.evaluate import metrics, predict

    probs = {}
    for model in ("hlf", "inclusive"):
        cfg = _train(generated_prepared, tmp_path, model, epochs=20)
        y, probs[model], _ = predict(cfg.train.resolved(cfg.train.output), str(generated_prepared), cfg)
        # Trained on generated events only, the model still separates real Delphes tt̄ and W+jets (33 and 46
        # selected events). Before issue 14 the HLF model reached 0.89 on real W+jets (0.99 on generated).
        y_real, p_real, _ = predict(cfg.train.resolved(cfg.train.output), str(real_ingested), cfg)
        real_auc = metrics(y_real, p_real)["auc"]
        assert real_auc["ttbar"] > 0.92 and real_auc["wjets"] > 0.92, (model, "real Delphes", real_auc)
    aucs = {m: metrics(y, p)["auc"] for m, p in probs.items()}
    for m, auc in aucs.items():
        assert all(auc[c] > 0.95 for c in CLASSES), (m, auc)

    def mean_auc_gap(idx):
        return np.mean([metrics(y[idx], probs["inclusive"][idx])["auc"][c] - metrics(y[idx], probs["hlf"][idx])["auc"][c]
                        for c in CLASSES])

    rng = np.random.default_rng(0)
    gap = mean_auc_gap(np.arange(len(y)))
    spread = np.std([mean_auc_gap(rng.integers(0, len(y), len(y))) for _ in range(200)])
    assert gap > -2 * spread, f"inclusive mean AUC {gap:+.4f} vs HLF (bootstrap σ {spread:.4f}): {aucs}"
