"""``sparsity-router eval``: how well routers rank prompts for a small -> large model pair.

Given outcome data (:mod:`evaluation.outcomes`), every router gives each prompt a score; sending
the top-c share by score to the large model yields a quality curve q(c), summarised as APGR,
CPT(50%), CPT(80%) and the AUROC of the score for "the large model does better" (definitions in
:mod:`evaluation.metrics`). Routers compared in one run, on the same folds:

- ``configured``: the probe's score (or, when the calibration carries a supervised model, its
  P(large does better), applied as fitted; :func:`configured_scores`);
- ``random``, ``length``, ``perplexity`` and ``embedding LR`` (:mod:`evaluation.baselines`);
- ``sparsity LR``: logistic regression on the probe's sparsity metrics
  (:func:`~evaluation.recipes.sparsity_features`) + length;
- ``probe LR``: the supervised calibration's recipe
  (:func:`~evaluation.recipes.supervised_features`): the same plus the probe's hidden vectors at
  its last layer (when the table holds them);
- ``probe LR + kNN``: the default of ``calibrate --labels``: ``probe LR`` stacked with the
  nearest-neighbour votes (:mod:`probes.neighbours`) on
  :func:`~evaluation.recipes.neighbour_blocks`' vectors, the stacking weights fitted on
  out-of-fold values inside each training fold.

With the small model's answers in the data (a cascade's check, ``--answer-column``) the probe
reads prompt + answer and the three probe routers follow the answer recipe instead
(:func:`~evaluation.recipes.default_recipe`: layers 2 to 40% of the depth, that layer's vectors,
one vote there).

Trained routers are scored by stratified k-fold cross-validation (:mod:`evaluation.crossval`);
every router's numbers are means over the same test folds. Probe features and embeddings are
cached on disk, so re-runs are fast.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from evaluation.baselines import N_RANDOM, fixed_baselines, score_random_fold
from evaluation.crossval import (
    GRID,
    FloatArray,
    RouterScores,
    cv_logistic,
    cv_stacked,
    fold_ids,
    score_fold,
)
from evaluation.outcomes import OutcomeDataError, OutcomeSet
from evaluation.recipes import default_recipe
from evaluation.tables import block_key, block_vectors, supervised_matrix
from probes.calibration import Calibration
from probes.feature_names import STATE
from probes.feature_table import FeatureTable
from probes.neighbours import DEFAULT_K
from probes.supervised import LENGTH_FEATURE

if TYPE_CHECKING:
    from probes.probe import SparsityProbe

__all__ = ["EvalReport", "configured_scores", "evaluate", "plot_report"]


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


def configured_scores(
    probe: SparsityProbe, table: FeatureTable, calibration: Calibration | None
) -> tuple[str, FloatArray]:
    """(name, score per row) of the configured router: the calibration's supervised
    P(large does better) when it carries one, else the probe's score."""
    if calibration is not None and calibration.supervised is not None:
        model = calibration.supervised
        cols = [
            np.log(np.maximum(table.n_tokens, 1.0)) if f == LENGTH_FEATURE else table.column(f)
            for f in model.features
        ]
        return "configured (p_large)", model.predict_matrix(np.column_stack(cols), table.states)
    s = probe.settings
    name = f"L{probe.score_layer}.{s.score_metric}.{s.score_position}"
    return f"configured ({name})", table.column(name)


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
        raise OutcomeDataError(
            "the small and the large model are equally good on these prompts: APGR is undefined"
        )
    fold = fold_ids(data.small, data.large, folds, seed)
    fixed: list[tuple[str, FloatArray, str]] = []
    if configured is not None:
        fixed.append((configured[0], configured[1], "as configured, not trained here"))
    read = "the prompt" if data.answers is None else "prompt + the small model's answer"
    fixed.extend(fixed_baselines(table, read))
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
        score_random_fold(rand, rng, small, large)
        for r, (_, s, _) in zip(fixed_scores, fixed, strict=True):
            score_fold(r, np.asarray(s, dtype=np.float64)[te], small, large)
        score_fold(oracle_r, oracle[te], small, large)
    routers += [rand, *fixed_scores]
    if embeddings is not None:
        routers.append(
            cv_logistic(
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
        if all(block_key(b) in table.states for b in states):
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
        routers.append(cv_logistic(name, X, data, fold, note.format(k=len(cols))))
    blocks = recipe.votes
    if features is None and len(trained) == 2 and all(block_key(b) in table.states for b in blocks):
        X, cols = supervised_matrix(table, trained[1][1])
        routers.append(
            cv_stacked(
                "probe LR + kNN",
                X,
                cols,
                [block_vectors(table, b) for b in blocks],
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
