"""How well a score separates out-of-distribution inputs from in-distribution ones (docs/ood.md).

The OOD inputs are the positive class and a higher score means "more OOD" (vqprior.evaluation.scoring). Computed
here with numpy alone:

- AUROC: the probability that a random OOD input scores above a random in-distribution one, ties counted 1/2 (the
  Mann-Whitney U statistic over n_in * n_out). 0.5 is chance; below 0.5 the score ranks the wrong way round.
- AUPR: average precision with OOD positive, over the distinct thresholds (tied scores enter together).
- FPR at 95% TPR: the fraction of in-distribution inputs flagged at the highest threshold that still flags 95% of
  the OOD inputs (threshold = the ceil(0.95 n_out)-th highest OOD score; flagged = score >= threshold).
"""
from __future__ import annotations

import math

import numpy as np

from vqprior.errors import UserError


def _check(inside, outside) -> tuple[np.ndarray, np.ndarray]:
    inside, outside = np.asarray(inside, dtype=np.float64), np.asarray(outside, dtype=np.float64)
    if not len(inside) or not len(outside):
        raise UserError("both the in-distribution and the OOD scores need at least one image")
    if not (np.isfinite(inside).all() and np.isfinite(outside).all()):
        raise UserError("scores must be finite numbers")
    return inside, outside


def auroc(inside, outside) -> float:
    """P(OOD score > in-distribution score) + P(equal) / 2, from average ranks."""
    inside, outside = _check(inside, outside)
    both = np.concatenate([inside, outside])
    order = np.argsort(both, kind="mergesort")
    ranks = np.empty(len(both), dtype=np.float64)
    sorted_scores = both[order]
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_scores)) + 1]
    ends = np.r_[starts[1:], len(both)]
    for s, e in zip(starts, ends):  # tied scores share the mean of their 1-based ranks
        ranks[order[s:e]] = (s + 1 + e) / 2.0
    n_in, n_out = len(inside), len(outside)
    u = ranks[n_in:].sum() - n_out * (n_out + 1) / 2.0
    return float(u / (n_in * n_out))


def aupr(inside, outside) -> float:
    """Average precision of the OOD class: sum over distinct thresholds of (recall step) x precision."""
    inside, outside = _check(inside, outside)
    scores = np.concatenate([inside, outside])
    positive = np.r_[np.zeros(len(inside)), np.ones(len(outside))]
    order = np.argsort(-scores, kind="mergesort")
    scores, positive = scores[order], positive[order]
    last = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1]  # the last index of each group of ties
    true_pos = np.cumsum(positive)[last]
    precision = true_pos / (last + 1)
    recall = true_pos / len(outside)
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def fpr_at_tpr(inside, outside, tpr: float = 0.95) -> float:
    """The in-distribution fraction scoring >= the threshold that flags ``tpr`` of the OOD inputs."""
    inside, outside = _check(inside, outside)
    k = max(1, math.ceil(tpr * len(outside)))
    threshold = np.sort(outside)[::-1][k - 1]
    return float(np.mean(inside >= threshold))


def separation(inside: dict[str, np.ndarray], outside: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """AUROC, AUPR and FPR at 95% TPR of every score column the two score tables share (in their order)."""
    names = [name for name in inside if name in outside]
    if not names:
        raise UserError("the two score tables share no score column")
    return {name: {"auroc": auroc(inside[name], outside[name]), "aupr": aupr(inside[name], outside[name]),
                   "fpr95": fpr_at_tpr(inside[name], outside[name]), "mean_in": float(np.mean(inside[name])),
                   "mean_out": float(np.mean(outside[name]))} for name in names}


def draw_histogram(path, name: str, inside, outside, labels: tuple[str, str], metrics: dict[str, float]) -> None:
    """One PNG: the two score distributions over shared bins, each normalised to its own count, AUROC in the title.
    matplotlib is an optional dependency (``pip install 'vqprior[plot]'``)."""
    try:
        from matplotlib.figure import Figure  # no pyplot: no process-wide backend or figure registry touched
    except ImportError:
        raise UserError("histograms need matplotlib: pip install 'vqprior[plot]'") from None
    from vqprior.io import atomic_write

    inside, outside = _check(inside, outside)
    both = np.concatenate([inside, outside])
    low, high = np.percentile(both, [0.5, 99.5])
    bins = np.linspace(low, high if high > low else low + 1.0, 61)
    fig = Figure(figsize=(6, 3.6), layout="constrained")
    ax = fig.subplots()
    for values, label in ((inside, labels[0]), (outside, labels[1])):
        ax.hist(np.clip(values, bins[0], bins[-1]), bins=bins, alpha=0.55, label=f"{label} ({len(values)})",
                weights=np.full(len(values), 1.0 / len(values)))
    ax.set_xlabel(name)
    ax.set_ylabel("fraction of images")
    ax.set_title(f"{name}: AUROC {metrics['auroc']:.3f}, AUPR {metrics['aupr']:.3f}, "
                 f"FPR@95%TPR {metrics['fpr95']:.3f}", fontsize=9)
    ax.legend(fontsize=8)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
