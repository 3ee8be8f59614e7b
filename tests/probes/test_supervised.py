"""The supervised P(large does better) model: fitting, JSON round trip, request-time use."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest

from policies.engine import PolicyEngine, RequestContext
from policies.loader import parse_settings
from probes.calibration import Calibration
from probes.metric_names import sparsity
from probes.neighbours import NeighbourVote
from probes.supervised import LENGTH_FEATURE, SupervisedModel, fit_logistic, required_probe
from probes.types import ProbeResult

FEATURES = ("L2.gini.last", "L4.effective_rank.mean", LENGTH_FEATURE)


def probe_result(gini: float, rank: float, n_tokens: int) -> ProbeResult:
    return ProbeResult(
        n_tokens=n_tokens,
        score=gini,
        metrics={2: {"gini": gini}, 4: {"gini": 0.1}},
        metrics_mean={2: {"gini": 0.2}, 4: {"effective_rank": rank}},
    )


def synthetic(n: int = 400, seed: int = 0) -> tuple[list[ProbeResult], np.ndarray]:
    rng = np.random.default_rng(seed)
    gini = rng.uniform(0.2, 0.8, n)
    rank = rng.uniform(0.1, 0.6, n)
    tokens = rng.integers(5, 300, n)
    # large helps on sparse (high gini) prompts with a low effective rank (= sparser)
    logit = 8 * (gini - 0.5) - 6 * (rank - 0.35)
    y = rng.random(n) < 1 / (1 + np.exp(-logit))
    results = [
        probe_result(float(g), float(r), int(t)) for g, r, t in zip(gini, rank, tokens, strict=True)
    ]
    return results, y


def matrix(model: SupervisedModel, results: list[ProbeResult]) -> np.ndarray:
    return np.array([model.vector(r) for r in results])


def test_fit_logistic_recovers_directions() -> None:
    results, y = synthetic()
    X = np.array([[r.metrics[2]["gini"], r.metrics_mean[4]["effective_rank"]] for r in results])  # type: ignore[index]
    coef, intercept, mean, scale = fit_logistic(X, y, l2=1.0)
    assert coef[0] > 0.5 and coef[1] < -0.3
    assert math.isfinite(intercept)
    assert mean.shape == (2,) and (scale > 0).all()
    with pytest.raises(ValueError, match="both classes"):
        fit_logistic(X, np.zeros(len(y), dtype=bool))


@pytest.mark.parametrize("l2", [0.5, 100.0])
def test_fewer_rows_than_features_fit_as_the_full_newton_would(l2: float) -> None:
    """With n < k the Newton steps run in the rows' span; the fit is the one the feature-space
    Newton gives. Two copies of every row with twice the penalty have the same optimum and
    n > k, so they take the feature-space path."""
    rng = np.random.default_rng(3)
    n, k = 60, 150
    X = rng.normal(size=(n, k)) * rng.uniform(0.1, 5.0, size=k)
    X[:, 4] = 2.0  # no spread: weight 0
    y = rng.random(n) < 1 / (1 + np.exp(-(X[:, :10].sum(1) / 3)))
    coef, intercept, mean, _ = fit_logistic(X, y, l2=l2)
    full = fit_logistic(np.vstack([X, X]), np.concatenate([y, y]), l2=2 * l2)
    np.testing.assert_allclose(coef, full[0], atol=1e-7)
    assert intercept == pytest.approx(full[1], abs=1e-7)
    np.testing.assert_allclose(mean, full[2])
    assert coef[4] == pytest.approx(0.0, abs=1e-12)
    assert np.abs(coef).max() > 1e-3


def test_vector_orients_metrics_and_logs_length() -> None:
    model = SupervisedModel(
        features=FEATURES, mean=(0, 0, 0), scale=(1, 1, 1), coef=(0, 0, 0), intercept=0.0
    )
    r = probe_result(0.7, 0.25, 100)
    assert model.vector(r) == pytest.approx([0.7, sparsity("effective_rank", 0.25), math.log(100)])
    assert model.predict(r) == pytest.approx(0.5)
    assert model.probe_needs() == ((2, 4), True)


def test_predict_matches_matrix_and_json_round_trip(tmp_path: Path) -> None:
    results, y = synthetic()
    probe_model = SupervisedModel(
        features=FEATURES, mean=(0, 0, 0), scale=(1, 1, 1), coef=(0, 0, 0), intercept=0.0
    )
    X = matrix(probe_model, results)
    model = SupervisedModel.fit(X, y, FEATURES, l2=1.0, cv={"apgr": 0.7})
    p_matrix = model.predict_matrix(X)
    p_one = np.array([model.predict(r) for r in results])
    assert p_one == pytest.approx(p_matrix, abs=1e-12)
    # better than chance at ranking its own training labels
    assert p_matrix[y].mean() > p_matrix[~y].mean() + 0.2
    assert set(model.p_quantiles) == {"q0.1", "q0.25", "q0.5", "q0.75", "q0.9"}
    again = SupervisedModel.model_validate_json(model.model_dump_json())
    assert again == model
    text = json.loads(model.model_dump_json())
    assert text["features"] == list(FEATURES) and text["cv"] == {"apgr": 0.7}


def test_invalid_models_are_refused() -> None:
    with pytest.raises(ValueError, match="coef has 1 entries, features 2"):
        SupervisedModel(features=FEATURES[:2], mean=(0, 0), scale=(1, 1), coef=(1,), intercept=0.0)
    with pytest.raises(ValueError, match="must look like 'L<layer>"):
        SupervisedModel(features=("gini",), mean=(0,), scale=(1,), coef=(1,), intercept=0.0)


def test_check_probe_names_what_is_missing() -> None:
    model = SupervisedModel(
        features=FEATURES, mean=(0, 0, 0), scale=(1, 1, 1), coef=(1, 1, 1), intercept=0.0
    )
    model.check_probe([2, 4, 10], True, ["gini", "effective_rank"])
    with pytest.raises(ValueError, match=r"layers \[4\].*token-mean"):
        model.check_probe([2], False, ["gini", "effective_rank"])


def fitted_calibration(model: SupervisedModel | None) -> Calibration:
    results = [probe_result(0.2 + i / 200, 0.3, 10 + i) for i in range(100)]
    cal = Calibration.fit(results, {"model": "m", "layer": 2}, min_per_bucket=20)
    return cal.model_copy(update={"supervised": model})


def test_calibration_carries_the_model(tmp_path: Path) -> None:
    results, y = synthetic()
    X = matrix(
        SupervisedModel(
            features=FEATURES, mean=(0, 0, 0), scale=(1, 1, 1), coef=(0, 0, 0), intercept=0.0
        ),
        results,
    )
    model = SupervisedModel.fit(X, y, FEATURES)
    path = fitted_calibration(model).save(tmp_path / "c.json")
    loaded = Calibration.load(path)
    assert loaded.supervised == model
    r = loaded.with_percentile(probe_result(0.7, 0.2, 50))
    assert r.percentile is not None and r.p_large == pytest.approx(
        model.predict(probe_result(0.7, 0.2, 50))
    )
    assert ProbeResult.from_dict(r.to_dict()).p_large == r.p_large
    # a result without the model's features gets no p_large (and no error)
    bare = ProbeResult(n_tokens=5, score=0.3, metrics={2: {"gini": 0.3}})
    assert loaded.with_percentile(bare).p_large is None
    # an old calibration (no supervised model) still loads and sets no p_large
    plain = Calibration.load(fitted_calibration(None).save(tmp_path / "plain.json"))
    assert plain.supervised is None
    assert plain.with_percentile(probe_result(0.7, 0.2, 50)).p_large is None
    assert "supervised p_large: 3 features, fitted on 400 labelled prompts" in loaded.summary()
    assert "supervised" not in plain.summary()


def test_reads_says_what_the_probe_read(tmp_path: Path) -> None:
    model = SupervisedModel(
        features=FEATURES, mean=(0, 0, 0), scale=(1, 1, 1), coef=(1, 1, 1), intercept=0.0
    )
    assert model.reads == "prompt"
    # a file written before the field existed reads as a prompt router
    legacy = json.loads(model.model_dump_json())
    del legacy["reads"]
    assert SupervisedModel.model_validate(legacy).reads == "prompt"
    assert "cascade" not in fitted_calibration(model).summary()
    # a cascade's check of the small model's answer round-trips and says so in the summary
    cascade = SupervisedModel.model_validate({**legacy, "reads": "answer"})
    loaded = Calibration.load(fitted_calibration(cascade).save(tmp_path / "c.json"))
    assert loaded.supervised is not None and loaded.supervised.reads == "answer"
    assert "calibration.answer_path" in loaded.summary()
    assert "cannot route prompts" in loaded.summary()
    with pytest.raises(ValueError, match="reads"):
        SupervisedModel.model_validate({**legacy, "reads": "response"})


POLICY = """
backends:
  small: {type: local}
  large: {type: local}
calibration: {path: c.json}
policies:
  default:
    rules:
      - name: likely-better
        when:
          p_large: {min: 0.6}
        route: large
    default: small
    on_probe_error: small
"""


def test_policy_bands_on_p_large() -> None:
    engine = PolicyEngine(parse_settings(POLICY, env={}))
    ctx = RequestContext(model="auto")
    assert engine.needs_probe("default")

    def route(p: float | None) -> str:
        r = ProbeResult(n_tokens=5, score=0.1, metrics={}, percentile=0.5, p_large=p)
        return engine.decide("default", r, ctx).backend

    assert route(0.9) == "large"
    assert route(0.6) == "large"
    assert route(0.59) == "small"
    assert route(None) == "small"  # a calibration without a supervised model
    decision = engine.decide(
        "default", ProbeResult(n_tokens=5, score=0.1, metrics={}, p_large=0.75), ctx
    )
    assert "p_large 0.75 in [0.6, inf)" in decision.reason


def test_p_large_needs_a_calibration() -> None:
    text = POLICY.replace("calibration: {path: c.json}\n", "")
    with pytest.raises(ValueError, match=r"policies\.default\.rules\[0\]\.when\.p_large: p_large"):
        parse_settings(text, env={})
    with pytest.raises(ValueError, match="p_large"):
        parse_settings(POLICY.replace("{min: 0.6}", "{min: 1.5}"), env={})


# -- hidden-vector features -----------------------------------------------------------------------
WIDTH = 8
STATE_FEATURES = (
    *(f"L4.state.last.{i}" for i in range(WIDTH)),
    "L4.state.mean.3",
    "L2.gini.last",
    LENGTH_FEATURE,
)


def state_result(rng: np.random.Generator) -> ProbeResult:
    return ProbeResult(
        n_tokens=int(rng.integers(5, 200)),
        score=0.5,
        metrics={2: {"gini": float(rng.uniform(0.2, 0.8))}},
        states={
            "L4.last": tuple(float(np.float32(x)) for x in rng.normal(size=WIDTH)),
            "L4.mean": tuple(float(np.float32(x)) for x in rng.normal(size=WIDTH)),
        },
    )


def uniform_model(features: tuple[str, ...], coef: float) -> SupervisedModel:
    k = len(features)
    return SupervisedModel(
        features=features, mean=(0.0,) * k, scale=(1.0,) * k, coef=(coef,) * k, intercept=0.0
    )


def test_hidden_vector_features_predict_like_the_matrix() -> None:
    rng = np.random.default_rng(3)
    results = [state_result(rng) for _ in range(300)]
    X = matrix(uniform_model(STATE_FEATURES, 0.0), results)
    assert X[0, 2] == pytest.approx(results[0].states["L4.last"][2])  # type: ignore[index]
    assert X[0, WIDTH] == pytest.approx(results[0].states["L4.mean"][3])  # type: ignore[index]
    # the large model does better where coordinate 2 of the last-token vector is high
    y = X[:, 2] + 0.3 * rng.normal(size=len(results)) > 0.2
    model = SupervisedModel.fit(X, y, STATE_FEATURES, l2=1.0)
    p_one = np.array([model.predict(r) for r in results])
    assert p_one == pytest.approx(model.predict_matrix(X), abs=1e-12)
    assert p_one[y].mean() > p_one[~y].mean() + 0.3
    assert model.state_layers() == (4,) and model.probe_needs() == ((2,), False)
    again = SupervisedModel.model_validate_json(model.model_dump_json())
    assert [again.predict(r) for r in results[:5]] == pytest.approx(p_one[:5], abs=1e-12)
    # a result without the vectors: a clear KeyError (the calibration then sets no p_large)
    bare = ProbeResult(n_tokens=5, score=0.3, metrics={2: {"gini": 0.3}})
    with pytest.raises(KeyError, match=r"no L4\.last hidden vector"):
        model.predict(bare)
    short = ProbeResult(
        n_tokens=5,
        score=0.3,
        metrics={2: {"gini": 0.3}},
        states={"L4.last": (0.0,) * 3, "L4.mean": (0.0,) * WIDTH},
    )
    with pytest.raises(KeyError, match="reads coordinate 7, the probe reports 3"):
        model.predict(short)


def test_check_probe_names_missing_hidden_vectors() -> None:
    model = uniform_model(STATE_FEATURES, 1.0)
    model.check_probe([2], False, ["gini"], state_layers=[4])
    with pytest.raises(ValueError, match=r"hidden vectors of layers \[4\].*probe\.state_layers"):
        model.check_probe([2], False, ["gini"])
    assert required_probe([model]) == {"layers": (2,), "token_mean": False, "state_layers": (4,)}
    with pytest.raises(ValueError, match=r"L<layer>\.state"):
        SupervisedModel(
            features=("L4.state.first.1",), mean=(0.0,), scale=(1.0,), coef=(1.0,), intercept=0.0
        )


# -- the stacked neighbour vote -----------------------------------------------------------------


def test_neighbour_vote_is_stacked_into_p_large() -> None:
    """A model with a neighbour vote on L6's token mean: predict (one live result) equals
    predict_matrix (a table), the vote moves P the way its weight says, and the probe must keep
    layer 6's vectors."""
    rng = np.random.default_rng(5)
    results = []
    for _ in range(200):
        r = state_result(rng)
        assert r.states is not None
        six = tuple(float(np.float32(x)) for x in rng.normal(size=WIDTH))
        results.append(dataclasses.replace(r, states={**r.states, "L6.mean": six}))
    X = matrix(uniform_model(STATE_FEATURES, 0.0), results)
    six = np.array([r.states["L6.mean"] for r in results], dtype=np.float32)  # type: ignore[index]
    gains = np.where(six[:, 0] > 0, 1.0, 0.0)  # the large model gains where coordinate 0 > 0
    y = gains > 0
    vote = NeighbourVote.fit(six, gains, "L6.state.mean", k=5)
    loo = vote.votes(six, exclude=np.arange(len(results)))
    model = SupervisedModel.fit(
        X, y, STATE_FEATURES, neighbours=vote, stack=(0.5, 4.0, -2.0), votes=loo
    )
    p_one = np.array([model.predict(r) for r in results])
    p_all = model.predict_matrix(X, {"L6.mean": six})
    assert p_one == pytest.approx(p_all, abs=1e-9)
    z = model.log_odds(X)
    votes = vote.votes(six)
    assert p_all == pytest.approx(1 / (1 + np.exp(-(0.5 * z + 4.0 * votes - 2.0))))
    assert model.state_layers() == (4, 6) and model.vote_blocks() == ("L6.state.mean",)
    # quantiles come from the leave-one-out votes, not from each prompt voting for itself
    p_loo = 1 / (1 + np.exp(-(0.5 * z + 4.0 * loo - 2.0)))
    assert model.p_quantiles["q0.5"] == pytest.approx(float(np.quantile(p_loo, 0.5)))
    assert "stacked with the vote of the 5 nearest of 200 (L6.state.mean)" in (
        fitted_calibration(model).summary()
    )
    # JSON round trip (inside a calibration, as served)
    again = SupervisedModel.model_validate_json(model.model_dump_json())
    assert [again.predict(r) for r in results[:10]] == pytest.approx(p_one[:10], abs=1e-12)
    # what is missing is named
    with pytest.raises(KeyError, match=r"needs the L6\.mean hidden vectors"):
        model.predict_matrix(X)
    assert results[0].states is not None
    lacking = dataclasses.replace(
        results[0], states={k: v for k, v in results[0].states.items() if k != "L6.mean"}
    )
    with pytest.raises(KeyError, match=r"no L6\.mean hidden vector"):
        model.predict(lacking)
    with pytest.raises(ValueError, match=r"hidden vectors of layers \[6\]"):
        model.check_probe([2], False, ["gini"], state_layers=[4])
    assert required_probe([model])["state_layers"] == (4, 6)
    with pytest.raises(ValueError, match="neighbours and stack go together"):
        SupervisedModel.model_validate({**model.model_dump(), "stack": None})
    with pytest.raises(ValueError, match="needs the training rows' votes"):
        SupervisedModel.fit(X, y, STATE_FEATURES, neighbours=[vote], stack=(1.0, 1.0, 0.0))
    # a file written before several votes (one vote object, not a list) reads the same
    legacy = model.model_dump(mode="json")
    legacy["neighbours"] = legacy["neighbours"][0]
    old = SupervisedModel.model_validate_json(json.dumps(legacy))
    assert old.vote_blocks() == ("L6.state.mean",) and old.stack == model.stack
    assert [old.predict(r) for r in results[:10]] == pytest.approx(p_one[:10], abs=1e-12)
    none = {**model.model_dump(mode="json"), "neighbours": None, "stack": None}
    assert SupervisedModel.model_validate(none).neighbours == ()


def test_two_votes_are_stacked_each_with_its_weight() -> None:
    """Votes on L6's and L8's token means: P = sigmoid(a z + b6 vote6 + b8 vote8 + c) for a
    table and for one live result alike; the probe keeps both layers; a stack whose length does
    not match the votes, or two votes on one block, are refused by name."""
    rng = np.random.default_rng(6)
    results = []
    for _ in range(150):
        r = state_result(rng)
        assert r.states is not None
        extra = {
            key: tuple(float(np.float32(x)) for x in rng.normal(size=WIDTH))
            for key in ("L6.mean", "L8.mean")
        }
        results.append(dataclasses.replace(r, states={**r.states, **extra}))
    X = matrix(uniform_model(STATE_FEATURES, 0.0), results)
    V = {
        key: np.array([r.states[key] for r in results], dtype=np.float32)  # type: ignore[index]
        for key in ("L6.mean", "L8.mean")
    }
    gains = np.where((V["L6.mean"][:, 0] > 0) & (V["L8.mean"][:, 1] > 0), 1.0, 0.0)
    votes = [
        NeighbourVote.fit(V["L6.mean"], gains, "L6.state.mean", k=7),
        NeighbourVote.fit(V["L8.mean"], gains, "L8.state.mean", k=9),
    ]
    own = np.arange(len(results))
    loo = np.column_stack(
        [votes[0].votes(V["L6.mean"], exclude=own), votes[1].votes(V["L8.mean"], exclude=own)]
    )
    stack = (0.5, 3.0, -1.5, 0.25)
    model = SupervisedModel.fit(
        X, gains > 0, STATE_FEATURES, neighbours=votes, stack=stack, votes=loo
    )
    p_one = np.array([model.predict(r) for r in results])
    p_all = model.predict_matrix(X, V)
    assert p_one == pytest.approx(p_all, abs=1e-9)
    z = model.log_odds(X)
    v6, v8 = votes[0].votes(V["L6.mean"]), votes[1].votes(V["L8.mean"])
    assert p_all == pytest.approx(1 / (1 + np.exp(-(0.5 * z + 3.0 * v6 - 1.5 * v8 + 0.25))))
    assert model.vote_blocks() == ("L6.state.mean", "L8.state.mean")
    assert model.state_layers() == (4, 6, 8) and required_probe([model])["state_layers"] == (
        4,
        6,
        8,
    )
    summary = fitted_calibration(model).summary()
    assert "the vote of the 7 nearest of 150 (L6.state.mean)" in summary
    assert "the vote of the 9 nearest of 150 (L8.state.mean)" in summary
    again = SupervisedModel.model_validate_json(model.model_dump_json())
    assert [again.predict(r) for r in results[:10]] == pytest.approx(p_one[:10], abs=1e-12)
    dumped = model.model_dump()
    with pytest.raises(ValueError, match=r"stack has 3 weights; 2 vote\(s\) need 4"):
        SupervisedModel.model_validate({**dumped, "stack": (1.0, 1.0, 0.0)})
    with pytest.raises(ValueError, match="two votes compare the same hidden vector"):
        SupervisedModel.model_validate({**dumped, "neighbours": [dumped["neighbours"][0]] * 2})
    with pytest.raises(ValueError, match="2 vote columns for 1 votes"):
        SupervisedModel.fit(
            X, gains > 0, STATE_FEATURES, neighbours=votes[:1], stack=(1.0, 1.0, 0.0), votes=loo
        ).combine(z, loo)
