"""N-way routing: each candidate model's expected quality on a prompt, from the probe's features.

An :class:`NWayModel` holds one linear head per candidate model over the same standardised
probe features as the supervised model (:mod:`probes.supervised`: feature names, means and
scales; the default recipe of :mod:`evaluation.recipes`). A head predicts the model's expected
quality (mean correctness, in [0, 1]) on a prompt:

- ``link: identity`` (ridge regression, the default: one solve fits every head, and it routed
  at least as well as logistic heads in a quick CV, docs/routing.md): quality = ``z``, clipped
  to [0, 1];
- ``link: logit`` (logistic regression on the soft labels, :func:`probes.supervised.fit_logistic`):
  quality = ``sigmoid(z)``;

where ``z = coef · (x - mean) / scale + intercept``. Each head is applied as a
:class:`~probes.supervised.SupervisedModel` (its precomputed plan: microseconds per head), so
reading the features from a :class:`~probes.types.ProbeResult` is the supervised model's code.

A router picks, among the allowed models, the argmax of ``quality - willingness_to_pay * cost``
(:func:`pick`), where ``cost`` is each model's price in the model's ``cost_unit`` (USD per
million tokens, or USD per request). It is stored in the calibration file's ``nway`` section
(:class:`probes.calibration.Calibration`), as plain JSON.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Final, Literal, cast

import numpy as np
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator

from probes.supervised import SupervisedModel, fit_logistic
from probes.types import ProbeResult

__all__ = [
    "COST_UNITS",
    "CostUnit",
    "Link",
    "NWayModel",
    "QualityHead",
    "fit_heads",
    "pick",
    "pick_matrix",
]

FloatArray = NDArray[np.float64]
#: What a model's cost is counted in.
CostUnit = Literal["usd_per_mtok", "usd_per_request"]
COST_UNITS: Final = ("usd_per_mtok", "usd_per_request")
#: How a head's linear score becomes a quality: ``identity`` (ridge), ``logit`` (logistic).
Link = Literal["identity", "logit"]


class QualityHead(BaseModel):
    """One candidate model: its head's weights (on the standardised features), its cost and its
    mean quality on the training prompts."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    coef: tuple[float, ...]
    intercept: float
    cost: float = Field(ge=0, description="price, in the N-way model's cost_unit")
    mean_quality: float = Field(ge=0, le=1, description="mean quality on the training prompts")


class NWayModel(BaseModel):
    """Expected quality of each candidate model from probe features; see the module docstring."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    features: tuple[str, ...] = Field(min_length=1)
    mean: tuple[float, ...]
    scale: tuple[float, ...]
    link: Link = "identity"
    l2: float = Field(1.0, ge=0)
    cost_unit: CostUnit = "usd_per_mtok"
    heads: dict[str, QualityHead] = Field(min_length=1, description="model name -> its head")
    n_train: int = Field(0, ge=0, description="labelled prompts it was fitted on")
    cv: dict[str, float] = Field(
        default_factory=dict, description="cross-validated scores on the training labels"
    )

    _applied: dict[str, SupervisedModel] = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _check(self) -> NWayModel:
        k = len(self.features)
        for model, head in self.heads.items():
            if len(head.coef) != k:
                raise ValueError(f"heads.{model}.coef has {len(head.coef)} entries, features {k}")
        # one SupervisedModel per head: its feature checks and its fast plan
        self._applied = {
            model: SupervisedModel(
                target=f"quality:{model}",
                features=self.features,
                mean=self.mean,
                scale=self.scale,
                coef=head.coef,
                intercept=head.intercept,
                l2=self.l2,
            )
            for model, head in self.heads.items()
        }
        return self

    # -- fitting -----------------------------------------------------------------------------
    @classmethod
    def fit(
        cls,
        X: FloatArray,
        Y: FloatArray,
        features: Sequence[str],
        models: Sequence[str],
        costs: Sequence[float],
        *,
        cost_unit: CostUnit = "usd_per_mtok",
        link: Link = "identity",
        l2: float = 100.0,
        cv: Mapping[str, float] | None = None,
    ) -> NWayModel:
        """Fit one head per column of ``Y`` (n x m qualities in [0, 1], columns: ``models``) on
        ``X`` (n x k, columns: ``features``)."""
        if len(models) != Y.shape[1] or len(costs) != len(models):
            raise ValueError(
                f"{Y.shape[1]} quality columns, {len(models)} models, {len(costs)} costs"
            )
        W, b, mean, scale = fit_heads(X, Y, link=link, l2=l2)
        heads = {
            name: QualityHead(
                coef=tuple(float(v) for v in W[:, j]),
                intercept=float(b[j]),
                cost=float(costs[j]),
                mean_quality=float(np.clip(Y[:, j].mean(), 0.0, 1.0)),
            )
            for j, name in enumerate(models)
        }
        return cls(
            features=tuple(features),
            mean=tuple(float(v) for v in mean),
            scale=tuple(float(v) for v in scale),
            link=link,
            l2=l2,
            cost_unit=cost_unit,
            heads=heads,
            n_train=int(X.shape[0]),
            cv=dict(cv or {}),
        )

    # -- applying ----------------------------------------------------------------------------
    @property
    def models(self) -> tuple[str, ...]:
        return tuple(self.heads)

    @property
    def costs(self) -> dict[str, float]:
        return {m: h.cost for m, h in self.heads.items()}

    def as_supervised(self) -> SupervisedModel:
        """The first head as a :class:`SupervisedModel`: what the probe must measure for this
        model (``probe_needs``, ``check_probe``, ``state_layers``)."""
        return next(iter(self._applied.values()))

    def predict_matrix(self, X: FloatArray) -> FloatArray:
        """n x m qualities for the rows of a feature matrix (columns: :attr:`features`)."""
        Z = np.column_stack([self._applied[m].log_odds(X) for m in self.heads])
        return _quality(Z, self.link)

    def predict(self, result: ProbeResult) -> dict[str, float]:
        """Model name -> predicted quality for one probe result (KeyError when a feature is
        not measured)."""
        out = {}
        for model, applied in self._applied.items():
            p = applied.predict(result)  # sigmoid(z), z clamped to +-35
            if self.link == "logit":
                out[model] = p
            else:
                z = math.log(p / (1.0 - p)) if 0.0 < p < 1.0 else (35.0 if p >= 1.0 else -35.0)
                out[model] = min(1.0, max(0.0, z))
        return out


def _quality(Z: FloatArray, link: Link) -> FloatArray:
    if link == "logit":
        return np.asarray(1.0 / (1.0 + np.exp(-np.clip(Z, -35, 35))), dtype=np.float64)
    return np.asarray(np.clip(Z, 0.0, 1.0), dtype=np.float64)


def fit_heads(
    X: FloatArray, Y: FloatArray, *, link: Link = "identity", l2: float = 100.0
) -> tuple[FloatArray, FloatArray, FloatArray, FloatArray]:
    """(W: k x m, b: m, mean, scale) of one head per column of ``Y`` on standardised ``X``.

    ``logit``: :func:`probes.supervised.fit_logistic` on the soft labels, per column (its
    standardisation is the supervised model's); a constant column gets a constant head.
    ``identity``: ridge regression of all columns at once (``l2`` times ½‖w‖², intercept
    unpenalised) on the same standardisation.
    """
    X = np.asarray(X, dtype=np.float64)
    Y = np.asarray(Y, dtype=np.float64)
    if X.ndim != 2 or Y.ndim != 2 or X.shape[0] != Y.shape[0] or X.shape[0] < 2:
        raise ValueError(f"X must be (n, k) and Y (n, m) with n >= 2; got {X.shape}, {Y.shape}")
    if not (np.isfinite(Y).all() and Y.min() >= 0.0 and Y.max() <= 1.0):
        raise ValueError("qualities must be numbers in [0, 1]")
    m = Y.shape[1]
    if link == "logit":
        W = np.zeros((X.shape[1], m))
        b = np.zeros(m)
        mean, scale = _standardisation(X)
        for j in range(m):
            t = Y[:, j]
            if t.min() == t.max():
                q = float(np.clip(t[0], 1e-4, 1 - 1e-4))
                b[j] = math.log(q / (1 - q))
                continue
            # soft labels: Newton's method on the cross-entropy works for targets in [0, 1]
            W[:, j], b[j], mean, scale = fit_logistic(X, cast(NDArray[np.bool_], t), l2=l2)
        return W, b, mean, scale
    mean, scale = _standardisation(X)
    Z = (X - mean) / scale
    y_mean = Y.mean(axis=0)
    # ridge on centred data: the intercept is the mean; solve in the smaller of n and k
    n, k = Z.shape
    if n >= k:
        W = np.linalg.solve(Z.T @ Z + l2 * np.eye(k), Z.T @ (Y - y_mean))
    else:
        W = Z.T @ np.linalg.solve(Z @ Z.T + l2 * np.eye(n), Y - y_mean)
    return W, y_mean.copy(), mean, scale


def _standardisation(X: FloatArray) -> tuple[FloatArray, FloatArray]:
    """Column means and standard deviations as :func:`probes.supervised.fit_logistic` takes
    them (zero spread: scale 1)."""
    probe = np.zeros(X.shape[0], dtype=np.bool_)
    probe[0] = True
    # the supervised model's own standardisation, read off a zero-iteration fit
    _, _, mean, scale = fit_logistic(X, probe, l2=1.0, iterations=0)
    return mean, scale


def pick(
    qualities: Mapping[str, float],
    costs: Mapping[str, float],
    *,
    willingness_to_pay: float = 0.0,
    allowed: Sequence[str] | None = None,
) -> str:
    """The model of ``allowed`` (default: all of ``qualities``) with the highest ``quality -
    willingness_to_pay * cost``; ties go to the cheaper model, then to the earlier one."""
    names = list(allowed) if allowed is not None else list(qualities)
    if not names:
        raise ValueError("no model to pick from")

    def key(i: int) -> tuple[float, float, int]:
        name = names[i]
        return (-(qualities[name] - willingness_to_pay * costs[name]), costs[name], i)

    return names[min(range(len(names)), key=key)]


def pick_matrix(
    Q: FloatArray, costs: Sequence[float] | FloatArray, willingness_to_pay: float = 0.0
) -> NDArray[np.intp]:
    """Per row of ``Q`` (n x m predicted qualities), the column :func:`pick` chooses."""
    c = np.broadcast_to(np.asarray(costs, dtype=np.float64), Q.shape)
    utility = np.asarray(Q, dtype=np.float64) - willingness_to_pay * c
    best = utility.max(axis=1, keepdims=True)
    # among ties, the cheaper column, then the earlier one
    tied = np.where(utility >= best - 1e-12, c, np.inf)
    return np.asarray(np.argmin(tied, axis=1), dtype=np.intp)
