"""The policy engine: rule order, every condition type, shares, probe failures, fallbacks."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policies.engine import Decision, PolicyEngine, RequestContext
from policies.errors import PolicyError
from policies.loader import load_settings, parse_settings
from policies.schema import Settings
from probes.types import ProbeResult

CONFIGS = Path(__file__).resolve().parent / "configs"
DEFAULT = Path(__file__).resolve().parents[2] / "config" / "default.yaml"
N_LAYERS = 30


@pytest.fixture(scope="module")
def all_settings() -> Settings:
    return load_settings(CONFIGS / "good-all-conditions.yaml", env={})


@pytest.fixture(scope="module")
def engine(all_settings: Settings) -> PolicyEngine:
    return PolicyEngine(all_settings, n_layers=N_LAYERS)


def result(
    *,
    percentile: float | None = 0.5,
    score: float = 0.0,
    n_tokens: int = 100,
    metrics: Mapping[int, Mapping[str, float]] | None = None,
    metrics_mean: Mapping[int, Mapping[str, float]] | None = None,
) -> ProbeResult:
    return ProbeResult(
        n_tokens=n_tokens,
        score=score,
        metrics=metrics if metrics is not None else {N_LAYERS: {"hoyer": 0.5}},
        metrics_mean=metrics_mean,
        percentile=percentile,
    )


@pytest.fixture(scope="module")
def default_engine() -> PolicyEngine:
    return PolicyEngine(load_settings(DEFAULT, env={}))


CTX = RequestContext(model="auto")


# -- rule order and condition types ----------------------------------------------------------


def test_first_match_wins(engine: PolicyEngine) -> None:
    ctx = RequestContext(model="pick-large", user="alice", headers={"X-Tier": "gold"})
    d = engine.decide("default", result(percentile=0.99), ctx)
    assert (d.backend, d.rule, d.policy) == ("large", "vip", "default")
    assert d.fallbacks == ("spare",)  # the rule's own fallback overrides large's
    assert d.reason == "rule vip: user 'alice'"
    assert not d.probe_error


def test_default_when_nothing_matches(engine: PolicyEngine) -> None:
    d = engine.decide("default", result(percentile=0.5), CTX)
    assert d == Decision(
        backend="small",
        fallbacks=(),
        rule="default",
        policy="default",
        reason="no rule matched",
        probe_error=False,
    )


@pytest.mark.parametrize(
    ("ctx", "probe", "backend", "rule"),
    [
        (RequestContext(user="bob"), result(), "large", "vip"),
        (RequestContext(user="carol"), result(), "small", "default"),
        (RequestContext(headers={"x-tier": "gold"}), result(), "large", "tier"),
        (RequestContext(headers={"X-TIER": "gold"}), result(), "large", "tier"),
        (RequestContext(headers={"x-tier": "Gold"}), result(), "small", "default"),
        (RequestContext(metadata={"team": "eval"}), result(), "medium", "tagged"),
        (RequestContext(metadata={"team": "sales"}), result(), "small", "default"),
        (RequestContext(model="pick-large"), result(), "large", "picked"),
        (CTX, result(percentile=0.25), "spare", "band"),
        (CTX, result(percentile=0.2), "spare", "band"),
        (CTX, result(percentile=0.3), "small", "default"),
        (CTX, result(n_tokens=1000), "large", "long"),
        (CTX, result(n_tokens=999), "small", "default"),
        (CTX, result(metrics_mean={N_LAYERS: {"hoyer": 0.95}}), "spare", "metric"),
        (CTX, result(metrics_mean={N_LAYERS: {"hoyer": 0.85}}), "small", "default"),
        (CTX, result(metrics_mean={7: {"hoyer": 0.95}}), "small", "default"),
        (CTX, result(metrics={N_LAYERS: {"hoyer": 0.95}}), "small", "default"),  # last != mean
        (CTX, result(score=-6), "spare", "raw"),
        (CTX, result(score=-5), "small", "default"),
    ],
)
def test_condition_types(
    engine: PolicyEngine, ctx: RequestContext, probe: ProbeResult, backend: str, rule: str
) -> None:
    d = engine.decide("default", probe, ctx)
    assert (d.backend, d.rule) == (backend, rule)


def test_conditions_in_one_rule_are_anded(engine: PolicyEngine) -> None:
    # by-score rules[1]: n_tokens < 3 AND model tiny
    tiny = RequestContext(model="tiny")
    assert engine.decide("by-score", result(n_tokens=2), tiny).backend == "spare"
    assert engine.decide("by-score", result(n_tokens=3), tiny).backend == "small"
    assert engine.decide("by-score", result(n_tokens=2), CTX).backend == "small"
    d = engine.decide("by-score", result(score=0.8), CTX)
    assert (d.backend, d.rule) == ("large", "rules[0]")
    assert d.reason == "rule rules[0]: score 0.8 in [0.8, inf)"


def test_metric_negative_layer_needs_n_layers(all_settings: Settings) -> None:
    probe = result(metrics_mean={N_LAYERS: {"hoyer": 0.95}})
    assert PolicyEngine(all_settings, n_layers=N_LAYERS).decide("default", probe, CTX).rule == (
        "metric"
    )
    assert PolicyEngine(all_settings).decide("default", probe, CTX).rule == "default"


def test_percentile_band_max_one_includes_one() -> None:
    text = """\
calibration: {path: c.json}
backends: {a: {type: local}, b: {type: local}}
policies:
  default:
    rules: [{when: {percentile: {min: 0.9, max: 1}}, route: b}]
    default: a
    on_probe_error: a
"""
    engine = PolicyEngine(parse_settings(text))
    assert engine.decide("default", result(percentile=1.0), CTX).backend == "b"
    assert engine.decide("default", result(percentile=0.95), CTX).backend == "b"
    assert engine.decide("default", result(percentile=0.89), CTX).backend == "a"


# -- shares ----------------------------------------------------------------------------------


def test_share_thresholds_are_cumulative(engine: PolicyEngine) -> None:
    assert engine.thresholds("default") == {"top": 0.98, "upper": 0.7}
    assert engine.thresholds("by-score") == {}


@pytest.mark.parametrize(
    ("percentile", "backend", "rule"),
    [
        (1.0, "large", "top"),
        (0.99, "large", "top"),
        (0.98, "large", "top"),
        (0.9799, "medium", "upper"),
        (0.7, "medium", "upper"),
        (0.6999, "small", "default"),
        (None, "small", "default"),  # no calibration loaded: percentile rules do not match
        (math.nan, "small", "default"),
    ],
)
def test_share_routing(
    engine: PolicyEngine, percentile: float | None, backend: str, rule: str
) -> None:
    d = engine.decide("default", result(percentile=percentile), CTX)
    assert (d.backend, d.rule) == (backend, rule)


def test_share_reason(engine: PolicyEngine) -> None:
    d = engine.decide("default", result(percentile=0.75), CTX)
    assert d.reason == "rule upper: percentile 0.75 >= 0.7 (share 0.28, cumulative 0.3)"


def test_default_config_share(monkeypatch: pytest.MonkeyPatch) -> None:
    engine = PolicyEngine(load_settings(DEFAULT, env={}))
    assert engine.thresholds("default") == {"sparse": 0.7}
    assert engine.policy_for_model("auto") == "default"
    assert engine.decide("default", result(percentile=0.7), CTX).backend == "large"
    d = engine.decide("default", result(percentile=0.69), CTX)
    assert (d.backend, d.fallbacks) == ("small", ())
    d = engine.decide("default", None, CTX, probe_failed=True)
    assert (d.backend, d.fallbacks, d.rule) == ("large", ("small",), "on_probe_error")


def test_custom_threshold_for_share(all_settings: Settings) -> None:
    engine = PolicyEngine(all_settings, threshold_for_share=lambda s: 1 - s / 2)
    assert engine.thresholds("default") == {"top": 0.99, "upper": 0.85}
    with pytest.raises(PolicyError, match=r"gave 2\.0; a percentile threshold must lie in"):
        PolicyEngine(all_settings, threshold_for_share=lambda s: 2.0)
    with pytest.raises(PolicyError, match="failed: boom"):
        PolicyEngine(all_settings, threshold_for_share=_boom)


def _boom(share: float) -> float:
    raise RuntimeError("boom")


# -- probe failures --------------------------------------------------------------------------


def test_probe_failure_goes_to_on_probe_error(engine: PolicyEngine) -> None:
    d = engine.decide("default", result(percentile=0.99), CTX, probe_failed=True)
    assert d == Decision(
        backend="medium",
        fallbacks=("small",),
        rule="on_probe_error",
        policy="default",
        reason="the probe failed and rule top needs it",
        probe_error=True,
    )
    d = engine.decide("default", None, CTX)
    assert (d.backend, d.rule, d.probe_error) == ("medium", "on_probe_error", True)
    assert d.reason == "there is no probe result and rule top needs it"


def test_request_rules_before_probe_rules_still_apply(engine: PolicyEngine) -> None:
    d = engine.decide("default", None, RequestContext(user="alice"), probe_failed=True)
    assert (d.backend, d.rule, d.probe_error) == ("large", "vip", True)


def test_probe_rule_whose_request_part_fails_is_skipped() -> None:
    text = """\
backends: {a: {type: local}, b: {type: local}, c: {type: local}}
policies:
  default:
    rules: [{when: {model: x, score: {min: 0}}, route: b}]
    default: a
    on_probe_error: c
"""
    engine = PolicyEngine(parse_settings(text))
    assert engine.decide("default", None, RequestContext(model="y")).backend == "a"
    assert engine.decide("default", None, RequestContext(model="x")).backend == "c"


def test_needs_probe(engine: PolicyEngine) -> None:
    assert engine.needs_probe("default")
    assert engine.needs_probe("by-score")
    assert not engine.needs_probe("plain")
    d = engine.decide("plain", None, RequestContext(model="gpt-4o"))
    assert (d.backend, d.rule, d.probe_error) == ("large", "rules[0]", False)
    d = engine.decide("plain", None, CTX)
    assert (d.backend, d.rule, d.reason) == ("medium", "rules[1]", "rule rules[1]: always")


# -- fallbacks and lookups -------------------------------------------------------------------


def test_fallback_chain_expansion(engine: PolicyEngine) -> None:
    assert engine.fallback_chain("large") == ("medium", "small")
    assert engine.fallback_chain("medium") == ("small",)
    assert engine.fallback_chain("small") == ()
    assert engine.fallback_chain("large", ("spare", "medium")) == ("spare", "medium", "small")
    # never the chosen backend, never twice
    assert engine.fallback_chain("small", ("medium", "large")) == ("medium", "large")
    assert engine.fallback_chain("medium", ("large",)) == ("large", "small")
    d = engine.decide("default", result(), RequestContext(headers={"x-tier": "gold"}))
    assert d.fallbacks == ("medium", "small")
    d = engine.decide("by-score", result(score=0.1), CTX)
    assert (d.backend, d.fallbacks) == ("small", ("spare",))


def test_model_lookups(engine: PolicyEngine, all_settings: Settings) -> None:
    assert engine.policy_for_model("auto-score") == "by-score"
    assert engine.policy_for_model("gpt-big") is None
    assert engine.direct_backend("gpt-big") == "large"
    assert engine.direct_backend("auto") is None
    assert set(engine.policy_names) == {"default", "by-score", "plain"}
    off = all_settings.model_copy(
        update={
            "server": all_settings.server.model_copy(update={"passthrough_direct_models": False})
        }
    )
    assert PolicyEngine(off).direct_backend("gpt-big") is None


def test_unknown_policy(engine: PolicyEngine) -> None:
    with pytest.raises(PolicyError, match="unknown policy 'nope'; known: by-score, default, plain"):
        engine.decide("nope", None, CTX)
    with pytest.raises(PolicyError):
        engine.needs_probe("nope")


def test_request_context_normalises() -> None:
    ctx = RequestContext(headers={"X-Tier": "gold", "Accept": "x"}, metadata={"a": "b"})
    assert dict(ctx.headers) == {"x-tier": "gold", "accept": "x"}
    with pytest.raises(TypeError):
        ctx.headers["x"] = "y"  # type: ignore[index]
    with pytest.raises(AttributeError):
        ctx.model = "m"  # type: ignore[misc]


# -- property: decide never raises and always names a real backend ---------------------------

_floats = st.floats(allow_nan=True, allow_infinity=True)
_layers = st.sampled_from([-1, 0, 1, 7, N_LAYERS, 99])
_names = st.sampled_from(["hoyer", "gini", "top1_energy", "weird"])
_tables = st.dictionaries(_layers, st.dictionaries(_names, _floats, max_size=3), max_size=3)
_text = st.text(max_size=8) | st.sampled_from(["alice", "gold", "tiny", "gpt-4o", "eval"])

_results = st.builds(
    ProbeResult,
    n_tokens=st.integers(min_value=-10, max_value=10**7),
    score=_floats,
    metrics=_tables,
    metrics_mean=st.none() | _tables,
    truncated=st.booleans(),
    percentile=st.none() | _floats,
)
_contexts = st.builds(
    RequestContext,
    model=st.none() | _text,
    user=st.none() | _text,
    headers=st.dictionaries(st.sampled_from(["X-Tier", "x-tier", "accept"]) | _text, _text),
    metadata=st.dictionaries(st.sampled_from(["team"]) | _text, _text),
)


@settings(max_examples=400, deadline=None)
@given(
    policy=st.sampled_from(["default", "by-score", "plain"]),
    probe=st.none() | _results,
    ctx=_contexts,
    failed=st.booleans(),
    n_layers=st.none() | st.integers(min_value=1, max_value=64),
)
def test_decide_never_raises(
    all_settings: Settings,
    policy: str,
    probe: ProbeResult | None,
    ctx: RequestContext,
    failed: bool,
    n_layers: int | None,
) -> None:
    engine = PolicyEngine(all_settings, n_layers=n_layers)
    d = engine.decide(policy, probe, ctx, probe_failed=failed)
    backends = all_settings.backends
    assert d.backend in backends
    assert all(f in backends for f in d.fallbacks)
    assert d.backend not in d.fallbacks
    assert len(set(d.fallbacks)) == len(d.fallbacks)
    rules = {r.name for r in all_settings.policies[policy].rules}
    assert d.rule in rules | {"default", "on_probe_error"}
    assert d.policy == policy
    if d.rule == "on_probe_error":
        assert d.probe_error and d.backend == all_settings.policies[policy].on_probe_error


@settings(max_examples=200, deadline=None)
@given(percentile=st.floats(min_value=0, max_value=1))
def test_share_rule_is_a_percentile_threshold(
    default_engine: PolicyEngine, percentile: float
) -> None:
    d = default_engine.decide("default", result(percentile=percentile), CTX)
    assert d.backend == ("large" if percentile >= 0.7 else "small")
