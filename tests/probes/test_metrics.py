"""Properties of the sparsity metrics (hypothesis) and their documented extremes."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from probes.metric_names import METRIC_NAMES, sparsity
from probes.metrics import (
    METRICS,
    compute_all,
    effective_rank,
    gini,
    hoyer,
    outlier_frac,
    top_k_energy,
)

widths = st.integers(min_value=4, max_value=700)
finite = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False, width=32)


@st.composite
def vectors(draw: st.DrawFn) -> torch.Tensor:
    d = draw(widths)
    values = draw(st.lists(finite, min_size=d, max_size=d))
    h = torch.tensor(values, dtype=torch.float64)
    if float(h.abs().max()) < 1e-3:  # the all-(near-)zero vector has no direction
        h[draw(st.integers(0, d - 1))] = 1.0
    return h


def one_hot(d: int, i: int = 0) -> torch.Tensor:
    h = torch.zeros(d, dtype=torch.float64)
    h[i] = -3.0
    return h


@pytest.mark.parametrize("d", [4, 100, 576, 2048])
def test_one_hot_is_maximally_sparse(d: int) -> None:
    h = one_hot(d, d // 2)
    assert float(top_k_energy(h, 0.01)) == pytest.approx(1.0)
    assert float(top_k_energy(h, 0.10)) == pytest.approx(1.0)
    assert float(effective_rank(h)) == pytest.approx(1.0 / d)
    assert float(hoyer(h)) == pytest.approx(1.0)
    assert float(gini(h)) == pytest.approx((d - 1) / d)
    assert float(outlier_frac(h)) == pytest.approx(1.0 / d)
    for name in METRIC_NAMES:  # oriented score: one-hot is the sparsest of all
        assert sparsity(name, float(METRICS[name].fn(h))) >= 1.0 - 1.0 / d - 1e-9


@pytest.mark.parametrize("d", [4, 100, 576, 2048])
def test_constant_is_minimally_sparse(d: int) -> None:
    h = torch.full((d,), -0.7, dtype=torch.float64)
    k1 = max(1, int(0.01 * d))
    assert float(top_k_energy(h, 0.01)) == pytest.approx(k1 / d)
    assert float(effective_rank(h)) == pytest.approx(1.0)
    assert float(hoyer(h)) == pytest.approx(0.0, abs=1e-9)
    assert float(gini(h)) == pytest.approx(0.0, abs=1e-9)
    assert float(outlier_frac(h)) == pytest.approx(1.0)


@settings(max_examples=60, deadline=None)
@given(vectors())
def test_values_lie_between_the_extremes(h: torch.Tensor) -> None:
    d = h.shape[-1]
    for name, value in compute_all(h).items():
        v = float(value)
        assert 0.0 <= v <= 1.0 + 1e-9, name
        if name == "outlier_frac":
            continue  # can reach 0 (e.g. [0, 1, 1, 1]): not bounded by one-hot; see its docstring
        oriented = sparsity(name, v)
        dense = sparsity(name, float(METRICS[name].fn(torch.ones(d, dtype=torch.float64))))
        sparse = sparsity(name, float(METRICS[name].fn(one_hot(d))))
        assert dense - 1e-9 <= oriented <= sparse + 1e-9, name


@settings(max_examples=60, deadline=None)
@given(vectors(), st.floats(1e-3, 1e3), st.randoms(use_true_random=False))
def test_scale_and_permutation_invariant(h: torch.Tensor, scale: float, rnd: object) -> None:
    perm = torch.randperm(h.shape[-1], generator=torch.Generator().manual_seed(hash(rnd) % 2**31))
    base = compute_all(h)
    scaled = compute_all(h * scale)
    permuted = compute_all(h[perm])
    flipped = compute_all(-h)
    for name in METRIC_NAMES:
        b = float(base[name])
        assert float(scaled[name]) == pytest.approx(b, abs=1e-6), name
        assert float(permuted[name]) == pytest.approx(b, abs=1e-9), name
        assert float(flipped[name]) == pytest.approx(b, abs=1e-12), name


@settings(max_examples=30, deadline=None)
@given(st.integers(2, 6), st.integers(2, 5), st.integers(8, 300), st.integers(0, 2**31 - 1))
def test_batch_equals_row_by_row(b: int, t: int, d: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(b, t, d, generator=g) * torch.rand(b, t, 1, generator=g) * 10
    batched = compute_all(h)
    for name in METRIC_NAMES:
        assert batched[name].shape == (b, t)
        for i in range(b):
            for j in range(t):
                row = float(METRICS[name].fn(h[i, j]))
                assert float(batched[name][i, j]) == pytest.approx(row, abs=1e-6), name


def test_heavier_tail_reads_sparser() -> None:
    """A vector with a few large outliers is sparser than a Gaussian on every metric."""
    g = torch.Generator().manual_seed(0)
    gaussian = torch.randn(576, generator=g, dtype=torch.float64)
    spiky = gaussian.clone()
    spiky[:5] *= 40
    for name in METRIC_NAMES:
        s_gauss = sparsity(name, float(METRICS[name].fn(gaussian)))
        s_spiky = sparsity(name, float(METRICS[name].fn(spiky)))
        assert s_spiky > s_gauss, name


def test_hoyer_matches_closed_form() -> None:
    h = torch.tensor([3.0, 4.0, 0.0, 0.0], dtype=torch.float64)
    expected = (2.0 - 7.0 / 5.0) / (2.0 - 1.0)
    assert float(hoyer(h)) == pytest.approx(expected)
    # Gini of |h| = [0, 0, 3, 4]: sum((2i - d - 1) x_i) / (d sum x) = (1*3 + 3*4) / (4*7)
    assert float(gini(h)) == pytest.approx(15 / 28)
    p = torch.tensor([9 / 25, 16 / 25])
    assert float(effective_rank(h)) == pytest.approx(
        math.exp(float(-(p * p.log()).sum())) / 4, rel=1e-6
    )


def test_rejects_scalars_and_unknown_names() -> None:
    with pytest.raises(ValueError, match="scalar"):
        hoyer(torch.tensor(1.0))
    with pytest.raises(ValueError, match="width"):
        gini(torch.ones(1))
    with pytest.raises(ValueError, match="unknown metric"):
        compute_all(torch.ones(8), ("sparseness",))
