"""The names, directions and descriptions of the sparsity metrics, without torch.

:mod:`probes.metrics` computes them; this module only knows what they are called and which way
they point, so that settings (:class:`probes.types.ProbeSettings`), feature names and fitted
models can be checked and oriented in a process that never loads torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Final

__all__ = [
    "HIGHER_IS_SPARSER",
    "METRIC_DESCRIPTIONS",
    "METRIC_NAMES",
    "sparsity",
]

#: Every metric :mod:`probes.metrics` computes, in its canonical order.
METRIC_NAMES: Final[tuple[str, ...]] = (
    "top1_energy",
    "top5_energy",
    "top10_energy",
    "effective_rank",
    "hoyer",
    "gini",
    "outlier_frac",
)

#: Whether a higher value of the metric means a sparser vector.
HIGHER_IS_SPARSER: Final[Mapping[str, bool]] = MappingProxyType(
    {
        "top1_energy": True,
        "top5_energy": True,
        "top10_energy": True,
        "effective_rank": False,
        "hoyer": True,
        "gini": True,
        "outlier_frac": False,
    }
)

#: A short human description of each metric.
METRIC_DESCRIPTIONS: Final[Mapping[str, str]] = MappingProxyType(
    {
        "top1_energy": "top-1% energy share",
        "top5_energy": "top-5% energy share",
        "top10_energy": "top-10% energy share",
        "effective_rank": "exp(entropy of h²/‖h‖²)/d",
        "hoyer": "Hoyer sparsity",
        "gini": "Gini coefficient of |h|",
        "outlier_frac": "share of |h_i| ≥ mean+std",
    }
)


def sparsity(name: str, value: float) -> float:
    """Orient a metric value so that higher means sparser (``1 − value`` for "lower" metrics).

    KeyError for a name not in :data:`METRIC_NAMES`.
    """
    return value if HIGHER_IS_SPARSER[name] else 1.0 - value
