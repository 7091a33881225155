"""A slow, per-event reference of SPEC.md's selection and features, in plain Python.

Written independently of ``topoflow.features`` (loops and ``math`` only, one event at a time, read
with uproot into Python lists) so that the vectorised code is checked against a second reading of
the spec, with the documented corrections: highest-pT isolated lepton, Δφ in [-π, π], MT with √,
no particle counts itself in its own isolation, the lepton's own track (ΔR < 1e-4) excluded,
the highest-pT 450/150/200 tracks/photons/neutral hadrons, rows by decreasing ΔR, lepton last.
"""

from __future__ import annotations

import math

import uproot


def _dphi(a: float, b: float) -> float:
    d = a - b
    while d > math.pi:
        d -= 2 * math.pi
    while d < -math.pi:
        d += 2 * math.pi
    return d


def _dr(eta1, phi1, eta2, phi2) -> float:
    return math.sqrt((eta1 - eta2) ** 2 + _dphi(phi1, phi2) ** 2)


def _iso(eta, phi, pt, cands, skip=None, own_track_dr=0.0) -> float:
    """Σ pT of ``cands`` (eta, phi, pt) in ΔR < 0.3, ``skip``: index to leave out, relative to pt."""
    total = 0.0
    for i, (e, p, w) in enumerate(cands):
        if i == skip:
            continue
        d = _dr(eta, phi, e, p)
        if d < 0.3 and d >= own_track_dr:
            total += w
    return total / pt


def read_events(path: str, muon: str = "Muon") -> list[dict]:
    """Every event of a Delphes file as Python lists (tracks, photons, neutrals, leptons, jets, MET)."""
    tree = uproot.open(path)["Delphes"]
    names = {
        "tracks": ("EFlowTrack", ("PT", "Eta", "Phi", "X", "Y", "Z", "Charge")),
        "photons": ("EFlowPhoton", ("ET", "Eta", "Phi")),
        "neutrals": ("EFlowNeutralHadron", ("ET", "Eta", "Phi")),
        "electrons": ("Electron", ("PT", "Eta", "Phi", "Charge")),
        "muons": (muon, ("PT", "Eta", "Phi", "Charge")),
        "jets": ("Jet", ("PT", "Eta", "BTag")),
        "met": ("MissingET", ("MET", "Phi")),
    }
    arrays = tree.arrays([f"{c}.{f}" for c, fs in names.values() for f in fs], library="np")
    events = []
    for i in range(tree.num_entries):
        ev = {}
        for key, (c, fs) in names.items():
            cols = [arrays[f"{c}.{f}"][i].tolist() for f in fs]
            ev[key] = list(zip(*cols))
        events.append(ev)
    return events


def event_features(ev: dict):
    """``None`` when the event is not selected, else ``(hlf list of 14, particle rows list)``."""
    trk_map = [(t[1], t[2], t[0]) for t in ev["tracks"] if t[0] > 0.5]
    trk_full = [t for t in ev["tracks"] if t[0] > 0.5]
    pho_map = [(p[1], p[2], p[0]) for p in ev["photons"] if p[0] > 1.0]
    neu_map = [(p[1], p[2], p[0]) for p in ev["neutrals"] if p[0] > 1.0]

    best = None
    for is_ele, coll in ((1.0, ev["electrons"]), (0.0, ev["muons"])):
        for pt, eta, phi, charge in coll:
            if pt <= 23.0:
                continue
            ch = _iso(eta, phi, pt, trk_map, own_track_dr=1e-4)
            ga = _iso(eta, phi, pt, pho_map)
            ne = _iso(eta, phi, pt, neu_map)
            if ch + ga + ne < 0.45 and (best is None or pt > best[0]):
                best = (pt, eta, phi, charge, is_ele, ch, ga, ne)
    if best is None:
        return None
    lpt, leta, lphi, lq, lele, lch, lga, lne = best

    ht, nj, nb = 0.0, 0, 0
    for pt, eta, btag in ev["jets"]:
        if pt > 30.0 and abs(eta) < 2.6:
            ht += pt
            nj += 1
            nb += int(btag) & 1
    met, met_phi = ev["met"][0]
    mt = math.sqrt(2 * met * lpt * (1 - math.cos(lphi - met_phi)))
    hlf = [ht, met, met_phi, mt, nj, nb, lpt, leta, lphi, lch, lga, lne, lq, lele]

    def row(pt, eta, phi, vtx, isos, onehot, charge):
        return [pt * math.cosh(eta), pt * math.cos(phi), pt * math.sin(phi), pt * math.sinh(eta),
                pt, eta, phi, *vtx, *isos, *onehot, charge]

    rows = []  # (ΔR to lepton, row)
    tracks = [(i, t) for i, t in enumerate(trk_full) if _dr(leta, lphi, t[1], t[2]) >= 1e-4]
    tracks = sorted(tracks, key=lambda it: -it[1][0])[:450]
    for i, (pt, eta, phi, x, y, z, q) in tracks:
        isos = (_iso(eta, phi, pt, trk_map, skip=i), _iso(eta, phi, pt, pho_map), _iso(eta, phi, pt, neu_map))
        rows.append((_dr(leta, lphi, eta, phi), row(pt, eta, phi, (x, y, z), isos, (1, 0, 0, 0, 0), q)))
    for cands, onehot, cap, own in ((pho_map, (0, 0, 1, 0, 0), 150, "pho"), (neu_map, (0, 1, 0, 0, 0), 200, "neu")):
        chosen = sorted(range(len(cands)), key=lambda j: -cands[j][2])[:cap]
        for j in chosen:
            eta, phi, et = cands[j]
            isos = (_iso(eta, phi, et, trk_map),
                    _iso(eta, phi, et, pho_map, skip=j if own == "pho" else None),
                    _iso(eta, phi, et, neu_map, skip=j if own == "neu" else None))
            rows.append((_dr(leta, lphi, eta, phi), row(et, eta, phi, (0, 0, 0), isos, onehot, 0.0)))
    rows.sort(key=lambda r: -r[0])
    lepton = row(lpt, leta, lphi, (0, 0, 0), (lch, lga, lne), (0, 0, 0, lele, 1 - lele), lq)
    return hlf, [r for _, r in rows] + [lepton]
