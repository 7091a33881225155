"""A fast, CMS-like detector simulation over whole batches of generator events (numpy + awkward +
fastjet), writing the Delphes collections topoflow reads.

It follows Delphes' ``delphes_card_CMS.tcl`` (issue 14 compared it with the real samples); its numbers
are in :data:`CARD` and, for the calorimeters, in :mod:`topoflow.generate.calorimeter`:
- tracks: efficiency and momentum resolution per species, evaluated where the particle reaches the
  calorimeter (soft tracks that curl up and leave through an endcap are lost, as in Delphes);
- ECAL and HCAL towers, their smearing and thresholds, and the particle flow made from towers and
  tracks (:mod:`~topoflow.generate.calorimeter`);
- jets as the card makes them: anti-kT R = 0.5 over the whole particle flow, lepton tracks included,
  ``JetPTMin`` 20 GeV, its ``JetEnergyScale``, then its ``UniqueObjectFinder``, which drops every jet
  holding an electron or muon (the sample cards switch lepton isolation off, so each one does);
- the card's b-tag efficiency and mistag formulas.
Simplifications, on purpose: no pile-up; electrons and muons are the generator ones after efficiency
and smearing; b-tagging matches jets to the last b hadrons of the event (c jets get the light rate); a
jet is dropped when a lepton lies within its radius (the card: when they share a particle; the same jets
on the real samples); particles start at the origin on their way to the calorimeter.
"""

from __future__ import annotations

import awkward as ak
import numpy as np

from topoflow.extras import require
from topoflow.features import delta_phi
from topoflow.generate import calorimeter

CARD = {
    # Tracker: |η| < 2.5, pT > 0.1 GeV; efficiency for pT ≤ 1, ≤ 100, above, in |η| ≤ 1.5 and ≤ 2.5
    # (the card's *TrackingEfficiency modules; muons lose a little more above 1 TeV, not modelled).
    "tracker_eta": 2.5,
    "track_pt_min": 0.1,
    "track_eff": {"hadron": ((0.70, 0.95, 0.95), (0.60, 0.85, 0.85)),
                  "electron": ((0.73, 0.95, 0.99), (0.50, 0.83, 0.90)),
                  "muon": ((0.75, 0.99, 0.99), (0.70, 0.98, 0.98))},
    # Relative pT resolution a ⊕ b·pT in |η| ≤ 0.5, ≤ 1.5, ≤ 2.5 (the card's MomentumSmearing modules).
    "track_res": {"hadron": ((0.06, 1.3e-3), (0.10, 1.7e-3), (0.25, 3.1e-3)),
                  "electron": ((0.03, 1.3e-3), (0.05, 1.7e-3), (0.15, 3.1e-3)),
                  "muon": ((0.01, 1.0e-4), (0.015, 1.5e-4), (0.025, 3.5e-4))},
    # Leptons: pT > 10 GeV; efficiency barrel / endcap (muons to |η| 2.4).
    "lepton_pt_min": 10.0, "electron_eff": (0.95, 0.85), "muon_eff": (0.95, 0.95), "muon_eta": 2.4,
    # Jets and b-tagging (the card's efficiency formulas in pT, see ``_btag_probability``).
    "jet_r": 0.5, "jet_pt_min": 20.0, "btag_eta": 2.5, "b_hadron_pt_min": 5.0,
    # A jet faking a lepton absorbs the particle flow of its core; this share of fakes are muons.
    "fake_core": 0.1, "fake_muon_share": 0.5,
}


def _eta(px, py, pz):
    return np.arcsinh(pz / np.maximum(np.hypot(px, py), 1e-12))


def _by_eta(eta, barrel_value, endcap_value, edge=1.5):
    return np.where(np.abs(eta) <= edge, barrel_value, endcap_value)


def _track_efficiency(pt, eta, species) -> np.ndarray:
    """Probability that each particle in the tracker makes a track, by species, pT and |η| region."""
    region, step = np.abs(eta) > 1.5, np.searchsorted([1.0, 100.0], pt)
    eff = np.zeros(len(pt))
    for name, table in CARD["track_eff"].items():
        eff = np.where(species == name, np.array(table)[region.astype(int), step], eff)
    return eff


def _track_resolution(pt, eta, species) -> np.ndarray:
    """Relative pT resolution of each track, by species and |η| region, capped at 1 as Delphes does."""
    region = np.searchsorted([0.5, 1.5], np.abs(eta))
    res = np.zeros(len(pt))
    for name, terms in CARD["track_res"].items():
        a, b = np.array(terms).T
        res = np.where(species == name, np.hypot(a[region], b[region] * pt), res)
    return np.minimum(res, 1.0)


def simulate(batch: list[tuple[np.ndarray, np.ndarray]], rng: np.random.Generator,
             fake_leptons: bool = False) -> dict[str, ak.Array]:
    """Delphes-named jagged arrays (``EFlowTrack.PT`` …) for a batch of ``(particles, b hadrons)``;
    ``fake_leptons``: the leading central jet of each event is reconstructed as an electron or a muon."""
    counts = np.array([len(p) for p, _ in batch])
    table = np.concatenate([p for p, _ in batch])
    evt = np.repeat(np.arange(len(batch)), counts)
    pid, px, py, pz, e, charge, x, y, z = table.T
    aid = np.abs(pid).astype(np.int64)
    pt, eta, phi = np.hypot(px, py), _eta(px, py, pz), np.arctan2(py, px)
    charged = charge != 0
    n = len(batch)
    out: dict[str, ak.Array] = {}

    # Tracks: efficiency and pT resolution inside the tracker. Delphes evaluates both at the η where the
    # particle reaches the calorimeter, so a soft track that curls up and leaves through an endcap
    # beyond |η| 2.5 is lost: most tracks below ≈ 0.7 GeV in the barrel (measured on the real samples).
    arrive_eta, arrive_phi = calorimeter.position(pt, pz, eta, phi, charge)
    in_tracker = charged & (np.abs(arrive_eta) < CARD["tracker_eta"]) & (pt > CARD["track_pt_min"])
    species = np.select([aid == 11, aid == 13], ["electron", "muon"], "hadron")
    tracked = in_tracker & (rng.random(len(pt)) < _track_efficiency(pt, arrive_eta, species))
    res = _track_resolution(pt, arrive_eta, species)
    track_pt = calorimeter.log_normal(pt, pt * res, rng)
    track_e = np.sqrt((track_pt * np.cosh(eta)) ** 2 + np.maximum(e ** 2 - (pt * np.cosh(eta)) ** 2, 0.0))

    # Calorimeter towers, and the particle flow built from them and the tracks (calorimeter.py).
    reached, scale, towers = calorimeter.particle_flow(evt, e, aid, arrive_eta, arrive_phi, tracked, track_e, res, rng)
    t = np.flatnonzero(tracked & reached)
    track_pt = track_pt * scale

    # Leptons: generator e/μ after efficiency, with track (μ) or ECAL (e) resolution.
    leptons = {}
    e_em = calorimeter.log_normal(e, calorimeter.sigma("ecal", e, eta), rng)
    for name, code, eff, eta_max, smeared in (
        ("Electron", 11, CARD["electron_eff"], CARD["tracker_eta"], e_em / np.cosh(eta)),
        ("Muon", 13, CARD["muon_eff"], CARD["muon_eta"], track_pt),
    ):
        ok = (aid == code) & (pt > CARD["lepton_pt_min"]) & (np.abs(eta) < eta_max)
        ok &= rng.random(len(pt)) < _by_eta(eta, *eff)
        i = np.flatnonzero(ok)
        leptons[name] = [evt[i], smeared[i], eta[i], phi[i], charge[i]]

    # The particle flow: MET from all of it, anti-kT jets b-tagged by matching b hadrons.
    (g_evt, g_et, g_eta, g_phi), (h_evt, h_et, h_eta, h_phi) = towers["ecal"], towers["hcal"]
    flow_evt = np.concatenate([evt[t], g_evt, h_evt])
    flow_pt = np.concatenate([track_pt[t], g_et, h_et])
    flow_eta, flow_phi = np.concatenate([eta[t], g_eta, h_eta]), np.concatenate([phi[t], g_phi, h_phi])
    fpx, fpy = flow_pt * np.cos(flow_phi), flow_pt * np.sin(flow_phi)
    mex = -np.bincount(flow_evt, weights=fpx, minlength=n)
    mey = -np.bincount(flow_evt, weights=fpy, minlength=n)
    out |= _collection("MissingET", np.arange(n), n, MET=np.hypot(mex, mey), Eta=np.zeros(n), Phi=np.arctan2(mey, mex))
    jets = _jets(flow_evt, flow_pt, flow_eta, flow_phi, [bh for _, bh in batch], n, rng)

    kept = np.ones(len(flow_evt), dtype=bool)
    if fake_leptons:
        kept, jets, fakes = _fake_lepton(flow_evt, flow_pt, flow_eta, flow_phi, jets, n, rng)
        for name, fake in fakes.items():
            leptons[name] = [np.concatenate([a, b]) for a, b in zip(leptons[name], fake)]
    kt, kg, kh = np.split(kept, np.cumsum([len(t), len(g_evt)]))
    t = t[kt]
    out |= _collection("EFlowTrack", evt[t], n, PT=track_pt[t], Eta=eta[t], Phi=phi[t], PID=pid[t].astype(np.int32),
                       Charge=charge[t].astype(np.int32), X=x[t], Y=y[t], Z=z[t])
    out |= _collection("EFlowPhoton", g_evt[kg], n, ET=g_et[kg], Eta=g_eta[kg], Phi=g_phi[kg])
    out |= _collection("EFlowNeutralHadron", h_evt[kh], n, ET=h_et[kh], Eta=h_eta[kh], Phi=h_phi[kh])
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


def _fake_lepton(flow_evt, flow_pt, flow_eta, flow_phi, jets, n, rng):
    """The leading central jet of each event becomes an electron or a muon candidate (as often as
    real Delphes QCD events that pass the selection hold either; issue 14): the particle-flow
    entries in its core (ΔR < ``fake_core``) are absorbed into it, the rest of the jet stays, so the
    isolation computed later decides, as in a detector, whether the fake passes the selection.
    Returns the particle-flow entries kept, the jets left and the fakes per lepton collection."""
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
    muon = rng.random(len(lead)) < CARD["fake_muon_share"]
    rest = np.ones(len(jpt), dtype=bool)
    rest[lead] = False
    return ~core, tuple(a[rest] for a in jets), {"Electron": [a[~muon] for a in fake], "Muon": [a[muon] for a in fake]}


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
    p_tag = _btag_probability(jpt, matched) * (np.abs(jeta) < CARD["btag_eta"])
    btag = (rng.random(len(jpt)) < p_tag).astype(np.uint32)
    order = np.lexsort((-jpt, jevt))  # Delphes sorts jets by decreasing pT
    return jevt[order], jpt[order], jeta[order], jphi[order], btag[order]


def _btag_probability(pt: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The card's b-tag efficiency (b jets: 0.55 at 30 GeV, 0.72 at 100-200) and light mistag rate
    (0.01 + 3.8e-5·pT); c jets are not told apart and get the light rate, not the card's ≈ 0.15."""
    return np.where(b, 0.85 * np.tanh(0.0025 * pt) * 25.0 / (1 + 0.063 * pt), 0.01 + 3.8e-5 * pt)


def _collection(name: str, evt: np.ndarray, n: int, **fields: np.ndarray) -> dict[str, ak.Array]:
    """Jagged arrays per event (entries in ``evt`` order within each event), named ``name.field``."""
    order = np.argsort(evt, kind="stable")
    counts = np.bincount(evt, minlength=n)
    dtype = {np.dtype(np.float64): np.float32}
    return {f"{name}.{k}": ak.unflatten(v[order].astype(dtype.get(v.dtype, v.dtype)), counts) for k, v in fields.items()}
