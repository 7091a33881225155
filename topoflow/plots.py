"""The evaluation plots (PNG): ROC curves per class with every model, and per model the confusion
matrix, score distributions and training curves. Classes are always named, never indexed."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from topoflow import CLASS_TITLES, CLASSES
from topoflow.metrics import roc_curve


def roc_xlim(y: np.ndarray, k: int) -> tuple[float, float]:
    """The ROC's log x-axis starts at one background event: no smaller false-positive rate is measured."""
    return 1 / max(int((y != k).sum()), 1), 1.0


def report_plots(folder: Path, results: dict[str, dict], curves: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    y_test = next(iter(curves.values()))[0]  # every model saw the same test split
    for k, c in enumerate(CLASSES):
        fig, ax = plt.subplots(figsize=(6, 5))
        for name, (y, prob) in curves.items():
            if results[name]["auc"][c] is None:
                continue
            fpr, tpr = roc_curve(y == k, prob[:, k])
            ax.plot(fpr, tpr, label=f"{name} (AUC {results[name]['auc'][c]:.4f})")
        xlim = roc_xlim(y_test, k)
        chance = np.geomspace(*xlim, 200)  # sampled densely so that the diagonal bends on the log axis
        ax.plot(chance, chance, ls=":", color="grey", label="chance")
        ax.set(xscale="log", xlim=xlim, ylim=(0, 1.01), xlabel="false-positive rate (background efficiency)",
               ylabel=f"{CLASS_TITLES[c]} efficiency", title=f"{CLASS_TITLES[c]} selector: {CLASS_TITLES[c]} vs the rest")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
        _save(fig, folder / f"roc_{c}.png")

    titles = [CLASS_TITLES[c] for c in CLASSES]
    for name, r in results.items():
        cm = np.array(r["confusion"], dtype=float)
        norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
        fig, ax = plt.subplots(figsize=(5.5, 4.5))
        im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
        for i in range(3):
            for j in range(3):
                ax.text(j, i, f"{norm[i, j]:.3f}\n({int(cm[i, j]):,})", ha="center", va="center",
                        color="white" if norm[i, j] > 0.5 else "black", fontsize=9)
        ax.set(xticks=range(3), yticks=range(3), xticklabels=titles, yticklabels=titles,
               xlabel="predicted", ylabel="true", title=f"{name}: confusion (fraction of true class)")
        fig.colorbar(im, ax=ax)
        _save(fig, folder / f"confusion_{name}.png")

        y, prob = curves[name]
        fig, axes = plt.subplots(1, 3, figsize=(14, 4))
        for k, ax in enumerate(axes):
            for t, c in enumerate(CLASSES):
                if not (y == t).any():
                    continue
                ax.hist(prob[y == t, k], bins=40, range=(0, 1), histtype="step", density=True, label=f"true {CLASS_TITLES[c]}")
            ax.set(yscale="log", xlabel=f"{CLASS_TITLES[CLASSES[k]]} score", ylabel="density")
            ax.legend(fontsize=8)
        fig.suptitle(f"{name}: score distributions")
        _save(fig, folder / f"scores_{name}.png")

        history = r.get("history") or {}
        if history:
            fig, axes = plt.subplots(1, 2, figsize=(11, 4))
            for ax, metric in zip(axes, ("loss", "accuracy")):
                for key in (metric, f"val_{metric}"):
                    if key in history:
                        ax.plot(range(1, len(history[key]) + 1), history[key], marker="o",
                                label="validation" if key.startswith("val_") else "training")
                ax.set(xlabel="epoch", ylabel=metric)
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
                ax.legend()
            fig.suptitle(f"{name}: training curves")
            _save(fig, folder / f"training_{name}.png")


def tuning_plot(path: Path, result, parameters: dict) -> None:
    """A study at a glance: the objective per trial with the best so far, every trial's objective per epoch
    (where median stopping cut trials short), and the objective against each parameter."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(result.rows, key=lambda r: r["number"])
    scored = [r for r in rows if r["state"] in ("complete", "stopped")]
    panels = 2 + len(parameters)
    cols = min(panels, 4)
    fig, axes = plt.subplots((panels + cols - 1) // cols, cols, figsize=(4.2 * cols, 3.6 * ((panels + cols - 1) // cols)),
                             squeeze=False)
    axes = axes.ravel()
    style = {"complete": dict(marker="o"), "stopped": dict(marker="o", mfc="none")}
    ax = axes[0]
    for state in ("complete", "stopped"):
        pts = [(r["number"], r["value"]) for r in scored if r["state"] == state]
        if pts:
            ax.plot(*zip(*pts), ls="none", label=state if state == "complete" else "stopped early", **style[state])
    complete = [r for r in rows if r["state"] == "complete"]
    if complete:
        pick = max if result.goal == "maximize" else min
        best, line = None, []
        for r in complete:
            best = r["value"] if best is None else pick(best, r["value"])
            line.append((r["number"], best))
        ax.step(*zip(*line), where="post", color="grey", label="best so far")
    failed = [r["number"] for r in rows if r["state"] == "failed"]
    if failed:
        ax.plot(failed, [0] * len(failed), "x", color="red", transform=ax.get_xaxis_transform(), clip_on=False,
                label="failed")
    ax.set(xlabel="trial", ylabel=result.metric, title=f"study {result.name}")
    ax.legend(fontsize=8)
    ax = axes[1]
    for r in scored:
        ax.plot(range(1, len(r["curve"]) + 1), r["curve"], ls="-" if r["state"] == "complete" else "--", alpha=0.7)
    ax.set(xlabel="epoch", ylabel=result.metric, title="per epoch (dashed: stopped early)")
    for ax, (name, p) in zip(axes[2:], parameters.items()):  # hollow: stopped early, so its value is lower
        labels = [str(v) for v in p.choices or ()]
        for state in ("complete", "stopped"):
            values = [(r["params"][name], r["value"]) for r in scored if name in r["params"] and r["state"] == state]
            x = [labels.index(str(v)) if labels else v for v, _ in values]
            ax.plot(x, [y for _, y in values], ls="none", alpha=0.7, color="C0", **style[state])
        if labels:
            ax.set_xticks(range(len(labels)), labels, rotation=30 if len(labels) > 3 else 0, fontsize=8)
        else:
            ax.set_xscale("log" if p.scale == "log" else "linear")
        ax.set(xlabel=name, ylabel=result.metric)
    for ax in axes[panels:]:
        ax.set_visible(False)
    _save(fig, path)


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
