"""N-way routing offline: reading several models' outcomes (RouterDC JSON, RouterBench CSV),
the frontier and its interpolation, and the cross-validated router against single models, their
mixtures and the oracle on synthetic data where the features carry a signal."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from evaluation.nway import (
    NWayData,
    evaluate_nway,
    fit_nway,
    hull,
    hull_value,
    parse_costs,
    plot_nway,
    read_nway,
)
from evaluation.outcomes import OutcomeDataError


def synthetic(n: int = 400, seed: int = 0) -> tuple[np.ndarray, NWayData]:
    """Three models: a is right where feature 0 is high, b where it is low, c (the best alone,
    and the dearest) is right 60% of the time everywhere; five noise features."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 6))
    p = 1 / (1 + np.exp(-3 * X[:, 0]))
    Y = np.column_stack([rng.random(n) < p, rng.random(n) < 1 - p, rng.random(n) < 0.6]).astype(
        float
    )
    return X, NWayData([f"q{i}" for i in range(n)], ("a", "b", "c"), Y)


def test_the_router_beats_single_models_and_the_oracle_beats_the_router() -> None:
    X, data = synthetic()
    report = evaluate_nway(X, data, [1.0, 1.0, 3.0], folds=5)
    best, acc, cost = report.best_single
    assert best == "c" and cost == 3.0
    assert report.oracle[1] >= report.argmax_accuracy > acc + 0.1
    assert report.gain_at_best_cost > 10  # points
    # the router's curve lies on or above the single models' mixtures over their cost range
    assert report.area_router >= report.area_singles
    for c, q in report.singles.values():
        assert hull_value(report.router_hull, c) >= q - 1e-9 or c < report.router_hull[0][0]
    assert set(report.argmax_share) == {"a", "b", "c"}
    doc = report.to_json()
    assert doc["best_single"] == {"model": "c", "accuracy": acc, "cost": 3.0}
    assert doc["router_curve"][0]["lambda"] == 0.0


def test_a_router_that_ignored_its_features_would_gain_nothing() -> None:
    X, data = synthetic()
    real = evaluate_nway(X, data, [1.0, 1.0, 3.0])
    shuffled = evaluate_nway(np.random.default_rng(1).permutation(X), data, [1.0, 1.0, 3.0])
    assert real.argmax_accuracy > shuffled.argmax_accuracy + 0.1
    assert shuffled.argmax_accuracy < real.best_single[1] + 0.05


def test_hull_and_interpolation() -> None:
    points = [(1.0, 0.5), (2.0, 0.55), (3.0, 0.8), (4.0, 0.7), (0.5, 0.2)]
    frontier = hull(points)
    # (2, 0.55) lies under the segment from (1, 0.5) to (3, 0.8); (4, 0.7) is dearer and worse
    assert frontier == [(0.5, 0.2), (1.0, 0.5), (3.0, 0.8)]
    assert hull_value(frontier, 2.0) == pytest.approx(0.65)
    assert hull_value(frontier, 10.0) == pytest.approx(0.8)
    assert np.isnan(hull_value(frontier, 0.1))


def test_fit_nway_attaches_cv_scores() -> None:
    X, data = synthetic(200)
    names = [f"L{i + 1}.gini.last" for i in range(6)]
    model = fit_nway(X, names, data, [1.0, 1.0, 3.0], l2=10.0)
    assert model.models == ("a", "b", "c") and model.l2 == 10.0
    assert model.cv["argmax_accuracy"] > model.cv["best_single_accuracy"]


def test_plot(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    X, data = synthetic(100)
    out = plot_nway(evaluate_nway(X, data, [1.0, 1.0, 3.0]), tmp_path / "n.png")
    assert out.stat().st_size > 1000


# -- reading ---------------------------------------------------------------------------------------


def test_read_routerdc_json(tmp_path: Path) -> None:
    rows = [
        {"question": f"question {i}", "scores": {"m/a": i % 2, "m/b": 0.5}, "cluster_id": 1}
        for i in range(6)
    ]
    path = tmp_path / "gsm8k-train.json"
    path.write_text(json.dumps(rows))
    data = read_nway(path)
    assert data.models == ("m/a", "m/b") and len(data) == 6 and data.costs is None
    assert data.scores[:, 0].tolist() == [0, 1, 0, 1, 0, 1]
    assert read_nway(path, ["m/b", "m/a"], sample=3).scores.shape == (3, 2)
    with pytest.raises(OutcomeDataError, match=r"no column 'scores\.m/z'"):
        read_nway(path, ["m/a", "m/z"])


def test_read_routerbench_csv(tmp_path: Path) -> None:
    path = tmp_path / "arc.csv"
    path.write_text(
        "prompt,x,y,x|total_cost,y|total_cost\n"
        "\"['Question one', 'Answer:']\",1.0,0.0,0.002,0.0001\n"
        "\"['Question two']\",,1.0,0.002,0.0001\n"  # x's outcome missing: skipped
        "\"['Question three']\",0.0,1.0,,0.0003\n"  # x's cost missing: NaN
    )
    data = read_nway(path, ["x", "y"], cost_column="{model}|total_cost")
    assert data.prompts == ["Question one\n\nAnswer:", "Question three"]
    assert data.costs is not None and np.isnan(data.costs[1, 0])
    assert data.mean_costs() == pytest.approx([0.002, 0.0002])
    with pytest.raises(OutcomeDataError, match="at least two models"):
        read_nway(path)


def test_parse_costs() -> None:
    assert parse_costs("a=0.2,b=1.5", ["a", "b"]) == {"a": 0.2, "b": 1.5}
    with pytest.raises(OutcomeDataError, match=r"no cost for \['b'\]"):
        parse_costs("a=0.2", ["a", "b"])
    with pytest.raises(OutcomeDataError, match="MODEL=COST"):
        parse_costs("a=cheap,b=1", ["a", "b"])
