"""The streaming training input: end padding per batch, every row once per epoch, bucketing, and a
Keras model training from a dataset that came in the original CERN schema."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

import synthetic
from topoflow import dataset
from topoflow.config import Config


def test_padding_goes_at_the_end_and_truncation_keeps_the_lepton():
    seqs = [[[float(i)] * 19 for i in range(1, n + 1)] for n in (3, 1, 5)]
    arr = pa.array(seqs, pa.list_(pa.list_(pa.float32())))
    x = dataset.pad_particles(arr)
    assert x.shape == (3, 5, 19)
    assert np.all(x[0, :3, 0] == [1, 2, 3]) and np.all(x[0, 3:] == 0)
    assert np.all(x[1, 0] == 1) and np.all(x[1, 1:] == 0)
    cut = dataset.pad_particles(arr, max_len=2)
    assert np.all(cut[2, :, 0] == [4, 5]), "the last rows (nearest the lepton, lepton last) survive"


@pytest.fixture(scope="module")
def prepared(spark, tmp_path_factory):
    from topoflow.prepare import prepare

    base = tmp_path_factory.mktemp("ds")
    src = synthetic.to_original(synthetic.ingested_table({"qcd": 150, "ttbar": 150, "wjets": 150}), base / "cern")
    cfg = Config()
    cfg.prepare.input, cfg.prepare.output, cfg.prepare.from_original = str(src), str(base / "prepared"), True
    prepare(cfg, spark, show_progress=False)
    return base / "prepared"


@pytest.mark.spark
@pytest.mark.parametrize("shuffle, bucket", [(False, False), (True, False), (True, True)])
def test_every_row_once_per_epoch(prepared, shuffle, bucket):
    batches = list(dataset.iter_batches(str(prepared / "train"), Config().storage, 16, shuffle=shuffle, bucket=bucket,
                                        window_batches=4))
    hlf = np.concatenate([x["hlf"] for x, _ in batches])
    reference = np.concatenate([x["hlf"] for x, _ in dataset.iter_batches(str(prepared / "train"), Config().storage, 64)])
    assert sorted(map(tuple, hlf.round(5))) == sorted(map(tuple, reference.round(5)))
    assert all(len(y) == 16 for _, y in batches[:-1]) and len(batches) == -(-len(reference) // 16)
    for x, y in batches:
        real = np.any(x["particles"] != 0, axis=2)
        assert real[:, 0].all() and real.sum(axis=1).max() == x["particles"].shape[1], "cut to the longest"
        assert np.all(np.diff(real.astype(int), axis=1) <= 0), "padding only at the end"
        assert np.allclose(y.sum(axis=1), 1)


@pytest.mark.spark
def test_bucketing_computes_less_padding(prepared):
    def padded(bucket):
        return sum(x["particles"].shape[0] * x["particles"].shape[1]
                   for x, _ in dataset.iter_batches(str(prepared / "train"), Config().storage, 8, shuffle=True,
                                                    bucket=bucket, window_batches=32))
    assert padded(True) < 0.8 * padded(False)


@pytest.mark.spark
def test_original_schema_dataset_trains_with_masking(prepared):
    from topoflow.tf import import_tensorflow

    import_tensorflow()
    import keras

    ds = dataset.tf_dataset(str(prepared / "train"), Config().storage, 32, shuffle=True)
    seq = keras.Input((None, 19), name="particles")
    hlf = keras.Input((14,), name="hlf")
    h = keras.layers.GRU(8)(keras.layers.Masking()(seq))
    out = keras.layers.Dense(3, activation="softmax")(keras.layers.Concatenate()([h, hlf]))
    model = keras.Model({"particles": seq, "hlf": hlf}, out)
    model.compile("adam", "categorical_crossentropy")
    history = model.fit(ds, epochs=2, verbose=0, shuffle=False)  # the stream shuffles itself
    assert np.isfinite(history.history["loss"]).all() and history.history["loss"][-1] < history.history["loss"][0]
