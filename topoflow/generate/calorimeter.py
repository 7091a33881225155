"""Delphes' ``SimpleCalorimeter`` as the CMS card configures it (``ECal`` then ``HCal``), over a whole
batch: where each particle reaches the calorimeter, towers, smearing, thresholds and the particle
flow built from them.

Each tower sums the energy its particles deposit (a share per species), is smeared log-normally and
zeroed below ``e_min`` or ``significance``·σ. If it exceeds the energy of the tracks it holds
significantly, the excess becomes a neutral EFlow tower (EFlowPhoton from the ECAL,
EFlowNeutralHadron from the HCAL) at a random point of the tower. Otherwise its tracks are rescaled
to the weighted mean of tracker and calorimeter. That rescaling removes most tracks below ≈ 0.7 GeV
from the real samples' EFlowTrack: alone in a tower that fails the cut, a soft track is pulled
towards zero. Numbers and tower edges are the card's (delphes/delphes ``cards/delphes_card_CMS.tcl``,
ECal L204-310, HCal L312-390; ``modules/SimpleCalorimeter.cc``).
"""

from __future__ import annotations

import numpy as np

#: The card's magnetic field (T) and the calorimeters' inner radius and half-length (m).
B_FIELD, RADIUS, HALF_LENGTH = 3.8, 1.29, 3.0
_HF = (3.125, 3.3, 3.475, 3.65, 3.825, 4.0, 4.175, 4.35, 4.525, 4.7, 5.0)
_HCAL_ENDCAP = (1.74, 1.83, 1.93, 2.043, 2.172, 2.322, 2.5, 2.65, 2.868, 2.95, 3.125, 3.3, 3.475, 3.65, 3.825,
                4.0, 4.175, 4.35)


def _towers(*groups: tuple[list[float], int]) -> tuple[np.ndarray, np.ndarray]:
    """Tower η edges and the φ divisions of the tower below each edge, as the card's ``EtaPhiBins``
    (a later group overrides an edge an earlier one gave)."""
    table = {}
    for edges, n_phi in groups:
        table |= {round(v, 6): n_phi for v in edges}
    edges = sorted(table)
    return np.array(edges), np.array([table[v] for v in edges])


CALORIMETERS = {
    "ecal": {
        "towers": _towers(([i * 0.0174 for i in range(-85, 87)], 360),
                          ([-2.958 + i * 0.0174 for i in range(1, 85)] + [1.4964 + i * 0.0174 for i in range(1, 85)], 360),
                          ([-v for v in _HF] + [-2.958] + list(_HF), 36)),
        # σ(E) = √((a·E)² + b²·E + c²), times an η factor below |η| 2.5 (see ``sigma``).
        "resolution": {"central": (0.008, 0.11, 0.40), "forward": (0.107, 2.08, 0.0)},
        "e_min": 0.5, "significance": 2.0,
        "fraction": {11: 1.0, 22: 1.0, 310: 0.3, 3122: 0.3}, "other": 0.0,
    },
    "hcal": {
        "towers": _towers(([i * 0.087 for i in range(-18, 20)], 72),
                          ([-v for v in _HCAL_ENDCAP] + [-1.653] + list(_HCAL_ENDCAP) + [4.525], 36),
                          ([-5.0, -4.7, -4.525, 4.7, 5.0], 18)),
        "resolution": {"central": (0.050, 1.50, 0.0), "forward": (0.130, 2.70, 0.0)},
        "e_min": 1.0, "significance": 1.0,
        "fraction": {11: 0.0, 22: 0.0, 12: 0.0, 13: 0.0, 14: 0.0, 16: 0.0, 310: 0.7, 3122: 0.7}, "other": 1.0,
    },
}
_MAX_PHI = 360


def sigma(name: str, e: np.ndarray, eta: np.ndarray) -> np.ndarray:
    """The card's energy resolution of the ECAL or HCAL at energy ``e`` and pseudorapidity ``eta``."""
    def stochastic(terms):
        a, b, c = terms
        return np.sqrt((a * e) ** 2 + b * b * e + c * c)

    res, x = CALORIMETERS[name]["resolution"], np.abs(eta)
    if name == "hcal":
        return np.where(x <= 3.0, stochastic(res["central"]), stochastic(res["forward"]))
    factor = np.where(x <= 1.5, 1 + 0.64 * x ** 2, 2.16 + 5.6 * (x - 2) ** 2)
    return np.where(x <= 2.5, factor * stochastic(res["central"]), stochastic(res["forward"]))


def log_normal(mean: np.ndarray, sd: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Delphes' smearing: a log-normal draw with this mean and standard deviation (never negative)."""
    b = np.sqrt(np.log1p((sd / np.maximum(mean, 1e-12)) ** 2))
    return mean * np.exp(b * rng.normal(size=len(mean)) - b * b / 2)


def position(pt, pz, eta, phi, charge) -> tuple[np.ndarray, np.ndarray]:
    """(η, φ) where each particle from the origin reaches the calorimeter, as Delphes'
    ``ParticlePropagator``: neutral ones straight; charged ones along the helix to the barrel radius,
    or to the endcap when that comes first. A track curling up inside the barrel (pT < 0.74 GeV)
    ends on an endcap, far from where it points."""
    rho = pt / (0.299792458 * B_FIELD)  # helix radius (m)
    to_barrel = 2 * np.arcsin(np.minimum(RADIUS / np.maximum(2 * rho, 1e-12), 1.0))
    to_barrel = np.where(2 * rho >= RADIUS, to_barrel, np.inf)
    to_endcap = HALF_LENGTH * 0.299792458 * B_FIELD / np.maximum(np.abs(pz), 1e-12)
    turn = np.minimum(to_barrel, to_endcap)  # the angle the track turns by until it arrives
    r = 2 * rho * np.abs(np.sin(turn / 2))
    z = np.sign(pz) * rho * turn * np.abs(pz) / np.maximum(pt, 1e-12)
    bent = charge != 0
    return (np.where(bent, np.arcsinh(z / np.maximum(r, 1e-12)), eta),
            np.where(bent, np.angle(np.exp(1j * (phi - np.sign(charge) * turn / 2))), phi))


def particle_flow(evt, energy, aid, eta, phi, tracked, track_e, track_res, rng):
    """The ECAL and HCAL of a batch. ``eta``/``phi``: where each particle arrives (:func:`position`);
    ``tracked``, ``track_e``, ``track_res``: its track, the track's energy and relative resolution.
    Returns the tracks kept (those reaching a tower), each track's energy scale and the neutral
    towers per calorimeter ``(event, ET, η, φ)``."""
    kept, scale, towers = np.ones(len(evt), dtype=bool), np.ones(len(evt)), {}
    for name, cal in CALORIMETERS.items():
        edges, n_phi = cal["towers"]
        ieta = np.searchsorted(edges, eta)  # Delphes' lower_bound: the tower below edge ieta
        inside = (ieta > 0) & (ieta < len(edges))
        ieta = np.clip(ieta, 1, len(edges) - 1)
        iphi = np.minimum(((phi + np.pi) / (2 * np.pi) * n_phi[ieta]).astype(np.int64), n_phi[ieta] - 1)
        fraction = np.full(len(evt), cal["other"])
        for code, share in cal["fraction"].items():
            fraction[aid == code] = share
        kept &= inside | ~tracked
        hits = np.flatnonzero(inside & (fraction > 0))
        key = (evt[hits] * len(edges) + ieta[hits]) * _MAX_PHI + iphi[hits]
        tower, inv = np.unique(key, return_inverse=True)
        deposit = np.bincount(inv, weights=fraction[hits] * energy[hits], minlength=len(tower))
        measured = tracked[hits] & (fraction[hits] > 0)  # tracks this calorimeter sees: hadrons in the HCAL, electrons in the ECAL
        t_e = np.where(measured, fraction[hits] * track_e[hits], 0.0)
        trk = np.bincount(inv, weights=t_e, minlength=len(tower))
        trk_var = np.bincount(inv, weights=(track_res[hits] * t_e) ** 2, minlength=len(tower))
        t_eta = tower // _MAX_PHI % len(edges)
        center = (edges[t_eta - 1] + edges[t_eta]) / 2
        e = log_normal(deposit, sigma(name, deposit, center), rng)
        sd = sigma(name, e, center)
        e = np.where((e < cal["e_min"]) | (e < cal["significance"] * sd), 0.0, e)
        neutral = np.maximum(e - trk, 0.0)
        excess = (neutral > cal["e_min"]) & (neutral > cal["significance"] * np.sqrt(trk_var + sd ** 2))
        w_trk = np.divide(1.0, trk_var, out=np.zeros(len(tower)), where=trk_var > 0)
        w_cal = np.divide(1.0, sd ** 2, out=np.zeros(len(tower)), where=sd > 0)
        best = (w_trk * trk + w_cal * e) / np.maximum(w_trk + w_cal, 1e-300)
        factor = np.where(~excess & (trk > 0), best / np.maximum(trk, 1e-300), 1.0)
        scale[hits[measured]] = factor[inv[measured]]
        out, t_eta = np.flatnonzero(excess), t_eta[excess]
        t_phi, divisions = tower[out] % _MAX_PHI, n_phi[t_eta]
        c_eta = rng.uniform(edges[t_eta - 1], edges[t_eta])  # the card's SmearTowerCenter
        c_phi = -np.pi + (t_phi + rng.random(len(out))) * 2 * np.pi / divisions
        towers[name] = (tower[out] // (_MAX_PHI * len(edges)), neutral[out] / np.cosh(c_eta), c_eta, c_phi)
    return kept, scale, towers
