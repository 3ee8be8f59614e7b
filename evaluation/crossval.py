"""Cross-validation of trained routers: stratified folds, per-fold scores, the inner CV that picks
the L2 strength, and the stacking of a regression with nearest-neighbour votes.

A :class:`Split` is one (train rows, test rows) pair: a CV fold (:func:`fold_splits`), or a
train set and a test set from other sources (``eval --train``, ``eval --by-source``); trained
routers are fitted on a split's train rows and scored on its test rows
(:func:`split_logistic`, :func:`split_stacked`).

Every trained router is scored by stratified k-fold cross-validation (:func:`fold_ids`, folds
stratified by the (small, large) outcome pair); its L2 strength is chosen by an inner 3-fold CV
on the training folds only (:func:`inner_fit`). The routing metrics are those of
:mod:`evaluation.metrics`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

import numpy as np
from numpy.typing import NDArray

from evaluation.metrics import apgr, auroc, cpt, quality_curve
from evaluation.outcomes import OutcomeSet
from evaluation.tables import block_key
from probes.neighbours import NeighbourVote
from probes.supervised import SupervisedModel, fit_logistic

__all__ = [
    "GRID",
    "L2_GRID",
    "BoolArray",
    "FloatArray",
    "IntArray",
    "RouterScores",
    "Split",
    "cv_logistic",
    "cv_stacked",
    "fit_stacked",
    "fold_ids",
    "fold_splits",
    "inner_fit",
    "inner_l2",
    "score_fold",
    "split_logistic",
    "split_stacked",
    "stack_weights",
]

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]
BoolArray = NDArray[np.bool_]

#: Shares c at which the averaged quality curves are drawn.
GRID: Final = np.linspace(0.0, 1.0, 101)
#: L2 strengths tried by the inner cross-validation (the large ones for the ~1,200 hidden-vector
#: features of the default recipe).
L2_GRID: Final = (1.0, 10.0, 100.0, 1000.0, 10000.0)


@dataclass(slots=True)
class RouterScores:
    """One router's results: per-fold metrics (mean reported) and its averaged curve."""

    name: str
    trained: bool
    apgr: list[float] = field(default_factory=list)
    cpt50: list[float] = field(default_factory=list)
    cpt80: list[float] = field(default_factory=list)
    auroc: list[float] = field(default_factory=list)
    curve: list[FloatArray] = field(default_factory=list)
    note: str = ""

    def mean(self, key: str) -> float:
        values = [v for v in getattr(self, key) if math.isfinite(v)]
        return float(np.mean(values)) if values else math.nan

    def sd(self, key: str) -> float:
        values = [v for v in getattr(self, key) if math.isfinite(v)]
        return float(np.std(values)) if len(values) > 1 else math.nan


@dataclass(frozen=True, slots=True)
class Split:
    """Rows to fit trained routers on (``train``) and rows to score every router on (``test``)."""

    name: str
    train: BoolArray
    test: BoolArray


def fold_splits(folds: IntArray) -> list[Split]:
    """One split per fold of :func:`fold_ids`: train on the other folds, test on it."""
    return [
        Split(f"fold {k + 1}", np.asarray(folds != k), np.asarray(folds == k))
        for k in range(int(folds.max()) + 1)
    ]


def fold_ids(small: FloatArray, large: FloatArray, folds: int, seed: int = 0) -> IntArray:
    """Fold number per row, stratified by the (small, large) outcome pair."""
    rng = np.random.default_rng(seed)
    out = np.empty(small.shape[0], dtype=np.int64)
    outcome = 2 * (small >= 0.5).astype(int) + (large >= 0.5).astype(int)
    for value in np.unique(outcome):
        idx = rng.permutation(np.flatnonzero(outcome == value))
        out[idx] = (np.arange(idx.size) + int(value)) % folds
    return out


def score_fold(r: RouterScores, s: FloatArray, small: FloatArray, large: FloatArray) -> None:
    """Append the metrics of scores ``s`` on one test fold to ``r`` (APGR and CPT nan when both
    models are equally good there: no gap to recover)."""
    better = large > small
    gap = abs(float(large.mean() - small.mean())) > 1e-12
    r.apgr.append(apgr(s, small, large) if gap else math.nan)
    r.cpt50.append(cpt(s, small, large, 0.5) if gap else math.nan)
    r.cpt80.append(cpt(s, small, large, 0.8) if gap else math.nan)
    r.auroc.append(auroc(s, better) if 0 < better.sum() < better.size else math.nan)
    r.curve.append(quality_curve(s, small, large, GRID)[1])


def inner_l2(X: FloatArray, y: NDArray[np.bool_], small: FloatArray, large: FloatArray) -> float:
    """The L2 strength with the best mean APGR over a 3-fold CV inside the training rows."""
    return inner_fit(X, y, small, large)[0]


def inner_fit(
    X: FloatArray, y: NDArray[np.bool_], small: FloatArray, large: FloatArray
) -> tuple[float, FloatArray]:
    """(the L2 strength with the best mean APGR over a 3-fold CV inside the training rows, the
    out-of-fold log-odds of every row at that strength)."""
    inner = fold_ids(small, large, 3, seed=1)
    best, best_value, best_oof = L2_GRID[0], -math.inf, np.zeros(len(y))
    for l2 in L2_GRID:
        values = []
        oof = np.full(len(y), np.nan)
        for k in range(3):
            tr, te = inner != k, inner == k
            if y[tr].all() or not y[tr].any():
                continue
            coef, b, mean, scale = fit_logistic(X[tr], y[tr], l2=l2)
            oof[te] = ((X[te] - mean) / scale) @ coef + b
            if small[te].mean() != large[te].mean():
                values.append(apgr(oof[te], small[te], large[te]))
        value = float(np.mean(values)) if values else -math.inf
        if value > best_value:
            best, best_value = l2, value
            fill = float(np.nanmean(oof)) if np.isfinite(oof).any() else 0.0
            best_oof = np.where(np.isfinite(oof), oof, fill)
    return best, best_oof


def stack_weights(z: FloatArray, votes: FloatArray, y: NDArray[np.bool_]) -> tuple[float, ...]:
    """(a, b_1..b_m, c) of P = sigmoid(a * z + sum b_i * vote_i + c), fitted on out-of-fold
    values (``votes``: n x m)."""
    coef, b, mean, scale = fit_logistic(np.column_stack([z, votes]), y, l2=1.0)
    w = coef / scale
    return (*(float(v) for v in w), float(b - w @ mean))


def fit_stacked(
    X: FloatArray,
    names: Sequence[str],
    vectors: Sequence[NDArray[np.float32]],
    data: OutcomeSet,
    blocks: Sequence[str],
    k: int,
) -> SupervisedModel:
    """Regression (L2 by inner CV) + one neighbour vote per block (``vectors`` in the same
    order) on every row of ``X``, stacked on the inner CV's out-of-fold log-odds and the
    leave-one-out votes."""
    y = data.large_better
    l2, oof = inner_fit(X, y, data.small, data.large)
    votes = [
        NeighbourVote.fit(v, data.large - data.small, block, k=k)
        for v, block in zip(vectors, blocks, strict=True)
    ]
    own = np.arange(len(y))
    loo = np.column_stack(
        [vote.votes(v, exclude=own) for vote, v in zip(votes, vectors, strict=True)]
    )
    stack = stack_weights(oof, loo, y)
    return SupervisedModel.fit(X, y, names, l2=l2, neighbours=votes, stack=stack, votes=loo)


def cv_stacked(
    name: str,
    X: FloatArray,
    names: Sequence[str],
    vectors: Sequence[NDArray[np.float32]],
    data: OutcomeSet,
    folds: IntArray,
    blocks: Sequence[str],
    k: int,
    note: str,
) -> RouterScores:
    """Cross-validated scores of :func:`fit_stacked` on the folds ``folds``."""
    return split_stacked(name, X, names, vectors, data, fold_splits(folds), blocks, k, note)


def split_stacked(
    name: str,
    X: FloatArray,
    names: Sequence[str],
    vectors: Sequence[NDArray[np.float32]],
    data: OutcomeSet,
    splits: Sequence[Split],
    blocks: Sequence[str],
    k: int,
    note: str,
) -> RouterScores:
    """Scores of :func:`fit_stacked`, fitted on each split's train rows, on its test rows."""
    r = RouterScores(name, trained=True, note=note)
    keys = [block_key(block) for block in blocks]
    for split in splits:
        tr, te = split.train, split.test
        sub = data.subset(np.flatnonzero(tr))
        model = fit_stacked(X[tr], names, [v[tr] for v in vectors], sub, blocks, k)
        p = model.predict_matrix(X[te], {key: v[te] for key, v in zip(keys, vectors, strict=True)})
        score_fold(r, p, data.small[te], data.large[te])
    return r


def cv_logistic(
    name: str,
    X: FloatArray,
    data: OutcomeSet,
    folds: IntArray,
    note: str,
) -> RouterScores:
    """Cross-validated scores of an L2 logistic regression on ``X`` (L2 by inner CV)."""
    return split_logistic(name, X, data, fold_splits(folds), note)


def split_logistic(
    name: str,
    X: FloatArray,
    data: OutcomeSet,
    splits: Sequence[Split],
    note: str,
) -> RouterScores:
    """Scores of an L2 logistic regression on ``X`` (L2 by inner CV), fitted on each split's
    train rows, on its test rows."""
    y = data.large_better
    r = RouterScores(name, trained=True, note=note)
    for split in splits:
        tr, te = split.train, split.test
        l2 = inner_l2(X[tr], y[tr], data.small[tr], data.large[tr])
        coef, b, mean, scale = fit_logistic(X[tr], y[tr], l2=l2)
        score_fold(r, ((X[te] - mean) / scale) @ coef + b, data.small[te], data.large[te])
    return r
