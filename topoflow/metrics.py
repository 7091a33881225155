"""The report's numbers, from true classes and predicted probabilities alone (no model, no
TensorFlow): the evaluation stage and its plots both use them. Per class, one against the rest: ROC
AUC with its bootstrap uncertainty; for the signals tt̄ and W+jets the efficiency at 1 % and 10 %
false-positive rate and, as Nguyen et al. highlight, the false-positive rate left at 99 % signal
efficiency. Plus accuracy, the confusion matrix, and a caution for each class with too few test
events to decide much.
"""

from __future__ import annotations

import numpy as np

from topoflow import CLASS_TITLES, CLASSES

SIGNALS = ("ttbar", "wjets")
FPR_POINTS = (0.01, 0.10)
EFFICIENCY = 0.99
MIN_TEST_EVENTS = 100  # below this, an efficiency's binomial error reaches 5 %
RESAMPLES = 200  # bootstrap resamples per AUC uncertainty


def roc_curve(is_signal: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False- and true-positive rates at every distinct score threshold, from (0, 0) to (1, 1)."""
    return roc_points(is_signal, score)[:2]


def roc_points(is_signal: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`roc_curve` with the score threshold of each point (1 for the first, which no score passes)."""
    order = np.argsort(-score, kind="stable")
    y, s = is_signal[order].astype(np.float64), score[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # last index of each distinct score
    tps, fps = np.cumsum(y)[last], np.cumsum(1 - y)[last]
    return np.r_[0.0, fps / max(fps[-1], 1)], np.r_[0.0, tps / max(tps[-1], 1)], np.r_[1.0, s[last]]


def auc_std(is_signal: np.ndarray, score: np.ndarray, resamples: int = RESAMPLES, seed: int = 0) -> float:
    """The ROC AUC's standard deviation over bootstrap resamples (signal and background each drawn
    with replacement, so every resample has both). A resample only changes how often each distinct
    score occurs, so its AUC comes from counts per score, ranked once: Σ signal × (background below
    + half the ties). Resamples go in batches of a few million draws, bounding memory."""
    _, rank = np.unique(score, return_inverse=True)
    n_ranks, rng, aucs = rank.max() + 1, np.random.default_rng(seed), []
    signal, background = rank[is_signal], rank[~is_signal]
    batch = max(1, 2**21 // len(score))

    def counts(ranks: np.ndarray, b: int) -> np.ndarray:  # (b, n_ranks): how often each score was drawn
        drawn = ranks[rng.integers(0, len(ranks), (b, len(ranks)))] + n_ranks * np.arange(b)[:, None]
        return np.bincount(drawn.ravel(), minlength=b * n_ranks).reshape(b, n_ranks)

    for start in range(0, resamples, batch):
        b = min(batch, resamples - start)
        s, bg = counts(signal, b), counts(background, b)
        pairs = np.einsum("ij,ij->i", s, np.cumsum(bg, axis=1)) - np.einsum("ij,ij->i", s, bg) / 2
        aucs.append(pairs / (len(signal) * len(background)))
    return float(np.concatenate(aucs).std())


def cautions(events_per_class: dict[str, int]) -> list[str]:
    """Classes whose test events are too few for their numbers to mean much."""
    return [f"caution: only {n} {CLASS_TITLES[c]} ({c}) events evaluated (fewer than {MIN_TEST_EVENTS}): "
            "its AUC and efficiencies are statistically weak"
            for c, n in events_per_class.items() if n < MIN_TEST_EVENTS]


def metrics(y_true: np.ndarray, prob: np.ndarray) -> dict:
    """All numbers of the report for one model: ``y_true`` class indices, ``prob`` (n, 3)."""
    pred = prob.argmax(axis=1)
    confusion = np.zeros((3, 3), dtype=np.int64)
    np.add.at(confusion, (y_true, pred), 1)
    per_class = {c: int(n) for c, n in zip(CLASSES, confusion.sum(axis=1))}
    out = {"events": int(len(y_true)), "events_per_class": per_class, "cautions": cautions(per_class),
           "accuracy": float((pred == y_true).mean()), "confusion": confusion.tolist(), "auc": {}, "auc_std": {},
           "trigger": {}}
    for k, c in enumerate(CLASSES):
        if per_class[c] in (0, len(y_true)):  # a ROC needs both signal and background
            out["auc"][c] = out["auc_std"][c] = None
            if c in SIGNALS:
                out["trigger"][c] = None
            continue
        fpr, tpr = roc_curve(y_true == k, prob[:, k])
        out["auc"][c] = float(np.trapezoid(tpr, fpr))
        out["auc_std"][c] = auc_std(y_true == k, prob[:, k])
        if c in SIGNALS:
            fpr_99 = float(np.interp(EFFICIENCY, tpr, fpr))
            out["trigger"][c] = {
                **{f"efficiency_at_fpr_{p:g}": float(np.interp(p, fpr, tpr)) for p in FPR_POINTS},
                "fpr_at_99pct_efficiency": fpr_99,
                "background_rejection_at_99pct_efficiency": 1 / fpr_99 if fpr_99 > 0 else float("inf"),
            }
    return out
