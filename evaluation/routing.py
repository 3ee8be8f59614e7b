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

Trained routers are scored by stratified k-fold cross-validation (:func:`evaluate`,
:mod:`evaluation.crossval`); every router's numbers are means over the same test folds. Across
sources (:mod:`evaluation.sources`) there is no CV: :func:`evaluate_transfer` fits the trained
routers on one set (``eval --train``) and scores every router on another, and
:func:`evaluate_by_source` holds out one source at a time (``eval --by-source``: fit on the
other sources, score on the held-out one). Probe features and embeddings are cached on disk, so
re-runs are fast.

APGR divides by the quality gap q_large - q_small of the scored prompts. When that gap is under
:data:`MIN_GAP` (5 points) or under two standard errors of the paired difference
(:class:`QualityGap`), APGR is mostly noise: the report marks it unstable (``0.612*``) and says
so, and CPT(50%) and AUROC remain the numbers to read. When the large model is worse (a
negative gap), APGR and CPT are not shown at all.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TypedDict, Unpack

import numpy as np

from evaluation.baselines import N_RANDOM, fixed_baselines, score_random_fold
from evaluation.crossval import (
    GRID,
    BoolArray,
    FloatArray,
    RouterScores,
    Split,
    fold_ids,
    fold_splits,
    score_fold,
    split_logistic,
    split_stacked,
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

__all__ = [
    "MIN_GAP",
    "EvalReport",
    "QualityGap",
    "RouterOptions",
    "SplitInfo",
    "configured_scores",
    "evaluate",
    "evaluate_by_source",
    "evaluate_transfer",
    "plot_report",
]


class RouterOptions(TypedDict, total=False):
    """What the routers of :func:`evaluate` (and the other ``evaluate_*``) read besides the
    feature table: the configured router's (name, scores), MiniLM embeddings (the ``embedding
    LR`` router), the features of ``sparsity LR`` (None: the default recipe), the seed of the
    folds and of ``random``, and extra fixed routers (name, scores, note)."""

    configured: tuple[str, FloatArray] | None
    embeddings: FloatArray | None
    features: Sequence[str] | None
    seed: int
    extra: Sequence[tuple[str, FloatArray, str]]


#: Below this quality gap (5 points), APGR is marked unstable.
MIN_GAP: Final = 0.05
_METRICS: Final = ("apgr", "cpt50", "cpt80", "auroc")


@dataclass(frozen=True, slots=True)
class QualityGap:
    """Both models' mean quality on a set of prompts and the noise of their difference."""

    n: int
    small: float
    large: float
    se: float  # standard error of the mean paired difference large - small

    @classmethod
    def of(cls, small: FloatArray, large: FloatArray) -> QualityGap:
        d = large - small
        se = float(np.std(d, ddof=1) / math.sqrt(d.size)) if d.size > 1 else math.inf
        return cls(int(d.size), float(small.mean()), float(large.mean()), se)

    @property
    def gap(self) -> float:
        return self.large - self.small

    @property
    def status(self) -> str:
        """``ok``; ``unstable`` (0 < gap < max(:data:`MIN_GAP`, 2 SE)); ``reversed`` (the large
        model is worse); ``none`` (equally good)."""
        if abs(self.gap) <= 1e-12:
            return "none"
        if self.gap < 0:
            return "reversed"
        return "unstable" if self.gap < max(MIN_GAP, 2 * self.se) else "ok"

    def warning(self, where: str) -> str | None:
        """What is wrong with APGR on these prompts (None: nothing)."""
        points = f"{100 * self.gap:.1f} points"
        both = f"large {self.large:.1%} vs small {self.small:.1%} on {self.n} prompts"
        if self.status == "unstable":
            return (
                f"{where}: APGR unstable: gap {points} ({both}; standard error "
                f"{100 * self.se:.1f} points), under max({100 * MIN_GAP:.0f} points, 2 standard "
                "errors): APGR divides by the gap, read CPT(50%) and AUROC instead"
            )
        if self.status == "reversed":
            return (
                f"{where}: the large model is worse than the small one (gap {points}: {both}): "
                "APGR and CPT are undefined; AUROC still measures the ranking"
            )
        if self.status == "none":
            return (
                f"{where}: the small and the large model are equally good ({both}): APGR and CPT "
                "are undefined; AUROC still measures the ranking"
            )
        return None


@dataclass(frozen=True, slots=True)
class SplitInfo:
    """One scored set: a held-out source (``eval --by-source``), the test set (``--train``) or
    the data of a CV run; what the trained routers were fitted on."""

    name: str
    gap: QualityGap
    n_train: int
    trained_on: tuple[str, ...]


@dataclass(slots=True)
class EvalReport:
    n: int
    folds: int
    small_accuracy: float
    large_accuracy: float
    large_better: float
    routers: list[RouterScores]
    #: "cv" (k-fold), "transfer" (``--train``: one split) or "by-source" (one split per source)
    mode: str = "cv"
    #: the scored sets: one (cv, transfer) or one per held-out source (by-source)
    splits: list[SplitInfo] = field(default_factory=list)

    def warnings(self) -> list[str]:
        """One line per scored set whose quality gap makes APGR unreliable or undefined."""
        out = []
        for split in self.splits:
            line = split.gap.warning(split.name)
            if line is not None:
                out.append(line)
        return out

    @property
    def title(self) -> str:
        if self.mode == "transfer":
            split = self.splits[0]
            return f"trained on {split.n_train}, tested on {self.n} prompts"
        if self.mode == "by-source":
            return f"{self.n} prompts, leave one of {len(self.splits)} sources out"
        return f"{self.n} prompts, {self.folds}-fold CV"

    def intro(self) -> str:
        both = (
            f"small model {self.small_accuracy:.1%} correct, large {self.large_accuracy:.1%}, "
            f"large better on {self.large_better:.1%}. AUROC: score vs 'large does better'."
        )
        if self.mode == "transfer":
            split = self.splits[0]
            sources = _names(split.trained_on, most=8)
            return (
                f"trained on {split.n_train} prompts from {sources}, tested on {self.n} from "
                f"{split.name} (no CV); {both}"
            )
        if self.mode == "by-source":
            return (
                f"{self.n} prompts from {len(self.splits)} sources, leave one source out: the "
                "trained routers are fitted on the other sources (and not on the held-out "
                "source's group), every router is scored on the held-out one; " + both
            )
        return f"{self.n} prompts, {self.folds}-fold CV (means over test folds); {both}"

    def rows(self) -> tuple[list[str], list[list[str]]]:
        """(header, rows) of the report's table; APGR marked ``*`` where unstable, APGR and
        CPT ``-`` where undefined."""
        if self.mode == "by-source":
            head = ["source", "router", "APGR", "CPT(50%)", "CPT(80%)", "AUROC", "note"]
            rows = []
            for i, split in enumerate(self.splits):
                for j, r in enumerate(self.routers):
                    values = [getattr(r, k)[i] for k in _METRICS]
                    cells = _cells(split.gap.status, *values)
                    rows.append([split.name if j == 0 else "", r.name, *cells, r.note])
            for j, r in enumerate(self.routers):
                label = f"mean of {len(self.splits)}" if j == 0 else ""
                rows.append([label, r.name, *_cells("ok", *self._source_means(r)), ""])
            return head, rows
        head = ["router", "APGR", "± sd", "CPT(50%)", "CPT(80%)", "AUROC", "note"]
        status = self.splits[0].gap.status if self.splits else "ok"
        rows = []
        for r in self.routers:
            apgr, *others = _cells(status, *(r.mean(k) for k in _METRICS))
            sd = _number(r.sd("apgr"), ".3f") if status in ("ok", "unstable") else "-"
            rows.append([r.name, apgr, sd, *others, r.note])
        return head, rows

    def _source_means(self, r: RouterScores) -> list[float]:
        """Means over the held-out sources: APGR over those with a stable gap, CPT over those
        where the large model is better, AUROC over all."""
        status = [s.gap.status for s in self.splits]
        keep = {"apgr": ("ok",), "cpt50": ("ok", "unstable"), "cpt80": ("ok", "unstable")}
        out = []
        for key in _METRICS:
            allowed = keep.get(key)
            values = [
                v
                for v, st in zip(getattr(r, key), status, strict=True)
                if math.isfinite(v) and (allowed is None or st in allowed)
            ]
            out.append(float(np.mean(values)) if values else math.nan)
        return out

    def table(self) -> str:
        head, rows = self.rows()
        text_cols = {0, len(head) - 1} | ({1} if self.mode == "by-source" else set())
        widths = [max(len(x[c]) for x in [head, *rows]) for c in range(len(head))]
        lines = [
            "  ".join(
                c.ljust(w) if i in text_cols else c.rjust(w)
                for i, (c, w) in enumerate(zip(x, widths, strict=True))
            ).rstrip()
            for x in [head, *rows]
        ]
        notes = [f"* {w}" for w in self.warnings()]
        if self.mode == "by-source":
            notes.append(
                f"mean of {len(self.splits)}: APGR over the sources with a stable gap, CPT over "
                "those where the large model is better, AUROC over all"
            )
        return "\n".join([self.intro(), *lines, *notes])

    def markdown(self) -> str:
        head, rows = self.rows()
        out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        out += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(out)

    def numbers(self) -> dict[str, Any]:
        """The report as JSON-ready numbers (None where undefined)."""
        out: dict[str, Any] = {
            "mode": self.mode,
            "n": self.n,
            "folds": self.folds,
            "small_accuracy": self.small_accuracy,
            "large_accuracy": self.large_accuracy,
            "warnings": self.warnings(),
        }
        if self.mode == "by-source":
            out["sources"] = {
                s.name: _split_numbers(s)
                | {
                    "routers": {
                        r.name: {k: _finite(getattr(r, k)[i], s.gap.status, k) for k in _METRICS}
                        for r in self.routers
                    }
                }
                for i, s in enumerate(self.splits)
            }
            out["routers"] = {
                r.name: dict(zip(_METRICS, map(_none, self._source_means(r)), strict=True))
                | {"trained": r.trained}
                for r in self.routers
            }
            return out
        status = self.splits[0].gap.status if self.splits else "ok"
        if self.splits:
            out |= _split_numbers(self.splits[0], trained=self.mode == "transfer")
        out["routers"] = {
            r.name: {k: _finite(r.mean(k), status, k) for k in _METRICS}
            | {"apgr_folds": [_finite(v, status, "apgr") for v in r.apgr], "trained": r.trained}
            for r in self.routers
        }
        return out


def _split_numbers(split: SplitInfo, *, trained: bool = True) -> dict[str, Any]:
    """The scored set's gap (and, with ``trained``, what the routers were trained on)."""
    g = split.gap
    out: dict[str, Any] = {"gap": g.gap, "gap_se": _none(g.se), "apgr_status": g.status}
    if trained:
        out |= {
            "tested_on": split.name,
            "n_test": g.n,
            "n_train": split.n_train,
            "trained_on": list(split.trained_on),
            "small_accuracy": g.small,
            "large_accuracy": g.large,
        }
    return out


def _number(x: float, spec: str) -> str:
    return format(x, spec) if math.isfinite(x) else "-"


def _cells(status: str, apgr: float, cpt50: float, cpt80: float, auroc: float) -> list[str]:
    """APGR, CPT(50%), CPT(80%), AUROC as table cells for a set whose gap has ``status``."""
    defined = status in ("ok", "unstable")
    mark = "*" if status == "unstable" and math.isfinite(apgr) else ""
    return [
        _number(apgr, ".3f") + mark if defined else "-",
        _number(cpt50, ".1%") if defined else "-",
        _number(cpt80, ".1%") if defined else "-",
        _number(auroc, ".3f"),
    ]


def _none(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _finite(x: float, status: str, key: str) -> float | None:
    """``x`` for JSON: None when not finite, or an APGR/CPT where the gap leaves it undefined."""
    if key != "auroc" and status not in ("ok", "unstable"):
        return None
    return _none(x)


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
    folds: int = 5,
    **routers: Unpack[RouterOptions],
) -> EvalReport:
    """Score every router on the same stratified folds (see the module docstring)."""
    _check_rows(data, table)
    if float(np.mean(data.large) - np.mean(data.small)) == 0.0:
        raise OutcomeDataError(
            "the small and the large model are equally good on these prompts: APGR is undefined"
        )
    splits = fold_splits(fold_ids(data.small, data.large, folds, routers.get("seed", 0)))
    scores = _score_splits(data, table, splits, len(data), routers)
    info = SplitInfo(_names(data.groups), QualityGap.of(data.small, data.large), len(data), ())
    return _report(data, scores, folds, "cv", [info])


def evaluate_transfer(
    data: OutcomeSet,
    table: FeatureTable,
    train: BoolArray,
    **routers: Unpack[RouterOptions],
) -> EvalReport:
    """Fit the trained routers on the rows ``train`` marks and score every router on the others
    (no CV: ``eval --train``). ``table`` (and ``embeddings``, ``configured``, ``extra``) hold
    every row of ``data``."""
    _check_rows(data, table)
    train = np.asarray(train, dtype=bool)
    test = ~train
    if not train.any() or not test.any():
        raise OutcomeDataError("--train: both the training and the test set need prompts")
    split = Split(_names(_pick(data.groups, test)), train, test)
    _check_training(data, split)
    scores = _score_splits(data, table, [split], int(train.sum()), routers)
    info = _info(data, split)
    return _report(data.subset(np.flatnonzero(test)), scores, 1, "transfer", [info])


def evaluate_by_source(
    data: OutcomeSet,
    table: FeatureTable,
    *,
    holdout: Mapping[str, str] | None = None,
    **routers: Unpack[RouterOptions],
) -> EvalReport:
    """Leave one source out (the sources: ``data.groups``): for each, fit the trained routers on
    the sources outside its hold-out group (``holdout``: source -> group, default each its own)
    and score every router on it (``eval --by-source``)."""
    _check_rows(data, table)
    groups = np.array(data.groups)
    sources = list(dict.fromkeys(data.groups))
    group_of = {s: (holdout or {}).get(s, s) for s in sources}
    if len(set(group_of.values())) < 2:
        raise OutcomeDataError(
            f"--by-source needs sources in at least two hold-out groups; found {len(sources)} "
            f"source(s) ({', '.join(sources)}) in {len(set(group_of.values()))} group(s). Fix: "
            "give more --data files (or sources), or set group= apart"
        )
    splits = []
    for source in sources:
        out = [s for s in sources if group_of[s] == group_of[source]]
        split = Split(source, ~np.isin(groups, out), groups == source)
        _check_training(data, split)
        splits.append(split)
    n_train = min(int(s.train.sum()) for s in splits)
    scores = _score_splits(data, table, splits, n_train, routers)
    return _report(data, scores, len(splits), "by-source", [_info(data, s) for s in splits])


def _check_rows(data: OutcomeSet, table: FeatureTable) -> None:
    if len(table) != len(data):
        raise ValueError(f"{len(table)} feature rows for {len(data)} prompts")


def _pick(values: Sequence[str], mask: BoolArray) -> list[str]:
    return [v for v, m in zip(values, mask, strict=True) if m]


def _names(groups: Sequence[str], most: int = 4) -> str:
    """The distinct names, in order; past ``most``, the first ones and a count."""
    names = list(dict.fromkeys(groups))
    if len(names) <= most:
        return ", ".join(names)
    return ", ".join(names[: most - 1]) + f" and {len(names) - most + 1} more"


def _info(data: OutcomeSet, split: Split) -> SplitInfo:
    return SplitInfo(
        split.name,
        QualityGap.of(data.small[split.test], data.large[split.test]),
        int(split.train.sum()),
        tuple(dict.fromkeys(_pick(data.groups, split.train))),
    )


def _check_training(data: OutcomeSet, split: Split) -> None:
    """The trained routers need prompts where the large model does better and where it does
    not among the training rows."""
    better = data.large_better[split.train]
    if not better.any() or better.all():
        where = "the training prompts" + (f" for {split.name}" if split.name else "")
        raise OutcomeDataError(
            f"{where} ({_names(_pick(data.groups, split.train))}): the large "
            f"model does better on {int(better.sum())} of {better.size}; a router needs both "
            "kinds of prompt to learn from. Fix: train on more (or other) outcome data"
        )


def _report(
    scored: OutcomeSet, routers: list[RouterScores], folds: int, mode: str, splits: list[SplitInfo]
) -> EvalReport:
    return EvalReport(
        n=len(scored),
        folds=folds,
        small_accuracy=float(scored.small.mean()),
        large_accuracy=float(scored.large.mean()),
        large_better=float(scored.large_better.mean()),
        routers=routers,
        mode=mode,
        splits=splits,
    )


def _score_splits(
    data: OutcomeSet,
    table: FeatureTable,
    splits: Sequence[Split],
    n_train: int,
    options: RouterOptions,
) -> list[RouterScores]:
    """Every router's scores on every split's test rows, trained routers fitted on its train
    rows (``n_train``: the training size the default recipe is chosen for)."""
    configured = options.get("configured")
    embeddings = options.get("embeddings")
    features = options.get("features")
    fixed: list[tuple[str, FloatArray, str]] = []
    if configured is not None:
        fixed.append((configured[0], configured[1], "as configured, not trained here"))
    read = "the prompt" if data.answers is None else "prompt + the small model's answer"
    fixed.extend(fixed_baselines(table, read))
    fixed.extend(options.get("extra", ()))
    oracle = data.large - data.small
    routers: list[RouterScores] = []
    rng = np.random.default_rng(options.get("seed", 0))
    rand = RouterScores("random", trained=False, note=f"mean of {N_RANDOM} random scores")
    fixed_scores = [RouterScores(n, trained=False, note=note) for n, _, note in fixed]
    oracle_r = RouterScores("oracle", trained=False, note="knows the outcomes (upper bound)")
    for split in splits:
        te = split.test
        small, large = data.small[te], data.large[te]
        with warnings.catch_warnings():  # no prompt where large does better: AUROC nan
            warnings.simplefilter("ignore", RuntimeWarning)
            score_random_fold(rand, rng, small, large)
        for r, (_, s, _) in zip(fixed_scores, fixed, strict=True):
            score_fold(r, np.asarray(s, dtype=np.float64)[te], small, large)
        score_fold(oracle_r, oracle[te], small, large)
    routers += [rand, *fixed_scores]
    if embeddings is not None:
        routers.append(
            split_logistic(
                "embedding LR",
                embeddings,
                data,
                splits,
                "all-MiniLM-L6-v2 of the prompt, L2 logistic",
            )
        )
    depth = _depth(table)
    recipe = default_recipe(depth, n_train, answers=data.answers is not None)
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
        routers.append(split_logistic(name, X, data, splits, note.format(k=len(cols))))
    blocks = recipe.votes
    if features is None and len(trained) == 2 and all(block_key(b) in table.states for b in blocks):
        X, cols = supervised_matrix(table, trained[1][1])
        routers.append(
            split_stacked(
                "probe LR + kNN",
                X,
                cols,
                [block_vectors(table, b) for b in blocks],
                data,
                splits,
                blocks,
                DEFAULT_K,
                f"probe LR stacked with the mean gain of the {DEFAULT_K} nearest training "
                f"prompts ({', '.join(blocks)})",
            )
        )
    routers.append(oracle_r)
    return routers


def _depth(table: FeatureTable) -> int:
    return max(int(name.split(".")[0][1:]) for name in table.names)


def plot_report(report: EvalReport, path: str | Path, title: str = "") -> Path:
    """Quality vs share-to-large curves (mean over test folds, or held-out sources) of every
    router, as a PNG."""
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
    ax.set_title(title or report.title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
