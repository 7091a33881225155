"""The calorimeter emulation on hand-made particles, against values worked out from the CMS card:
where particles arrive, which towers they share, smearing, thresholds and the particle flow."""

from __future__ import annotations

import numpy as np
import pytest

from topoflow.generate import calorimeter

pytest.importorskip("fastjet")  # the generate extra


def _flow(particles, seed=0):
    """particle_flow for one event of (pid, E, η, φ, charge, tracked) rows; track energy = E, 6 % resolution."""
    pid, e, eta, phi, charge, tracked = (np.array(c) for c in zip(*particles))
    pt = e / np.cosh(eta)
    at_eta, at_phi = calorimeter.position(pt, pt * np.sinh(eta), eta, phi, charge)
    return calorimeter.particle_flow(np.zeros(len(e), dtype=np.int64), e, np.abs(pid), at_eta, at_phi,
                                     tracked.astype(bool), e, np.full(len(e), 0.06), np.random.default_rng(seed))


def test_arrival_straight_bent_and_curled():
    pt, eta, phi = np.array([50.0, 50.0, 0.5]), np.array([0.3, 0.0, 0.3]), np.array([1.0, 1.0, 1.0])
    a_eta, a_phi = calorimeter.position(pt, pt * np.sinh(eta), eta, phi, np.array([0.0, 1.0, 1.0]))
    assert a_eta[0] == 0.3 and a_phi[0] == 1.0, "neutral: straight"
    rho = 50 / (0.299792458 * 3.8)
    assert a_eta[1] == pytest.approx(0.0, abs=1e-9)
    assert a_phi[1] == pytest.approx(1.0 - np.arcsin(1.29 / (2 * rho)), rel=1e-9), "positive: bends to lower φ"
    assert abs(a_eta[2]) > 1.6, "0.5 GeV curls inside the 1.29 m barrel and leaves through an endcap"


def test_a_neutral_excess_becomes_a_tower_and_tracks_stay():
    # K0L (50 GeV) and a tracked π+ (20 GeV), both at η 0.2: one HCAL tower whose excess is the K0L.
    kept, scale, towers = _flow([(130, 50.0, 0.2, 0.5, 0, 0), (211, 20.0, 0.2, 0.5 + 0.0001, 1, 1)])
    evt, et, eta, phi = towers["hcal"]
    assert kept.all() and scale[1] == 1.0
    assert len(et) == 1 and evt[0] == 0
    sigma = calorimeter.sigma("hcal", np.array([70.0]), np.array([0.2]))[0]
    assert abs(et[0] * np.cosh(eta[0]) - 50.0) < 4 * sigma
    assert abs(eta[0] - 0.2) < 0.087 and abs(phi[0] - 0.5) < 2 * np.pi / 72, "inside the 0.087 x 5° tower"
    assert len(towers["ecal"][1]) == 0


def test_photons_in_one_tower_merge_and_separate_ones_do_not():
    _, _, towers = _flow([(22, 10.0, 0.1, 0.2, 0, 0), (22, 5.0, 0.1 + 0.003, 0.2 + 0.003, 0, 0),
                          (22, 10.0, -1.0, -2.0, 0, 0)])
    et = np.sort(towers["ecal"][1])
    assert len(et) == 2, "ECAL towers are 0.0174 x 1°"
    sigma = calorimeter.sigma("ecal", np.array([15.0]), np.array([0.1]))[0]
    assert abs(et[1] * np.cosh(0.1) - 15.0) < 4 * sigma + 0.1


def test_soft_lone_deposits_are_cut_and_their_tracks_pulled_down():
    # A 1.5 GeV K0L alone: below the HCAL's significance cut (E > σ(E) needs E > 2.26 GeV).
    _, _, towers = _flow([(130, 1.5, 0.4, 0.0, 0, 0)])
    assert len(towers["hcal"][1]) == 0
    # A tracked 3 GeV π+ alone: no neutral tower; its track is rescaled towards the calorimeter, never up
    # to more than tracker and calorimeter allow, and on average close to 1 at 6 % track resolution.
    scales = np.array([_flow([(211, 3.0, 0.4, 0.0, 1, 1)], seed=s)[1][0] for s in range(200)])
    assert ((scales > 0.5) & (scales < 1.5)).all() and 0.9 < np.median(scales) < 1.1
    assert (scales != 1.0).any()


def test_beyond_the_calorimeters_nothing_arrives():
    kept, _, towers = _flow([(130, 100.0, 5.5, 0.0, 0, 0), (22, 100.0, -5.2, 1.0, 0, 0)])
    assert all(len(t[0]) == 0 for t in towers.values())
