"""Preparation through real Spark: disjoint, balanced, stable splits; scalers fitted on the training
split only and saved as a round-tripping artifact; original-schema input; clear errors."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

import synthetic
from topoflow import CLASSES
from topoflow.config import Config
from topoflow.errors import BadInputError, TopoflowError
from topoflow.prepare import prepare
from topoflow.preprocessing import Moments, Preprocessing

pytestmark = pytest.mark.spark
COUNTS = {"qcd": 600, "ttbar": 1500, "wjets": 2400}


def _cfg(inp, out, **prep) -> Config:
    cfg = Config()
    cfg.prepare.input, cfg.prepare.output = str(inp), str(out)
    for k, v in prep.items():
        setattr(cfg.prepare, k, v)
    return cfg


def _rows(path) -> dict[tuple[str, int], dict]:
    manifest = json.loads((path / "_manifest.json").read_text())
    out = {}
    for part in manifest["files"]:
        for r in pq.read_table(path / part["name"]).to_pylist():
            out[(r["source_file"], r["entry"])] = r
    return out


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    table = synthetic.ingested_table(COUNTS)
    return table, synthetic.write_dataset(table, tmp_path_factory.mktemp("ingested") / "ds")


@pytest.fixture(scope="module")
def prepared(spark, raw, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared") / "ds"
    summary = prepare(_cfg(raw[1], out), spark, show_progress=False)
    return summary, out


def test_splits_are_disjoint_balanced_and_sized(prepared):
    summary, out = prepared
    rows = {name: _rows(out / name) for name in ("train", "validation", "test")}
    keys = [set(r) for r in rows.values()]
    assert not (keys[0] & keys[1] or keys[0] & keys[2] or keys[1] & keys[2]), "an event in two splits"
    for c in CLASSES:
        kept = sum(summary.counts[name][c] for name in rows)
        assert abs(kept - 600) <= 5 * np.sqrt(600), f"{c}: {kept} kept, balance target 600"
    assert sum(summary.counts[name]["qcd"] for name in rows) == 600, "smallest class kept whole"
    n_all = sum(len(r) for r in rows.values())
    for name, share in (("test", 0.2), ("validation", 0.8 * 0.1)):  # validation: 10 % of the non-test events
        assert abs(len(rows[name]) / n_all - share) < 5 * np.sqrt(share * (1 - share) / n_all), name
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["counts"] == summary.counts and manifest["input_counts"] == COUNTS
    assert all(len(r["particles"]) == r["n_particles"] for r in rows["train"].values())


def test_validation_share_does_not_move_test_events(spark, raw, prepared, tmp_path):
    _, out = prepared
    prepare(_cfg(raw[1], tmp_path / "wide", validation_fraction=0.3), spark, show_progress=False)
    assert set(_rows(tmp_path / "wide" / "test")) == set(_rows(out / "test"))
    assert set(_rows(tmp_path / "wide" / "validation")) > set(_rows(out / "validation"))


def test_scalers_come_from_the_training_split_only(prepared, raw):
    _, out = prepared
    table, _ = raw
    pre = Preprocessing.load(str(out), Config().storage)
    by_key = {(f, e): (h, p) for f, e, h, p in zip(*(table.column(c).to_pylist()
                                                     for c in ("source_file", "entry", "hlf", "particles")))}
    train_keys = list(_rows(out / "train"))
    hlf = np.array([by_key[k][0] for k in train_keys], dtype=np.float64)
    parts = np.concatenate([np.array(by_key[k][1], dtype=np.float64) for k in train_keys])
    np.testing.assert_allclose(pre.hlf_min, hlf.min(axis=0), rtol=1e-6)
    np.testing.assert_allclose(pre.hlf_max, hlf.max(axis=0), rtol=1e-6)
    np.testing.assert_allclose(pre.particle_mean, parts.mean(axis=0), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(pre.particle_std, parts.std(axis=0), rtol=1e-6)
    test_row = next(iter(_rows(out / "test").items()))
    expected = pre.transform_hlf(np.array(by_key[test_row[0]][0]))
    np.testing.assert_allclose(test_row[1]["hlf"], expected, rtol=1e-6), "test split scaled the same way"


def test_rerun_reproduces_and_seed_changes_the_split(spark, raw, prepared, tmp_path):
    _, out = prepared
    prepare(_cfg(raw[1], tmp_path / "again"), spark, show_progress=False)
    assert (tmp_path / "again" / "preprocessing.json").read_text() == (out / "preprocessing.json").read_text()
    assert set(_rows(tmp_path / "again" / "test")) == set(_rows(out / "test"))
    prepare(_cfg(raw[1], tmp_path / "other", seed=7), spark, show_progress=False)
    assert set(_rows(tmp_path / "other" / "test")) != set(_rows(out / "test"))


def test_the_split_does_not_depend_on_where_the_source_files_were(spark, raw, prepared, tmp_path):
    """Ingestion records each event's source as the path or URL it read: the same files read from another
    folder (another checkout, a copy on EOS) must split the same events the same way."""
    table, _ = raw
    names = table.column("source_file").to_pylist()
    moved = table.set_column(table.schema.get_field_index("source_file"), "source_file",
                             pa.array([f"root://eos.example//store/user/x/{n}" for n in names]))
    prepare(_cfg(synthetic.write_dataset(moved, tmp_path / "moved"), tmp_path / "p"), spark, show_progress=False)
    by_name = lambda rows: {(f.rsplit("/", 1)[-1], e) for f, e in rows}  # noqa: E731
    for split in ("train", "validation", "test"):
        assert by_name(_rows(tmp_path / "p" / split)) == by_name(_rows(prepared[1] / split))


def test_an_event_keeps_its_split_when_the_dataset_grows(spark, tmp_path):
    table = synthetic.ingested_table({"qcd": 500, "ttbar": 600, "wjets": 700})
    subset = table.filter(pc.less(table.column("entry"), 300))
    small, big = synthetic.write_dataset(subset, tmp_path / "s"), synthetic.write_dataset(table, tmp_path / "b")
    for src, dst in ((small, "ps"), (big, "pb")):
        prepare(_cfg(src, tmp_path / dst, balance=False), spark, show_progress=False)
    test_small, test_big = set(_rows(tmp_path / "ps" / "test")), set(_rows(tmp_path / "pb" / "test"))
    train_big = set(_rows(tmp_path / "pb" / "train"))
    assert test_small <= test_big and not (test_small & train_big)


def test_preprocessing_artifact_round_trips():
    rng = np.random.default_rng(3)
    pre = Preprocessing.fit(Moments.of(rng.normal(size=(50, 14))), Moments.of(rng.normal(size=(300, 19))), {"events": 50})
    again = Preprocessing.from_json(pre.to_json())
    x, rows = rng.normal(size=(5, 14)), rng.normal(size=(7, 19))
    np.testing.assert_array_equal(again.transform_hlf(x), pre.transform_hlf(x))
    np.testing.assert_array_equal(again.transform_particles(rows), pre.transform_particles(rows))
    with pytest.raises(BadInputError, match="version"):
        Preprocessing.from_json(pre.to_json().replace('"version": 1', '"version": 99'))


def test_moments_merge_like_one_pass():
    rng = np.random.default_rng(5)
    x = rng.normal(3, 2, size=(1000, 19))
    merged = Moments.of(x[:10]).merge(Moments.of(x[10:700])).merge(Moments.of(x[700:])).merge(Moments.of(x[:0]))
    np.testing.assert_allclose(merged.mean, x.mean(axis=0))
    np.testing.assert_allclose(merged.std(), x.std(axis=0))


def test_original_schema_input(spark, tmp_path):
    table = synthetic.ingested_table({"qcd": 40, "ttbar": 40, "wjets": 40})
    src = synthetic.to_original(table, tmp_path / "cern")
    out = tmp_path / "prepared"
    prepare(_cfg(src, out, from_original=True, balance=False), spark, show_progress=False)
    pre = Preprocessing.load(str(out), Config().storage)
    rows = [r for name in ("train", "validation", "test") for r in _rows(out / name).values()]
    assert len(rows) == 120
    originals = {tuple(np.round(h, 4)): p for h, p in zip(table.column("hlf").to_pylist(), table.column("particles").to_pylist())}
    for r in rows[:10]:  # padding rows gone, order kept
        hlf = np.array(r["hlf"]) * np.where(pre.hlf_max > pre.hlf_min, pre.hlf_max - pre.hlf_min, 1) + pre.hlf_min
        expected = np.array(originals[tuple(np.round(hlf, 4))])
        np.testing.assert_allclose(np.array(r["particles"]), pre.transform_particles(expected), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case, message", [
    ("empty_class", "no events of class(es) ['wjets']"),
    ("ingested_as_original", "schema mismatch: column 'HLF_input' missing"),
    ("original_as_ingested", "pass --from-original"),
    ("nan", "non-finite"),
])
def test_bad_inputs_are_clear_errors_and_write_nothing(spark, tmp_path, case, message):
    if case == "empty_class":
        src = synthetic.write_dataset(synthetic.ingested_table({"qcd": 50, "ttbar": 50}), tmp_path / "in")
    elif case == "nan":
        src = synthetic.write_dataset(synthetic.ingested_table({"qcd": 50, "ttbar": 50, "wjets": 50}, nan_entry=3),
                                      tmp_path / "in")
    elif case == "original_as_ingested":
        src = synthetic.to_original(synthetic.ingested_table({"qcd": 5, "ttbar": 5, "wjets": 5}), tmp_path / "in")
    else:
        src = synthetic.write_dataset(synthetic.ingested_table({"qcd": 5, "ttbar": 5, "wjets": 5}), tmp_path / "in")
    with pytest.raises(TopoflowError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        prepare(_cfg(src, tmp_path / "out", from_original=case == "ingested_as_original"), spark, show_progress=False)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("out.staging-*"))
