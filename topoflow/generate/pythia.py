"""Pythia 8 event generation at √s = 13 TeV for the three classes, with the generator-level lepton
filter of the original samples (≥ 1 final-state e or μ with pT > 20 GeV, |η| < 2.5).

QCD is a *defined* sample of the two ways a single-lepton trigger sees multijet events:
``qcd``, heavy-flavour production (gg/qq̄ → bb̄) with the b hadrons forced to decay semileptonically
(real leptons, mostly inside jets), and ``qcd_fake``, inclusive QCD in which the detector simulation
turns the leading central jet into an electron or a muon candidate (a jet faking a lepton). Both
use p̂T > 50 GeV, as the real Delphes QCD sample does. Both are unweighted and conditional on the
lepton being there, ~1,000× faster than filtering inclusive QCD; their mixture is
``generate.qcd_fake_fraction``.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from topoflow.extras import require

_COMMON = ["Beams:eCM = 13000.", "Print:quiet = on", "Next:numberCount = 0", "Random:setSeed = on"]
_B_HADRONS = (511, 521, 531, 5122)
PROCESSES = {
    "ttbar": ["Top:gg2ttbar = on", "Top:qqbar2ttbar = on"],
    "wjets": ["WeakBosonAndParton:qqbar2Wg = on", "WeakBosonAndParton:qg2Wq = on", "PhaseSpace:pTHatMin = 20.",
              "24:onMode = off", "24:onIfAny = 11 13 15"],
    "qcd": ["HardQCD:hardbbbar = on", "PhaseSpace:pTHatMin = 50."]
    + [s for b in _B_HADRONS for s in (f"{b}:onMode = off", f"{b}:onIfAny = 11 13")],
    # Inclusive QCD for the jet→lepton fake component: the fake is the trigger lepton, no filter.
    "qcd_fake": ["HardQCD:all = on", "PhaseSpace:pTHatMin = 50."],
}
UNFILTERED = {"qcd_fake"}
FILTER_PT, FILTER_ETA = 20.0, 2.5

#: Columns of the final-state particle table handed to the detector simulation.
COLUMNS = ("id", "px", "py", "pz", "e", "charge", "x", "y", "z")


def events(process: str, seed: int, n_kept: int, stats: dict) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield ``(final-state particles (n, 9), b-hadron momenta (m, 3: pT, η, φ))`` for ``n_kept``
    events passing the lepton filter. ``stats`` counts ``tried`` and ``kept``."""
    pythia8mc = require("pythia8mc", "generate")

    py = pythia8mc.Pythia("", False)
    for s in _COMMON + PROCESSES[process] + [f"Random:seed = {seed % 900_000_000}"]:
        if not py.readString(s):
            raise ValueError(f"Pythia rejected setting {s!r}")
    if not py.init():
        raise RuntimeError(f"Pythia failed to initialise process {process!r}")
    stats.setdefault("tried", 0)
    stats.setdefault("kept", 0)
    while stats["kept"] < n_kept:
        if not py.next():
            continue
        stats["tried"] += 1
        # The filter first, touching as little of each particle as possible: most QCD events fail it.
        if process not in UNFILTERED and not any(
            p.idAbs() in (11, 13) and p.isFinal() and p.pT() > FILTER_PT and abs(p.eta()) < FILTER_ETA
            for p in py.event
        ):
            continue
        stats["kept"] += 1
        table = np.array([(p.id(), p.px(), p.py(), p.pz(), p.e(), p.charge(), p.xProd(), p.yProd(), p.zProd())
                          for p in py.event if p.isFinal()], dtype=np.float64)
        b = [(p.pT(), p.eta(), p.phi()) for p in py.event
             if _is_b_hadron(p.idAbs()) and not any(_is_b_hadron(py.event[d].idAbs()) for d in p.daughterList())]
        yield table, np.array(b, dtype=np.float64).reshape(-1, 3)


def _is_b_hadron(aid: int) -> bool:
    return (aid // 100) % 10 == 5 or (aid // 1000) % 10 == 5
