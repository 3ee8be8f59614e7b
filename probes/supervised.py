"""Supervised calibration: the probability that the large model does better on a prompt.

A :class:`SupervisedModel` is an L2-regularised logistic regression on standardised probe
features (oriented sparsity at chosen layers, metrics and positions, see
:mod:`probes.feature_names`) plus ``log_tokens`` (log of the prompt's token count), fitted on
prompts labelled with both models' outcomes. The target is "the large model does better": the large
model was right and the small one wrong (not "the small model fails", which also counts prompts
neither model gets right).

Its features may also be coordinates of the probe's pooled hidden vectors
(``L30.state.last.17``, see :mod:`probes.feature_names`): the probe's own representation of the
prompt, which routes better than its sparsity alone (bench/results/routing_eval.md). A probe that
feeds such a model keeps those vectors (``probe.state_layers``).

It may also carry :class:`~probes.neighbours.NeighbourVote` s (each the mean gain of the most
similar labelled prompts in the probe's state space at one layer), stacked with the regression:
``P = sigmoid(a * z + b_1 * vote_1 + ... + b_m * vote_m + c)``, where ``z`` is the regression's
log-odds and ``(a, b_1..b_m, c)`` (:attr:`SupervisedModel.stack`) a logistic regression fitted on
out-of-fold values. A calibration file written with one vote (``"neighbours": {...}``,
``"stack": [a, b, c]``) reads as a one-vote model.

A model fitted on prompts followed by the small model's answers (:attr:`SupervisedModel.reads`
``"answer"``) is a cascade's check of that answer; it cannot route a prompt alone. Files
written before the field existed read as ``"prompt"``.

It is stored as plain JSON (feature names, means, scales, coefficients; no pickle) inside the
calibration file and carries the probe fingerprint it was fitted with. Applying it to a live
:class:`~probes.types.ProbeResult` is a dot product (a few dozen numbers for the sparsity
features, microseconds; a ~1,200-long numpy dot product with the hidden vectors, ~20 µs).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Final, Literal

import numpy as np
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from probes.feature_names import (
    feature_value,
    is_state_feature,
    parse_feature,
    parse_state_feature,
    state_block,
)
from probes.metric_names import HIGHER_IS_SPARSER
from probes.neighbours import NeighbourVote
from probes.types import ProbeResult

__all__ = [
    "LENGTH_FEATURE",
    "SupervisedModel",
    "fit_logistic",
    "required_probe",
]

#: The non-probe feature: log of the prompt's token count.
LENGTH_FEATURE: Final = "log_tokens"

FloatArray = NDArray[np.float64]


def fit_logistic(
    X: FloatArray, y: NDArray[np.bool_], *, l2: float = 1.0, iterations: int = 50
) -> tuple[FloatArray, float, FloatArray, FloatArray]:
    """(coef, intercept, mean, scale) of an L2 logistic regression on standardised ``X``.

    Newton's method on the penalised log-likelihood (``l2`` times ½‖w‖², intercept unpenalised);
    features with zero spread get scale 1 and (in effect) weight 0. With fewer rows than
    features (a few hundred labels and the recipe's ~1,260 features) the same Newton steps are
    taken in the rows' span (:func:`_newton_rows`): the iterates, and so the fit, are the same,
    at a fraction of the cost.
    """
    X = np.asarray(X, dtype=np.float64)
    t = np.asarray(y, dtype=np.float64)
    if X.ndim != 2 or X.shape[0] != t.shape[0]:
        raise ValueError(f"X must be (n, k) with n = len(y); got {X.shape} and {t.shape}")
    if X.shape[0] == 0 or t.min() == t.max():
        raise ValueError("fitting needs both classes among the labels")
    mean = X.mean(axis=0)
    scale = X.std(axis=0)
    scale[~(scale > 1e-12)] = 1.0
    Xs = (X - mean) / scale
    b0 = math.log(t.mean() / (1.0 - t.mean()))
    if Xs.shape[0] < Xs.shape[1]:
        coef, intercept = _newton_rows(Xs, t, l2, b0, iterations)
        return coef, intercept, mean, scale
    Z = np.column_stack([np.ones(X.shape[0]), Xs])
    w = np.zeros(Z.shape[1])
    w[0] = b0
    penalty = np.full(Z.shape[1], l2)
    penalty[0] = 0.0
    for _ in range(iterations):
        p = _sigmoid(Z @ w)
        grad = Z.T @ (p - t) + penalty * w
        hess = (Z * (p * (1.0 - p))[:, None]).T @ Z + np.diag(penalty + _RIDGE)
        step = np.linalg.solve(hess, grad)
        w -= step
        if float(np.abs(step).max()) < _TOL:
            break
    return w[1:].copy(), float(w[0]), mean, scale


#: Newton's stopping rule (largest coefficient step) and the ridge every diagonal gets.
_TOL: Final = 1e-8
_RIDGE: Final = 1e-9


def _sigmoid(u: FloatArray) -> FloatArray:
    out: FloatArray = 1.0 / (1.0 + np.exp(-np.clip(u, -35, 35)))
    return out


def _newton_rows(
    Xs: FloatArray, t: FloatArray, l2: float, b0: float, iterations: int
) -> tuple[FloatArray, float]:
    """:func:`fit_logistic`'s Newton iterations with w = Xsᵀα (n < k rows x features).

    Starting from w = 0 every Newton step lies in the span of the rows, so with K = Xs·Xsᵀ,
    D = diag(p(1-p)) and r = (p - t) + l2·α the primal step (Xsᵀ D Xs + l2 I) δw + Xsᵀ D 1 δb =
    Xsᵀ r is δw = Xsᵀ δα for (D K + l2 I) δα + D 1 δb = r, and the intercept's row 1ᵀ D K δα +
    1ᵀ D 1 δb = 1ᵀ(p - t) is unchanged: an (n+1)-square system instead of a (k+1)-square one.
    """
    n = Xs.shape[0]
    K = Xs @ Xs.T
    alpha = np.zeros(n)
    b = b0
    lam = l2 + _RIDGE
    M = np.empty((n + 1, n + 1))
    for _ in range(iterations):
        p = _sigmoid(K @ alpha + b)
        d = p * (1.0 - p)
        M[:n, :n] = d[:, None] * K
        M[np.arange(n), np.arange(n)] += lam
        M[:n, n] = d
        M[n, :n] = d @ K
        M[n, n] = d.sum() + _RIDGE
        rhs = np.append((p - t) + l2 * alpha, (p - t).sum())
        step = np.linalg.solve(M, rhs)
        alpha -= step[:n]
        b -= float(step[n])
        if max(float(np.abs(Xs.T @ step[:n]).max()), abs(float(step[n]))) < _TOL:
            break
    coef: FloatArray = Xs.T @ alpha
    return coef, b


class SupervisedModel(BaseModel):
    """P(large model does better | probe features); see the module docstring."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    target: str = Field(
        "large_better", description="what was predicted: large model right, small model wrong"
    )
    features: tuple[str, ...] = Field(min_length=1)
    mean: tuple[float, ...]
    scale: tuple[float, ...]
    coef: tuple[float, ...]
    intercept: float
    l2: float = Field(1.0, ge=0)
    n_train: int = Field(0, ge=0, description="labelled prompts it was fitted on")
    positives: int = Field(0, ge=0, description="of which the large model did better")
    cv: dict[str, float] = Field(
        default_factory=dict, description="cross-validated scores on the training labels"
    )
    p_quantiles: dict[str, float] = Field(
        default_factory=dict, description="quantiles of P on the training prompts ('q0.5': ...)"
    )
    neighbours: tuple[NeighbourVote, ...] = Field(
        (), description="nearest-neighbour votes stacked with the regression (none: it alone)"
    )
    stack: tuple[float, ...] | None = Field(
        None,
        description="(a, b_1..b_m, c): P = sigmoid(a * log-odds of the regression + "
        "b_1 * vote_1 + ... + b_m * vote_m + c), one b per vote; set exactly when there are votes",
    )
    reads: Literal["prompt", "answer"] = Field(
        "prompt",
        description="what the probe read when it was fitted: the prompt, or the prompt plus the "
        "small model's answer (a cascade's check)",
    )

    # (layer or -1 for length, metric, token mean?, flip to "higher = sparser"?, mean, coef/scale)
    _plan: list[tuple[int, str, bool, bool, float, float]] = PrivateAttr(default_factory=list)
    # hidden-vector features: block ("L30.last") -> (coordinates, their means, coef/scale,
    # the width a vector must at least have)
    _blocks: dict[str, tuple[NDArray[np.intp], FloatArray, FloatArray, int]] = PrivateAttr(
        default_factory=dict
    )

    def model_post_init(self, context: Any, /) -> None:
        plan = []
        blocks: dict[str, tuple[list[int], list[float], list[float]]] = {}
        k = len(self.features)
        if not len(self.mean) == len(self.scale) == len(self.coef) == k or min(self.scale) <= 0:
            return  # refused with a clear message by _check
        for name, m, s, c in zip(self.features, self.mean, self.scale, self.coef, strict=True):
            if name == LENGTH_FEATURE:
                plan.append((-1, "", False, False, m, c / s))
            elif is_state_feature(name):
                layer, pos, index = parse_state_feature(name)
                idx, mu, w = blocks.setdefault(state_block(layer, pos), ([], [], []))
                idx.append(index)
                mu.append(m)
                w.append(c / s)
            else:
                layer, metric, pos = parse_feature(name)
                flip = metric in HIGHER_IS_SPARSER and not HIGHER_IS_SPARSER[metric]
                plan.append((layer, metric, pos == "mean", flip, m, c / s))
        self._plan = plan
        self._blocks = {
            b: (np.asarray(i, dtype=np.intp), np.asarray(mu), np.asarray(w), max(i) + 1)
            for b, (i, mu, w) in blocks.items()
        }

    @field_validator("neighbours", mode="before")
    @classmethod
    def _one_vote(cls, value: Any) -> Any:
        """A file from before several votes: ``null`` or a single vote object."""
        if value is None:
            return ()
        if isinstance(value, (dict, NeighbourVote)):
            return (value,)
        return value

    @model_validator(mode="after")
    def _check(self) -> SupervisedModel:
        k = len(self.features)
        for name in ("mean", "scale", "coef"):
            if len(getattr(self, name)) != k:
                raise ValueError(f"{name} has {len(getattr(self, name))} entries, features {k}")
        if any(not s > 0 for s in self.scale):
            raise ValueError("every scale must be > 0")
        for f in self.features:
            if is_state_feature(f):
                parse_state_feature(f)
            elif f != LENGTH_FEATURE:
                parse_feature(f)
        if bool(self.neighbours) != (self.stack is not None):
            raise ValueError("neighbours and stack go together: set both or neither")
        if self.stack is not None:
            m = len(self.neighbours)
            if len(self.stack) != m + 2:
                raise ValueError(
                    f"stack has {len(self.stack)} weights; {m} vote(s) need {m + 2} "
                    "(a for the regression, one b per vote, c)"
                )
            if not all(math.isfinite(v) for v in self.stack):
                raise ValueError("stack weights must be finite")
        blocks = self.vote_blocks()
        if len(set(blocks)) != len(blocks):
            raise ValueError(f"two votes compare the same hidden vector: {list(blocks)}")
        return self

    @classmethod
    def fit(
        cls,
        X: FloatArray,
        y: NDArray[np.bool_],
        features: Sequence[str],
        *,
        l2: float = 1.0,
        cv: dict[str, float] | None = None,
        neighbours: NeighbourVote | Sequence[NeighbourVote] = (),
        stack: tuple[float, ...] | None = None,
        votes: FloatArray | None = None,
    ) -> SupervisedModel:
        """Fit the regression on ``X`` (columns: ``features``); with ``neighbours``, stack their
        ``votes`` on the training rows (leave-one-out; n x m, one column per vote) with weights
        ``stack``."""
        coef, intercept, mean, scale = fit_logistic(X, y, l2=l2)
        if isinstance(neighbours, NeighbourVote):
            neighbours = (neighbours,)
        model = cls(
            features=tuple(features),
            mean=tuple(float(v) for v in mean),
            scale=tuple(float(v) for v in scale),
            coef=tuple(float(v) for v in coef),
            intercept=intercept,
            l2=l2,
            n_train=len(y),
            positives=int(np.sum(y)),
            cv=dict(cv or {}),
            neighbours=tuple(neighbours),
            stack=stack,
        )
        if neighbours and (votes is None or len(votes) != len(y)):
            raise ValueError("a model with neighbours needs the training rows' votes")
        p = model.combine(model.log_odds(X), votes)
        quantiles = {f"q{q:g}": float(np.quantile(p, q)) for q in (0.1, 0.25, 0.5, 0.75, 0.9)}
        return model.model_copy(update={"p_quantiles": quantiles})

    # -- applying ------------------------------------------------------------------------
    def log_odds(self, X: FloatArray) -> FloatArray:
        """The regression's log-odds per row of a feature matrix (columns: :attr:`features`)."""
        z = ((np.asarray(X, dtype=np.float64) - self.mean) / self.scale) @ np.asarray(self.coef)
        return np.asarray(z + self.intercept, dtype=np.float64)

    def combine(self, z: FloatArray, votes: FloatArray | None) -> FloatArray:
        """P from the regression's log-odds ``z`` and, with neighbours, their ``votes`` (n x m,
        one column per vote in :attr:`neighbours` order; a 1-D array for a single vote)."""
        if self.stack is not None:
            if votes is None:
                raise KeyError(f"the model stacks the {list(self.vote_blocks())} votes: give votes")
            V = np.asarray(votes, dtype=np.float64)
            if V.ndim == 1:
                V = V[:, None]
            if V.shape[1] != len(self.neighbours):
                raise ValueError(f"{V.shape[1]} vote columns for {len(self.neighbours)} votes")
            a, *b, c = self.stack
            z = a * np.asarray(z, dtype=np.float64) + V @ np.asarray(b) + c
        return np.asarray(1.0 / (1.0 + np.exp(-np.clip(z, -35, 35))))

    def vote_blocks(self) -> tuple[str, ...]:
        """The hidden vectors the neighbour votes compare ("L12.state.mean", ...)."""
        return tuple(v.block for v in self.neighbours)

    def predict_matrix(
        self, X: FloatArray, states: dict[str, NDArray[Any]] | None = None
    ) -> FloatArray:
        """P for each row of a feature matrix whose columns follow :attr:`features`; with
        neighbours, ``states`` (as in ``FeatureTable.states``) holds the rows' vectors."""
        votes = None
        if self.neighbours:
            columns = []
            for vote in self.neighbours:
                if states is None or vote.key not in states:
                    raise KeyError(f"the neighbour vote needs the {vote.key} hidden vectors")
                columns.append(vote.votes(states[vote.key]))
            votes = np.column_stack(columns)
        return self.combine(self.log_odds(X), votes)

    def vector(self, result: ProbeResult) -> list[float]:
        """The model's input features read from a probe result (KeyError when not measured)."""
        out = []
        for name in self.features:
            if name == LENGTH_FEATURE:
                out.append(math.log(max(1, result.n_tokens)))
            elif is_state_feature(name):
                layer, pos, index = parse_state_feature(name)
                out.append(float(_state(result, state_block(layer, pos))[index]))
            else:
                out.append(feature_value(result, *parse_feature(name)))
        return out

    def predict(self, result: ProbeResult) -> float:
        """P(large model does better) for one probe result (KeyError when a feature is not
        measured). A few microseconds: one pass over a precomputed plan."""
        z = self.intercept
        for layer, metric, mean, flip, mu, w in self._plan:
            if layer < 0:
                x = math.log(max(1, result.n_tokens))
            else:
                table = result.metrics_mean if mean else result.metrics
                if table is None:
                    raise KeyError("token-mean metrics were not measured")
                v = table[layer][metric]
                x = 1.0 - v if flip else v
            z += w * (x - mu)
        for block, (idx, mu_b, w_b, need) in self._blocks.items():
            vec = np.asarray(_state(result, block), dtype=np.float64)
            if vec.size < need:
                raise KeyError(
                    f"{block}: the model reads coordinate {need - 1}, the probe reports {vec.size}"
                )
            z += float(w_b @ (vec[idx] - mu_b))
        if self.stack is not None:
            a, *b, c = self.stack
            z = a * z + c
            for weight, vote in zip(b, self.neighbours, strict=True):
                z += weight * vote.vote(_state(result, vote.key))
        return 1.0 / (1.0 + math.exp(-max(-35.0, min(35.0, z))))

    def _metric_features(self) -> list[tuple[int, str, str]]:
        return [
            parse_feature(f)
            for f in self.features
            if f != LENGTH_FEATURE and not is_state_feature(f)
        ]

    def probe_needs(self) -> tuple[tuple[int, ...], bool]:
        """(layers whose metrics the probe must report, whether it needs token-mean metrics)."""
        parsed = self._metric_features()
        layers = tuple(sorted({p[0] for p in parsed}))
        return layers, any(p[2] == "mean" for p in parsed)

    def state_layers(self) -> tuple[int, ...]:
        """Layers whose hidden vectors the probe must keep (``probe.state_layers``)."""
        layers = {parse_state_feature(f)[0] for f in self.features if is_state_feature(f)}
        layers.update(v.layer for v in self.neighbours)
        return tuple(sorted(layers))

    def check_probe(
        self,
        layers: Sequence[int],
        token_mean: bool,
        metrics: Sequence[str],
        state_layers: Sequence[int] = (),
    ) -> None:
        """ValueError naming what a probe configuration lacks to feed this model."""
        need_layers, need_mean = self.probe_needs()
        missing = sorted(set(need_layers) - set(layers))
        problems = []
        if missing:
            problems.append(f"layers {missing} (set probe.layers to include them)")
        if need_mean and not token_mean:
            problems.append("token-mean metrics (set probe.token_mean: true)")
        need_metrics = {p[1] for p in self._metric_features()}
        if need_metrics - set(metrics):
            problems.append(f"metrics {sorted(need_metrics - set(metrics))} (add to probe.metrics)")
        missing_states = sorted(set(self.state_layers()) - set(state_layers))
        if missing_states:
            problems.append(
                f"the hidden vectors of layers {missing_states} "
                "(set probe.state_layers to include them; the local probe only)"
            )
        if problems:
            raise ValueError("the supervised model needs " + "; ".join(problems))


def _state(result: ProbeResult, block: str) -> tuple[float, ...]:
    if result.states is None or block not in result.states:
        raise KeyError(f"the probe result carries no {block} hidden vector (probe.state_layers)")
    return result.states[block]


def required_probe(models: Sequence[SupervisedModel]) -> dict[str, Any]:
    """Probe settings (layers, token_mean, state_layers) that cover every model's features."""
    layers: set[int] = set()
    states: set[int] = set()
    mean = False
    for m in models:
        ls, needs_mean = m.probe_needs()
        layers |= set(ls)
        states |= set(m.state_layers())
        mean = mean or needs_mean
    return {
        "layers": tuple(sorted(layers)),
        "token_mean": mean,
        "state_layers": tuple(sorted(states)),
    }
