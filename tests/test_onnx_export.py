"""The ONNX graph built from Keras weights (topoflow.onnx_export): the native GRU op, no loops, the
same probabilities as Keras on events of very different lengths, and padding that changes nothing."""

from __future__ import annotations

import numpy as np
import pytest

from topoflow.config import TrainConfig
from topoflow.tf import import_tensorflow

LENGTHS = (1, 5, 0, 87, 249)  # 0: an event without particles (Keras: the GRU state stays 0)
SMALL = {"gru_units": 17, "hlf_units": [8, 4], "dense_units": 9}


def randomized(model, seed=0):
    """``model`` with every weight random, biases included (Keras initializes those to 0, which
    would hide a bias laid out in the wrong order)."""
    rng = np.random.default_rng(seed)
    for w in model.weights:
        w.assign(rng.normal(scale=0.4, size=w.shape).astype("float32"))
    return model


def events(lengths, pad_to=None, seed=1):
    """Inputs for events of the given lengths, particles end-padded with zero rows."""
    rng = np.random.default_rng(seed)
    particles = np.zeros((len(lengths), pad_to or max(lengths), 19), "float32")
    for i, n in enumerate(lengths):
        particles[i, :n] = rng.normal(size=(n, 19))
    return {"hlf": rng.normal(size=(len(lengths), 14)).astype("float32"), "particles": particles}


def event(batch, i, steps):
    """Event ``i`` of ``batch`` alone, cut to ``steps`` particle rows."""
    return {k: v[i:i + 1, :steps] if k == "particles" else v[i:i + 1] for k, v in batch.items()}


def session(proto):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(proto.SerializeToString(), opts)


def run(sess, x):
    return sess.run(None, {i.name: x[i.name] for i in sess.get_inputs()})[0]


@pytest.mark.parametrize("sizes", [{}, SMALL], ids=["default", "small"])
@pytest.mark.parametrize("name", ["hlf", "gru", "inclusive"])
def test_onnx_matches_keras_at_any_padding(name, sizes, tmp_path):
    import_tensorflow()
    import onnx

    from topoflow.models import INPUTS, build
    from topoflow.onnx_export import to_onnx

    model = randomized(build(TrainConfig(model=name, **sizes)))
    proto = to_onnx(model, tmp_path / "model.onnx")
    assert onnx.load(str(tmp_path / "model.onnx")) == proto
    ops = {n.op_type for n in proto.graph.node}
    assert ("GRU" in ops) == (name != "hlf") and not ops & {"Loop", "Scan", "If"}, ops
    sess = session(proto)
    shapes = {"hlf": ["N", 14], "particles": ["N", "L", 19]}  # Keras' names; batch and steps dynamic
    assert {i.name: i.shape for i in sess.get_inputs()} == {k: shapes[k] for k in INPUTS[name]}
    assert [o.name for o in sess.get_outputs()] == ["probabilities"]

    def keras(x):
        return model.predict_on_batch({k: x[k] for k in INPUTS[name]})

    batch = events(LENGTHS)
    together = run(sess, batch)
    np.testing.assert_allclose(together, keras(batch), atol=1e-5)
    np.testing.assert_allclose(run(sess, events(LENGTHS, pad_to=801)), together, atol=1e-5)
    for i, n in enumerate(LENGTHS):
        alone = run(sess, event(batch, i, n))
        np.testing.assert_allclose(alone, together[i:i + 1], atol=1e-5, err_msg=f"padding changed event {i}")
        # Keras' GRU may fail on zero steps (TF stacks an empty list): one zero row is the same empty event
        np.testing.assert_allclose(alone, keras(event(batch, i, max(n, 1))), atol=1e-5)


@pytest.mark.parametrize("options", [{"reset_after": False}, {"use_bias": False}])
def test_other_gru_options_convert(options):
    import_tensorflow()
    import keras

    from topoflow.onnx_export import to_onnx

    seq = keras.Input((None, 19), name="particles")
    out = keras.layers.Dense(3, activation="softmax")(keras.layers.GRU(6, **options)(keras.layers.Masking(0.0)(seq)))
    model = randomized(keras.Model({"particles": seq}, out))
    x = {"particles": events((3, 0, 40), pad_to=50)["particles"]}
    np.testing.assert_allclose(run(session(to_onnx(model)), x), model.predict_on_batch(x), atol=1e-5)


@pytest.mark.parametrize("head, problem", [
    (lambda layers: [layers.LSTM(4)], r"'lstm' \(LSTM\) to ONNX: no ONNX translation"),
    (lambda layers: [layers.GRU(4, go_backwards=True)], r"GRU options \{'go_backwards': True\}"),
    (lambda layers: [layers.GRU(4), layers.Dense(4, activation="tanh")], r"activation 'tanh'"),
], ids=["lstm", "go_backwards", "tanh"])
def test_unsupported_layers_are_refused_clearly(head, problem):
    import_tensorflow()
    import keras

    from topoflow.onnx_export import UnsupportedModelError, to_onnx

    seq = keras.Input((None, 19), name="particles")
    x = keras.layers.Masking(0.0)(seq)
    for layer in head(keras.layers):
        x = layer(x)
    model = keras.Model({"particles": seq}, keras.layers.Dense(3, activation="softmax")(x))
    with pytest.raises(UnsupportedModelError, match=problem):
        to_onnx(model)
