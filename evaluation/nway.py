"""N-way routing offline: several models' outcomes, the per-model quality predictor, its curve.

:func:`read_nway` reads outcome files with one quality column per model (RouterDC's JSON
``{"question", "scores": {model: quality}}``, RouterBench's CSV with a list-literal ``prompt``,
a 0/1 column per model and ``<model>|total_cost``) with the outcome readers' column paths
(its column paths ``scores.MODEL``, :func:`~evaluation.outcomes.column_value`, and list-literal
prompts, :func:`~evaluation.outcomes.as_text`); rows with an empty quality are skipped.

:func:`evaluate_nway` cross-validates :class:`probes.nway.NWayModel` (k folds over prompts; the
heads' L2 strength by an inner 3-fold CV on the training folds, :func:`choose_l2`) and, on the
pooled out-of-fold predictions, compares:

- each single model (a point: its mean cost, its accuracy);
- the random mixtures of single models: the upper concave hull of their points (mixing two
  models at random reaches every point of the segment between them);
- the router: for each willingness to pay λ, every prompt goes to the argmax of predicted
  quality - λ·cost (:func:`probes.nway.pick_matrix`); its curve is the upper concave hull of
  those points (likewise reachable by mixing two λ);
- the oracle: per prompt, the cheapest model with the best score.

The headline (RouterBench's comparison) is the router's quality at the best single model's
cost minus that model's accuracy, in points; :attr:`NWayReport.argmax_accuracy` (λ = 0: the
model with the highest predicted quality) against the best single model is RouterDC's setup,
which compares accuracy only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import numpy as np
from numpy.typing import NDArray

from evaluation.crossval import L2_GRID
from evaluation.outcomes import OutcomeDataError, as_text, column_value, outcome_rows
from evaluation.supervised import LabelModel, label_calibration, plan_label_fit
from evaluation.tables import feature_table, probe_feeding, supervised_matrix
from probes.calibration import Calibration
from probes.feature_table import FeatureTable
from probes.nway import CostUnit, Link, NWayModel, fit_heads, pick_matrix
from probes.supervised import LENGTH_FEATURE

if TYPE_CHECKING:
    from probes.probe import SparsityProbe

__all__ = [
    "COST_COLUMN",
    "NWAY_L2_GRID",
    "NWayData",
    "NWayReport",
    "choose_l2",
    "concat_nway",
    "draw_nway",
    "evaluate_nway",
    "file_models",
    "fit_nway",
    "hull",
    "hull_value",
    "nway_calibration",
    "nway_features",
    "parse_costs",
    "plot_nway",
    "read_nway",
]

FloatArray = NDArray[np.float64]
#: RouterBench's per-request cost column, ``{model}`` standing for the model's name.
COST_COLUMN: Final = "{model}|total_cost"


@dataclass(slots=True)
class NWayData:
    """n prompts, m models: ``scores`` (n x m qualities in [0, 1]) and, when read from the
    file, ``costs`` (n x m, per request; NaN where a cell was empty)."""

    prompts: list[str]
    models: tuple[str, ...]
    scores: FloatArray
    costs: FloatArray | None = None

    def __len__(self) -> int:
        return len(self.prompts)

    def subset(self, idx: Sequence[int] | NDArray[np.intp]) -> NWayData:
        ids = np.asarray(idx, dtype=np.intp)
        return NWayData(
            [self.prompts[i] for i in ids],
            self.models,
            self.scores[ids],
            None if self.costs is None else self.costs[ids],
        )

    def mean_costs(self) -> FloatArray | None:
        """Each model's mean per-request cost over the rows with one (None without costs)."""
        if self.costs is None:
            return None
        have: list[bool] = np.isfinite(self.costs).sum(axis=0).astype(bool).tolist()
        if not all(have):
            missing = [m for j, m in enumerate(self.models) if not have[j]]
            raise OutcomeDataError(f"no row has a cost for {missing}")
        return np.asarray(np.nanmean(self.costs, axis=0), dtype=np.float64)

    def sample(self, n: int | None, seed: int = 0) -> NWayData:
        """A seeded random subset of ``n`` rows, in their order (all rows when fewer)."""
        if n is None or n >= len(self):
            return self
        keep = np.sort(np.random.default_rng(seed).choice(len(self), size=n, replace=False))
        return self.subset(keep)


def _score_column(first: Mapping[str, Any], model: str) -> str:
    """``model``, or RouterDC's ``scores.MODEL`` when the row nests its scores."""
    nested = first.get("scores")
    return f"scores.{model}" if model not in first and isinstance(nested, Mapping) else model


def file_models(path: str | Path) -> tuple[str, ...]:
    """The models of a RouterDC file (the keys of its first row's ``scores``); empty for other
    files (name them with ``--models``)."""
    rows = [row for _, row in outcome_rows(Path(path))]
    scores = rows[0].get("scores") if rows else None
    return tuple(scores) if isinstance(scores, Mapping) else ()


def read_nway(
    path: str | Path,
    models: Sequence[str] | None = None,
    *,
    prompt_col: str | None = None,
    cost_column: str | None = None,
    sample: int | None = None,
    seed: int = 0,
) -> NWayData:
    """Prompts and each model's quality from one outcome file (see the module docstring);
    ``cost_column`` (``{model}|total_cost``) also reads per-request costs. Rows where a model's
    quality is empty (RouterBench has a few) are skipped."""
    path = Path(path)
    rows = [row for _, row in outcome_rows(path)]
    names = tuple(models) if models else file_models(path)
    if len(names) < 2:
        raise OutcomeDataError(
            f"{path}: N-way routing needs at least two models. Fix: name them with --models "
            "a,b,c (the files' quality columns)"
        )
    if cost_column is not None and "{model}" not in cost_column:
        raise OutcomeDataError(
            f"--cost-column {cost_column!r} must contain {{model}}, e.g. {COST_COLUMN!r}"
        )
    prompt_key = prompt_col or ("question" if rows and "question" in rows[0] else "prompt")
    columns = [_score_column(rows[0], m) for m in names] if rows else list(names)
    prompts: list[str] = []
    scores: list[list[float]] = []
    costs: list[list[float]] = []
    for i, row in enumerate(rows, 1):
        where = f"{path}: row {i}"
        found, prompt = column_value(row, prompt_key)
        prompt = as_text(prompt)
        if not found or not isinstance(prompt, str) or not prompt.strip():
            raise OutcomeDataError(
                f"{where}: no prompt in column {prompt_key!r}. Fix: name it with --prompt-column"
            )
        values = [_cell(row, c, where, quality=True) for c in columns]
        if any(math.isnan(v) for v in values):
            continue
        prompts.append(prompt)
        scores.append(values)
        if cost_column is not None:
            costs.append(
                [_cell(row, cost_column.format(model=m), where, quality=False) for m in names]
            )
    if not prompts:
        raise OutcomeDataError(f"{path}: no row has every model's quality")
    data = NWayData(
        prompts, names, np.array(scores), np.array(costs) if cost_column is not None else None
    )
    return data.sample(sample, seed)


def _cell(row: Mapping[str, Any], column: str, where: str, *, quality: bool) -> float:
    """A quality in [0, 1] or a cost >= 0 (NaN when the cell is empty)."""
    found, value = column_value(row, column)
    if not found:
        have = ", ".join(repr(k) for k in list(row)[:12])
        raise OutcomeDataError(
            f"{where}: no column {column!r}; the row has {have}. Fix: name the models with "
            "--models as their columns are named (a nested field as OBJECT.KEY)"
        )
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    text = "" if value is None else str(value).strip()
    if not text:
        return math.nan
    try:
        x = float(text)
    except ValueError:
        x = math.nan
    bad = not math.isfinite(x) or x < 0 or (quality and x > 1)
    if bad:
        raise OutcomeDataError(
            f"{where}: column {column!r} holds {value!r}; expected "
            + ("a quality in [0, 1]" if quality else "a cost >= 0")
        )
    return x


def parse_costs(text: str | None, models: Sequence[str]) -> dict[str, float]:
    """``a=0.2,b=1.5`` as model -> cost; every model of ``models`` must be priced, each once."""
    if not text:
        return {}
    out: dict[str, float] = {}
    for item in (x.strip() for x in text.split(",") if x.strip()):
        name, sep, value = item.rpartition("=")
        try:
            cost = float(value)
        except ValueError:
            cost = math.nan
        if not sep or not name or not math.isfinite(cost) or cost < 0:
            raise OutcomeDataError(
                f"--cost {item!r}: give MODEL=COST with a cost >= 0, e.g. a=0.2,b=1.5"
            )
        if name in out:
            raise OutcomeDataError(f"--cost prices {name} twice")
        out[name] = cost
    unknown = sorted(set(out) - set(models))
    missing = [m for m in models if m not in out]
    if unknown or missing:
        raise OutcomeDataError(
            f"--cost: {'unknown models ' + str(unknown) + '; ' if unknown else ''}"
            f"{'no cost for ' + str(missing) if missing else ''}. Fix: price each of "
            f"{', '.join(models)} once"
        )
    return out


# -- fitting ------------------------------------------------------------------------------------


def _folds(n: int, k: int, seed: int) -> NDArray[np.intp]:
    order = np.random.default_rng(seed).permutation(n)
    out = np.empty(n, dtype=np.intp)
    out[order] = np.arange(n) % k
    return out


#: L2 strengths the inner CV tries: the supervised router's, and stronger ones, at which every
#: head predicts its model's mean and the router falls back to the best single model.
NWAY_L2_GRID: Final = (*L2_GRID, 1e5, 1e6)


def choose_l2(X: FloatArray, Y: FloatArray, *, link: Link = "identity", seed: int = 1) -> float:
    """The L2 strength of :data:`NWAY_L2_GRID` whose argmax router (each prompt to the model
    with the highest predicted quality) scores best over a 3-fold CV; ties go to the stronger
    L2 (the routing objective itself, as the supervised router's inner CV uses APGR)."""
    if len(X) < 6:
        return NWAY_L2_GRID[-1]
    fold = _folds(len(X), 3, seed)
    rows = np.arange(len(X))
    best, best_score = NWAY_L2_GRID[-1], -math.inf
    for l2 in reversed(NWAY_L2_GRID):
        Q = np.zeros_like(Y)
        for f in range(3):
            tr, te = fold != f, fold == f
            Q[te] = _predict(X[tr], Y[tr], X[te], link, l2)
        score = float(Y[rows, pick_matrix(Q, np.zeros(Y.shape[1]))].mean())
        if score > best_score + 1e-12:
            best, best_score = l2, score
    return best


def _predict(X: FloatArray, Y: FloatArray, X_new: FloatArray, link: Link, l2: float) -> FloatArray:
    W, b, mean, scale = fit_heads(X, Y, link=link, l2=l2)
    Z = ((X_new - mean) / scale) @ W + b
    if link == "logit":
        return np.asarray(1.0 / (1.0 + np.exp(-np.clip(Z, -35, 35))))
    return np.asarray(np.clip(Z, 0.0, 1.0))


def fit_nway(
    X: FloatArray,
    names: Sequence[str],
    data: NWayData,
    costs: Sequence[float],
    *,
    cost_unit: CostUnit = "usd_per_mtok",
    link: Link = "identity",
    l2: float | None = None,
    folds: int = 5,
    seed: int = 0,
) -> NWayModel:
    """The N-way model on every row (L2 by inner CV unless given), its CV scores attached
    (argmax accuracy and the best single model's)."""
    Y = data.scores
    chosen = choose_l2(X, Y, link=link) if l2 is None else l2
    cv: dict[str, float] = {}
    if len(data) >= 2 * folds:
        report = evaluate_nway(X, data, costs, folds=folds, seed=seed, link=link, l2=l2)
        cv = {
            "folds": float(folds),
            "argmax_accuracy": report.argmax_accuracy,
            "best_single_accuracy": report.best_single[1],
            "oracle_accuracy": report.oracle[1],
        }
    return NWayModel.fit(
        X, Y, names, data.models, costs, cost_unit=cost_unit, link=link, l2=chosen, cv=cv
    )


def nway_features(
    probe: SparsityProbe,
    data: NWayData,
    cache: Path | None,
    features: Sequence[str] | None = None,
    *,
    progress: bool = True,
) -> tuple[FloatArray, list[str], FeatureTable]:
    """The design matrix of ``data``'s prompts: the supervised recipe's features (or
    ``features``, checked as ``calibrate --features``) plus ``log_tokens``, read through the
    feature cache (:func:`evaluation.tables.feature_table`), and the table itself."""
    plan = plan_label_fit(probe, len(data), answers=False, features=features, neighbours="none")
    table = feature_table(
        probe, list(data.prompts), cache, progress=progress, state_layers=plan.state_layers
    )
    X, names = supervised_matrix(table, [f for f in plan.features if f != LENGTH_FEATURE])
    return X, names, table


def nway_calibration(
    probe: SparsityProbe,
    model: NWayModel,
    table: FeatureTable,
    *,
    min_per_bucket: int = 50,
    max_buckets: int = 8,
) -> Calibration:
    """The percentile calibration on the labelled prompts' cached features, fitted for the probe
    that feeds ``model``, with ``model`` as its ``nway`` section."""
    reader = model.as_supervised()
    fitted = LabelModel(reader, probe_feeding(probe, reader), table)
    base = label_calibration(fitted, None, min_per_bucket=min_per_bucket, max_buckets=max_buckets)
    return base.model_copy(update={"supervised": None, "nway": model})


def concat_nway(parts: Sequence[NWayData]) -> NWayData:
    """The rows of ``parts`` one after the other (the same models in the same order)."""
    first = parts[0]
    for part in parts[1:]:
        if part.models != first.models:
            raise OutcomeDataError(
                f"the outcome files name different models: {list(first.models)} and "
                f"{list(part.models)}. Fix: name the same ones with --models"
            )
    with_costs = [p.costs for p in parts if p.costs is not None]
    return NWayData(
        [q for p in parts for q in p.prompts],
        first.models,
        np.concatenate([p.scores for p in parts]),
        np.concatenate(with_costs) if len(with_costs) == len(parts) else None,
    )


# -- the curve ----------------------------------------------------------------------------------


def hull(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """The upper-left frontier of (cost, quality) points that mixing reaches: from the cheapest
    point, the upper concave hull up to the best quality (costlier points that are not better
    are dropped)."""
    pts = sorted(set(points), key=lambda p: (p[0], -p[1]))
    out: list[tuple[float, float]] = []
    for p in pts:
        if out and p[1] <= out[-1][1]:
            continue  # costs more, not better
        while len(out) >= 2:
            (x1, y1), (x2, y2) = out[-2], out[-1]
            # drop the middle point when it lies on or below the segment from out[-2] to p
            if (y2 - y1) * (p[0] - x1) <= (p[1] - y1) * (x2 - x1):
                out.pop()
            else:
                break
        out.append(p)
    return out


def hull_value(frontier: Sequence[tuple[float, float]], cost: float) -> float:
    """Quality of a frontier at ``cost`` (linear between its points, flat past the last; NaN
    below the first)."""
    xs = [p[0] for p in frontier]
    ys = [p[1] for p in frontier]
    if cost < xs[0] - 1e-12:
        return math.nan
    return float(np.interp(cost, xs, ys))


def _area(frontier: Sequence[tuple[float, float]], lo: float, hi: float) -> float:
    """Mean quality of a frontier over costs [lo, hi] (NaN when it does not reach ``lo``)."""
    if not hi > lo:
        return hull_value(frontier, lo)
    grid = np.linspace(lo, hi, 201)
    values = np.array([hull_value(frontier, c) for c in grid])
    return float(np.mean(values)) if np.isfinite(values).all() else math.nan


@dataclass(slots=True)
class NWayReport:
    """An N-way evaluation: points are (mean cost, accuracy); see the module docstring."""

    models: tuple[str, ...]
    n: int
    singles: dict[str, tuple[float, float]]
    best_single: tuple[str, float, float]  # (model, accuracy, cost)
    oracle: tuple[float, float]  # (cost, accuracy)
    router: list[tuple[float, float, float]]  # (λ, cost, accuracy) per λ
    router_hull: list[tuple[float, float]]
    singles_hull: list[tuple[float, float]]
    argmax_accuracy: float
    argmax_share: dict[str, float]  # how often λ = 0 picks each model
    gain_at_best_cost: float  # points
    area_router: float
    area_singles: float
    link: str = "identity"
    l2s: list[float] = field(default_factory=list)
    cost_note: str = ""
    #: per prompt, the column the argmax router (λ = 0) picked (out of fold)
    picks: list[int] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "models": list(self.models),
            "n": self.n,
            "singles": {m: {"cost": c, "accuracy": q} for m, (c, q) in self.singles.items()},
            "best_single": dict(zip(("model", "accuracy", "cost"), self.best_single, strict=True)),
            "oracle": {"cost": self.oracle[0], "accuracy": self.oracle[1]},
            "argmax_accuracy": self.argmax_accuracy,
            "argmax_gain_points": 100 * (self.argmax_accuracy - self.best_single[1]),
            "argmax_share": self.argmax_share,
            "gain_at_best_cost_points": self.gain_at_best_cost,
            "area_router": self.area_router,
            "area_singles": self.area_singles,
            "router_curve": [
                {"lambda": lam, "cost": c, "accuracy": q} for lam, c, q in self.router
            ],
            "router_hull": [list(p) for p in self.router_hull],
            "singles_hull": [list(p) for p in self.singles_hull],
            "link": self.link,
            "l2_per_fold": self.l2s,
            "cost_note": self.cost_note,
        }


def _lambdas(costs: FloatArray) -> FloatArray:
    """λ from 0 up to where the cheapest model always wins (qualities differ by at most 1, so
    λ times the smallest gap between two costs above 1 suffices)."""
    distinct = np.unique(costs)
    if distinct.size < 2:
        return np.zeros(1)
    spread = float(distinct[-1] - distinct[0])
    gap = float(np.diff(distinct).min())
    return np.concatenate([[0.0], np.geomspace(1e-3 / spread, 2.0 / gap, 120)])


def evaluate_nway(
    X: FloatArray,
    data: NWayData,
    costs: Sequence[float],
    *,
    folds: int = 5,
    seed: int = 0,
    link: Link = "identity",
    l2: float | None = None,
    cost_note: str = "",
) -> NWayReport:
    """k-fold CV of the N-way model on ``X`` (rows: ``data``'s prompts); ``costs``: each model's
    cost, used to pick and, without per-request costs in ``data``, to count the cost."""
    Y = data.scores
    n, m = Y.shape
    if n < 2 * folds:
        raise ValueError(f"{n} prompts are too few for {folds}-fold CV")
    cost_vec = np.asarray(costs, dtype=np.float64)
    if cost_vec.shape != (m,):
        raise ValueError(f"{cost_vec.shape[0]} costs for {m} models")
    realised = np.broadcast_to(cost_vec, (n, m)).copy()
    if data.costs is not None:
        realised = np.where(np.isfinite(data.costs), data.costs, realised)
    fold = _folds(n, folds, seed)
    Q = np.zeros((n, m))
    l2s: list[float] = []
    for f in range(folds):
        tr, te = fold != f, fold == f
        strength = choose_l2(X[tr], Y[tr], link=link) if l2 is None else l2
        l2s.append(strength)
        Q[te] = _predict(X[tr], Y[tr], X[te], link, strength)
    rows = np.arange(n)
    singles = {
        name: (float(realised[:, j].mean()), float(Y[:, j].mean()))
        for j, name in enumerate(data.models)
    }
    best = max(data.models, key=lambda name: (singles[name][1], -singles[name][0]))
    best_single = (best, singles[best][1], singles[best][0])
    top = Y.max(axis=1, keepdims=True)
    oracle_pick = np.argmin(np.where(Y >= top - 1e-12, realised, np.inf), axis=1)
    oracle = (float(realised[rows, oracle_pick].mean()), float(top.mean()))
    router = []
    for lam in _lambdas(cost_vec):
        choice = pick_matrix(Q, cost_vec, float(lam))
        router.append(
            (float(lam), float(realised[rows, choice].mean()), float(Y[rows, choice].mean()))
        )
    argmax = pick_matrix(Q, cost_vec, 0.0)
    router_hull = hull([(c, q) for _, c, q in router])
    singles_hull = hull(list(singles.values()))
    lo = min(c for c, _ in singles.values())
    hi = max(c for c, _ in singles.values())
    at_best = hull_value(router_hull, best_single[2])
    return NWayReport(
        models=data.models,
        n=n,
        singles=singles,
        best_single=best_single,
        oracle=oracle,
        router=router,
        router_hull=router_hull,
        singles_hull=singles_hull,
        argmax_accuracy=float(Y[rows, argmax].mean()),
        argmax_share={name: float(np.mean(argmax == j)) for j, name in enumerate(data.models)},
        gain_at_best_cost=100 * (at_best - best_single[1]),
        area_router=_area(router_hull, lo, hi),
        area_singles=_area(singles_hull, lo, hi),
        link=link,
        l2s=l2s,
        cost_note=cost_note,
        picks=[int(j) for j in argmax],
    )


def plot_nway(report: NWayReport, path: str | Path, title: str = "") -> Path:
    """Quality against mean cost: single models, their mixtures, the router, the oracle."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    draw_nway(ax, report, title or f"N-way routing, {report.n} prompts")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def draw_nway(ax: Any, report: NWayReport, title: str) -> None:
    """Draw one report on matplotlib axes ``ax``."""
    for name, (c, q) in report.singles.items():
        ax.scatter([c], [q], marker="o", zorder=3)
        ax.annotate(
            name.split("/")[-1], (c, q), fontsize=6, xytext=(3, 3), textcoords="offset points"
        )
    sx, sy = zip(*report.singles_hull, strict=True)
    ax.plot(sx, sy, "k--", lw=1, label="mixtures of single models")
    ax.plot(
        [c for _, c, _ in report.router],
        [q for _, _, q in report.router],
        ".",
        color="tab:blue",
        alpha=0.4,
        ms=4,
    )
    hx, hy = zip(*report.router_hull, strict=True)
    ax.plot(hx, hy, "-", color="tab:blue", lw=2, label="probe N-way router")
    ax.scatter(
        [report.oracle[0]],
        [report.oracle[1]],
        marker="*",
        s=120,
        color="tab:red",
        label="oracle",
        zorder=4,
    )
    ax.set_xlabel("mean cost" + (f" ({report.cost_note})" if report.cost_note else ""))
    ax.set_ylabel("accuracy")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
