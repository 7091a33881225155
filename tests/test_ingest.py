"""The ingest stage through real Spark: output equals the per-event reference, is written
atomically, re-runs replace cleanly, and every kind of bad input gives a clear error or a skip."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

import badfiles
from conftest import SAMPLES, ingest_config
from reference import event_features, read_events
from topoflow import CLASSES
from topoflow.errors import BadInputError, TopoflowError
from topoflow.ingest import ingest

pytestmark = pytest.mark.spark


def _datasets(d: Path) -> dict[str, list[str]]:
    return {c: [str(d / f)] for c, f in SAMPLES.items()}


def read_dataset(url_or_dir) -> dict[tuple[str, int], dict]:
    """Rows of a written dataset keyed by (file name, entry), from the files its manifest lists."""
    manifest = json.loads((Path(url_or_dir) / "_manifest.json").read_text())
    rows = {}
    for part in manifest["files"]:
        for r in pq.read_table(Path(url_or_dir) / part["name"]).to_pylist():
            rows[(os.path.basename(r["source_file"]), r["entry"])] = r
    return rows


def assert_matches_reference(rows: dict, delphes_dir: Path) -> None:
    expected = {}
    for cls, name in SAMPLES.items():
        for i, ev in enumerate(read_events(str(delphes_dir / name))):
            if (r := event_features(ev)) is not None:
                expected[(name, i)] = (CLASSES.index(cls), *r)
    assert sorted(rows) == sorted(expected)
    for key, (label, hlf, particles) in expected.items():
        got = rows[key]
        assert got["label"] == label
        np.testing.assert_allclose(got["hlf"], hlf, rtol=1e-6, atol=1e-5, err_msg=str(key))
        np.testing.assert_allclose(np.array(got["particles"]), np.array(particles), rtol=1e-6, atol=1e-5,
                                   err_msg=str(key))


def test_ingest_matches_reference_and_writes_a_complete_dataset(spark, delphes_dir, tmp_path):
    out = tmp_path / "ingested"
    summary = ingest(ingest_config(_datasets(delphes_dir), str(out), row_group_size=10), spark, show_progress=False)
    assert summary.events_read == {"qcd": 60, "ttbar": 60, "wjets": 60}
    assert summary.selected == {"qcd": 4, "ttbar": 33, "wjets": 46}
    assert summary.skipped == []
    rows = read_dataset(out)
    assert_matches_reference(rows, delphes_dir)
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["rows"] == 83 and manifest["meta"]["events_read"]["ttbar"] == 60
    for part in manifest["files"]:  # bounded row groups, so training can stream
        meta = pq.ParquetFile(out / part["name"]).metadata
        assert all(meta.row_group(i).num_rows <= 10 for i in range(meta.num_row_groups))
    assert not list(tmp_path.glob("ingested.staging-*")), "staging area left behind"
    assert "83" in summary.table() and "ttbar" in summary.table()


def test_rerun_replaces_the_dataset(spark, delphes_dir, tmp_path):
    out = tmp_path / "ingested"
    cfg = ingest_config(_datasets(delphes_dir), str(out))
    ingest(cfg, spark, show_progress=False)
    first = {k: v["hlf"] for k, v in read_dataset(out).items()}
    (out / "stale.parquet").write_bytes(b"left from an older run")
    os.makedirs(f"{out}.staging-deadbeef")  # as left by a killed run
    cfg.ingest.datasets = {"ttbar": cfg.ingest.datasets["ttbar"]}
    ingest(cfg, spark, show_progress=False)
    again = read_dataset(out)
    assert {k: v["hlf"] for k, v in again.items()} == {k: v for k, v in first.items() if k[0].startswith("ttbar")}
    assert not (out / "stale.parquet").exists()
    assert not list(tmp_path.glob("ingested.staging-*"))


@pytest.mark.parametrize("maker, problem", [
    (lambda src, d: badfiles.truncated(src, d / "x.root"), "truncated or corrupt ROOT file"),
    (lambda src, d: badfiles.empty(d / "x.root"), "empty file"),
    (lambda src, d: badfiles.not_root(d / "x.root"), "not a ROOT file: first four bytes are b'PAR1'"),
    (lambda src, d: badfiles.flat_copy(src, d / "x.root", tree="Events"), "no TTree 'Delphes'"),
    (lambda src, d: badfiles.flat_copy(src, d / "x.root", drop="Jet"), "missing branch(es) in tree 'Delphes': Jet.PT"),
    (lambda src, d: badfiles.flat_copy(src, d / "x.root", drop="Jet.BTag"), "missing branch(es) in tree 'Delphes': Jet.BTag"),
    (lambda src, d: badfiles.flat_copy(src, d / "x.root", drop="Muon"), "ingest.muon_collection"),
])
def test_bad_file_fails_before_writing(spark, delphes_dir, tmp_path, maker, problem):
    bad = maker(delphes_dir / SAMPLES["ttbar"], tmp_path)
    out = tmp_path / "ingested"
    datasets = _datasets(delphes_dir) | {"ttbar": [str(delphes_dir / SAMPLES["ttbar"]), str(bad)]}
    with pytest.raises(BadInputError) as e:
        ingest(ingest_config(datasets, str(out)), spark, show_progress=False)
    assert problem in str(e.value) and str(bad) in str(e.value)
    assert ("muon" in str(e.value)) == ("Muon" in problem or "muon" in problem), "the muon hint only for muons"
    assert not out.exists() and not list(tmp_path.glob("ingested.staging-*"))


@pytest.mark.parametrize("maker, problem", [
    (lambda src, d: badfiles.corrupt_basket(src, d / "x.root"), "cannot decode entries"),
    (lambda src, d: badfiles.flat_copy(src, d / "x.root", nan_entry=7), "non-finite value"),
])
def test_error_inside_a_spark_task_fails_cleanly_and_keeps_the_old_dataset(spark, delphes_dir, tmp_path, maker, problem):
    out = tmp_path / "ingested"
    ingest(ingest_config({"wjets": [str(delphes_dir / SAMPLES["wjets"])]}, str(out)), spark, show_progress=False)
    before = read_dataset(out)
    bad = maker(delphes_dir / SAMPLES["ttbar"], tmp_path)
    with pytest.raises(TopoflowError) as e:
        ingest(ingest_config({"ttbar": [str(bad)]}, str(out)), spark, show_progress=False)
    assert problem in str(e.value) and str(bad) in str(e.value)
    assert read_dataset(out).keys() == before.keys(), "a failed run must not touch the complete dataset"
    assert not list(tmp_path.glob("ingested.staging-*"))


def test_skip_mode_completes_and_lists_bad_files(spark, delphes_dir, tmp_path):
    src = delphes_dir / SAMPLES["ttbar"]
    broken = badfiles.not_root(tmp_path / "broken.root")
    corrupt = badfiles.corrupt_basket(src, tmp_path / "corrupt.root")
    out = tmp_path / "ingested"
    datasets = {"ttbar": [str(src), str(broken), str(corrupt)], "wjets": [str(delphes_dir / SAMPLES["wjets"])]}
    summary = ingest(ingest_config(datasets, str(out), on_bad_file="skip", entries_per_partition=1000),
                     spark, show_progress=False)
    skipped = json.loads((out / "_skipped.json").read_text())
    assert {s["file"] for s in skipped} == {str(broken), str(corrupt)}
    assert {s["file"] for s in summary.skipped} == {str(broken), str(corrupt)}
    assert any("not a ROOT file" in s["reason"] for s in skipped)
    assert next(s for s in skipped if s["file"] == str(corrupt))["entries"] == [[0, 60]]
    assert summary.selected == {"qcd": 0, "ttbar": 33, "wjets": 46}
    assert summary.events_read["ttbar"] == 60, "the corrupt file's 60 entries were not read"
    assert {k[0] for k in read_dataset(out)} == {SAMPLES["ttbar"], SAMPLES["wjets"]}


def test_datasource_reads_standalone(spark, delphes_dir):
    df = spark.read.format("delphes").option("label", "wjets").load(str(delphes_dir / "wjets_*.root"))
    assert df.count() == 46
    row = df.orderBy("entry").first()
    assert row.label == 2 and len(row.hlf) == 14 and len(row.particles[0]) == 19


def test_missing_dataset_glob_is_a_clear_error(spark, tmp_path):
    with pytest.raises(TopoflowError, match="no file matches"):
        ingest(ingest_config({"qcd": [str(tmp_path / "nothing-*.root")]}, str(tmp_path / "o")), spark,
               show_progress=False)


def test_plan_packs_small_files_and_splits_large_ones():
    from topoflow.datasource import plan
    from topoflow.delphes import FileInfo

    small = [(FileInfo(f"s{i}.root", 60, "Muon", "EFlowTrack.Charge"), 0) for i in range(10)]
    big = [(FileInfo("big.root", 1000, "Muon", "EFlowTrack.Charge"), 1)]
    splits = plan(small + big, max_entries=400)
    assert all(sum(r.stop - r.start for r in s.ranges) <= 400 for s in splits)
    covered = {}
    for s in splits:
        for r in s.ranges:
            covered.setdefault(r.url, []).append((r.start, r.stop))
    big_ranges = covered["big.root"]
    assert big_ranges[0][0] == 0 and big_ranges[-1][1] == 1000 and len(big_ranges) > 1
    assert all(a[1] == b[0] for a, b in zip(big_ranges, big_ranges[1:])), "no gap, no overlap"
    assert all(v == [(0, 60)] for k, v in covered.items() if k != "big.root"), "small files never cut"
    assert len(splits[0].ranges) == 6, "small files share a task"
    assert len(plan(small, max_entries=10_000, min_partitions=4)) >= 4, "enough tasks for all cores"
