"""The exported model folder: what export writes, load reads back and checks (a damaged, foreign or
outdated folder is one clear error naming it and the fix, and nothing stored in it runs), and the
one inference path from raw features to the model's inputs."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest

from topoflow.config import Config
from topoflow.errors import BadInputError
from topoflow.export import RE_EXPORT, load
from topoflow.preprocessing import Preprocessing


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """An (untrained) inclusive model exported with random preprocessing: its folder."""
    from topoflow.export import export
    from topoflow.models import build

    rng = np.random.default_rng(0)
    pre = Preprocessing(rng.normal(size=14), rng.normal(size=14) + 3, rng.normal(size=19), rng.random(19) + 0.5)
    cfg = Config()
    cfg.train.model = "inclusive"
    folder = tmp_path_factory.mktemp("export") / "model"
    export(build(cfg.train), str(folder), cfg.storage, pre, cfg, {"loss": [1.0]})
    return folder


def test_the_folder_holds_a_triton_repository_of_the_same_onnx_model(exported):
    model = exported / "triton" / "topoflow"
    assert (model / "1" / "model.onnx").read_bytes() == (exported / "model.onnx").read_bytes()
    assert 'platform: "onnxruntime_onnx"' in (model / "config.pbtxt").read_text()


def test_raw_features_are_scaled_by_the_models_preprocessing_and_padded_at_the_end(exported):
    model = load(str(exported), Config().storage)
    assert (model.card["format"], model.card["version"], model.url) == ("topoflow-model-card", 1, str(exported))
    pre = model.preprocessing
    rng = np.random.default_rng(1)
    hlf, rows, counts = rng.normal(size=(3, 14)), rng.normal(size=(6, 19)), np.array([4, 1, 1])
    x = model.model_inputs(hlf, rows, counts)
    scaled = (rows - pre.particle_mean) / pre.particle_std
    np.testing.assert_allclose(x["hlf"], (hlf - pre.hlf_min) / (pre.hlf_max - pre.hlf_min), rtol=1e-5)
    assert x["particles"].shape == (3, 4, 19) and not x["particles"][1:, 1:].any(), "zero rows at the end"
    np.testing.assert_allclose(x["particles"][:, 0], scaled[[0, 4, 5]], rtol=1e-5)
    np.testing.assert_allclose(x["particles"][0], scaled[:4], rtol=1e-5)
    probs = model.predict(hlf, rows, counts)
    np.testing.assert_allclose(probs, model.run(x), atol=1e-6)
    np.testing.assert_allclose(model.predict(hlf[1:2], rows[4:5], counts[1:2]), probs[1:2], atol=1e-6,
                               err_msg="an event's probabilities do not depend on its batch's padding")


def _events(n, seed=2):
    rng = np.random.default_rng(seed)
    counts = rng.integers(0, 40, size=n)
    return rng.normal(size=(n, 14)) * 3, rng.normal(size=(counts.sum(), 19)) * 3, counts


@pytest.mark.parametrize("backend", ["onnx", "saved_model"])
def test_every_backend_computes_what_keras_computes(exported, backend):
    """The serving backends run the same model: ONNX (the native GRU) and the SavedModel agree with
    Keras to 1e-5 on events of mixed lengths, including one without particles."""
    keras_model, other = load(str(exported), Config().storage), load(str(exported), Config().storage, backend)
    assert other.backend == backend and other.card == keras_model.card
    hlf, rows, counts = _events(50)
    np.testing.assert_allclose(other.predict(hlf, rows, counts), keras_model.predict(hlf, rows, counts), atol=1e-5)


def test_length_ordered_batches_give_each_event_its_own_answer(exported):
    """Batches of 7 events in order of length (not of the call) return each event's probabilities in
    the caller's order, the same as one event at a time; padded input with or without its lengths
    gives the same numbers; no events, no run (ONNX Runtime aborts on a batch of 0)."""
    from topoflow.preprocessing import pad

    model = load(str(exported), Config().storage, "onnx")
    hlf, rows, counts = _events(30)
    whole = model.predict(hlf, rows, counts, batch=7)
    starts = np.cumsum(counts) - counts
    one_by_one = np.concatenate([model.predict(hlf[i:i + 1], rows[starts[i]:starts[i] + counts[i]], counts[i:i + 1])
                                 for i in range(len(counts))])
    np.testing.assert_allclose(whole, one_by_one, atol=1e-6)
    padded = pad(rows, counts)
    np.testing.assert_allclose(model.predict_padded(hlf, padded, counts), whole, atol=1e-6)
    np.testing.assert_allclose(model.predict_padded(hlf, padded), whole, atol=1e-6)
    assert model.predict(hlf[:0], rows[:0], counts[:0]).shape == (0, 3)


def test_a_damaged_onnx_file_names_the_file(exported, tmp_path):
    folder = shutil.copytree(exported, tmp_path / "model")
    (folder / "model.onnx").write_bytes((folder / "model.onnx").read_bytes()[:500])
    with pytest.raises(BadInputError, match=f"(?s)ONNX Runtime cannot load.*in file {folder}/model.onnx"):
        load(str(folder), Config().storage, "onnx")


def _edit_card(folder, change):
    card = json.loads((folder / "model_card.json").read_text())
    change(card)
    (folder / "model_card.json").write_text(json.dumps(card))


def _edit_preprocessing(folder):
    artifact = json.loads((folder / "preprocessing.json").read_text())
    artifact["version"] = 2
    (folder / "preprocessing.json").write_text(json.dumps(artifact))


@pytest.mark.parametrize("damage, problem", [
    (lambda m: (m / "model_card.json").write_text("{"), "unreadable model card"),
    (lambda m: _edit_card(m, lambda c: [c.pop("format"), c.pop("version")]),
     "the model card has no format: an export of an older topoflow"),
    (lambda m: _edit_card(m, lambda c: c.update(version=2)),
     "model card format 'topoflow-model-card' v2 is unknown to this topoflow"),
    (_edit_preprocessing, "not a topoflow-preprocessing v1 artifact"),
    (lambda m: _edit_card(m, lambda c: c.update(inputs={"hlf": [None, 14]})),
     "the model card names the inputs .* the files come from different exports"),
], ids=["unreadable-card", "card-without-format", "card-v2", "preprocessing-v2", "other-inputs"])
def test_a_foreign_or_outdated_folder_is_a_clear_error(exported, tmp_path, damage, problem):
    folder = shutil.copytree(exported, tmp_path / "model")
    damage(folder)
    with pytest.raises(BadInputError) as e:
        load(str(folder), Config().storage)
    assert re.search(problem, str(e.value)) and str(folder) in str(e.value) and RE_EXPORT in str(e.value), e.value


def test_code_stored_in_the_model_never_runs(exported, tmp_path):
    """A Lambda layer carries marshalled Python, which a load without safe mode would run (this one
    writes a file): Keras' safe mode refuses it first."""
    import keras

    folder = shutil.copytree(exported, tmp_path / "model")
    marker = tmp_path / "ran"
    hlf = keras.Input((14,), name="hlf")
    touch = keras.layers.Lambda(lambda x, path: (open(path, "w").close(), x)[1], arguments={"path": str(marker)})
    keras.Model(hlf, keras.layers.Dense(3)(touch(hlf))).save(folder / "model.keras")
    marker.unlink()  # building the model ran it
    with pytest.raises(BadInputError, match="(?s)holds code .*safe mode.*model.keras"):
        load(str(folder), Config().storage)
    assert not marker.exists()
