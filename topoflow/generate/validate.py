"""Validation of generated events against real Delphes events, per class, on the events topoflow's
selection keeps (an isolated lepton): one PNG of distributions per class, and one table of means
with standard errors and a two-sample Kolmogorov–Smirnov test per observable (Markdown and JSON).

The real reference is any folder of Delphes files named ``<class>_*.root`` (e.g. the shared CMS
samples); distributions are normalised to unit area, so samples of different size compare. Every
value comes from topoflow's own feature code (:func:`topoflow.features.compute`), so the plots
and the table show what ingestion would store.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from topoflow import CLASS_TITLES, CLASSES, delphes, features, storage
from topoflow.config import StorageConfig

#: name → (table name, axis label, bins); all per selected event
OBSERVABLES = {
    "n_jets": ("nJets", "jets (pT > 30 GeV, |η| < 2.6)", np.arange(-0.5, 10.5, 1)),
    "n_bjets": ("nBjets", "b-tagged jets (pT > 30 GeV, |η| < 2.6)", np.arange(-0.5, 5.5, 1)),
    "jet_pt": ("leading jet pT [GeV]", "leading jet pT [GeV]", np.linspace(0, 400, 21)),
    "ht": ("HT [GeV]", "HT (jets pT > 30 GeV, |η| < 2.6) [GeV]", np.linspace(0, 1000, 21)),
    "met": ("MET [GeV]", "missing ET [GeV]", np.linspace(0, 250, 21)),
    "mt": ("MT [GeV]", "MT(lepton, MET) [GeV]", np.linspace(0, 200, 21)),
    "lepton_pt": ("lepton pT [GeV]", "selected lepton pT [GeV]", np.linspace(0, 200, 21)),
    "lepton_iso": ("lepton isolation", "selected lepton isolation (sum)", np.linspace(0, 0.45, 16)),
    "lepton_muon": ("lepton is a muon", "selected lepton: 0 electron, 1 muon", np.array([-0.5, 0.5, 1.5])),
    "n_tracks": ("tracks", "tracks (pT > 0.5 GeV, as ingested)", np.arange(0, 301, 15)),
    "n_photons": ("photons", "photons (ET > 1 GeV, as ingested)", np.arange(0, 151, 7.5)),
    "n_neutrals": ("neutral hadrons", "neutral hadrons (ET > 1 GeV, as ingested)", np.arange(0, 151, 7.5)),
    "n_particles": ("particles (total)", "particles as ingested (lepton included)", np.arange(0, 601, 30)),
}
P_FLAG = 0.01  # a distribution whose KS p-value is below this is flagged
TEST = "two-sample Kolmogorov-Smirnov, asymptotic p-value (conservative for integer counts)"


def observables(urls: list[str], cfg: StorageConfig) -> dict[str, np.ndarray]:
    """Per selected event, the values of :data:`OBSERVABLES`."""
    import awkward as ak

    out: dict[str, list] = {k: [] for k in OBSERVABLES}
    for url in urls:
        info = delphes.probe(url, cfg)
        for _, a in delphes.read_batches(info, cfg, 0, info.entries, 2000):
            f = features.compute(a)
            owner = np.repeat(np.arange(len(f.events)), f.counts)  # selected event of each particle row
            jets = a["Jet.PT"][f.events]
            out["jet_pt"].append(ak.to_numpy(ak.fill_none(ak.max(jets, axis=1), 0)))
            for name, col in (("ht", 0), ("met", 1), ("mt", 3), ("n_jets", 4), ("n_bjets", 5), ("lepton_pt", 6)):
                out[name].append(f.hlf[:, col])
            out["lepton_iso"].append(f.hlf[:, 9:12].sum(axis=1))
            out["lepton_muon"].append(1 - f.hlf[:, features.HLF_NAMES.index("isEle")])
            for name, col in (("n_tracks", 13), ("n_neutrals", 14), ("n_photons", 15)):  # isChHad, isNeuHad, isGamma
                out[name].append(np.bincount(owner, weights=f.particles[:, col], minlength=len(f.events)))
            out["n_particles"].append(f.counts.astype(np.float64))
    return {k: np.concatenate(v) if v else np.zeros(0) for k, v in out.items()}


def validate(generated: str, reference: str, out_dir: Path, cfg: StorageConfig) -> tuple[list[Path], str]:
    """For every class present in both folders, write ``validation_<class>.png``; write the tables of
    all classes to ``validation.md`` and ``validation.json``. Returns the files and the Markdown."""
    written, tables, text = [], {}, []
    for c in CLASSES:
        gen_urls = storage.expand(storage.join(generated, f"{c}_*.root"), cfg, missing_ok=True)
        ref_urls = storage.expand(storage.join(reference, f"{c}_*.root"), cfg, missing_ok=True)
        if not gen_urls or not ref_urls:  # a class missing on one side: nothing to compare
            continue
        gen, ref = observables(gen_urls, cfg), observables(ref_urls, cfg)
        written.append(_plot(c, gen, ref, out_dir))
        tables[c] = compare(gen, ref)
        text.append(markdown(c, tables[c]))
    text.append(f"Δ/σ: (generated − real) / √(SE_gen² + SE_real²), SE the standard error of the mean; "
                f"p: {TEST}; ✗: p < {P_FLAG}.\n")
    md = "\n".join(text)
    (out_dir / "validation.md").write_text(md)
    (out_dir / "validation.json").write_text(json.dumps({"test": TEST, "classes": tables}, indent=1))
    return [*written, out_dir / "validation.md", out_dir / "validation.json"], md


def compare(gen: dict[str, np.ndarray], ref: dict[str, np.ndarray]) -> dict:
    """Per observable: mean, standard error and size of each sample, their difference in standard
    errors, and the KS statistic with its p-value; JSON-ready, with None where a value is undefined
    (an empty sample, a single event)."""
    rows = {}
    for name in OBSERVABLES:
        g, r = _mean_se(gen[name]), _mean_se(ref[name])
        d, p = ks_2samp(gen[name], ref[name])
        sigma = math.hypot(g["se"], r["se"]) if g["se"] is not None and r["se"] is not None else 0.0
        pull = (g["mean"] - r["mean"]) / sigma if sigma > 0 else None  # None: no spread to compare with
        rows[name] = {"generated": g, "real": r, "pull": pull, "ks_d": d, "p": p}
    return rows


def _mean_se(v: np.ndarray) -> dict:
    n = len(v)
    return {"n": n, "mean": float(v.mean()) if n else None,
            "se": float(v.std(ddof=1) / math.sqrt(n)) if n > 1 else None}


def ks_2samp(a: np.ndarray, b: np.ndarray) -> tuple[float | None, float | None]:
    """Kolmogorov–Smirnov statistic D = max |F_a − F_b| and its asymptotic p-value with Stephens'
    finite-size correction (Numerical Recipes' ``kstwo``): numpy suffices, no scipy needed.
    (None, None) when a sample is empty."""
    if len(a) == 0 or len(b) == 0:
        return None, None
    a, b = np.sort(a), np.sort(b)
    x = np.concatenate([a, b])
    d = float(np.max(np.abs(np.searchsorted(a, x, "right") / len(a) - np.searchsorted(b, x, "right") / len(b))))
    n = math.sqrt(len(a) * len(b) / (len(a) + len(b)))
    return d, kolmogorov_q((n + 0.12 + 0.11 / n) * d)


def kolmogorov_q(lam: float) -> float:
    """P(K > λ) for the Kolmogorov distribution: 2 Σ (−1)^(k−1) exp(−2k²λ²). Below λ = 0.27 it is 1
    to 10⁻⁹, where the series would need thousands of terms."""
    if lam < 0.27:
        return 1.0
    k = np.arange(1, 101)
    return float(np.clip(2 * np.sum((-1.0) ** (k - 1) * np.exp(-2 * k**2 * lam**2)), 0, 1))


def markdown(c: str, table: dict) -> str:
    """One class's table, columns aligned so that it reads in a terminal as well as rendered."""
    first = next(iter(table.values()))
    head = (f"### {c} ({CLASS_TITLES[c]}): {first['generated']['n']:,} generated vs "
            f"{first['real']['n']:,} real Delphes events after selection\n")
    rows = [("observable", "generated", "real", "Δ/σ", "KS D", "p", f"p<{P_FLAG}")]
    for name, t in table.items():
        p = t["p"]
        rows.append((OBSERVABLES[name][0], _pm(t["generated"]), _pm(t["real"]), _num(t["pull"], "+.1f"),
                     _num(t["ks_d"], ".2f"), _num(p, ".3f" if p is None or p >= 1e-3 else ".0e"),
                     "✗" if p is not None and p < P_FLAG else ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    def line(cells):
        return "| " + " | ".join(s.ljust(w) if i in (0, 6) else s.rjust(w)
                                 for i, (s, w) in enumerate(zip(cells, widths))) + " |"
    rule = "|" + "|".join("-" * (w + 1) + ":" if 0 < i < 6 else ":" + "-" * (w + 1)
                          for i, w in enumerate(widths)) + "|"
    return "\n".join([head, line(rows[0]), rule, *map(line, rows[1:])]) + "\n"


def _pm(s: dict) -> str:
    """``mean ± SE`` with the SE to two significant digits and the mean to the same decimal."""
    if s["mean"] is None:
        return "–"
    if s["se"] is None or s["se"] == 0:
        return f"{s['mean']:.3g}"
    decimals = max(0, 1 - math.floor(math.log10(s["se"])))
    return f"{s['mean']:.{decimals}f} ± {s['se']:.{decimals}f}"


def _num(x: float | None, fmt: str) -> str:
    return "–" if x is None else format(x, fmt)


def _plot(c: str, gen: dict, ref: dict, out_dir: Path) -> Path:
    """``validation_<class>.png``: one panel per observable, real Delphes filled, generated as a
    line, unit area."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import mplhep

    with plt.style.context(mplhep.style.CMS):
        rows = -(-len(OBSERVABLES) // 4)
        fig, axes = plt.subplots(rows, 4, figsize=(26, 5.7 * rows))
        for ax in axes.flat[len(OBSERVABLES):]:
            ax.set_axis_off()
        for ax, (name, (_, label, bins)) in zip(axes.flat, OBSERVABLES.items()):
            for values, what, style in ((ref[name], "real Delphes", dict(histtype="stepfilled", alpha=0.35)),
                                        (gen[name], "topoflow generate", dict(histtype="step", lw=2))):
                if len(values):
                    ax.hist(np.clip(values, bins[0], bins[-1]), bins=bins, density=True,
                            label=f"{what} ({len(values):,})", **style)
            ax.set_xlabel(label, fontsize=18)
            ax.set_ylabel("normalised", fontsize=18)
            ax.tick_params(labelsize=13)
            ax.locator_params(axis="x", nbins=6)
            ax.legend(fontsize=14)
        note = ("QCD here: bb̄ dijets with semileptonic b decays, and jets faking an electron or a muon"
                if c == "qcd" else "")
        fig.suptitle(f"{CLASS_TITLES[c]}, selected events: generated vs real Delphes. {note}", fontsize=20)
        fig.tight_layout()
    path = out_dir / f"validation_{c}.png"
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
