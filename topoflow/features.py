"""Event selection, the 14 high-level features and the particle list, vectorised over whole batches.

Definitions follow SPEC.md with the original pipeline's defects corrected (see the README):
the selected lepton is the isolated e/μ with the highest pT; Δφ wraps into [-π, π); MT has its
square root; a particle's isolation sums the *other* particles of a map in the cone (it never
counts itself, and the lepton never counts its own track); particle rows are sorted by decreasing
ΔR to the lepton with the lepton last, and stored without padding.

Everything works on flat numpy arrays with an event index per particle: no Python loop runs per
event or per particle.
"""

from __future__ import annotations

from dataclasses import dataclass

import awkward as ak
import numpy as np

# Cuts of SPEC.md.
TRACK_PT_MIN = 0.5
TOWER_ET_MIN = 1.0  # photons and neutral hadrons
LEPTON_PT_MIN = 23.0
ISO_CONE = 0.3
ISO_MAX = 0.45
OWN_TRACK_DR = 1e-4
JET_PT_MIN, JET_ETA_MAX = 30.0, 2.6
MAX_TRACKS, MAX_PHOTONS, MAX_NEUTRALS = 450, 150, 200

HLF_NAMES = (
    "HT", "MET", "phiMET", "MT", "nJets", "nBjets", "lepPT", "lepEta", "lepPhi",
    "lepIsoCh", "lepIsoGamma", "lepIsoNeu", "lepCharge", "isEle",
)
PARTICLE_NAMES = (
    "Energy", "Px", "Py", "Pz", "Pt", "Eta", "Phi", "vtxX", "vtxY", "vtxZ",
    "ChPFIso", "GammaPFIso", "NeuPFIso", "isChHad", "isNeuHad", "isGamma", "isEle", "isMu", "Charge",
)
#: Leaves read from each collection of a Delphes file (only these are read: real files hold ~80 KB/event in all).
FIELDS = {
    "EFlowTrack": ("PT", "Eta", "Phi", "X", "Y", "Z"),
    "EFlowPhoton": ("ET", "Eta", "Phi"),
    "EFlowNeutralHadron": ("ET", "Eta", "Phi"),
    "Electron": ("PT", "Eta", "Phi", "Charge"),
    "Muon": ("PT", "Eta", "Phi", "Charge"),
    "Jet": ("PT", "Eta", "BTag"),
    "MissingET": ("MET", "Phi"),
}
#: What :func:`compute` takes: those, and each track's charge (a leaf, or from its PID in older files).
INPUT_FIELDS = FIELDS | {"EFlowTrack": (*FIELDS["EFlowTrack"], "Charge")}
_PAIR_CHUNK = 4_000_000  # candidate pairs handled at once: bounds memory for crowded events


@dataclass
class Features:
    """Selected events of one batch: ``events`` indexes the batch; ``particles`` holds the rows of
    all selected events back to back, ``counts`` of them per event."""

    events: np.ndarray  # (n,) int64
    hlf: np.ndarray  # (n, 14) float64
    particles: np.ndarray  # (sum(counts), 19) float64
    counts: np.ndarray  # (n,) int64


@dataclass
class _Flat:
    """One collection flattened: a value array per field plus the event index of each entry."""

    evt: np.ndarray
    cols: dict[str, np.ndarray]

    def __getitem__(self, name: str) -> np.ndarray:
        return self.cols[name]

    def take(self, idx: np.ndarray) -> _Flat:
        return _Flat(self.evt[idx], {k: v[idx] for k, v in self.cols.items()})


@dataclass
class Jagged:
    """One branch of a batch of events: the values of all events back to back, and each event's count."""

    values: np.ndarray
    counts: np.ndarray

    def __len__(self) -> int:
        return len(self.counts)


Branches = dict[str, Jagged]


def jagged(arrays: dict[str, ak.Array | Jagged]) -> Branches:
    """The branches as :class:`Jagged` numpy arrays: awkward arrays (as uproot reads them) are converted
    once here, since awkward's per-call overhead would dominate small batches (a served event)."""
    out = {}
    for name, arr in arrays.items():
        if not isinstance(arr, Jagged):
            flat = arr.ndim == 1
            arr = Jagged(ak.to_numpy(arr if flat else ak.flatten(arr)),
                         np.ones(len(arr), dtype=np.int64) if flat else ak.to_numpy(ak.num(arr)))
        out[name] = arr
    return out


def _flatten(arrays: Branches, collection: str, fields: tuple[str, ...]) -> _Flat:
    counts = arrays[f"{collection}.{fields[0]}"].counts
    evt = np.repeat(np.arange(len(counts)), counts)
    return _Flat(evt, {f: arrays[f"{collection}.{f}"].values.astype(np.float64) for f in fields})


class EventError(ValueError):
    """An event whose values cannot give features (NaN, no MissingET entry); ``index`` in the batch."""

    def __init__(self, problem: str, index: int):
        self.problem, self.index = problem, index
        super().__init__(f"{problem} (event {index} of the batch)")


def check_finite(arrays: dict[str, ak.Array | Jagged]) -> None:
    """Raise :class:`EventError` for the first event holding NaN or infinity in any branch."""
    for name, arr in jagged(arrays).items():
        counts, flat = arr.counts, arr.values
        if flat.dtype.kind == "f":
            bad = np.flatnonzero(~np.isfinite(flat))
            if len(bad):
                event = int(np.searchsorted(np.cumsum(counts), bad[0], side="right"))
                raise EventError(f"non-finite value {flat[bad[0]]!r} in branch {name!r}", event)


def delta_phi(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a − b wrapped into [-π, π), for angles in [-π, π] (ROOT's convention for φ)."""
    d = np.subtract(a, b, dtype=np.float64)
    d[d >= np.pi] -= 2 * np.pi
    d[d < -np.pi] += 2 * np.pi
    return d


def _group_order(group: np.ndarray, key: np.ndarray) -> np.ndarray:
    """Indices sorting by ``group`` (a non-negative integer) then increasing ``key``, in one sort."""
    if len(key) == 0:
        return np.zeros(0, dtype=np.int64)
    lo, width = key.min(), np.ptp(key) + 1.0
    return np.argsort(group * width + (key - lo), kind="stable")


@dataclass
class _Map:
    """The isolation maps of a batch (tracks, photons, neutral hadrons) in one array, sorted by
    event then η, so that one binary search finds every query's neighbours in all three."""

    evt: np.ndarray
    eta: np.ndarray
    phi: np.ndarray
    weight: np.ndarray  # PT for tracks, ET for photons and neutral hadrons
    kind: np.ndarray  # 0 track, 1 photon, 2 neutral hadron
    keys: np.ndarray  # event * span + η: sorted
    span: float
    position: np.ndarray  # combined index (tracks, photons, neutrals back to back) → sorted index

    @classmethod
    def build(cls, parts: list[tuple[_Flat, str]]) -> _Map:
        evt = np.concatenate([m.evt for m, _ in parts])
        eta = np.concatenate([m["Eta"] for m, _ in parts])
        span = 2 * (np.abs(eta).max() if len(eta) else 0) + 2 * ISO_CONE + 1
        order = _group_order(evt, eta)
        position = np.empty(len(order), dtype=np.int64)
        position[order] = np.arange(len(order))
        kind = np.repeat(np.arange(len(parts)), [len(m.evt) for m, _ in parts])
        return cls(evt[order], eta[order], np.concatenate([m["Phi"] for m, _ in parts])[order],
                   np.concatenate([m[w] for m, w in parts])[order], kind[order],
                   evt[order] * span + eta[order], span, position)


def cone_sums(
    q_evt: np.ndarray, q_eta: np.ndarray, q_phi: np.ndarray, m: _Map,
    self_index: np.ndarray | None = None, own_track_dr: float = 0.0,
) -> np.ndarray:
    """(n queries, 3): for each query, the summed weight of the tracks, photons and neutral hadrons
    of its event with ΔR < 0.3, leaving out map entry ``self_index[q]`` (the query itself, as a
    sorted map index) and tracks closer than ``own_track_dr`` (a lepton's own track).

    Candidates come from a binary search in η inside each event, so the work grows with the
    particles near each query, not with all pairs of the event.
    """
    out = np.zeros(3 * len(q_evt))
    if len(q_evt) == 0 or len(m.evt) == 0:
        return out.reshape(-1, 3)
    q_key = q_evt * m.span + q_eta
    lo = np.searchsorted(m.keys, q_key - ISO_CONE, side="left")
    n = np.searchsorted(m.keys, q_key + ISO_CONE, side="right") - lo
    ends = np.cumsum(n)
    start_q = 0
    while start_q < len(q_evt):  # chunks of bounded candidate-pair count
        base = ends[start_q - 1] if start_q else 0
        stop_q = max(int(np.searchsorted(ends, base + _PAIR_CHUNK, side="right")), start_q + 1)
        cnt = n[start_q:stop_q]
        pq = np.repeat(np.arange(start_q, stop_q), cnt)
        pm = lo[pq] + np.arange(len(pq)) - np.repeat(ends[start_q:stop_q] - cnt - base, cnt)
        dr2 = (q_eta[pq] - m.eta[pm]) ** 2 + delta_phi(q_phi[pq], m.phi[pm]) ** 2
        keep = (dr2 < ISO_CONE**2) & (m.evt[pm] == q_evt[pq])
        if own_track_dr > 0:
            keep &= (dr2 >= own_track_dr**2) | (m.kind[pm] != 0)
        if self_index is not None:
            keep &= pm != self_index[pq]
        pq, pm = pq[keep], pm[keep]
        out += np.bincount(3 * pq + m.kind[pm], weights=m.weight[pm], minlength=len(out))
        start_q = stop_q
    return out.reshape(-1, 3)


def _rank_in_event(evt: np.ndarray, key: np.ndarray) -> np.ndarray:
    """Rank of each entry within its event by decreasing ``key`` (0 = largest)."""
    order = _group_order(evt, -key)
    sorted_evt = evt[order]
    rank = np.empty(len(evt), dtype=np.int64)
    rank[order] = np.arange(len(evt)) - np.searchsorted(sorted_evt, sorted_evt, side="left")
    return rank


def compute(arrays: dict[str, ak.Array | Jagged]) -> Features:
    """Select events with an isolated lepton and build their features (SPEC.md)."""
    arrays = jagged(arrays)
    n_events = len(arrays["MissingET.MET"])
    tracks = _flatten(arrays, "EFlowTrack", ("PT", "Eta", "Phi", "X", "Y", "Z", "Charge"))
    photons = _flatten(arrays, "EFlowPhoton", ("ET", "Eta", "Phi"))
    neutrals = _flatten(arrays, "EFlowNeutralHadron", ("ET", "Eta", "Phi"))
    tracks = tracks.take(np.flatnonzero(tracks["PT"] > TRACK_PT_MIN))
    photons = photons.take(np.flatnonzero(photons["ET"] > TOWER_ET_MIN))
    neutrals = neutrals.take(np.flatnonzero(neutrals["ET"] > TOWER_ET_MIN))
    maps = ((tracks, "PT"), (photons, "ET"), (neutrals, "ET"))
    iso_map = _Map.build(list(maps))
    first_index = np.cumsum([0] + [len(m.evt) for m, _ in maps])  # of each map in the combined one

    # Lepton candidates and their isolation.
    fields = ("PT", "Eta", "Phi", "Charge")
    ele, mu = _flatten(arrays, "Electron", fields), _flatten(arrays, "Muon", fields)
    ele, mu = ele.take(np.flatnonzero(ele["PT"] > LEPTON_PT_MIN)), mu.take(np.flatnonzero(mu["PT"] > LEPTON_PT_MIN))
    lep = _Flat(
        np.concatenate([ele.evt, mu.evt]),
        {f: np.concatenate([ele[f], mu[f]]) for f in fields} | {"isEle": np.repeat([1.0, 0.0], [len(ele.evt), len(mu.evt)])},
    )
    lep_iso = cone_sums(lep.evt, lep["Eta"], lep["Phi"], iso_map, own_track_dr=OWN_TRACK_DR) / lep["PT"][:, None]
    isolated = np.flatnonzero(lep_iso.sum(axis=1) < ISO_MAX)
    best = isolated[np.lexsort((lep["isEle"][isolated] == 0, -lep["PT"][isolated], lep.evt[isolated]))]
    events, first = np.unique(lep.evt[best], return_index=True)
    chosen = best[first]
    lep, lep_iso = lep.take(chosen), lep_iso[chosen]
    n_sel = len(events)
    slot = np.full(n_events, -1)
    slot[events] = np.arange(n_sel)

    hlf = _high_level(arrays, events, lep, lep_iso, n_events)

    # Particle rows: the lepton, then the capped tracks, photons and neutral hadrons.
    lepton_rows = _rows(slot[lep.evt], lep["PT"], lep["Eta"], lep["Phi"], lep_iso, None, lep)
    blocks = [(lepton_rows, np.full(n_sel, -1.0))]
    for i, (kind, (m, w), cap) in enumerate(zip(("track", "photon", "neutral"), maps, (MAX_TRACKS, MAX_PHOTONS, MAX_NEUTRALS))):
        in_sel = np.flatnonzero(slot[m.evt] >= 0)
        s = slot[m.evt[in_sel]]
        dr = np.hypot(m["Eta"][in_sel] - lep["Eta"][s], delta_phi(m["Phi"][in_sel], lep["Phi"][s]))
        if kind == "track":  # the lepton's own track is the lepton row already
            own = dr < OWN_TRACK_DR
            in_sel, s, dr = in_sel[~own], s[~own], dr[~own]
        keep = _rank_in_event(s, m[w][in_sel]) < cap
        idx, s, dr = in_sel[keep], s[keep], dr[keep]
        me = iso_map.position[first_index[i] + idx]
        iso = cone_sums(m.evt[idx], m["Eta"][idx], m["Phi"][idx], iso_map, self_index=me) / m[w][idx][:, None]
        blocks.append((_rows(s, m[w][idx], m["Eta"][idx], m["Phi"][idx], iso, kind, m.take(idx)), dr))

    rows = np.concatenate([b[0][1] for b in blocks])
    owner = np.concatenate([b[0][0] for b in blocks])
    dr = np.concatenate([b[1] for b in blocks])
    order = _group_order(owner, -dr)  # by event, then decreasing ΔR (stable); the lepton (ΔR -1) last
    counts = np.bincount(owner, minlength=n_sel)
    return Features(events=events, hlf=hlf, particles=rows[order], counts=counts)


def _high_level(arrays, events, lep: _Flat, lep_iso: np.ndarray, n_events: int) -> np.ndarray:
    jets = _flatten(arrays, "Jet", ("PT", "Eta"))
    btag = arrays["Jet.BTag"].values.astype(np.int64) & 1
    good = (jets["PT"] > JET_PT_MIN) & (np.abs(jets["Eta"]) < JET_ETA_MAX)
    ht = np.bincount(jets.evt[good], weights=jets["PT"][good], minlength=n_events)[events]
    n_jets = np.bincount(jets.evt[good], minlength=n_events)[events]
    n_b = np.bincount(jets.evt[good & (btag == 1)], minlength=n_events)[events]
    met_counts = arrays["MissingET.MET"].counts
    no_met = np.flatnonzero(met_counts[events] == 0)
    if len(no_met):
        raise EventError("no MissingET entry", int(events[no_met[0]]))
    first = (np.cumsum(met_counts) - met_counts)[events]  # the first MissingET entry of each event
    met = arrays["MissingET.MET"].values[first].astype(np.float64)
    met_phi = arrays["MissingET.Phi"].values[first].astype(np.float64)
    mt = np.sqrt(2 * met * lep["PT"] * (1 - np.cos(delta_phi(lep["Phi"], met_phi))))
    return np.column_stack([
        ht, met, met_phi, mt, n_jets, n_b, lep["PT"], lep["Eta"], lep["Phi"],
        lep_iso[:, 0], lep_iso[:, 1], lep_iso[:, 2], lep["Charge"], lep["isEle"],
    ])


def _rows(slot, pt, eta, phi, iso, kind, src: _Flat) -> tuple[np.ndarray, np.ndarray]:
    """The 19-feature rows of one particle type (massless four-vectors) and their event slots."""
    n = len(slot)
    rows = np.zeros((n, 19))
    rows[:, 0] = pt * np.cosh(eta)
    rows[:, 1], rows[:, 2], rows[:, 3] = pt * np.cos(phi), pt * np.sin(phi), pt * np.sinh(eta)
    rows[:, 4], rows[:, 5], rows[:, 6] = pt, eta, phi
    rows[:, 10:13] = iso
    if kind is None:  # the selected lepton
        rows[:, 16], rows[:, 17], rows[:, 18] = src["isEle"], 1 - src["isEle"], src["Charge"]
    elif kind == "track":
        rows[:, 7], rows[:, 8], rows[:, 9] = src["X"], src["Y"], src["Z"]
        rows[:, 13], rows[:, 18] = 1.0, src["Charge"]
    else:
        rows[:, 14 if kind == "neutral" else 15] = 1.0
    return slot, rows
