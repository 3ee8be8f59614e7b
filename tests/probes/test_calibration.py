"""Calibration: length buckets, percentiles, files, fingerprints, plots."""

from __future__ import annotations

import itertools
import json
import math
import os
import random
import stat
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from probes.calibration import Calibration, fit_calibration
from probes.errors import CalibrationError
from probes.plots import plot_calibration
from probes.types import ProbeResult

FINGERPRINT: dict[str, Any] = {
    "model": "test-model",
    "n_layers": 30,
    "hidden_size": 576,
    "dtype": "float32",
    "layer": 30,
    "metric": "top1_energy",
    "position": "last",
    "max_tokens": 512,
    "chat_template": True,
    "system_prompt": None,
    "code_version": "1",
}


def make_result(score: float, n_tokens: int, *, mean: bool = True) -> ProbeResult:
    metrics = {layer: {"top1_energy": score * layer / 30} for layer in (1, 15, 30)}
    return ProbeResult(
        n_tokens=n_tokens,
        score=score,
        metrics=metrics,
        metrics_mean={k: {"top1_energy": v["top1_energy"] / 2} for k, v in metrics.items()}
        if mean
        else None,
    )


def random_results(n: int, seed: int = 0) -> list[ProbeResult]:
    rng = random.Random(seed)
    return [make_result(rng.random(), rng.randint(5, 400)) for _ in range(n)]


@pytest.fixture(scope="module")
def calibration() -> Calibration:
    return Calibration.fit(random_results(600), FINGERPRINT)


# -- fitting ---------------------------------------------------------------------------------


def test_buckets_cover_lengths_with_enough_references(calibration: Calibration) -> None:
    buckets = calibration.buckets
    assert 2 <= len(buckets) <= 8
    assert all(b.count >= 50 for b in buckets)
    assert sum(b.count for b in buckets) == calibration.n == 600
    assert buckets[-1].hi is None
    for a, b in itertools.pairwise(buckets):
        assert a.hi == b.lo
    assert all(list(b.scores) == sorted(b.scores) for b in buckets)


@pytest.mark.parametrize(("n", "min_per", "max_b"), [(600, 100, 8), (600, 50, 3), (120, 50, 8)])
def test_bucket_limits(n: int, min_per: int, max_b: int) -> None:
    cal = Calibration.fit(
        random_results(n, seed=n), FINGERPRINT, min_per_bucket=min_per, max_buckets=max_b
    )
    assert len(cal.buckets) <= min(max_b, n // min_per)
    assert all(b.count >= min_per for b in cal.buckets)


def test_ties_never_straddle_an_edge() -> None:
    # Half the references share one length: no bucket edge may split them.
    results = [make_result(i / 200, 20) for i in range(100)] + random_results(100)
    cal = Calibration.fit(results, FINGERPRINT, min_per_bucket=20)
    assert sum(b.count for b in cal.buckets if b.lo <= 20 and (b.hi is None or 20 < b.hi)) >= 100


def test_too_few_references() -> None:
    with pytest.raises(CalibrationError, match="only 10 reference result"):
        Calibration.fit(random_results(10), FINGERPRINT)


def test_non_finite_score_refused() -> None:
    results = [*random_results(60), make_result(math.nan, 10)]
    with pytest.raises(CalibrationError, match="reference 60 has a non-finite score"):
        Calibration.fit(results, FINGERPRINT)


def test_stats_and_layer_profile(calibration: Calibration) -> None:
    scores = np.array([r.score for r in random_results(600)])
    assert calibration.stats.mean == pytest.approx(scores.mean())
    assert calibration.stats.quantiles["p50"] == pytest.approx(np.median(scores))
    assert [p.layer for p in calibration.layers] == [1, 15, 30]
    top = calibration.layers[-1]
    assert top.last.mean == pytest.approx(scores.mean())
    assert top.last.std == pytest.approx(scores.std())
    assert top.token_mean is not None
    assert top.token_mean.mean == pytest.approx(scores.mean() / 2)


def test_subsampled_to_quantile_points() -> None:
    rng = random.Random(1)
    results = [make_result(rng.gauss(0, 1), 50) for _ in range(5000)]
    cal = Calibration.fit(results, FINGERPRINT, min_per_bucket=5000)
    assert len(cal.buckets) == 1
    assert cal.buckets[0].count == 5000
    assert len(cal.buckets[0].scores) == 2000
    exact = np.sort([r.score for r in results])
    for x in (-2.0, -0.5, 0.0, 0.3, 1.7):
        ecdf = np.searchsorted(exact, x) / exact.size
        assert cal.percentile_of(x, 50) == pytest.approx(ecdf, abs=2e-3)


# -- percentiles -----------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    a=st.floats(-1, 2, allow_nan=False),
    b=st.floats(-1, 2, allow_nan=False),
    n_tokens=st.integers(0, 5000),
)
def test_percentile_is_monotone_in_score(a: float, b: float, n_tokens: int) -> None:
    cal = _shared_calibration()
    lo, hi = sorted((a, b))
    p_lo, p_hi = cal.percentile_of(lo, n_tokens), cal.percentile_of(hi, n_tokens)
    assert 0.0 <= p_lo <= p_hi <= 1.0


_SHARED: list[Calibration] = []


def _shared_calibration() -> Calibration:
    if not _SHARED:
        _SHARED.append(Calibration.fit(random_results(600), FINGERPRINT))
    return _SHARED[0]


def test_percentile_is_uniform_on_the_reference_set() -> None:
    results = random_results(600)
    cal = Calibration.fit(results, FINGERPRINT)
    pcts = np.sort([cal.percentile(r) for r in results])
    assert pcts.mean() == pytest.approx(0.5, abs=0.01)
    grid = (np.arange(pcts.size) + 0.5) / pcts.size
    assert np.abs(pcts - grid).max() < 0.03  # Kolmogorov-Smirnov distance to uniform


def test_mid_rank_for_ties() -> None:
    results = [make_result(0.5, 10)] * 50 + [make_result(0.1, 10)] * 50
    cal = Calibration.fit(results, FINGERPRINT)
    assert cal.percentile_of(0.5, 10) == pytest.approx(0.75)
    assert cal.percentile_of(0.1, 10) == pytest.approx(0.25)
    assert cal.percentile_of(0.0, 10) == 0.0
    assert cal.percentile_of(0.9, 10) == 1.0


def test_same_score_reads_sparser_among_denser_references() -> None:
    rng = random.Random(2)
    short = [make_result(rng.uniform(0.1, 0.2), rng.randint(10, 30)) for _ in range(100)]
    long = [make_result(rng.uniform(0.5, 0.6), rng.randint(200, 300)) for _ in range(100)]
    cal = Calibration.fit(short + long, FINGERPRINT, max_buckets=2)
    assert len(cal.buckets) == 2
    assert cal.percentile(make_result(0.35, 20)) == 1.0  # sparser than every short reference
    assert cal.percentile(make_result(0.35, 250)) == 0.0  # denser than every long reference
    # Lengths outside the fitted range use the nearest bucket.
    assert cal.bucket_for(1) is cal.buckets[0]
    assert cal.bucket_for(100_000) is cal.buckets[-1]
    assert cal.percentile(make_result(0.15, 1)) == pytest.approx(0.5, abs=0.1)


def test_with_percentile_returns_a_copy(calibration: Calibration) -> None:
    result = make_result(0.5, 100)
    out = calibration.with_percentile(result)
    assert result.percentile is None
    assert out.percentile == calibration.percentile(result)
    assert (out.score, out.n_tokens, out.metrics) == (result.score, result.n_tokens, result.metrics)


def test_nan_score_has_no_percentile(calibration: Calibration) -> None:
    with pytest.raises(CalibrationError, match="NaN"):
        calibration.percentile(make_result(math.nan, 10))


def test_threshold_for_share(calibration: Calibration) -> None:
    assert calibration.threshold_for_share(0.2) == pytest.approx(0.8)
    assert calibration.threshold_for_share(0.0) == 1.0
    assert calibration.threshold_for_share(1.0) == 0.0
    for bad in (-0.1, 1.5, math.nan):
        with pytest.raises(CalibrationError, match="between 0 and 1"):
            calibration.threshold_for_share(bad)


# -- files -----------------------------------------------------------------------------------


def test_save_load_round_trip(calibration: Calibration, tmp_path: Path) -> None:
    path = calibration.save(tmp_path / "sub" / "calib.json")
    data = json.loads(path.read_text())
    assert data["format"] == 1
    assert data["kind"] == "sparsity-router-calibration"
    loaded = Calibration.load(path, expect_fingerprint=FINGERPRINT)
    assert loaded == calibration
    rng = random.Random(3)
    for _ in range(500):
        probe = make_result(rng.uniform(-0.1, 1.1), rng.randint(0, 600))
        assert loaded.percentile(probe) == calibration.percentile(probe)


def test_saved_file_has_the_umask_mode_not_a_private_one(
    calibration: Calibration, tmp_path: Path
) -> None:
    """A gateway running as another user must be able to read what calibrate wrote."""
    old = os.umask(0o022)
    try:
        path = calibration.save(tmp_path / "calib.json")
        assert stat.S_IMODE(path.stat().st_mode) == 0o644
        os.umask(0o077)
        assert stat.S_IMODE(calibration.save(tmp_path / "private.json").stat().st_mode) == 0o600
    finally:
        os.umask(old)


def test_fingerprint_mismatch_names_each_key(calibration: Calibration, tmp_path: Path) -> None:
    path = calibration.save(tmp_path / "calib.json")
    other = {**FINGERPRINT, "layer": 12, "metric": "hoyer"}
    with pytest.raises(CalibrationError) as info:
        Calibration.load(path, expect_fingerprint=other)
    message = str(info.value)
    assert (
        "was fitted with layer=30, metric=top1_energy; this probe has layer=12, metric=hoyer. "
        "Fix: re-run sparsity-router calibrate with this probe config"
    ) in message
    assert str(path) in message
    assert "model=" not in message


def test_fingerprint_key_missing_on_one_side(calibration: Calibration) -> None:
    expected = {**FINGERPRINT, "new_key": 1}
    with pytest.raises(CalibrationError, match="new_key=<absent>; this probe has new_key=1"):
        calibration.check_fingerprint(expected)


def _corrupt(calibration: Calibration, path: Path, how: str) -> None:
    data = json.loads(calibration.to_json())
    if how == "not json":
        path.write_text("{not json")
        return
    if how == "missing key":
        del data["buckets"]
    elif how == "unsorted":
        data["buckets"][0]["scores"] = [0.9, 0.1]
    elif how == "wrong kind":
        data["kind"] = "something-else"
    elif how == "newer format":
        data["format"] = 99
    elif how == "extra key":
        data["surprise"] = True
    elif how == "list":
        data = [data]
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    ("how", "match"),
    [
        ("not json", "is not valid JSON"),
        ("missing key", "malformed: buckets: Field required"),
        ("unsorted", "sorted ascending"),
        ("wrong kind", "is not a sparsity-router calibration"),
        ("newer format", "written by a newer sparsity-router"),
        ("extra key", "malformed: surprise: Extra inputs are not permitted"),
        ("list", "is not a sparsity-router calibration"),
    ],
)
def test_malformed_file_refused(
    calibration: Calibration, tmp_path: Path, how: str, match: str
) -> None:
    path = tmp_path / "bad.json"
    _corrupt(calibration, path, how)
    with pytest.raises(CalibrationError, match=match) as info:
        Calibration.load(path)
    assert str(path) in str(info.value)


def test_missing_file_refused(tmp_path: Path) -> None:
    with pytest.raises(CalibrationError, match=r"does not exist\. Fix: create it"):
        Calibration.load(tmp_path / "nope.json")


def test_save_to_unwritable_path(calibration: Calibration, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(CalibrationError, match="cannot write calibration"):
        calibration.save(blocker / "calib.json")


def test_summary_mentions_buckets_and_quantiles(calibration: Calibration) -> None:
    text = calibration.summary()
    assert "600 references" in text
    assert calibration.buckets[0].label in text
    assert "p50=" in text


# -- with a real (tiny) probe ----------------------------------------------------------------


def test_fit_calibration_with_tiny_probe(tiny_probe: Any, tmp_path: Path) -> None:
    words = "the quick brown fox jumps over lazy dog what is two plus eggs".split()
    rng = random.Random(4)
    prompts = [" ".join(rng.choices(words, k=rng.randint(1, 40))) for _ in range(60)]
    cal = fit_calibration(tiny_probe, prompts, min_per_bucket=20, max_buckets=4)
    assert cal.fingerprint == tiny_probe.fingerprint()
    assert cal.n == 60
    assert [p.layer for p in cal.layers] == list(tiny_probe.layers)
    assert all(p.token_mean is not None for p in cal.layers)
    path = cal.save(tmp_path / "tiny.json")
    loaded = Calibration.load(path, expect_fingerprint=tiny_probe.fingerprint())
    results = tiny_probe.measure(prompts[:5])
    assert [loaded.percentile(r) for r in results] == [cal.percentile(r) for r in results]


# -- plots -----------------------------------------------------------------------------------


@pytest.mark.parametrize("with_mean", [True, False])
def test_plot_writes_a_png(tmp_path: Path, with_mean: bool) -> None:
    rng = random.Random(5)
    results = [make_result(rng.random(), rng.randint(5, 400), mean=with_mean) for _ in range(300)]
    cal = Calibration.fit(results, FINGERPRINT)
    path = plot_calibration(cal, tmp_path / "plots" / "calib.png")
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    assert len(data) > 1000


def test_plot_single_bucket_constant_scores(tmp_path: Path) -> None:
    cal = Calibration.fit([make_result(0.5, 10)] * 50, FINGERPRINT)
    path = plot_calibration(cal, tmp_path / "c.png")
    assert path.read_bytes().startswith(b"\x89PNG")
