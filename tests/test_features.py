"""Physics: the vectorised selection and features against the slow per-event reference, on the
real Delphes samples, batch by batch (no Spark here: the Spark path is checked in test_ingest)."""

from __future__ import annotations

import awkward as ak
import numpy as np
import pytest
import uproot

from conftest import SAMPLES
from reference import event_features, read_events
from topoflow import delphes, features
from topoflow.config import StorageConfig


def _vectorised(path, batch_size):
    info = delphes.probe(str(path), StorageConfig())
    out = {}
    for first, arrays in delphes.read_batches(info, StorageConfig(), 0, info.entries, batch_size):
        f = features.compute(arrays)
        rows = np.split(f.particles, np.cumsum(f.counts)[:-1])
        for e, h, r in zip(f.events, f.hlf, rows):
            out[first + int(e)] = (h, r)
    return out


@pytest.mark.parametrize("cls", sorted(SAMPLES))
@pytest.mark.parametrize("batch_size", [7, 1000])
def test_matches_per_event_reference(delphes_dir, cls, batch_size):
    path = delphes_dir / SAMPLES[cls]
    got = _vectorised(path, batch_size)
    expected = {i: r for i, ev in enumerate(read_events(str(path))) if (r := event_features(ev)) is not None}
    assert sorted(got) == sorted(expected), "selection decisions differ"
    for entry, (hlf, rows) in expected.items():
        g_hlf, g_rows = got[entry]
        np.testing.assert_allclose(g_hlf, hlf, rtol=1e-9, atol=1e-9, err_msg=f"HLF of entry {entry}")
        assert g_rows.shape == (len(rows), 19), f"particle count of entry {entry}"
        np.testing.assert_allclose(g_rows, np.array(rows), rtol=1e-9, atol=1e-9, err_msg=f"rows of entry {entry}")


def test_selection_counts_match_the_samples_readme(delphes_dir):
    """shared/data/delphes/README.md lists the counts an independent reference selected."""
    counts = {c: len(_vectorised(delphes_dir / f, 1000)) for c, f in SAMPLES.items()}
    assert counts == {"qcd": 4, "ttbar": 33, "wjets": 46}


def test_particle_list_layout(delphes_dir):
    info = delphes.probe(str(delphes_dir / SAMPLES["ttbar"]), StorageConfig())
    _, arrays = next(delphes.read_batches(info, StorageConfig(), 0, info.entries, 1000))
    f = features.compute(arrays)
    for rows in np.split(f.particles, np.cumsum(f.counts)[:-1]):
        lepton = rows[-1]
        assert lepton[16] + lepton[17] == 1 and rows[:-1, 16:18].sum() == 0, "one lepton row, last"
        dr = np.hypot(rows[:-1, 5] - lepton[5], features.delta_phi(rows[:-1, 6], lepton[6]))
        assert np.all(np.diff(dr) <= 0), "rows sorted by decreasing ΔR to the lepton"
        assert rows[:, 13].sum() <= 450 and rows[:, 15].sum() <= 150 and rows[:, 14].sum() <= 200
        assert np.all(rows[:, 10:13] >= 0), "isolation never negative (no self-subtraction)"
        onehot = rows[:, 13:18].sum(axis=1)
        assert np.all(onehot == 1)


def test_delta_phi_wraps_at_pi():
    got = features.delta_phi(np.array([3.1, -3.1, 0.5]), np.array([-3.1, 3.1, -0.5]))
    np.testing.assert_allclose(got, [6.2 - 2 * np.pi, 2 * np.pi - 6.2, 1.0], atol=1e-12)


def test_charge_from_pid_handles_leptons_and_hadrons():
    pid = ak.Array([[211, -211, 11, -11, 13, 321, 2212, 3112], []])
    assert delphes.charge_from_pid(pid).tolist() == [[1, -1, -1, 1, -1, 1, 1, -1], []]


def test_flat_uproot_file_reads_like_real_delphes(delphes_dir, tmp_path):
    """Files written by uproot (flat Jet.PT with Jet_size, no EFlowTrack.Charge, MuonTight) give the
    same features as the real file they were copied from."""
    src = delphes_dir / SAMPLES["wjets"]
    tree = uproot.open(src)["Delphes"]
    fields = {c: fs for c, fs in features.FIELDS.items()}
    fields["EFlowTrack"] = (*fields["EFlowTrack"], "PID")
    out = tmp_path / "flat.root"
    with uproot.recreate(out) as f:
        data = {}
        for c, fs in fields.items():
            name = "MuonTight" if c == "Muon" else c
            data[name] = ak.zip({k: tree[f"{c}.{k}"].array() for k in fs})
        f.mktree("Delphes", {k: v.type for k, v in data.items()},
                 counter_name=lambda c: c + "_size", field_name=lambda o, i: o + "." + i)
        f["Delphes"].extend(data)
    info = delphes.probe(str(out), StorageConfig())
    assert (info.muon, info.track_charge) == ("MuonTight", "EFlowTrack.PID")
    flat, real = _vectorised(out, 1000), _vectorised(src, 1000)
    assert sorted(flat) == sorted(real)
    for k in real:
        np.testing.assert_allclose(flat[k][0], real[k][0])
        np.testing.assert_allclose(flat[k][1], real[k][1])


def test_non_finite_values_are_reported_with_their_event():
    arrays = {"EFlowTrack.PT": ak.Array([[1.0, 2.0], [np.nan]]), "MissingET.MET": ak.Array([[1.0], [2.0]])}
    with pytest.raises(features.EventError) as e:
        features.check_finite(arrays)
    assert e.value.index == 1 and "EFlowTrack.PT" in e.value.problem
