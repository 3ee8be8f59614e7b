"""The experiments report's statistics on synthetic event logs with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from evaluation.experiments import ReportError, build_report, to_markdown
from evaluation.stats import (
    bootstrap_mean_ci,
    chi_square_independence,
    chi_square_sf,
    student_t_sf,
    welch_t_test,
)
from tests.evaluation.event_logs import synthetic_log


def test_exact_counts_shares_percentiles_and_costs() -> None:
    records, _ = synthetic_log()
    report = build_report(records, "exp", resamples=500)
    a, b = report.arms
    assert (a.arm, b.arm, report.control) == ("A", "B", "A")
    assert (a.requests, a.errors, b.requests, b.errors) == (400, 0, 400, 10)
    assert a.backend_counts == {"large": 100, "small": 300}
    assert a.backend_share == {"large": 0.25, "small": 0.75}
    assert b.backend_counts == {"-": 10, "large": 190, "small": 200}
    assert b.backend_share["small"] == 0.5
    # latencies 1..400 ms: linear-interpolation quantiles
    assert a.latency_p50 == pytest.approx(0.2005)
    assert a.latency_p95 == pytest.approx((1 + 0.95 * 399) / 1000)
    # B answered 390 requests with latencies 2, 4, ..., 780 ms
    assert b.latency_p50 == pytest.approx(0.391)
    assert a.cost_per_request == pytest.approx((300 * 0.001 + 100 * 0.01) / 400)
    assert b.cost_per_request == pytest.approx((200 * 0.001 + 190 * 0.01) / 390)
    assert (a.feedback_n, b.feedback_n) == (200, 200)  # failed requests' feedback counts too


def test_feedback_means_cis_and_welch_test() -> None:
    records, scores = synthetic_log()
    report = build_report(records, "exp", resamples=2000, seed=3)
    a, b = report.arms
    assert a.feedback_mean == pytest.approx(scores["A"].mean())
    b_scores = scores["B"]
    assert b.feedback_mean == pytest.approx(b_scores.mean())
    for stats, x in ((a, scores["A"]), (b, b_scores)):
        assert stats.feedback_ci is not None
        lo, hi = stats.feedback_ci
        assert lo < x.mean() < hi
        normal_half_width = 1.96 * x.std(ddof=1) / math.sqrt(x.size)
        assert (hi - lo) / 2 == pytest.approx(normal_half_width, rel=0.15)
    (cmp,) = report.comparisons
    assert (cmp.arm, cmp.control) == ("B", "A")
    assert cmp.difference == pytest.approx(b_scores.mean() - scores["A"].mean())
    reference = sps.ttest_ind(b_scores, scores["A"], equal_var=False)
    assert cmp.test.statistic == pytest.approx(reference.statistic, rel=1e-9)
    assert cmp.test.p_value == pytest.approx(reference.pvalue, rel=1e-6)
    assert cmp.test.p_value < 1e-10  # 0.1 apart with sd 0.1 and ~200 per arm
    # backend shares: A 300/100/0, B 200/190/10 -> chi-square against scipy's
    table = [[0, 100, 300], [10, 190, 200]]
    expected = sps.chi2_contingency(table, correction=False)
    assert report.backends_test.statistic == pytest.approx(expected.statistic)
    assert report.backends_test.df == expected.dof == 2
    assert report.backends_test.p_value == pytest.approx(expected.pvalue, rel=1e-6)
    # same seed, same answer
    again = build_report(records, "exp", resamples=2000, seed=3)
    assert again.arms[0].feedback_ci == a.feedback_ci
    text = to_markdown(report)
    assert "| A | 400 | 0 | large 25.0%, small 75.0% | 200.5 | " in text
    assert "| B | A | +" in text and "< 1e-4" in text


def test_chi_square_known_answer() -> None:
    # A 300 small/100 large, B 200/200: E = 250/150 per arm; chi2 = 2*50²/250 + 2*50²/150
    result = chi_square_independence([[300, 100], [200, 200]])
    assert result.statistic == pytest.approx(20 + 100 / 3)
    assert result.df == 1
    assert result.p_value == pytest.approx(sps.chi2.sf(20 + 100 / 3, 1), rel=1e-6)
    assert math.isnan(chi_square_independence([[5, 0], [3, 0]]).p_value)  # one column left


@pytest.mark.parametrize(("x", "df"), [(0.0, 1), (0.3, 2.5), (1.96, 30), (-2.5, 4), (8, 3)])
def test_t_tail_against_scipy(x: float, df: float) -> None:
    assert student_t_sf(x, df) == pytest.approx(sps.t.sf(x, df), rel=1e-9, abs=1e-15)


@pytest.mark.parametrize(("x", "df"), [(0.01, 1), (3.84, 1), (12.0, 5), (60, 40), (500, 30)])
def test_chi_square_tail_against_scipy(x: float, df: float) -> None:
    assert chi_square_sf(x, df) == pytest.approx(sps.chi2.sf(x, df), rel=1e-9, abs=1e-300)


def test_bootstrap_ci_coverage_and_welch_size_under_the_null() -> None:
    rng = np.random.default_rng(7)
    covered = 0
    false_positives = 0
    trials = 300
    for t in range(trials):
        x = rng.exponential(1.0, 60)  # skewed, true mean 1
        ci = bootstrap_mean_ci(x, resamples=1000, seed=t)
        assert ci is not None
        covered += ci[0] <= 1.0 <= ci[1]
        y = rng.exponential(1.0, 45)
        false_positives += welch_t_test(x, y).p_value < 0.05
    # nominal 95%; the percentile bootstrap undercovers a little on skewed data at n=60
    assert 0.88 <= covered / trials <= 0.99
    assert 0.01 <= false_positives / trials <= 0.10
    # and under a real difference the test finds it almost always
    power = sum(
        welch_t_test(rng.normal(0, 1, 100), rng.normal(0.6, 1, 100)).p_value < 0.05
        for _ in range(100)
    )
    assert power >= 95


def test_small_samples_and_errors() -> None:
    assert bootstrap_mean_ci([]) is None
    assert bootstrap_mean_ci([2.0]) == (2.0, 2.0)
    assert math.isnan(welch_t_test([1.0], [2.0, 3.0]).p_value)
    assert math.isnan(welch_t_test([1.0, 1.0], [1.0, 1.0]).p_value)
    with pytest.raises(ReportError, match="no request events for experiment 'nope'"):
        build_report([], "nope")
    records, _ = synthetic_log()
    with pytest.raises(ReportError, match="control arm 'C' has no requests; arms with"):
        build_report(records, "exp", control="C")
    report = build_report(records, "exp", control="B", arm_order=["B", "A"], resamples=100)
    assert [s.arm for s in report.arms] == ["B", "A"] and report.comparisons[0].arm == "A"
