"""Event generation: seeded reproducibility, files that ingestion reads, and physics sanity per
class (tt̄ busier than W+jets, the W transverse-mass Jacobian peak, QCD leptons less isolated)."""

from __future__ import annotations

import json

import awkward as ak
import numpy as np
import pytest
import uproot

from topoflow.config import Config
from topoflow.generate import generate

pytestmark = [pytest.mark.slow, pytest.mark.spark]
EVENTS = {"qcd": 120, "ttbar": 150, "wjets": 150}


def _gen_cfg(out, events, seed=1, per_file=75) -> Config:
    cfg = Config()
    cfg.generate.output, cfg.generate.events, cfg.generate.seed = str(out), events, seed
    cfg.generate.events_per_file, cfg.generate.workers = per_file, 2
    return cfg


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    out = tmp_path_factory.mktemp("gen") / "generated"
    summary = generate(_gen_cfg(out, EVENTS), show_progress=False)
    return summary, out


@pytest.fixture(scope="module")
def ingested(spark, generated, tmp_path_factory):
    import pyarrow.parquet as pq

    from conftest import ingest_config
    from topoflow.ingest import ingest

    _, out = generated
    dest = tmp_path_factory.mktemp("ing") / "ingested"
    summary = ingest(ingest_config({c: [str(out / f"{c}_*.root")] for c in EVENTS}, str(dest)), spark,
                     show_progress=False)
    manifest = json.loads((dest / "_manifest.json").read_text())
    rows = [r for part in manifest["files"] for r in pq.read_table(dest / part["name"]).to_pylist()]
    return summary, rows


def test_counts_files_and_filter_efficiency(generated):
    summary, out = generated
    assert summary.per_class["qcd"]["kept"] + summary.per_class["qcd_fake"]["kept"] == EVENTS["qcd"]
    for c, n in EVENTS.items():
        if c != "qcd":
            assert summary.per_class[c]["kept"] == n
        files = sorted(out.glob(f"{c}_*.root"))  # qcd_*: both QCD components
        assert sum(uproot.open(f)["Delphes"].num_entries for f in files) == n
    eff = {c: s["kept"] / s["tried"] for c, s in summary.per_class.items()}
    assert 0.3 < eff["ttbar"] < 0.6 and 0.3 < eff["wjets"] < 0.6, "as in the real samples (≈ 0.43)"
    assert eff["qcd"] < eff["ttbar"] and eff["qcd_fake"] == 1.0, "fakes need no generator lepton"
    tree = uproot.open(out / "ttbar_0000.root")["Delphes"]
    for branch in ("EFlowTrack.PT", "EFlowTrack.X", "EFlowPhoton.ET", "Jet.BTag", "MissingET.MET", "Electron.Charge"):
        assert branch in tree, branch
    assert tree["Jet.BTag"].array().layout.content.dtype.kind == "u", "a bit mask, as in Delphes"


def test_same_seed_same_file_other_seed_differs(tmp_path):
    a = generate(_gen_cfg(tmp_path / "a", {"wjets": 20}, per_file=20), show_progress=False)
    generate(_gen_cfg(tmp_path / "b", {"wjets": 20}, per_file=20), show_progress=False)
    generate(_gen_cfg(tmp_path / "c", {"wjets": 20}, seed=2, per_file=20), show_progress=False)
    def read(d):
        return uproot.open(d / "wjets_0000.root")["Delphes"]["EFlowTrack.PT"].array()

    assert ak.to_list(read(tmp_path / "a")) == ak.to_list(read(tmp_path / "b"))
    assert ak.to_list(read(tmp_path / "a")) != ak.to_list(read(tmp_path / "c"))
    assert a.per_class["wjets"]["kept"] == 20


def test_ingestion_selects_events_of_every_class(ingested):
    summary, _ = ingested
    assert summary.events_read == EVENTS
    assert all(summary.selected[c] > 0 for c in EVENTS)
    frac = {c: summary.selected[c] / EVENTS[c] for c in EVENTS}
    assert frac["qcd"] < frac["ttbar"] < frac["wjets"], "isolated-lepton selection: QCD lowest, as in the original"


def test_fake_leptons_are_jets_turned_into_electrons_or_muons(generated):
    _, out = generated
    fake = uproot.open(sorted(out.glob("qcd_fake_*.root"))[0])["Delphes"].arrays(
        ["Electron.PT", "Electron.Eta", "Muon.PT", "Muon.Eta"])
    electrons, muons = ak.num(fake["Electron.PT"]), ak.num(fake["Muon.PT"])
    assert ak.mean(electrons + muons >= 1) > 0.6, "most events have a central jet to fake a lepton"
    assert 0.3 < ak.sum(muons) / ak.sum(electrons + muons) < 0.7, "both flavours, as in real QCD"
    assert ak.all(np.abs(ak.flatten(fake["Electron.Eta"])) < 2.5)


def test_physics_sanity(ingested):
    _, rows = ingested
    hlf = {c: np.array([r["hlf"] for r in rows if r["label"] == k]) for k, c in enumerate(("qcd", "ttbar", "wjets"))}
    n_jets, n_b, mt, iso = 4, 5, 3, slice(9, 12)
    assert hlf["ttbar"][:, n_jets].mean() > hlf["wjets"][:, n_jets].mean() + 1
    assert hlf["ttbar"][:, n_b].mean() > hlf["wjets"][:, n_b].mean()
    w_mt = hlf["wjets"][:, mt]
    counts, edges = np.histogram(w_mt, bins=np.arange(0, 161, 20))
    assert 40 <= edges[np.argmax(counts)] <= 80, "Jacobian peak just below m_W"
    assert hlf["qcd"][:, iso].sum(axis=1).mean() > hlf["wjets"][:, iso].sum(axis=1).mean()


def test_validation_compares_with_real_delphes(generated, delphes_dir, tmp_path):
    from topoflow.config import StorageConfig
    from topoflow.generate.validate import observables, validate

    _, out = generated
    paths, table = validate(str(out), str(delphes_dir), tmp_path, StorageConfig())
    assert [p.name for p in paths] == ["validation_qcd.png", "validation_ttbar.png", "validation_wjets.png",
                                       "validation.md", "validation.json"]
    assert all(p.stat().st_size > 20_000 for p in paths[:3])
    assert table.count("| nJets ") == 3
    gen = observables([str(p) for p in sorted(out.glob("ttbar_*.root"))], StorageConfig())
    real = observables([str(delphes_dir / "ttbar_cms_60ev.root")], StorageConfig())
    ratio = np.median(gen["n_tracks"]) / np.median(real["n_tracks"])
    assert 0.7 < ratio < 1.4, f"track multiplicity close to real Delphes (ratio {ratio:.2f})"
