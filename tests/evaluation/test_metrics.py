"""Routing-quality metrics on hand-made data with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from evaluation.metrics import (
    apgr,
    auroc,
    average_ranks,
    cpt,
    quality_curve,
    routing_summary,
    stratified_auroc,
)

# Four prompts: gains (strong - weak) = +1, +1, 0, -1. q_weak = 0.5, q_strong = 0.75.
WEAK = np.array([0, 0, 1, 1], dtype=bool)
STRONG = np.array([1, 1, 1, 0], dtype=bool)
ORACLE = np.array([4.0, 3.0, 2.0, 1.0])  # +1 gains first, the -1 gain last


def test_average_ranks_ties() -> None:
    assert average_ranks([10, 20, 20, 5]).tolist() == [2.0, 3.5, 3.5, 1.0]
    assert average_ranks([1, 1, 1]).tolist() == [2.0, 2.0, 2.0]


def test_quality_curve_knots_and_grid() -> None:
    c, q = quality_curve(ORACLE, WEAK, STRONG)
    assert c.tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert q.tolist() == [0.5, 0.75, 1.0, 1.0, 0.75]
    c, q = quality_curve(ORACLE, WEAK, STRONG, grid=[0.0, 0.125, 1.0])
    assert c.tolist() == [0.0, 0.125, 1.0]
    assert q.tolist() == pytest.approx([0.5, 0.625, 0.75])


def test_oracle_apgr_known_value() -> None:
    # ∫q = (1/4)·(0.625 + 0.875 + 1 + 0.875) = 0.84375; (0.84375 - 0.5) / 0.25 = 1.375
    assert apgr(ORACLE, WEAK, STRONG) == pytest.approx(1.375)


def test_reversed_router() -> None:
    # q = 0.5, 0.25, 0.25, 0.5, 0.75; ∫q = 0.40625; (0.40625 - 0.5) / 0.25 = -0.375
    assert apgr(-ORACLE, WEAK, STRONG) == pytest.approx(-0.375)
    assert auroc(ORACLE, ~WEAK) == 1.0
    assert auroc(-ORACLE, ~WEAK) == 0.0


def test_apgr_of_a_score_and_its_negation_sum_to_one() -> None:
    rng = np.random.default_rng(1)
    for _ in range(20):
        n = int(rng.integers(5, 60))
        weak = rng.random(n) < 0.5
        strong = rng.random(n) < 0.8
        if weak.mean() == strong.mean():
            continue
        scores = rng.integers(0, 4, n).astype(float)  # many ties
        assert apgr(scores, weak, strong) + apgr(-scores, weak, strong) == pytest.approx(1.0)


def test_constant_score_is_exactly_half() -> None:
    assert apgr(np.zeros(4), WEAK, STRONG) == pytest.approx(0.5)
    assert auroc(np.zeros(4), ~WEAK) == 0.5
    _, q = quality_curve(np.ones(4), WEAK, STRONG)
    assert q.tolist() == pytest.approx([0.5, 0.5625, 0.625, 0.6875, 0.75])


def test_random_router_is_half_on_average() -> None:
    rng = np.random.default_rng(0)
    n = 200
    weak = rng.random(n) < 0.6
    strong = rng.random(n) < 0.85
    values = [apgr(rng.random(n), weak, strong) for _ in range(400)]
    assert np.mean(values) == pytest.approx(0.5, abs=0.02)
    aurocs = [auroc(rng.random(n), ~weak) for _ in range(400)]
    assert np.mean(aurocs) == pytest.approx(0.5, abs=0.01)


def test_ties_are_deterministic_and_order_free() -> None:
    scores = np.array([1.0, 1.0, 0.0, 0.0])
    perm = np.array([3, 1, 0, 2])
    a = apgr(scores, WEAK, STRONG)
    assert apgr(scores[perm], WEAK[perm], STRONG[perm]) == a
    # Block {0, 1} has mean gain 1, block {2, 3} mean gain -0.5: same curve as the oracle on
    # the knots 0, 0.5, 1, so ∫q = (1/4)·(0.625 + 0.875 + 0.9375 + 0.8125) = 0.8125
    assert a == pytest.approx((0.8125 - 0.5) / 0.25)


def test_cpt_hand_example() -> None:
    # targets: 50% → 0.625, reached halfway through the first prompt; 100% → 0.75 at c = 0.25
    assert cpt(ORACLE, WEAK, STRONG, 0.5) == pytest.approx(0.125)
    assert cpt(ORACLE, WEAK, STRONG, 1.0) == pytest.approx(0.25)
    assert cpt(ORACLE, WEAK, STRONG, 0.0) == 0.0
    assert cpt(ORACLE, WEAK, STRONG, 2.0) == pytest.approx(0.5)  # q peaks at 1.0 = 0.5 + 2·0.25
    assert math.isnan(cpt(ORACLE, WEAK, STRONG, 2.5))
    # reversed: q = 0.5, 0.25, 0.25, 0.5, 0.75; 0.625 is crossed between c = 0.75 and 1
    assert cpt(-ORACLE, WEAK, STRONG, 0.5) == pytest.approx(0.875)
    # random: q is linear, so CPT(x) = x
    assert cpt(np.zeros(4), WEAK, STRONG, 0.3) == pytest.approx(0.3)


def test_auroc_hand_example_with_ties() -> None:
    scores = [0.9, 0.5, 0.5, 0.1, 0.5]
    labels = [True, True, False, False, False]
    # pairs (pos, neg): 0.9 beats all 3; 0.5 ties 0.5 (½), beats 0.1, ties 0.5 (½) → 5 / 6
    assert auroc(scores, labels) == pytest.approx(5 / 6)
    assert auroc(scores, [1, 1, 0, 0, 0]) == pytest.approx(5 / 6)


def test_stratified_auroc_ignores_cross_stratum_pairs() -> None:
    # Within each stratum the score is useless; across strata it looks perfect.
    scores = [0.0, 0.0, 1.0, 1.0]
    labels = [False, True, False, True]
    assert auroc(scores, labels) == 0.5
    assert stratified_auroc(scores, labels, [0, 0, 1, 1]) == 0.5
    scores = [0.0, 0.0, 1.0, 1.0]
    labels = [False, False, True, True]
    assert auroc(scores, labels) == 1.0
    assert math.isnan(stratified_auroc(scores, labels, [0, 0, 1, 1]))
    assert stratified_auroc([0, 1, 0, 1], [0, 1, 0, 1], ["a", "a", "b", "b"]) == 1.0


def test_routing_summary() -> None:
    summary = routing_summary(ORACLE, WEAK, STRONG)
    assert summary.n == 4
    assert summary.weak_accuracy == 0.5
    assert summary.strong_accuracy == 0.75
    assert summary.apgr == pytest.approx(1.375)
    assert summary.cpt50 == pytest.approx(0.125)
    assert summary.auroc_weak_wrong == 1.0
    assert summary.auroc_strong_helps == 1.0


def test_invalid_inputs() -> None:
    with pytest.raises(ValueError, match="both classes"):
        auroc([1.0, 2.0], [True, True])
    with pytest.raises(ValueError, match="lengths differ"):
        apgr([1.0, 2.0], [0, 1, 1], [1, 1, 1])
    with pytest.raises(ValueError, match="non-finite"):
        apgr([1.0, math.nan], [0, 1], [1, 1])
    with pytest.raises(ValueError, match="equally good"):
        apgr([1.0, 2.0], [0, 1], [1, 0])
    with pytest.raises(ValueError, match="0/1"):
        auroc([1.0, 2.0], [0, 2])
    with pytest.raises(ValueError, match="shares"):
        quality_curve([1.0, 2.0], [0, 1], [1, 1], grid=[0.5, 1.5])
    with pytest.raises(ValueError, match="empty"):
        apgr([], [], [])
