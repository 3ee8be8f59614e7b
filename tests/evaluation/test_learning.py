"""``evaluation.learning``: labels from the events store as outcomes, the held-back split, the
paired bootstrap of the APGR difference, and a refit that beats (or does not beat) the
calibration serving, on the tiny probe."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from evaluation.learning import (
    MIN_LABELS,
    check_label_count,
    compare,
    holdout_split,
    label_events,
    labels_outcomes,
    learn,
    load_candidate,
    paired_apgr_ci,
)
from probes.calibration import Calibration
from probes.errors import CalibrationError
from probes.probe import SparsityProbe
from probes.supervised import LENGTH_FEATURE, SupervisedModel
from router.events import LabelEvent, SQLiteSink


def words(i: int) -> int:
    """How many filler words prompt ``i`` has (1..12): the labels follow its length."""
    return 1 + (i * 7) % 12


def label_records(n: int = 60, *, chat: bool = True) -> list[dict[str, Any]]:
    """``label`` records whose large model did better on all but the shortest prompts (a tie now and
    then), half of them chat messages; the probe reads the same text the gateway read."""
    records = []
    for i in range(n):
        text = " ".join(["word"] * words(i)) + f" {i}?"
        large_better = 1.0 if words(i) > 3 else 0.0
        if i % 11 == 5:
            large_better = 0.5
        item: Any = [{"role": "user", "content": text}] if chat and i % 2 else text
        event = LabelEvent(
            request_id=f"r{i}",
            time=1000.0 + i,
            policy="default",
            source="judge",
            large_better=large_better,
            verdicts=("B", "A"),
            calibration="abc123abc123",
            input=item,
        )
        records.append(event.to_record())
    return records


def length_calibration(probe: SparsityProbe, sign: float) -> Calibration:
    """A calibration whose p_large rises (sign 1) or falls (sign -1) with the prompt length."""
    results = probe.measure([" ".join(["word"] * words(i)) for i in range(40)])
    X = np.log([[r.n_tokens] for r in results])
    y = (sign * X[:, 0]) > np.median(sign * X[:, 0])
    model = SupervisedModel.fit(X, y, (LENGTH_FEATURE,), l2=1.0)
    base = Calibration.fit(results, probe.fingerprint(), min_per_bucket=20)
    return base.model_copy(update={"supervised": model})


def test_labels_become_outcomes_with_what_the_probe_read(tmp_path: Path) -> None:
    records = label_records(6)
    records[3] = {**records[3], "input": None}  # stored without text
    later = LabelEvent(request_id="r0", time=2000.0, source="feedback", large_better=1.0)
    sink = SQLiteSink(tmp_path / "events.sqlite")
    sink.write([*records, {**later.to_record(), "input": "What is 2+2?"}])
    sink.close()
    reader = SQLiteSink(tmp_path / "events.sqlite")
    try:
        labels = label_events(reader.read())
    finally:
        reader.close()
    found = labels_outcomes(labels)
    assert found.read == 6 and found.without_text == 1
    assert "labelling.store_text: true" in found.describe()
    data = found.data
    assert data is not None and len(data) == 5
    # the feedback label for r0 replaced its judge label
    assert data.prompts[-1] == "What is 2+2?" and data.large[-1] == 1.0
    assert data.inputs is not None
    assert data.inputs[0] == [{"role": "user", "content": data.prompts[0]}]
    assert data.inputs[1] == data.prompts[1]  # a plain prompt stays text
    np.testing.assert_allclose(data.small, 1.0 - data.large)


def test_too_few_labels_name_how_many_there_are() -> None:
    with pytest.raises(CalibrationError, match=r"12 usable label\(s\): learn needs at least 50"):
        check_label_count(12)
    check_label_count(MIN_LABELS, holdout=0.2)


def test_the_held_back_share_is_seeded_and_stratified() -> None:
    data = labels_outcomes(label_events(label_records(60))).data
    assert data is not None
    fit, held = holdout_split(data, 0.2, seed=3)
    again = holdout_split(data, 0.2, seed=3)
    assert np.array_equal(held, again[1]) and len(fit) + len(held) == 60
    assert not set(fit) & set(held)
    better = data.large_better
    assert better[held].any() and not better[held].all()
    assert abs(len(held) - 12) <= 1


def test_the_bootstrap_of_equal_scores_is_zero() -> None:
    rng = np.random.default_rng(0)
    small = (rng.random(40) > 0.5).astype(float)
    large = np.ones(40)
    scores = rng.random(40)
    assert paired_apgr_ci(scores, scores, small, large, resamples=200) == (0.0, 0.0)
    ci = paired_apgr_ci(1.0 - small, small, small, large, resamples=200)
    assert ci is not None and 0.3 < ci[0] < 0.5 < ci[1]  # perfect vs reversed: +0.5


def test_a_refit_beats_a_calibration_ranking_backwards_and_ties_its_equal(
    tiny_probe: SparsityProbe, tmp_path: Path
) -> None:
    data = labels_outcomes(label_events(label_records(60))).data
    assert data is not None
    backwards = length_calibration(tiny_probe, -1.0)
    cache = tmp_path / "features"
    learned = learn(
        tiny_probe,
        data,
        current=backwards,
        holdout=0.3,
        cache=cache,
        features=(LENGTH_FEATURE,),
        neighbours="none",
        resamples=300,
    )
    comparison = learned.comparison
    assert comparison.n_holdout + comparison.n_fit == 60
    assert comparison.current_name == backwards.id
    assert comparison.candidate_apgr > 0.8 > 0.2 > comparison.current_apgr
    ok, why = comparison.verdict(0.02)
    assert ok, why
    candidate = learned.candidate
    assert candidate.supervised is not None and candidate.supervised.n_train == 60
    assert candidate.supervised.features == (LENGTH_FEATURE,)

    held = data.subset(holdout_split(data, 0.3, seed=0)[1])
    same = compare(tiny_probe, held, candidate, candidate, cache=cache, resamples=100)
    assert same.difference == 0.0
    ok, why = same.verdict(0.02)
    assert not ok and "below the margin" in why


def test_a_broken_candidate_is_refused(tiny_probe: SparsityProbe, tmp_path: Path) -> None:
    path = tmp_path / "candidate.json"
    path.write_text('{"kind": "sparsity-router-calibration", "format": 1')
    with pytest.raises(CalibrationError, match="is not valid JSON"):
        load_candidate(path, tiny_probe)
    calibration = length_calibration(tiny_probe, 1.0)
    other = calibration.model_copy(update={"fingerprint": {**calibration.fingerprint, "layer": 9}})
    other.save(path)
    with pytest.raises(CalibrationError, match="was fitted with layer=9"):
        load_candidate(path, tiny_probe)
    calibration.model_copy(update={"supervised": None}).save(path)
    with pytest.raises(CalibrationError, match="has no supervised model"):
        load_candidate(path, tiny_probe)
