"""Validation plots: generated events against real Delphes events, per class, for the observables
the classifiers see (multiplicities, jets, lepton, MET, MT, isolation). One PNG per class.

The real reference is any folder of Delphes files named ``<class>_*.root`` (e.g. the shared CMS
samples); distributions are normalised to unit area, so samples of different size compare.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from topoflow import CLASS_TITLES, CLASSES, delphes, features, storage
from topoflow.config import StorageConfig

#: name → (axis label, bins)
OBSERVABLES = {
    "n_tracks": ("tracks with pT > 0.5 GeV", np.arange(0, 301, 15)),
    "n_photons": ("photons with ET > 1 GeV", np.arange(0, 151, 7.5)),
    "n_neutrals": ("neutral hadrons with ET > 1 GeV", np.arange(0, 151, 7.5)),
    "n_jets": ("jets (pT > 30 GeV, |η| < 2.6)", np.arange(-0.5, 10.5, 1)),
    "jet_pt": ("leading jet pT [GeV]", np.linspace(0, 400, 21)),
    "lepton_pt": ("selected lepton pT [GeV]", np.linspace(0, 200, 21)),
    "lepton_iso": ("selected lepton isolation (sum)", np.linspace(0, 0.45, 16)),
    "met": ("missing ET [GeV]", np.linspace(0, 250, 21)),
    "mt": ("MT(lepton, MET) [GeV]", np.linspace(0, 200, 21)),
}


def observables(urls: list[str], cfg: StorageConfig) -> dict[str, np.ndarray]:
    """Per-event values of :data:`OBSERVABLES` (lepton quantities for selected events only)."""
    import awkward as ak

    out: dict[str, list] = {k: [] for k in OBSERVABLES}
    for url in urls:
        info = delphes.probe(url, cfg)
        for _, a in delphes.read_batches(info, cfg, 0, info.entries, 2000):
            out["n_tracks"].append(ak.to_numpy(ak.sum(a["EFlowTrack.PT"] > 0.5, axis=1)))
            out["n_photons"].append(ak.to_numpy(ak.sum(a["EFlowPhoton.ET"] > 1, axis=1)))
            out["n_neutrals"].append(ak.to_numpy(ak.sum(a["EFlowNeutralHadron.ET"] > 1, axis=1)))
            jets = a["Jet.PT"]
            out["jet_pt"].append(ak.to_numpy(ak.fill_none(ak.max(jets, axis=1), 0)))
            f = features.compute(a)
            out["n_jets"].append(f.hlf[:, 4])
            out["lepton_pt"].append(f.hlf[:, 6])
            out["lepton_iso"].append(f.hlf[:, 9:12].sum(axis=1))
            out["met"].append(f.hlf[:, 1])
            out["mt"].append(f.hlf[:, 3])
    return {k: np.concatenate(v) if v else np.zeros(0) for k, v in out.items()}


def validation_plots(generated: str, reference: str, out_dir: Path, cfg: StorageConfig) -> list[Path]:
    """Write ``validation_<class>.png`` for every class present in both folders."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import mplhep

    written = []
    for c in CLASSES:
        gen_urls = storage.expand(storage.join(generated, f"{c}_*.root"), cfg, missing_ok=True)
        ref_urls = storage.expand(storage.join(reference, f"{c}_*.root"), cfg, missing_ok=True)
        if not gen_urls or not ref_urls:  # a class missing on one side: nothing to compare
            continue
        gen, ref = observables(gen_urls, cfg), observables(ref_urls, cfg)
        with plt.style.context(mplhep.style.CMS):
            fig = _figure(plt, c, gen, ref)
        path = out_dir / f"validation_{c}.png"
        fig.savefig(path, dpi=80)
        plt.close(fig)
        written.append(path)
    return written


def _figure(plt, c: str, gen: dict, ref: dict):
    """The 3 × 3 grid of one class: real Delphes filled, generated as a line, unit area."""
    fig, axes = plt.subplots(3, 3, figsize=(20, 17))
    for ax, (name, (label, bins)) in zip(axes.flat, OBSERVABLES.items()):
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
    note = ("QCD here: heavy-flavour (bb̄) dijets, b hadrons decaying semileptonically (100 %)"
            if c == "qcd" else "")
    fig.suptitle(f"{CLASS_TITLES[c]}: generated vs real Delphes. {note}", fontsize=20)
    fig.tight_layout()
    return fig
