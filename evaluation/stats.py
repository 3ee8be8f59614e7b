"""The statistics of the experiments report, with numpy only (no scipy at run time).

- :func:`bootstrap_mean_ci`: percentile bootstrap of the mean (seeded).
- :func:`welch_t_test`: Welch's unequal-variance t-test, two-sided p from Student's t.
- :func:`chi_square_independence`: Pearson's chi-square test on a contingency table.

Student's t and chi-square tail probabilities come from the regularised incomplete beta and
gamma functions (continued fractions as in Numerical Recipes §6.2 and §6.4); the tests check
them against scipy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "TestResult",
    "bootstrap_mean_ci",
    "chi_square_independence",
    "chi_square_sf",
    "student_t_sf",
    "welch_t_test",
]

_EPS = 1e-15
_TINY = 1e-300
_MAX_ITER = 10_000


@dataclass(frozen=True, slots=True)
class TestResult:
    statistic: float
    df: float
    p_value: float


def bootstrap_mean_ci(
    values: Sequence[float] | np.ndarray,
    *,
    resamples: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float] | None:
    """Percentile-bootstrap confidence interval of the mean (None for no values)."""
    x = np.asarray(values, dtype=np.float64)
    n = x.size
    if n == 0:
        return None
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    rows = max(1, min(resamples, 4_000_000 // n))  # bound the index matrix to ~32 MB
    for start in range(0, resamples, rows):
        k = min(rows, resamples - start)
        means[start : start + k] = x[rng.integers(0, n, size=(k, n))].mean(axis=1)
    alpha = (1 - level) / 2
    lo, hi = np.quantile(means, [alpha, 1 - alpha])
    return float(lo), float(hi)


def _betacf(a: float, b: float, x: float) -> float:
    qab, qap, qam = a + b, a + 1, a - 1
    c, d = 1.0, 1 - qab * x / qap
    d = 1 / (d if abs(d) > _TINY else _TINY)
    h = d
    for m in range(1, _MAX_ITER):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1 + aa * d
        d = 1 / (d if abs(d) > _TINY else _TINY)
        c = 1 + aa / c
        c = c if abs(c) > _TINY else _TINY
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1 + aa * d
        d = 1 / (d if abs(d) > _TINY else _TINY)
        c = 1 + aa / c
        c = c if abs(c) > _TINY else _TINY
        delta = d * c
        h *= delta
        if abs(delta - 1) < _EPS:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function I_x(a, b)."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    log_front = (
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )
    front = math.exp(log_front)
    if x < (a + 1) / (a + b + 2):
        return front * _betacf(a, b, x) / a
    return 1 - front * _betacf(b, a, 1 - x) / b


def student_t_sf(t: float, df: float) -> float:
    """P(T > t) for Student's t with ``df`` degrees of freedom."""
    if math.isnan(t):
        return math.nan
    if math.isinf(t):
        return 0.0 if t > 0 else 1.0
    tail = 0.5 * _betainc(df / 2, 0.5, df / (df + t * t))
    return tail if t > 0 else 1 - tail


def _gammainc_upper(a: float, x: float) -> float:
    """The regularised upper incomplete gamma function Q(a, x)."""
    if x <= 0:
        return 1.0
    log_front = -x + a * math.log(x) - math.lgamma(a)
    if x < a + 1:  # series for P(a, x)
        term = total = 1 / a
        ap = a
        for _ in range(_MAX_ITER):
            ap += 1
            term *= x / ap
            total += term
            if abs(term) < abs(total) * _EPS:
                break
        return max(0.0, 1 - total * math.exp(log_front))
    b = x + 1 - a  # continued fraction for Q(a, x)
    c = 1 / _TINY
    d = 1 / b
    h = d
    for i in range(1, _MAX_ITER):
        an = -i * (i - a)
        b += 2
        d = an * d + b
        d = d if abs(d) > _TINY else _TINY
        c = b + an / c
        c = c if abs(c) > _TINY else _TINY
        d = 1 / d
        delta = d * c
        h *= delta
        if abs(delta - 1) < _EPS:
            break
    return math.exp(log_front) * h


def chi_square_sf(statistic: float, df: float) -> float:
    """P(X > statistic) for a chi-square variable with ``df`` degrees of freedom."""
    return _gammainc_upper(df / 2, statistic / 2)


def welch_t_test(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> TestResult:
    """Welch's t-test of mean(a) == mean(b); two-sided. NaN when a side has < 2 values or
    both have no variance."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.size < 2 or y.size < 2:
        return TestResult(math.nan, math.nan, math.nan)
    vx, vy = x.var(ddof=1) / x.size, y.var(ddof=1) / y.size
    se2 = vx + vy
    if se2 <= 0:
        return TestResult(math.nan, math.nan, math.nan)
    t = float((x.mean() - y.mean()) / math.sqrt(se2))
    df = float(se2**2 / (vx**2 / (x.size - 1) + vy**2 / (y.size - 1)))
    p = min(1.0, 2 * student_t_sf(abs(t), df))
    return TestResult(t, df, p)


def chi_square_independence(table: Sequence[Sequence[float]] | np.ndarray) -> TestResult:
    """Pearson's chi-square test of independence of rows and columns (no continuity
    correction). Empty rows and columns are dropped; NaN when fewer than 2 remain of either."""
    obs = np.asarray(table, dtype=np.float64)
    obs = obs[obs.sum(axis=1) > 0][:, obs.sum(axis=0) > 0] if obs.size else obs
    if obs.ndim != 2 or obs.shape[0] < 2 or obs.shape[1] < 2:
        return TestResult(math.nan, math.nan, math.nan)
    expected = np.outer(obs.sum(axis=1), obs.sum(axis=0)) / obs.sum()
    statistic = float(((obs - expected) ** 2 / expected).sum())
    df = float((obs.shape[0] - 1) * (obs.shape[1] - 1))
    return TestResult(statistic, df, chi_square_sf(statistic, df))
