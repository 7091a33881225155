"""Training, export and evaluation: the models of SPEC.md learn, resume reproduces, masking ignores
padding, exports agree, and the report's numbers match independent computations."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import synthetic
from conftest import SAMPLES, ingest_config, train_config
from topoflow.config import Config, TrainConfig
from topoflow.tf import import_tensorflow

pytestmark = pytest.mark.spark


@pytest.fixture(scope="module")
def synthetic_prepared(spark, tmp_path_factory):
    """Separable synthetic events (HLF and particles shifted by class), prepared by topoflow."""
    return synthetic.prepared(spark, tmp_path_factory.mktemp("syn"), 400)


@pytest.fixture(scope="module")
def delphes_prepared(spark, delphes_dir, tmp_path_factory):
    """The real Delphes samples, ingested and prepared (a few events: a smoke fixture)."""
    from topoflow.ingest import ingest
    from topoflow.prepare import prepare

    base = tmp_path_factory.mktemp("delphes")
    ingest(ingest_config({c: [str(delphes_dir / f)] for c, f in SAMPLES.items()}, str(base / "ingested")), spark,
           show_progress=False)
    cfg = Config()
    cfg.prepare.input, cfg.prepare.output, cfg.prepare.test_fraction = str(base / "ingested"), str(base / "prepared"), 0.3
    cfg.prepare.balance = False
    prepare(cfg, spark, show_progress=False)
    return base / "prepared"


def test_parameter_counts_match_spec():
    from topoflow.models import build

    assert build(TrainConfig(model="hlf")).count_params() == 2013
    assert build(TrainConfig(model="inclusive")).count_params() == 12353


@pytest.mark.parametrize("model", ["gru", "inclusive"])
def test_masking_ignores_padding(model):
    from topoflow.models import build

    m = build(TrainConfig(model=model, dropout=0.0))
    rng = np.random.default_rng(0)
    x = {"hlf": rng.normal(size=(4, 14)).astype("float32"), "particles": rng.normal(size=(4, 30, 19)).astype("float32")}
    x["particles"][1, 20:] = 0  # a shorter event
    longer = dict(x, particles=np.concatenate([x["particles"], np.zeros((4, 25, 19), "float32")], axis=1))
    inputs = ("particles",) if model == "gru" else ("hlf", "particles")
    np.testing.assert_allclose(m.predict_on_batch({k: longer[k] for k in inputs}),
                               m.predict_on_batch({k: x[k] for k in inputs}), atol=1e-6)


@pytest.mark.parametrize("model", ["hlf", "gru", "inclusive"])
def test_each_model_trains_on_real_delphes_fixture(delphes_prepared, tmp_path, model, capsys):
    from topoflow.train import train

    result = train(train_config(delphes_prepared, tmp_path, model, epochs=1, batch_size=8), show_progress=True)
    assert np.isfinite(result.history["loss"]).all()
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\r" not in out, "no progress bar when stdout is not a terminal"
    metric_lines = [line for line in out.splitlines() if re.match(r"\d{4}-\d\d-\d\dT[\d:.]+Z epoch=1 ", line)]
    assert len(metric_lines) == 1 and "val_loss=" in metric_lines[0], "a Katib-readable metric line of its own"
    assert "1 epoch," in result.table()
    assert (tmp_path / "models" / model / "_manifest.json").exists()


def test_inclusive_learns_and_exports_agree(synthetic_prepared, tmp_path):
    import onnxruntime as ort

    from topoflow import dataset
    from topoflow.train import train

    tf = import_tensorflow()
    import keras

    result = train(train_config(synthetic_prepared, tmp_path, "inclusive", epochs=3, batch_size=64), show_progress=False)
    assert result.history["val_accuracy"][-1] > 0.6, "well above chance (1/3) on separable classes"
    folder = tmp_path / "models" / "inclusive"
    x, _ = next(dataset.iter_batches(str(synthetic_prepared / "test"), Config().storage, 32))
    keras_p = keras.saving.load_model(folder / "model.keras").predict_on_batch(x)
    saved = tf.saved_model.load(str(folder / "saved_model"))
    saved_p = saved.serve({k: tf.constant(v) for k, v in x.items()}).numpy()
    sess = ort.InferenceSession(str(folder / "model.onnx"))
    onnx_p = sess.run(None, {i.name: x[i.name] for i in sess.get_inputs()})[0]
    np.testing.assert_allclose(saved_p, keras_p, atol=1e-5)
    np.testing.assert_allclose(onnx_p, keras_p, atol=1e-5)
    card = json.loads((folder / "model_card.json").read_text())
    assert card["parameters"] == 12353 and card["preprocessing"]["version"] == 1
    assert (folder / "preprocessing.json").read_text() == (synthetic_prepared / "preprocessing.json").read_text()


def test_killed_training_resumes_to_the_same_result(synthetic_prepared, tmp_path):
    """A CLI run stopped by SIGTERM (as Kubernetes evicts a pod) after its first checkpoint exits 143 (which a
    TFJob's ExitCode policy retries, unlike a bad input's 2), and resumed with the same settings, ends with the
    history of an uninterrupted run."""
    from topoflow.train import train

    epochs = 6
    straight = train(train_config(synthetic_prepared, tmp_path / "a", "gru", epochs=epochs, batch_size=64),
                     show_progress=False)
    cfg = train_config(synthetic_prepared, tmp_path / "b", "gru", epochs=epochs, batch_size=64)
    state = tmp_path / "b" / "ckpt" / "gru" / "state.json"
    proc = subprocess.Popen([sys.executable, "-m", "topoflow.cli", "train", "--no-progress", "--model", "gru",
                             "--data", str(synthetic_prepared), "--epochs", str(epochs), "--set", "train.batch_size=64",
                             "--set", f"train.checkpoint_dir={state.parent}", "--output", cfg.train.output],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not state.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    done = json.loads(state.read_text())["epoch"]
    assert proc.returncode == 143 and 1 <= done < epochs, (proc.returncode, done, err)
    assert f"{done} epoch{'s' if done > 1 else ''} checkpointed" in err and "--resume" in err
    resumed = train(cfg, resume=True, show_progress=False)
    np.testing.assert_allclose(resumed.history["loss"], straight.history["loss"], rtol=1e-5)
    np.testing.assert_allclose(resumed.history["val_loss"], straight.history["val_loss"], rtol=1e-5)
    assert len(list(state.parent.glob("*.keras"))) == 1, "only the last epoch's model is kept"


def test_resume_without_checkpoint_is_a_clear_error(synthetic_prepared, tmp_path):
    from topoflow.errors import TopoflowError
    from topoflow.train import train

    with pytest.raises(TopoflowError, match="nothing to resume"):
        train(train_config(synthetic_prepared, tmp_path, "hlf"), resume=True, show_progress=False)


def test_a_checkpoint_is_never_discarded_or_resumed_with_other_settings(synthetic_prepared, tmp_path):
    from topoflow.errors import TopoflowError
    from topoflow.train import train

    cfg = train_config(synthetic_prepared, tmp_path, "hlf", epochs=1, batch_size=64)
    train(cfg, show_progress=False)
    state = tmp_path / "ckpt" / "hlf" / "state.json"
    before = state.read_text()
    with pytest.raises(TopoflowError, match="(?s)a checkpoint of 1 epoch exists .*--resume.*--restart"):
        train(cfg, show_progress=False)
    assert state.read_text() == before, "the checkpoint is untouched"
    other = train_config(synthetic_prepared, tmp_path, "hlf", epochs=1, batch_size=32)
    other.train.output = str(tmp_path / "elsewhere")  # where it exports may change on resume
    with pytest.raises(TopoflowError, match=r"other settings: batch_size \(checkpoint: 64, now: 32\)"):
        train(other, resume=True, show_progress=False)
    train(cfg, restart=True, show_progress=False)
    assert json.loads(state.read_text())["epoch"] == 1


def test_training_validates_on_the_validation_split_only(synthetic_prepared, tmp_path, monkeypatch):
    from topoflow import dataset
    from topoflow.train import train

    streamed = []
    real = dataset.tf_dataset
    monkeypatch.setattr(dataset, "tf_dataset", lambda url, *a, **k: streamed.append(url) or real(url, *a, **k))
    result = train(train_config(synthetic_prepared, tmp_path, "hlf", epochs=1), show_progress=False)
    assert sorted(u.rsplit("/", 1)[-1] for u in streamed) == ["train", "validation"]
    card = json.loads((tmp_path / "models" / "hlf" / "model_card.json").read_text())
    assert "validation" in card["splits"]["validation"] or "val_" in card["splits"]["validation"]
    assert "evaluate" in card["splits"]["test"] and result.history["val_loss"]
