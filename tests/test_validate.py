"""The generated-vs-real validation table: its real means and standard errors against an independent
computation on a shared real Delphes sample, the Kolmogorov–Smirnov test against its known critical
values and on shifted samples, and `topoflow generate --validate` printing it."""

from __future__ import annotations

import json
import math
import re
import statistics

import numpy as np
import pytest
import uproot

from topoflow import delphes, features
from topoflow.config import StorageConfig
from topoflow.generate.validate import OBSERVABLES, compare, kolmogorov_q, ks_2samp, markdown, observables


@pytest.fixture(scope="module")
def ttbar(delphes_dir):
    return observables([str(delphes_dir / "ttbar_cms_60ev.root")], StorageConfig())


def test_real_means_and_errors_match_uproot(ttbar, delphes_dir):
    tree = uproot.open(delphes_dir / "ttbar_cms_60ev.root")["Delphes"]
    raw = tree.arrays(["Jet.PT", "Jet.Eta", "MissingET.MET"], library="np")
    # The selection (an isolated lepton) is topoflow's by definition; nJets and MET are recounted here.
    info = delphes.probe(str(delphes_dir / "ttbar_cms_60ev.root"), StorageConfig())
    selected = features.compute(next(delphes.read_batches(info, StorageConfig(), 0, info.entries, 1000))[1]).events
    n_jets = [int(np.sum((pt > 30) & (np.abs(eta) < 2.6)))
              for pt, eta in zip(raw["Jet.PT"][selected], raw["Jet.Eta"][selected])]
    met = [float(m[0]) for m in raw["MissingET.MET"][selected]]
    table = compare(ttbar, ttbar)
    for name, values in (("n_jets", n_jets), ("met", met)):
        real = table[name]["real"]
        assert real["n"] == len(values) == 33
        assert real["mean"] == pytest.approx(statistics.fmean(values))
        assert real["se"] == pytest.approx(statistics.stdev(values) / math.sqrt(len(values)))


def test_standard_error_and_difference_in_errors():
    gen = {k: np.array([1.0, 2.0, 3.0, 4.0]) for k in OBSERVABLES}
    ref = {k: np.array([2.0, 4.0]) for k in OBSERVABLES}
    t = compare(gen, ref)["met"]
    assert t["generated"] == {"n": 4, "mean": 2.5, "se": pytest.approx(0.6454972)}  # sd √(5/3), /√4
    assert t["real"] == {"n": 2, "mean": 3.0, "se": pytest.approx(1.0)}
    assert t["pull"] == pytest.approx(-0.5 / math.hypot(0.6454972, 1.0))


def test_kolmogorov_distribution_critical_values():
    assert kolmogorov_q(1.358) == pytest.approx(0.05, abs=5e-4)
    assert kolmogorov_q(1.628) == pytest.approx(0.01, abs=2e-4)
    assert kolmogorov_q(0.0) == 1.0 and kolmogorov_q(5.0) < 1e-20
    assert ks_2samp(np.array([1.0, 2.0, 3.0]), np.array([4.0, 5.0]))[0] == 1.0
    assert ks_2samp(np.array([1.0, 3.0]), np.array([2.0, 4.0]))[0] == 0.5


def test_sample_against_itself_passes_and_shifted_fails(ttbar):
    same = compare(ttbar, ttbar)
    assert all(t["ks_d"] == 0 and t["p"] == 1 for t in same.values())
    shifted = dict(ttbar, met=ttbar["met"] + 2 * ttbar["met"].std(), n_tracks=ttbar["n_tracks"] * 1.6)
    table = compare(shifted, ttbar)
    assert table["met"]["p"] < 0.01 and table["n_tracks"]["p"] < 0.01
    assert table["met"]["pull"] > 3
    assert table["n_jets"]["p"] == 1
    rows = {line.split("|")[1].strip(): line for line in markdown("ttbar", table).splitlines() if line.startswith("| ")}
    assert rows["MET [GeV]"].rstrip(" |").endswith("✗") and "✗" not in rows["nJets"]
    assert len({len(line) for line in rows.values()}) == 1, "aligned columns"


@pytest.mark.slow
def test_cli_prints_and_writes_the_table(delphes_dir, tmp_path, capsys):
    from topoflow.cli import main

    out = tmp_path / "validation"
    assert main(["generate", "--no-progress", "--events", "wjets=1", "--workers", "1",
                 "--output", str(tmp_path / "gen"), "--set", f"generate.reference={delphes_dir}",
                 "--set", f"generate.validation_dir={out}", "--validate"]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"### wjets \(W\(→ℓν\)\+jets\): \d generated vs 46 real Delphes events after selection",
                     printed)
    assert "| MET [GeV]" in printed and "Kolmogorov-Smirnov" in printed
    assert (out / "validation.md").read_text() in printed
    saved = json.loads((out / "validation.json").read_text())
    assert saved["classes"]["wjets"]["met"]["real"]["n"] == 46
    assert (out / "validation_wjets.png").stat().st_size > 20_000
