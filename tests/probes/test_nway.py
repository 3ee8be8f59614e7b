"""The N-way model: one quality head per model on the supervised model's standardised features;
fit, predict (a probe result and a matrix agree), the calibration file's ``nway`` section, the
pick rule."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from probes.calibration import Calibration
from probes.nway import NWayModel, fit_heads, pick, pick_matrix
from probes.supervised import LENGTH_FEATURE, SupervisedModel, fit_logistic
from probes.types import ProbeResult

FEATURES = ("L2.gini.last", "L4.effective_rank.mean", LENGTH_FEATURE)
MODELS = ("m-a", "m-b", "m-c")


def result(gini: float, rank: float, n_tokens: int) -> ProbeResult:
    return ProbeResult(
        n_tokens=n_tokens,
        score=gini,
        metrics={2: {"gini": gini}},
        metrics_mean={4: {"effective_rank": rank}},
    )


def synthetic(n: int = 300, seed: int = 0) -> tuple[list[ProbeResult], np.ndarray, np.ndarray]:
    """m-a is right on high-Gini prompts, m-b on low ones, m-c half the time."""
    rng = np.random.default_rng(seed)
    gini = rng.uniform(0.2, 0.8, n)
    rank = rng.uniform(0.1, 0.6, n)
    tokens = rng.integers(5, 300, n)
    results = [
        result(float(g), float(r), int(t)) for g, r, t in zip(gini, rank, tokens, strict=True)
    ]
    # effective_rank is "lower = sparser": the feature is 1 - rank (SupervisedModel.vector)
    X = np.array(
        [
            SupervisedModel(
                features=FEATURES, mean=(0,) * 3, scale=(1,) * 3, coef=(0,) * 3, intercept=0
            ).vector(r)
            for r in results
        ]
    )
    p = 1 / (1 + np.exp(-10 * (gini - 0.5)))
    Y = np.column_stack(
        [
            (rng.random(n) < p).astype(float),
            (rng.random(n) < 1 - p).astype(float),
            np.full(n, 0.5),
        ]
    )
    return results, X, Y


@pytest.mark.parametrize("link", ["identity", "logit"])
def test_fit_predict_and_json_round_trip(link: str) -> None:
    results, X, Y = synthetic()
    model = NWayModel.fit(X, Y, FEATURES, MODELS, (1.0, 2.0, 0.1), link=link, l2=1.0)  # type: ignore[arg-type]
    Q = model.predict_matrix(X)
    assert Q.shape == (len(results), 3)
    assert ((Q >= 0) & (Q <= 1)).all()
    for i in (0, 7, 123):
        one = model.predict(results[i])
        assert [one[m] for m in MODELS] == pytest.approx(list(Q[i]), abs=1e-9)
    # the heads learned the signal: m-a above m-b on sparse prompts, below on dense ones
    gini = X[:, 0]
    assert Q[gini > 0.7, 0].mean() > Q[gini > 0.7, 1].mean() + 0.3
    assert Q[gini < 0.3, 1].mean() > Q[gini < 0.3, 0].mean() + 0.3
    assert Q[:, 2] == pytest.approx(0.5, abs=0.02)  # a constant column: a constant head
    again = NWayModel.model_validate_json(model.model_dump_json())
    assert again == model
    assert again.predict(results[5]) == model.predict(results[5])
    assert again.costs == {"m-a": 1.0, "m-b": 2.0, "m-c": 0.1}


def test_the_supervised_standardisation_is_reused() -> None:
    _, X, Y = synthetic()
    for link in ("identity", "logit"):
        _, _, mean, scale = fit_heads(X, Y, link=link)
        _, _, mean_s, scale_s = fit_logistic(X, Y[:, 0] > 0.5)
        assert mean == pytest.approx(mean_s) and scale == pytest.approx(scale_s)
    # the logistic heads are fit_logistic's own fits on the soft labels
    W, b, _, _ = fit_heads(X, Y, link="logit", l2=3.0)
    coef, intercept, _, _ = fit_logistic(X, Y[:, 0] > 0.5, l2=3.0)
    assert W[:, 0] == pytest.approx(coef) and b[0] == pytest.approx(intercept)


def test_the_calibration_carries_it_and_fills_qualities(tmp_path) -> None:  # type: ignore[no-untyped-def]
    results, X, Y = synthetic()
    model = NWayModel.fit(X, Y, FEATURES, MODELS, (1.0, 2.0, 0.1))
    cal = Calibration.fit(results, {"model": "m", "layer": 2}, min_per_bucket=20)
    cal = cal.model_copy(update={"nway": model})
    path = cal.save(tmp_path / "c.json")
    loaded = Calibration.load(path)
    assert loaded.nway == model
    filled = loaded.with_percentile(results[3])
    assert filled.qualities is not None
    assert {m: q for m, (q, _) in filled.qualities.items()} == model.predict(results[3])
    assert filled.qualities["m-b"][1] == 2.0
    # a result without the features: no qualities, no error
    bare = ProbeResult(n_tokens=5, score=0.1, metrics={})
    assert loaded.with_percentile(bare).qualities is None


def test_invalid_models_are_refused() -> None:
    with pytest.raises(ValidationError, match=r"heads\.m-a\.coef has 1 entries, features 3"):
        NWayModel(
            features=FEATURES,
            mean=(0, 0, 0),
            scale=(1, 1, 1),
            heads={"m-a": {"coef": (1,), "intercept": 0, "cost": 1, "mean_quality": 0.5}},
        )
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        fit_heads(np.zeros((4, 2)), np.full((4, 2), 2.0))


def test_pick_trades_quality_for_cost_and_breaks_ties_by_cost() -> None:
    q = {"a": 0.8, "b": 0.7, "c": 0.7}
    c = {"a": 10.0, "b": 2.0, "c": 1.0}
    assert pick(q, c) == "a"
    assert pick(q, c, willingness_to_pay=0.1) == "c"  # 0.8 - 1 < 0.7 - 0.1
    assert pick(q, c, allowed=["b", "c"]) == "c"  # tie: the cheaper
    Q = np.array([[0.8, 0.7, 0.7], [0.1, 0.9, 0.2]])
    assert list(pick_matrix(Q, [10.0, 2.0, 1.0], 0.0)) == [0, 1]
    assert list(pick_matrix(Q, [10.0, 2.0, 1.0], 0.1)) == [2, 1]
