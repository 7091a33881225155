"""Prediction through real Spark: every entry of real Delphes files gets a row, the selected ones
are exactly ingestion's and get the model's own probabilities; an ingested dataset gets what
evaluation computes plus its true class; bad files fail cleanly or are skipped as in ingest; an
output that is not predict's is refused."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

import badfiles
from conftest import SAMPLES
from topoflow import CLASSES
from topoflow.config import Config
from topoflow.errors import BadInputError, StorageError, TopoflowError
from topoflow.predict import predict

pytestmark = pytest.mark.spark
PROBS = [f"p_{c}" for c in CLASSES]


@pytest.fixture(scope="module")
def ingested(real_ingested):
    return real_ingested


@pytest.fixture(scope="module")
def model(ingested, tmp_path_factory):
    """An (untrained) inclusive model exported with preprocessing fitted on the real events, so that
    its probabilities spread over (0, 1) instead of saturating."""
    from topoflow.export import export
    from topoflow.models import build
    from topoflow.preprocessing import Moments, Preprocessing

    cfg = Config()
    cfg.train.model = "inclusive"
    _, _, hlf, rows, _ = _ingested_events(ingested)
    folder = tmp_path_factory.mktemp("predict") / "model"
    export(build(cfg.train), str(folder), cfg.storage, Preprocessing.fit(Moments.of(hlf), Moments.of(rows), {}),
           cfg, {"loss": [1.0]})
    return folder


def _config(model, inputs, output, **ingest) -> Config:
    cfg = Config()
    cfg.predict.model, cfg.predict.inputs, cfg.predict.output = str(model), [str(i) for i in inputs], str(output)
    cfg.predict.batch_size = 16  # batches and tasks (entries_per_partition) that cut files
    cfg.ingest.entries_per_partition = 25
    for k, v in ingest.items():
        setattr(cfg.ingest, k, v)
    return cfg


def _rows(out):
    return pq.read_table(out).to_pandas().assign(file=lambda d: d.source_file.map(os.path.basename))


def _ingested_events(url):
    """Keys (file name, entry), labels and raw features of an ingested dataset, in its order."""
    from topoflow.datasource import feature_arrays, parquet_files

    tables = [pq.read_table(p) for p in parquet_files(str(url), Config().storage)]
    keys = [(os.path.basename(f), e) for t in tables for f, e in zip(t["source_file"].to_pylist(),
                                                                      t["entry"].to_pylist())]
    batches = [feature_arrays(b) for t in tables for b in t.to_batches()]
    hlf, rows = np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches])
    labels = np.concatenate([t["label"].to_numpy() for t in tables])
    return keys, labels, hlf, rows, np.concatenate([b[2] for b in batches])


def test_every_entry_gets_a_row_and_selected_events_the_models_probabilities(spark, delphes_dir, ingested, model,
                                                                            tmp_path):
    from topoflow.export import load

    out = tmp_path / "predictions"
    summary = predict(_config(model, [delphes_dir / "*.root"], out), spark, show_progress=False)
    rows = _rows(out)
    assert sorted(zip(rows.file, rows.entry)) == sorted((f, i) for f in SAMPLES.values() for i in range(60))
    keys, _, hlf, parts, counts = _ingested_events(ingested)
    chosen = rows[rows.selected].set_index(["file", "entry"])
    assert sorted(chosen.index) == sorted(keys), "selected = what ingestion selects"
    expected = load(str(model), Config().storage).predict(hlf, parts, counts)  # Keras, not ONNX
    np.testing.assert_allclose(chosen.loc[keys, PROBS].to_numpy(), expected, atol=1e-5)
    np.testing.assert_allclose(chosen[PROBS].sum(axis=1), 1, atol=1e-5)
    assert (chosen.predicted == np.array(CLASSES)[chosen[PROBS].to_numpy().argmax(axis=1)]).all()
    assert 0.01 < chosen[PROBS].to_numpy().std(), "probabilities that tell events apart"
    unselected = rows[~rows.selected]
    assert unselected[PROBS].isna().all().all() and unselected.predicted.isna().all() and "label" not in rows
    assert (summary.events, summary.selected, sum(summary.predicted.values())) == (180, 83, 83)
    assert summary.predicted == rows.predicted.value_counts().reindex(CLASSES, fill_value=0).to_dict()
    assert "83 of 180 events read" in summary.table() and str(out) in summary.table()
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["meta"]["stage"] == "predict" and "p_ttbar float" in manifest["columns"]


def test_an_ingested_dataset_gets_evaluations_probabilities_and_its_labels(spark, ingested, model, tmp_path):
    from topoflow.evaluate import predict as evaluate_predict

    out = tmp_path / "predictions"
    summary = predict(_config(model, [ingested], out), spark, show_progress=False)
    rows = _rows(out).set_index(["file", "entry"])
    keys, labels, *_ = _ingested_events(ingested)
    y, expected, _ = evaluate_predict(str(model), str(ingested), Config())
    assert sorted(rows.index) == sorted(keys) and rows.selected.all() and summary.events == 83
    np.testing.assert_allclose(rows.loc[keys, PROBS].to_numpy(), expected, atol=1e-5)
    assert list(rows.loc[keys, "label"]) == [CLASSES[k] for k in y] == [CLASSES[k] for k in labels]


def test_a_corrupt_file_fails_cleanly_or_is_skipped(spark, delphes_dir, model, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    good = shutil.copy(delphes_dir / SAMPLES["wjets"], data)
    bad = badfiles.corrupt_basket(delphes_dir / SAMPLES["ttbar"], data / "ttbar_corrupt.root")
    out = tmp_path / "predictions"
    with pytest.raises(BadInputError, match="cannot decode entries") as e:
        predict(_config(model, [data / "*.root"], out), spark, show_progress=False)
    assert e.value.url == str(bad) and "--on-bad-file skip" in str(e.value)
    assert not list(tmp_path.glob("predictions*")), "no output, no staging area left"

    truncated = badfiles.truncated(delphes_dir / SAMPLES["qcd"], data / "qcd_truncated.root")
    summary = predict(_config(model, [data / "*.root"], out, on_bad_file="skip"), spark, show_progress=False)
    rows = _rows(out)
    assert sorted(rows.entry[rows.source_file == good]) == list(range(60))
    skipped = {s["file"]: s for s in summary.skipped}
    assert set(skipped) == {str(bad), str(truncated)} and skipped[str(truncated)]["entries"] is None
    scored = rows.entry[rows.file == bad.name].tolist()
    left_out = [i for lo, hi in skipped[str(bad)]["entries"] for i in range(lo, hi)]
    assert sorted(scored + left_out) == list(range(60)), "each entry of the corrupt file scored or listed"
    assert "bad files: 2" in summary.table()


def test_refuses_what_it_must_not_replace_or_cannot_score(spark, ingested, model, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(StorageError, match="refusing to replace .*not written by topoflow predict"):
        predict(_config(model, [ingested], mine), spark, show_progress=False)
    with pytest.raises(StorageError, match="an output of topoflow ingest"):
        predict(_config(model, [model], ingested), spark, show_progress=False)
    assert (mine / "notes.txt").read_text() == "keep me" and (ingested / "_manifest.json").exists()
    with pytest.raises(BadInputError, match="not an ingested dataset") as e:
        predict(_config(model, [model], tmp_path / "out"), spark, show_progress=False)
    assert e.value.url == str(model) and "'DIR/*.root'" in e.value.fix
    with pytest.raises(TopoflowError, match="an ingested dataset is scored alone"):
        predict(_config(model, [ingested, model], tmp_path / "out"), spark, show_progress=False)
    assert not (tmp_path / "out").exists()


def test_cli_scores_files_and_teaches(spark, delphes_dir, model, tmp_path, capsys):
    from topoflow.cli import main

    with pytest.raises(SystemExit):
        main(["predict", "--help"])
    text = capsys.readouterr().out
    for needle in ("--input", "--on-bad-file", "examples:", "pd.read_parquet", "p_ttbar", "_manifest.json"):
        assert needle in text
    out = tmp_path / "predictions"
    assert main(["predict", "--no-progress", "--model", str(model), "--input", str(delphes_dir / SAMPLES["wjets"]),
                 "--input", str(delphes_dir / SAMPLES["qcd"]), "--output", str(out), "--master", "local[2]"]) == 0
    printed = capsys.readouterr().out
    assert "50 of 120 events read" in printed and f"written to {out}" in printed
    assert main(["predict", "--model", str(model), "--output", str(out)]) == 2
    assert "nothing to score: pass --input" in capsys.readouterr().err


@pytest.mark.integration
def test_serving_the_same_events_gives_predicts_answers(spark, delphes_dir, model, tmp_path):
    """`topoflow predict` on the real files and `topoflow serve` sent the same events as raw JSON (V1)
    agree event by event: selection, probabilities (to 1e-5) and class."""
    from test_serve import Server, v1_outputs
    from topoflow import delphes, events

    out = tmp_path / "predictions"
    predict(_config(model, [delphes_dir / "*.root"], out), spark, show_progress=False)
    rows = _rows(out).set_index(["file", "entry"])
    server = Server(model, tmp_path / "serve.log")
    try:
        server.wait()
        for name in SAMPLES.values():
            info = delphes.probe(str(delphes_dir / name), Config().storage)
            (_, arrays), = delphes.read_batches(info, Config().storage, 0, info.entries, info.entries)
            r = server.http.post("/v1/models/topoflow:predict", json={"instances": events.from_arrays(arrays)})
            assert r.status_code == 200, r.text
            served, want = v1_outputs(r.json()), rows.loc[[(name, e) for e in range(info.entries)]]
            np.testing.assert_array_equal(served["selected"], want.selected)
            np.testing.assert_allclose(served["probabilities"], want[PROBS].to_numpy(dtype=float), atol=1e-5)
            np.testing.assert_array_equal(served["predicted"], want.predicted.fillna(""))
    finally:
        server.stop()
