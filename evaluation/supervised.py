"""Fitting the supervised calibration: P(the large model does better) from probe features.

:func:`fit_supervised` fits the model on a feature table (L2 strength by inner CV, neighbour
votes stacked in when given) and attaches its k-fold CV scores. ``calibrate --labels`` runs it
in three steps: :func:`plan_label_fit` checks which features and votes to fit (the default
recipe, :mod:`evaluation.recipes`, unless given), :func:`fit_label_model` probes the labelled
prompts (:func:`evaluation.tables.feature_table`) and fits, and :func:`label_calibration` adds
the score percentiles the gateway serves with it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from evaluation.crossval import cv_logistic, cv_stacked, fit_stacked, fold_ids, inner_l2
from evaluation.outcomes import OutcomeSet
from evaluation.recipes import SUPERVISED_FEATURES, default_recipe
from evaluation.tables import (
    block_vectors,
    feature_table,
    probe_feeding,
    results_from_table,
    supervised_matrix,
)
from probes.calibration import Calibration, fit_calibration
from probes.errors import CalibrationError
from probes.feature_names import (
    expand_features,
    is_state_feature,
    parse_feature,
    parse_state_block,
    parse_state_feature,
)
from probes.feature_table import FeatureTable
from probes.neighbours import DEFAULT_K
from probes.supervised import LENGTH_FEATURE, SupervisedModel
from probes.types import ProbeInput

if TYPE_CHECKING:
    from probes.probe import SparsityProbe

__all__ = [
    "LabelModel",
    "LabelPlan",
    "fit_label_model",
    "fit_supervised",
    "label_calibration",
    "parse_neighbours",
    "plan_label_fit",
    "require_both_outcomes",
]


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
        cv = cv_logistic("probe LR", X, data, fold, "")
        model = SupervisedModel.fit(X, y, names, l2=inner_l2(X, y, data.small, data.large))
    else:
        vectors = [block_vectors(table, b) for b in blocks]
        cv = cv_stacked("probe LR + kNN", X, names, vectors, data, fold, blocks, k, "")
        model = fit_stacked(X, names, vectors, data, blocks, k)
    scores = {
        "folds": float(folds),
        "apgr": cv.mean("apgr"),
        "cpt50": cv.mean("cpt50"),
        "cpt80": cv.mean("cpt80"),
        "auroc": cv.mean("auroc"),
    }
    return model.model_copy(update={"cv": scores})


# -- calibrate --labels -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LabelPlan:
    """What ``calibrate --labels`` fits: the regression's features (hidden-vector blocks spelled
    out), the neighbour votes as (layer, block), and the layers whose vectors the table needs."""

    features: tuple[str, ...]
    neighbours: tuple[tuple[int, str], ...]
    state_layers: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class LabelModel:
    """A fitted supervised model, the probe that serves it (measuring what it reads) and the
    feature table it was fitted on."""

    model: SupervisedModel
    serving: SparsityProbe
    table: FeatureTable


def require_both_outcomes(data: OutcomeSet) -> None:
    """CalibrationError unless the labels hold prompts where the large model did better and
    prompts where it did not."""
    if data.large_better.all() or not data.large_better.any():
        raise CalibrationError(
            "the labels need prompts where the large model did better and prompts where it did "
            "not: a supervised model cannot be fitted otherwise"
        )


def parse_neighbours(given: str | None, default: Sequence[str]) -> list[tuple[int, str]]:
    """(layer, block) per vote of ``--neighbours`` (a comma-separated list; ``default`` when not
    given; empty for 'none')."""
    text = given if given is not None else ",".join(default)
    if text.strip().lower() == "none":
        return []
    out: list[tuple[int, str]] = []
    items = [item.strip() for item in text.split(",")]
    for item in items:
        try:
            parsed = parse_state_block(item)
        except ValueError:
            parsed = None
        if parsed is None:
            raise CalibrationError(
                f"--neighbours {item!r} must name a hidden vector, 'L<layer>.state.<last|mean>' "
                "(e.g. L12.state.mean, or a list: L12.state.mean,L18.state.mean), or be 'none'"
            )
        if any(block == item for _, block in out):
            raise CalibrationError(f"--neighbours names {item} twice. Fix: name each block once")
        out.append((parsed[0], item))
    return out


def plan_label_fit(
    probe: SparsityProbe,
    n_labelled: int,
    *,
    answers: bool,
    features: Sequence[str] | None = None,
    neighbours: str | None = None,
) -> LabelPlan:
    """Check ``features`` (``--features``; default: the recipe for what the probe reads) and
    ``neighbours`` (``--neighbours``) against ``probe``; CalibrationError names the problem."""
    recipe = default_recipe(probe.n_layers, n_labelled, answers=answers)
    chosen = tuple(features) if features else recipe.features
    needed_layers: set[int] = set()
    needed_states: set[int] = set()
    width = probe.loaded.hidden_size
    votes = parse_neighbours(neighbours, recipe.votes)
    needed_states.update(layer for layer, _ in votes)
    try:
        chosen = expand_features(chosen, width)
        for f in chosen:
            if f == LENGTH_FEATURE:
                continue
            if is_state_feature(f):
                layer, _pos, index = parse_state_feature(f)
                if index >= width:
                    raise ValueError(
                        f"feature {f!r}: the probe's hidden vectors have {width} coordinates "
                        f"(0..{width - 1})"
                    )
                needed_states.add(layer)
                continue
            needed_layers.add(parse_feature(f)[0])
    except ValueError as exc:
        raise CalibrationError(f"--features: {exc}") from None
    out_of_range = sorted(
        {la for la in needed_layers if not 0 <= la <= probe.n_layers}
        | {la for la in needed_states if not 1 <= la <= probe.n_layers}
    )
    if out_of_range:
        raise CalibrationError(
            f"--features name layers {out_of_range}, outside 0..{probe.n_layers} of "
            f"{probe.settings.model}"
        )
    return LabelPlan(chosen, tuple(votes), tuple(sorted(needed_states)))


def fit_label_model(
    probe: SparsityProbe,
    data: OutcomeSet,
    plan: LabelPlan,
    *,
    cache: Path | None,
    k: int = DEFAULT_K,
    seed: int = 0,
) -> LabelModel:
    """Probe the labelled prompts (through the feature cache) and fit the supervised model of
    ``plan`` with ``k`` neighbours per vote; with the small model's answers in ``data`` the model
    reads prompt + answer (a cascade's check)."""
    table = feature_table(probe, data.probe_inputs, cache, state_layers=plan.state_layers)
    if plan.neighbours and k > len(data) - 1:
        raise CalibrationError(
            f"--neighbours-k {k}: only {len(data)} labelled prompts. Fix: lower "
            "--neighbours-k or give more labels"
        )
    model = fit_supervised(
        table,
        data,
        [f for f in plan.features if f != LENGTH_FEATURE],
        neighbours=[block for _, block in plan.neighbours],
        k=k,
        folds=5,
        seed=seed,
    )
    if data.answers is not None:
        model = model.model_copy(update={"reads": "answer"})
    # The probe that serves this calibration must measure the model's features.
    return LabelModel(model, probe_feeding(probe, model), table)


def label_calibration(
    fitted: LabelModel,
    reference: Sequence[ProbeInput] | None,
    *,
    min_per_bucket: int = 50,
    max_buckets: int = 8,
) -> Calibration:
    """The percentile calibration (on ``reference`` prompts, probed now, else the labelled
    prompts' cached features) with the supervised model of ``fitted`` attached."""
    serving = fitted.serving
    if reference is not None:
        base = fit_calibration(
            serving,
            reference,
            min_per_bucket=min_per_bucket,
            max_buckets=max_buckets,
            progress=True,
        )
    else:
        base = Calibration.fit(
            results_from_table(serving, fitted.table),
            serving.fingerprint(),
            min_per_bucket=min_per_bucket,
            max_buckets=max_buckets,
        )
    return base.model_copy(update={"supervised": fitted.model})
