"""Sparsity metrics of hidden vectors, batched over any leading dimensions.

Every function takes ``h`` of shape ``(..., d)`` and returns shape ``(...)``, computed in float32
(or float64 when given float64). All are scale and permutation invariant and lie in [0, 1].
Definitions follow Jin et al., "Farther the Shift, Sparser the Representation" (arXiv 2603.03415):

=================  =========================================================  =================
name               definition on h (width d)                                  sparser when
=================  =========================================================  =================
``top1_energy``    share of Σh² held by the k = max(1, ⌊0.01·d⌋) largest |h_i|  higher
``top5_energy``    same with k = max(1, ⌊0.05·d⌋)                              higher
``top10_energy``   same with k = max(1, ⌊0.10·d⌋)                              higher
``effective_rank`` exp(entropy of p = h²/‖h‖²) / d                             lower
``hoyer``          (√d − ‖h‖₁/‖h‖₂) / (√d − 1)                                 higher
``gini``           Gini coefficient of |h|                                     higher
``outlier_frac``   fraction of |h_i| ≥ mean(|h|) + std(|h|)                    lower
=================  =========================================================  =================

Extremes: a one-hot vector is maximally sparse (top-k energy 1, effective rank 1/d, Hoyer 1,
Gini (d−1)/d, outlier fraction 1/d); a constant vector is minimally sparse (top-k energy k/d,
effective rank 1, Hoyer 0, Gini 0, outlier fraction 1).

:func:`sparsity` turns a value into the shared orientation "higher = sparser" (``1 − value`` for
the two "lower" metrics), which is what probe scores use. The names, directions and
:func:`sparsity` live in the torch-free :mod:`probes.metric_names`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from probes.metric_names import HIGHER_IS_SPARSER, METRIC_DESCRIPTIONS, METRIC_NAMES

__all__ = [
    "METRICS",
    "Metric",
    "compute_all",
    "effective_rank",
    "gini",
    "hoyer",
    "outlier_frac",
    "top_k_energy",
]

_EPS = 1e-30


def _prep(h: torch.Tensor) -> torch.Tensor:
    if h.dim() == 0:
        raise ValueError("a metric needs vectors: got a scalar")
    if h.shape[-1] < 2:
        raise ValueError(f"a metric needs width d >= 2, got d = {h.shape[-1]}")
    return h if h.dtype == torch.float64 else h.float()


def _top_k(d: int, frac: float) -> int:
    return max(1, int(d * frac))


def top_k_energy(h: torch.Tensor, frac: float) -> torch.Tensor:
    """Share of Σh² held by the ``max(1, ⌊frac·d⌋)`` largest entries. Higher = sparser."""
    h = _prep(h)
    sq = h * h
    k = _top_k(h.shape[-1], frac)
    top = torch.topk(sq, k, dim=-1).values.sum(-1)
    return top / sq.sum(-1).clamp_min(_EPS)


def effective_rank(h: torch.Tensor) -> torch.Tensor:
    """exp(H(p)) / d with p = h²/‖h‖²: 1/d for one-hot, 1 for constant. Lower = sparser."""
    h = _prep(h)
    sq = h * h
    p = sq / sq.sum(-1, keepdim=True).clamp_min(_EPS)
    entropy = -(p * torch.log(p.clamp_min(_EPS))).sum(-1)
    return torch.exp(entropy) / h.shape[-1]


def hoyer(h: torch.Tensor) -> torch.Tensor:
    """(√d − ‖h‖₁/‖h‖₂)/(√d − 1): 1 for one-hot, 0 for constant. Higher = sparser."""
    h = _prep(h)
    sqrt_d = math.sqrt(h.shape[-1])
    norm: torch.Tensor = torch.linalg.vector_norm(h, dim=-1)
    ratio = h.abs().sum(-1) / norm.clamp_min(_EPS)
    return ((sqrt_d - ratio) / (sqrt_d - 1.0)).clamp(0.0, 1.0)


def gini(h: torch.Tensor) -> torch.Tensor:
    """Gini coefficient of |h|: (d−1)/d for one-hot, 0 for constant. Higher = sparser."""
    h = _prep(h)
    d = h.shape[-1]
    x = torch.sort(h.abs(), dim=-1).values
    i = torch.arange(1, d + 1, dtype=x.dtype, device=x.device)
    weighted = ((2.0 * i - d - 1.0) * x).sum(-1)
    return (weighted / (d * x.sum(-1).clamp_min(_EPS))).clamp(0.0, 1.0)


def outlier_frac(h: torch.Tensor) -> torch.Tensor:
    """Fraction of |h_i| at or above mean(|h|) + std(|h|): 1/d for one-hot, 1 for constant.

    Lower = sparser, with a caveat: a two-level vector such as [0, 1, 1, 1] has no entry above
    mean + std and scores 0, below the one-hot's 1/d, so this metric is not bounded by the
    extremes the others respect. The comparison allows a relative tolerance of 1e-5 of max|h|
    so that a constant vector (std = 0 up to rounding) counts every entry, as the limit demands.
    """
    h = _prep(h)
    a = h.abs()
    threshold = a.mean(-1, keepdim=True) + a.std(-1, unbiased=False, keepdim=True)
    tol = 1e-5 * a.amax(-1, keepdim=True)
    return (a >= threshold - tol).to(a.dtype).mean(-1)


@dataclass(frozen=True, slots=True)
class Metric:
    """A named metric and its direction."""

    name: str
    fn: Callable[[torch.Tensor], torch.Tensor]
    higher_is_sparser: bool
    description: str


_FUNCTIONS: Mapping[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "top1_energy": lambda h: top_k_energy(h, 0.01),
    "top5_energy": lambda h: top_k_energy(h, 0.05),
    "top10_energy": lambda h: top_k_energy(h, 0.10),
    "effective_rank": effective_rank,
    "hoyer": hoyer,
    "gini": gini,
    "outlier_frac": outlier_frac,
}

METRICS: Mapping[str, Metric] = {
    name: Metric(name, _FUNCTIONS[name], HIGHER_IS_SPARSER[name], METRIC_DESCRIPTIONS[name])
    for name in METRIC_NAMES
}


def compute_all(h: torch.Tensor, names: tuple[str, ...] = METRIC_NAMES) -> dict[str, torch.Tensor]:
    """Every requested metric of ``h`` (shape ``(..., d)``), each of shape ``(...)``."""
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; known: {', '.join(METRIC_NAMES)}")
    return {n: METRICS[n].fn(h) for n in names}
