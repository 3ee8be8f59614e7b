"""Routing-quality metrics: how well a score ranks prompts for a two-model router.

Pure numpy, no I/O. A *router* here is a score per prompt; routing a share ``c`` of traffic
means sending the ``c·n`` highest-scoring prompts to the strong model and the rest to the weak
one. Definitions follow RouteLLM (Ong et al., 2024):

``quality_curve``
    q(c) = mean correctness when the top-c share goes to the strong model. Exact knots at
    c = k/n (k = 0..n), linear in between (routing a fraction of one prompt = routing it with
    that probability).
``apgr``
    average performance-gap recovered, (∫₀¹ q(c) dc - q_weak) / (q_strong - q_weak). A random
    router scores 0.5 in expectation, a perfect ("oracle") router more than 1 when the strong
    model is sometimes wrong where the weak one is right. ``apgr(s) + apgr(-s) == 1`` always.
``cpt``
    call-performance threshold: the smallest c with q(c) ≥ q_weak + x·(q_strong - q_weak).
``auroc``
    area under the ROC curve of the score for a binary label (Mann-Whitney U / n₊n₋).

Ties are handled deterministically and without favouring either side: tied scores share
their average rank in :func:`auroc` (a tie counts ½), and a block of tied prompts is routed
"evenly" in :func:`quality_curve` (each prompt in the block contributes the block's mean gain),
which is the expectation over random tie-breaking. A constant score therefore has AUROC 0.5
and APGR 0.5 exactly.

Correctness may be boolean or any real-valued quality (for instance a judge score scaled to
[0, 1]); scores must be finite.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = [
    "RoutingSummary",
    "apgr",
    "auroc",
    "average_ranks",
    "cpt",
    "quality_curve",
    "routing_summary",
    "stratified_auroc",
]

FloatArray = NDArray[np.float64]

#: Slack for float comparisons of accumulated qualities (sums of n terms of size ≤ 1).
_TOL = 1e-12


def _vector(values: ArrayLike, name: str) -> FloatArray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} is empty")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} has non-finite values")
    return arr


def _same_length(**arrays: FloatArray) -> int:
    lengths = {name: int(a.shape[0]) for name, a in arrays.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"lengths differ: {lengths}")
    return next(iter(lengths.values()))


def average_ranks(values: ArrayLike) -> FloatArray:
    """1-based ranks of ``values``; tied values get the mean of the ranks they span."""
    x = _vector(values, "values")
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts).astype(np.float64)  # rank of each unique value's last copy
    mean_rank = ends - (counts.astype(np.float64) - 1.0) / 2.0
    return np.asarray(mean_rank[inverse.reshape(-1)], dtype=np.float64)


def _labels(labels: ArrayLike, n: int) -> NDArray[np.bool_]:
    arr = np.asarray(labels)
    if arr.ndim != 1 or arr.shape[0] != n:
        raise ValueError(f"labels must be one-dimensional of length {n}, got shape {arr.shape}")
    if arr.dtype != np.bool_:
        if not np.all(np.isin(arr, (0, 1))):
            raise ValueError("labels must be boolean or 0/1")
        arr = arr.astype(np.bool_)
    return np.asarray(arr, dtype=np.bool_)


def auroc(scores: ArrayLike, labels: ArrayLike) -> float:
    """P(score of a positive > score of a negative), ties counting ½.

    ``labels`` are boolean (or 0/1); positives are the ``True`` ones. 0.5 is chance, 1 a
    perfect ranking, 0 a perfectly reversed one. Raises ``ValueError`` when a class is empty.
    """
    s = _vector(scores, "scores")
    y = _labels(labels, s.shape[0])
    n_pos = int(y.sum())
    n_neg = int(y.shape[0] - n_pos)
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"AUROC needs both classes: {n_pos} positive, {n_neg} negative")
    ranks = average_ranks(s)
    u = float(ranks[y].sum()) - n_pos * (n_pos + 1) / 2.0
    return u / (n_pos * n_neg)


def stratified_auroc(scores: ArrayLike, labels: ArrayLike, strata: ArrayLike) -> float:
    """AUROC over the positive-negative pairs that share a stratum (e.g. a length bucket).

    Pairs from different strata are not compared, so a confounder that defines the strata
    cannot drive the number. Strata holding one class only are skipped; ``nan`` when no
    stratum holds both.
    """
    s = _vector(scores, "scores")
    y = _labels(labels, s.shape[0])
    g = np.asarray(strata)
    if g.ndim != 1 or g.shape[0] != s.shape[0]:
        raise ValueError(f"strata must be one-dimensional of length {s.shape[0]}")
    total_u = 0.0
    total_pairs = 0
    for key in np.unique(g):
        inside = g == key
        n_pos = int(y[inside].sum())
        n_neg = int(inside.sum()) - n_pos
        if n_pos == 0 or n_neg == 0:
            continue
        total_u += auroc(s[inside], y[inside]) * n_pos * n_neg
        total_pairs += n_pos * n_neg
    return total_u / total_pairs if total_pairs else math.nan


def _knots(scores: ArrayLike, weak_correct: ArrayLike, strong_correct: ArrayLike) -> FloatArray:
    """q at c = k/n for k = 0..n (length n + 1), ties routed evenly."""
    s = _vector(scores, "scores")
    weak = _vector(weak_correct, "weak_correct")
    strong = _vector(strong_correct, "strong_correct")
    n = _same_length(scores=s, weak_correct=weak, strong_correct=strong)
    order = np.argsort(-s, kind="stable")
    gain = (strong - weak)[order]
    sorted_scores = s[order]
    # Replace each block of tied scores by its mean gain (expectation over tie-breaking).
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    block_sums = np.add.reduceat(gain, starts)
    block_sizes = np.diff(np.r_[starts, n])
    gain = np.repeat(block_sums / block_sizes, block_sizes)
    cumulative = np.r_[0.0, np.cumsum(gain)]
    return np.asarray((weak.sum() + cumulative) / n, dtype=np.float64)


def quality_curve(
    scores: ArrayLike,
    weak_correct: ArrayLike,
    strong_correct: ArrayLike,
    grid: ArrayLike | None = None,
) -> tuple[FloatArray, FloatArray]:
    """(c, q(c)): quality when the top-c share of prompts by score goes to the strong model.

    Without ``grid`` the exact knots c = k/n (k = 0..n) are returned; with one, q is
    interpolated (exactly: the curve is linear between knots) at the given shares in [0, 1].
    q(0) is the weak model's accuracy, q(1) the strong one's.
    """
    q = _knots(scores, weak_correct, strong_correct)
    n = int(q.shape[0]) - 1
    c_knots = np.arange(n + 1, dtype=np.float64) / n
    if grid is None:
        return c_knots, q
    c = np.asarray(grid, dtype=np.float64)
    if c.ndim != 1 or not np.all(np.isfinite(c)) or np.any((c < 0.0) | (c > 1.0)):
        raise ValueError("grid must be a one-dimensional array of shares in [0, 1]")
    return c, np.asarray(np.interp(c, c_knots, q), dtype=np.float64)


def _gap(q: FloatArray) -> float:
    gap = float(q[-1] - q[0])
    if abs(gap) <= _TOL:
        raise ValueError(
            "the strong and weak models are equally good on these prompts: "
            "the performance gap (and so APGR/CPT) is undefined"
        )
    return gap


def apgr(scores: ArrayLike, weak_correct: ArrayLike, strong_correct: ArrayLike) -> float:
    """Average performance-gap recovered: (∫₀¹ q(c) dc - q(0)) / (q(1) - q(0)).

    0.5 for a random (or constant) score; ``apgr(s) + apgr(-s) == 1``.
    """
    q = _knots(scores, weak_correct, strong_correct)
    gap = _gap(q)
    n = int(q.shape[0]) - 1
    area = float((q[:-1] + q[1:]).sum()) / (2.0 * n)
    return (area - float(q[0])) / gap


def cpt(
    scores: ArrayLike, weak_correct: ArrayLike, strong_correct: ArrayLike, x: float = 0.5
) -> float:
    """Call-performance threshold: smallest share c with q(c) ≥ q(0) + x·(q(1) - q(0)).

    ``x`` is a fraction (0.5 for RouteLLM's CPT(50%)). The crossing is found exactly on the
    piecewise-linear curve. ``nan`` when the target is never reached (possible only for
    ``x > 1`` or a gap of the wrong sign).
    """
    if not math.isfinite(x) or x < 0.0:
        raise ValueError(f"x must be a finite fraction >= 0, got {x}")
    q = _knots(scores, weak_correct, strong_correct)
    gap = _gap(q)
    n = int(q.shape[0]) - 1
    target = float(q[0]) + x * gap
    reached = np.flatnonzero(q >= target - _TOL)
    if reached.size == 0:
        return math.nan
    k = int(reached[0])
    if k == 0:
        return 0.0
    lo, hi = float(q[k - 1]), float(q[k])
    frac = min(1.0, max(0.0, (target - lo) / (hi - lo)))
    return (k - 1 + frac) / n


@dataclass(frozen=True, slots=True)
class RoutingSummary:
    """The headline numbers of one router on one labelled set."""

    n: int
    weak_accuracy: float
    strong_accuracy: float
    apgr: float
    cpt50: float
    auroc_weak_wrong: float  # score vs "the weak model fails"; nan when it never/always fails
    auroc_strong_helps: float  # score vs "weak wrong and strong right"; nan when undefined


def _auroc_or_nan(scores: FloatArray, labels: NDArray[np.bool_]) -> float:
    if labels.all() or not labels.any():
        return math.nan
    return auroc(scores, labels)


def routing_summary(
    scores: ArrayLike, weak_correct: ArrayLike, strong_correct: ArrayLike
) -> RoutingSummary:
    """APGR, CPT(50%) and AUROCs of routing by ``scores`` (correctness given as booleans)."""
    s = _vector(scores, "scores")
    weak = _vector(weak_correct, "weak_correct")
    strong = _vector(strong_correct, "strong_correct")
    n = _same_length(scores=s, weak_correct=weak, strong_correct=strong)
    weak_ok = weak >= 0.5
    strong_ok = strong >= 0.5
    return RoutingSummary(
        n=n,
        weak_accuracy=float(weak.mean()),
        strong_accuracy=float(strong.mean()),
        apgr=apgr(s, weak, strong),
        cpt50=cpt(s, weak, strong, 0.5),
        auroc_weak_wrong=_auroc_or_nan(s, ~weak_ok),
        auroc_strong_helps=_auroc_or_nan(s, ~weak_ok & strong_ok),
    )
