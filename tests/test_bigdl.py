"""The BigDL engine (``train.engine: bigdl``): BigDL trains in its own Python 3.9 environment, and the exported
Keras model computes what BigDL computed, on topoflow's usual end-padded, masked input; it learns as well as
the Keras engine; resuming continues; failures of the worker are clear. Small sizes: BigDL's GRU is slow."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import synthetic
from conftest import train_config
from topoflow.errors import TopoflowError

pytestmark = [pytest.mark.bigdl, pytest.mark.slow, pytest.mark.spark]
SETTINGS = dict(epochs=4, batch_size=32, workers=2, learning_rate=0.02, gru_units=8, dropout=0.1)


@pytest.fixture(scope="module", autouse=True)
def bigdl_env():
    from topoflow.config import TrainConfig
    from topoflow.engines import bigdl

    try:
        bigdl.python(TrainConfig(engine="bigdl"))
    except TopoflowError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def prepared(spark, tmp_path_factory):
    """Separable synthetic events of 5-60 particles, 200 per class, prepared by topoflow."""
    return synthetic.prepared(spark, tmp_path_factory.mktemp("bigdl"), 200)


def _validation(data, model):
    """The validation split as the Keras engine sees it (padded at the end, in file order)."""
    from topoflow import dataset
    from topoflow.config import StorageConfig
    from topoflow.models import INPUTS

    batches = list(dataset.iter_batches(str(data / "validation"), StorageConfig(), 1 << 20, inputs=INPUTS[model]))
    assert len(batches) == 1
    return batches[0]


@pytest.mark.parametrize("model", ["hlf", "inclusive"])
def test_the_export_computes_what_bigdl_trained_and_learns_as_keras_does(prepared, tmp_path, model):
    from topoflow import export
    from topoflow.config import StorageConfig
    from topoflow.train import train

    cfg = train_config(prepared, tmp_path / "bigdl", model, engine="bigdl", **SETTINGS)
    result = train(cfg, show_progress=False)
    assert result.epochs == 4 and result.samples_per_s > 0
    assert set(result.history) == {"loss", "accuracy", "auc", "val_loss", "val_accuracy", "val_auc"}
    with np.load(tmp_path / "bigdl" / "ckpt" / model / "bigdl" / "epoch.npz") as saved:
        bigdl_probabilities = saved["val_probabilities"]
    x, y = _validation(prepared, model)
    for backend in ("keras", "onnx"):
        exported = export.load(result.output, StorageConfig(), backend)
        assert np.abs(exported.run(x) - bigdl_probabilities).max() < 1e-4, backend
    card = json.loads((tmp_path / "bigdl" / "models" / model / "model_card.json").read_text())
    assert card["engine"]["name"] == "bigdl"

    keras_result = train(train_config(prepared, tmp_path / "keras", model, **SETTINGS), show_progress=False)
    assert result.history["val_auc"][-1] > 0.9
    assert abs(result.history["val_auc"][-1] - keras_result.history["val_auc"][-1]) < 0.02


def test_a_stopped_run_resumes_to_the_end(prepared, tmp_path):
    from topoflow.train import fit, train

    cfg = train_config(prepared, tmp_path, "inclusive", engine="bigdl", **{**SETTINGS, "epochs": 2})
    stopped = fit(cfg, show_progress=False, on_epoch=lambda epoch, metrics: epoch == 1)
    assert stopped.epochs == 1
    result = train(cfg, resume=True, show_progress=False)
    assert result.epochs == 2 and result.history["loss"][0] == stopped.history["loss"][0]
    # BigDL continued from the checkpoint's weights (scrambled or fresh ones would lose what epoch 1 learnt)
    assert result.history["val_auc"][1] >= stopped.history["val_auc"][0] - 0.02


def _worker():
    """The worker module (it runs under the BigDL environment's Python; its numpy parts load here too)."""
    import importlib.util

    from topoflow.engines import bigdl

    spec = importlib.util.spec_from_file_location("bigdl_worker", bigdl.WORKER)
    worker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(worker)
    return worker


def test_training_metrics_use_a_fixed_sample_of_whole_events():
    worker = _worker()
    lengths = np.arange(40) % 7
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    rows = np.arange(offsets[-1] * 19, dtype=np.float32).reshape(-1, 19)
    split = {"labels": np.arange(40) % 3, "hlf": np.arange(40 * 14, dtype=np.float32).reshape(40, 14),
             "rows": rows, "offsets": offsets, "length": 6}
    part = worker.subset(split, 10, seed=42)
    assert len(part["labels"]) == 10 and part["length"] == 6
    events = (part["hlf"][:, 0] / 14).astype(int)  # which events were drawn
    assert len(set(events)) == 10 and (part["labels"] == split["labels"][events]).all()
    for k, e in enumerate(events):
        np.testing.assert_array_equal(part["rows"][part["offsets"][k]:part["offsets"][k + 1]],
                                      rows[offsets[e]:offsets[e + 1]])
    np.testing.assert_array_equal(worker.subset(split, 10, seed=42)["hlf"], part["hlf"])
    assert worker.subset(split, 40, seed=1) is split


@pytest.mark.parametrize("model", ["hlf", "gru", "inclusive"])
def test_weights_cross_between_keras_and_bigdl_layouts_losslessly(model):
    """BigDL starts (and resumes) from the Keras model's weights in its own layout: ``to_bigdl`` must be the
    exact inverse of ``to_keras``, which the export test shows right (the export computes what BigDL did)."""
    from topoflow.config import TrainConfig
    from topoflow.models import build

    worker = _worker()
    tc = TrainConfig(model=model, engine="bigdl", gru_units=5)
    weights = [np.random.default_rng(i).normal(size=w.shape).astype(np.float32)
               for i, w in enumerate(build(tc).get_weights())]
    spec = tc.model_dump()
    back = worker.to_keras(spec, worker.to_bigdl(spec, weights))
    assert [w.shape for w in back] == [w.shape for w in weights]
    for a, b in zip(back, weights):
        np.testing.assert_array_equal(a, b)


def test_an_unreadable_file_and_a_batch_bigdl_cannot_split_are_clear_errors(prepared, tmp_path):
    from topoflow.train import train

    data = tmp_path / "data"
    shutil.copytree(prepared, data)
    cfg = train_config(data, tmp_path, "hlf", engine="bigdl", **{**SETTINGS, "batch_size": 31})
    with pytest.raises(TopoflowError, match=r"batch_size 31 is not a multiple of the 2 cores"):
        train(cfg, show_progress=False)
    bad = sorted((data / "train").glob("*.parquet"))[0]
    bad.write_bytes(b"not parquet")
    cfg.train.batch_size = 32
    with pytest.raises(TopoflowError, match=rf"cannot read {bad}.*\n.*re-run topoflow prepare"):
        train(cfg, restart=True, show_progress=False)
