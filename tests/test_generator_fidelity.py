"""Generated events against real Delphes (the shared CMS samples), after topoflow's selection (issue 14):
per class, mean nJets and nBjets within 2 standard errors of the real means, or 15 %, whichever is larger,
and every distribution of the validation table passing a two-sample KS test at the 1 % level at these
sample sizes (240 generated events per class; 33 tt̄, 46 W+jets and 4 QCD real events pass the selection).

What failed before: without the card's lepton-jet removal, R = 0.5 and jet energy scale, tt̄ had 4.2 jets
against real 2.9 and W+jets 1.4 against 0.7; without its calorimeter towers and track acceptance (measured
where a track reaches the calorimeter), tt̄ had 37 neutral hadrons against 29 and 99 tracks against 73;
QCD leptons were 80 % electrons, the real ones half muons."""

from __future__ import annotations

import numpy as np
import pytest

from topoflow.config import Config, StorageConfig
from topoflow.generate import generate
from topoflow.generate.validate import OBSERVABLES, P_FLAG, compare, observables

pytestmark = pytest.mark.slow
EVENTS = {"qcd": 240, "ttbar": 240, "wjets": 240}


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    cfg = Config()
    cfg.generate.output = str(tmp_path_factory.mktemp("fidelity") / "generated")
    cfg.generate.events, cfg.generate.events_per_file, cfg.generate.workers = EVENTS, 120, 2
    generate(cfg, show_progress=False)
    return cfg.generate.output


def _samples(generated, delphes_dir, cls):
    from pathlib import Path

    gen = observables([str(p) for p in sorted(Path(generated).glob(f"{cls}_*.root"))], StorageConfig())
    real = observables([str(p) for p in sorted(delphes_dir.glob(f"{cls}_*.root"))], StorageConfig())
    return gen, real


def _allowed(real: np.ndarray) -> float:
    """max(2 SE, 15 %) of the real mean; when every real event has 0 (QCD b-jets: 0 in 4 events) the SE
    is 0 and says nothing, so the Poisson 95 % upper limit on the mean, 3/n, bounds it instead."""
    if not real.any():
        return 3.0 / len(real)
    return max(2 * real.std(ddof=1) / np.sqrt(len(real)), 0.15 * real.mean())


@pytest.mark.parametrize("cls", sorted(EVENTS))
def test_jet_multiplicities_match_real_delphes(generated, delphes_dir, cls):
    gen, real = _samples(generated, delphes_dir, cls)
    assert len(gen["n_jets"]) > 40 and len(real["n_jets"]) >= 4
    for name in ("n_jets", "n_bjets"):
        g, r = gen[name].mean(), real[name].mean()
        assert abs(g - r) <= _allowed(real[name]), f"{cls} mean {name}: generated {g:.2f}, real {r:.2f}"


@pytest.mark.parametrize("cls", sorted(EVENTS))
def test_every_distribution_passes_a_two_sample_test(generated, delphes_dir, cls):
    table = compare(*_samples(generated, delphes_dir, cls))
    failed = {OBSERVABLES[k][0]: round(row["p"], 4) for k, row in table.items() if row["p"] < P_FLAG}
    assert not failed, f"{cls}: KS p < {P_FLAG} for {failed}"


def test_qcd_leptons_are_electrons_and_muons(generated, delphes_dir):
    """The real QCD events that pass the selection hold 2 electrons and 2 muons (and, before isolation, 14
    events have an electron above 23 GeV and 22 a muon): the generated ones must hold both, about equally."""
    gen, real = _samples(generated, delphes_dir, "qcd")
    assert real["lepton_muon"].mean() == 0.5
    assert 0.35 < gen["lepton_muon"].mean() < 0.65, f"generated QCD: {gen['lepton_muon'].mean():.0%} muons"
