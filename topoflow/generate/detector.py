"""A fast, CMS-like detector simulation over whole batches of generator events (numpy + awkward +
fastjet), writing the Delphes collections topoflow reads.

Every number is in :data:`CARD`, after Delphes' ``delphes_card_CMS.tcl`` (tracking efficiency and
momentum resolution, ECAL/HCAL resolution, lepton efficiencies, b-tagging; jets as the card makes them:
anti-kT R = 0.5 over the whole particle flow, lepton tracks included, ``JetPTMin`` 20 GeV, then its
``JetEnergyScale``, then its ``UniqueObjectFinder``, which drops every jet holding an electron or muon: the
sample cards switch lepton isolation off, so each one does). Without that removal the selected lepton
made a jet of its own, and tt̄ and W+jets events had 1.4-2.3x the jets of real Delphes (issue 14).
Simplifications, on purpose: particles are not grouped into calorimeter towers (each neutral
particle is its own EFlow entry), there is no pile-up, electrons and muons are the generator ones
after efficiency and smearing, b-tagging matches jets to the last b hadrons of the event, and a jet
is dropped when a lepton lies within its radius (the card: when they share a particle; the same jets on
the real samples).
"""

from __future__ import annotations

import awkward as ak
import numpy as np

from topoflow.extras import require
from topoflow.features import delta_phi

CARD = {
    # Tracker: |η| < 2.5; efficiency by (pT > 1 GeV, barrel |η| ≤ 1.5) as in the CMS card.
    "tracker_eta": 2.5,
    "track_pt_min": 0.1,
    "track_eff": {"barrel_low": 0.70, "barrel_high": 0.95, "endcap_low": 0.60, "endcap_high": 0.85},
    "muon_track_eff": {"barrel_low": 0.75, "barrel_high": 0.99, "endcap_low": 0.70, "endcap_high": 0.98},
    # Relative pT resolution: a ⊕ b·pT (barrel, endcap).
    "track_res": {"barrel": (0.006, 1.5e-4), "endcap": (0.015, 3.1e-4)},
    # Calorimeters: σ(E) = √((a·E)² + b²·E + c²); ECAL to |η| 3.0, HCAL to |η| 5.0.
    "ecal_eta": 3.0, "ecal": {"barrel": (0.007, 0.07, 0.35), "endcap": (0.020, 0.11, 0.40)},
    "hcal_eta": 5.0, "hcal": {"central": (0.050, 1.50, 0.0), "forward": (0.130, 2.70, 0.0)},
    "photon_e_min": 0.5, "neutral_e_min": 1.0,
    # Leptons: pT > 10 GeV; efficiency barrel / endcap (muons to |η| 2.4).
    "lepton_pt_min": 10.0, "electron_eff": (0.95, 0.85), "muon_eff": (0.95, 0.95), "muon_eta": 2.4,
    # Jets and b-tagging.
    "jet_r": 0.5, "jet_pt_min": 20.0, "btag_eta": 2.5, "btag_eff_b": 0.70, "btag_mistag": 0.01,
    "b_hadron_pt_min": 5.0,
    # A jet faking an electron absorbs the particle flow of its core.
    "fake_core": 0.1,
}

_NEUTRINOS = (12, 14, 16)


def _eta(px, py, pz):
    return np.arcsinh(pz / np.maximum(np.hypot(px, py), 1e-12))


def _by_eta(eta, barrel_value, endcap_value, edge=1.5):
    return np.where(np.abs(eta) <= edge, barrel_value, endcap_value)


def simulate(batch: list[tuple[np.ndarray, np.ndarray]], rng: np.random.Generator,
             fake_electrons: bool = False) -> dict[str, ak.Array]:
    """Delphes-named jagged arrays (``EFlowTrack.PT`` …) for a batch of ``(particles, b hadrons)``;
    ``fake_electrons``: the leading central jet of each event is reconstructed as an electron."""
    counts = np.array([len(p) for p, _ in batch])
    table = np.concatenate([p for p, _ in batch])
    evt = np.repeat(np.arange(len(batch)), counts)
    pid, px, py, pz, e, charge, x, y, z = table.T
    aid = np.abs(pid).astype(np.int64)
    pt, eta, phi = np.hypot(px, py), _eta(px, py, pz), np.arctan2(py, px)
    visible = ~np.isin(aid, _NEUTRINOS)
    charged = (charge != 0) & visible
    n = len(batch)
    out: dict[str, ak.Array] = {}

    # Tracks: efficiency and pT resolution inside the tracker.
    in_tracker = charged & (np.abs(eta) < CARD["tracker_eta"]) & (pt > CARD["track_pt_min"])
    high = pt > 1.0
    hadron_eff = _by_eta(eta, np.where(high, CARD["track_eff"]["barrel_high"], CARD["track_eff"]["barrel_low"]),
                         np.where(high, CARD["track_eff"]["endcap_high"], CARD["track_eff"]["endcap_low"]))
    muon_eff = _by_eta(eta, np.where(high, CARD["muon_track_eff"]["barrel_high"], CARD["muon_track_eff"]["barrel_low"]),
                       np.where(high, CARD["muon_track_eff"]["endcap_high"], CARD["muon_track_eff"]["endcap_low"]))
    tracked = in_tracker & (rng.random(len(pt)) < np.where(aid == 13, muon_eff, hadron_eff))
    a, b = (_by_eta(eta, CARD["track_res"]["barrel"][i], CARD["track_res"]["endcap"][i]) for i in (0, 1))
    track_pt = pt * np.maximum(1 + rng.normal(size=len(pt)) * np.hypot(a, b * pt), 0.01)
    t = np.flatnonzero(tracked)

    # Calorimeters: photons and electrons not tracked → EFlowPhoton; other hadrons → EFlowNeutralHadron.
    em = visible & ~tracked & ((aid == 22) | (aid == 11)) & (np.abs(eta) < CARD["ecal_eta"])
    had = visible & ~tracked & ~((aid == 22) | (aid == 11) | (aid == 13)) & (np.abs(eta) < CARD["hcal_eta"])
    ecal = [_by_eta(eta, CARD["ecal"]["barrel"][i], CARD["ecal"]["endcap"][i]) for i in range(3)]
    hcal = [_by_eta(eta, CARD["hcal"]["central"][i], CARD["hcal"]["forward"][i], edge=3.0) for i in range(3)]
    e_em = e + rng.normal(size=len(e)) * np.sqrt((ecal[0] * e) ** 2 + ecal[1] ** 2 * e + ecal[2] ** 2)
    e_had = e + rng.normal(size=len(e)) * np.sqrt((hcal[0] * e) ** 2 + hcal[1] ** 2 * e + hcal[2] ** 2)
    g = np.flatnonzero(em & (e_em > CARD["photon_e_min"]))
    h = np.flatnonzero(had & (e_had > CARD["neutral_e_min"]))

    # Leptons: generator e/μ after efficiency, with track (μ) or ECAL (e) resolution.
    leptons = {}
    for name, code, eff, eta_max, smeared in (
        ("Electron", 11, CARD["electron_eff"], CARD["tracker_eta"], e_em / np.cosh(eta)),
        ("Muon", 13, CARD["muon_eff"], CARD["muon_eta"], track_pt),
    ):
        ok = (aid == code) & (pt > CARD["lepton_pt_min"]) & (np.abs(eta) < eta_max)
        ok &= rng.random(len(pt)) < _by_eta(eta, *eff)
        i = np.flatnonzero(ok)
        leptons[name] = [evt[i], smeared[i], eta[i], phi[i], charge[i]]

    # The particle flow: MET from all of it, anti-kT jets b-tagged by matching b hadrons.
    flow_evt = np.concatenate([evt[t], evt[g], evt[h]])
    flow_pt = np.concatenate([track_pt[t], e_em[g] / np.cosh(eta[g]), e_had[h] / np.cosh(eta[h])])
    flow_eta, flow_phi = np.concatenate([eta[t], eta[g], eta[h]]), np.concatenate([phi[t], phi[g], phi[h]])
    fpx, fpy = flow_pt * np.cos(flow_phi), flow_pt * np.sin(flow_phi)
    mex = -np.bincount(flow_evt, weights=fpx, minlength=n)
    mey = -np.bincount(flow_evt, weights=fpy, minlength=n)
    out |= _collection("MissingET", np.arange(n), n, MET=np.hypot(mex, mey), Eta=np.zeros(n), Phi=np.arctan2(mey, mex))
    jets = _jets(flow_evt, flow_pt, flow_eta, flow_phi, [bh for _, bh in batch], n, rng)

    kept = np.ones(len(flow_evt), dtype=bool)
    if fake_electrons:
        kept, jets, fake = _fake_electron(flow_evt, flow_pt, flow_eta, flow_phi, jets, n, rng)
        leptons["Electron"] = [np.concatenate([a, b]) for a, b in zip(leptons["Electron"], fake)]
    kt, kg, kh = np.split(kept, np.cumsum([len(t), len(g)]))
    t, g, h = t[kt], g[kg], h[kh]
    out |= _collection("EFlowTrack", evt[t], n, PT=track_pt[t], Eta=eta[t], Phi=phi[t], PID=pid[t].astype(np.int32),
                       Charge=charge[t].astype(np.int32), X=x[t], Y=y[t], Z=z[t])
    out |= _collection("EFlowPhoton", evt[g], n, ET=e_em[g] / np.cosh(eta[g]), Eta=eta[g], Phi=phi[g])
    out |= _collection("EFlowNeutralHadron", evt[h], n, ET=e_had[h] / np.cosh(eta[h]), Eta=eta[h], Phi=phi[h])
    for name, (le, lpt, leta, lphi, lq) in leptons.items():
        order = np.lexsort((-lpt, le))  # Delphes sorts by decreasing pT
        out |= _collection(name, le[order], n, PT=lpt[order], Eta=leta[order], Phi=lphi[order],
                           Charge=lq[order].astype(np.int32))
    jevt, jpt, jeta, jphi, btag = jets = _unique(jets, leptons)
    out |= _collection("Jet", jevt, n, PT=jpt, Eta=jeta, Phi=jphi, BTag=btag)
    return out


def _unique(jets, leptons) -> tuple[np.ndarray, ...]:
    """The jets Delphes' UniqueObjectFinder keeps: none within the jet radius of an electron or muon."""
    jevt, _, jeta, jphi, _ = jets
    le, leta, lphi = (np.concatenate([leptons[k][i] for k in ("Electron", "Muon")]) for i in (0, 2, 3))
    lep, jet = _same_event(le, jevt)
    near = np.hypot(leta[lep] - jeta[jet], delta_phi(lphi[lep], jphi[jet])) < CARD["jet_r"]
    keep = np.ones(len(jevt), dtype=bool)
    keep[jet[near]] = False
    return tuple(a[keep] for a in jets)


def _same_event(a_evt: np.ndarray, b_evt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs ``(i, j)`` with ``a_evt[i] == b_evt[j]`` (``b_evt`` sorted): per event, not batch x batch."""
    start, end = np.searchsorted(b_evt, a_evt, "left"), np.searchsorted(b_evt, a_evt, "right")
    counts = end - start
    i = np.repeat(np.arange(len(a_evt)), counts)
    j = np.repeat(start - (np.cumsum(counts) - counts), counts) + np.arange(counts.sum())
    return i, j


def _fake_electron(flow_evt, flow_pt, flow_eta, flow_phi, jets, n, rng):
    """The leading central jet of each event becomes an electron candidate: the particle-flow
    entries in its core (ΔR < ``fake_core``) are absorbed into it, the rest of the jet stays, so the
    isolation computed later decides, as in a detector, whether the fake passes the selection.
    Returns the particle-flow entries kept, the jets left and the fake electrons."""
    jevt, jpt, jeta, jphi, btag = jets
    central = np.flatnonzero(np.abs(jeta) < CARD["tracker_eta"])
    events, first = np.unique(jevt[central], return_index=True)  # jets are sorted by decreasing pT
    lead = central[first]
    slot = np.full(n, -1)
    slot[events] = lead
    j = slot[flow_evt]
    has = j >= 0
    dphi = delta_phi(flow_phi, jphi[np.maximum(j, 0)])
    core = has & (np.hypot(flow_eta - jeta[np.maximum(j, 0)], dphi) < CARD["fake_core"])
    e_pt = np.bincount(np.maximum(j[core], 0), weights=flow_pt[core], minlength=len(jpt))[lead]
    fake = [jevt[lead], e_pt, jeta[lead], jphi[lead], rng.choice([-1.0, 1.0], size=len(lead))]
    rest = np.ones(len(jpt), dtype=bool)
    rest[lead] = False
    return ~core, tuple(a[rest] for a in jets), fake


def _jets(evt, pt, eta, phi, b_hadrons, n, rng) -> tuple[np.ndarray, ...]:
    fastjet = require("fastjet", "generate")

    order = np.argsort(evt, kind="stable")
    evt, pt, eta, phi = evt[order], pt[order], eta[order], phi[order]
    counts = np.bincount(evt, minlength=n)
    vectors = ak.unflatten(ak.zip({"px": pt * np.cos(phi), "py": pt * np.sin(phi), "pz": pt * np.sinh(eta),
                                   "E": pt * np.cosh(eta)}), counts)
    jets = fastjet.ClusterSequence(vectors, fastjet.JetDefinition(fastjet.antikt_algorithm, CARD["jet_r"]))
    j = jets.inclusive_jets(min_pt=CARD["jet_pt_min"])
    jcounts = ak.to_numpy(ak.num(j))
    jpx, jpy, jpz = (ak.to_numpy(ak.flatten(j[c])) for c in ("px", "py", "pz"))
    jpt, jeta, jphi = np.hypot(jpx, jpy), _eta(jpx, jpy, jpz), np.arctan2(jpy, jpx)
    jpt = jpt * np.sqrt((2.5 - 0.15 * np.abs(jeta)) ** 2 / jpt + 1)  # the card's JetEnergyScale, after JetPTMin
    jevt = np.repeat(np.arange(n), jcounts)
    b_counts = np.array([len(b) for b in b_hadrons])
    bh = np.concatenate(b_hadrons) if b_counts.sum() else np.zeros((0, 3))
    bh_evt = np.repeat(np.arange(n), b_counts)
    keep = bh[:, 0] > CARD["b_hadron_pt_min"]
    matched = np.zeros(len(jpt), dtype=bool)
    if keep.any():  # pairs (jet, b hadron) of the same event within ΔR < R
        pb, pj = _same_event(bh_evt[keep], jevt)
        dphi = delta_phi(jphi[pj], bh[keep][pb, 2])
        close = np.hypot(jeta[pj] - bh[keep][pb, 1], dphi) < CARD["jet_r"]
        matched[pj[close]] = True
    p_tag = np.where(matched, CARD["btag_eff_b"], CARD["btag_mistag"]) * (np.abs(jeta) < CARD["btag_eta"])
    btag = (rng.random(len(jpt)) < p_tag).astype(np.uint32)
    order = np.lexsort((-jpt, jevt))  # Delphes sorts jets by decreasing pT
    return jevt[order], jpt[order], jeta[order], jphi[order], btag[order]


def _collection(name: str, evt: np.ndarray, n: int, **fields: np.ndarray) -> dict[str, ak.Array]:
    """Jagged arrays per event (entries in ``evt`` order within each event), named ``name.field``."""
    order = np.argsort(evt, kind="stable")
    counts = np.bincount(evt, minlength=n)
    dtype = {np.dtype(np.float64): np.float32}
    return {f"{name}.{k}": ak.unflatten(v[order].astype(dtype.get(v.dtype, v.dtype)), counts) for k, v in fields.items()}
