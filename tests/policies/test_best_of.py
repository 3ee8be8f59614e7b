"""``route: {best_of: [...]}`` rules: the schema, the load-time cross-checks (naming the YAML
path), the engine's choice from the qualities a probe result carries, and the start-up check
against a calibration's N-way model (:func:`policies.engine.best_of_problems`)."""

from __future__ import annotations

import pytest

from policies.engine import PolicyEngine, RequestContext, backend_model, best_of_problems
from policies.errors import ConfigError
from policies.loader import parse_settings
from policies.schema import Settings
from probes.types import ProbeResult

BASE = """\
calibration: {{path: c.json}}
backends:
  a: {{type: openai, base_urls: ["http://127.0.0.1:9/v1"], model: model-a}}
  b: {{type: openai, base_urls: ["http://127.0.0.1:9/v1"], model: model-b}}
  c: {{type: openai, base_urls: ["http://127.0.0.1:9/v1"], fallback: [a]}}
policies:
  default:
    rules:
      - {{name: short, when: {{n_tokens: {{max: 5}}}}, route: a}}
      - name: nway
        when: {{always: true}}
        route: {route}
    default: b
    on_probe_error: b
"""


def settings(route: str, calibration: bool = True) -> Settings:
    text = BASE.format(route=route)
    if not calibration:
        text = text.replace("calibration: {path: c.json}\n", "")
    return parse_settings(text, source_name="gw.yaml")


def result(qualities: dict[str, tuple[float, float]] | None, n_tokens: int = 50) -> ProbeResult:
    return ProbeResult(n_tokens=n_tokens, score=0.5, metrics={}, qualities=qualities)


PREDICTED = {"model-a": (0.6, 1.0), "model-b": (0.9, 10.0), "c": (0.55, 0.1)}


# -- schema and load-time checks -------------------------------------------------------------------


def test_a_best_of_route_loads() -> None:
    s = settings("{best_of: [a, b, c], willingness_to_pay: 0.02, max_cost_per_mtok: 5}")
    route = s.policies["default"].rules[1].route
    assert not isinstance(route, str)
    assert route.best_of == ("a", "b", "c")
    assert route.max_cost == (5.0, "usd_per_mtok")
    assert str(route) == "best_of(a, b, c)"
    assert backend_model(s, "a") == "model-a" and backend_model(s, "c") == "c"


@pytest.mark.parametrize(
    ("route", "message"),
    [
        (
            "{best_of: [a, x]}",
            r"policies\.default\.rules\[1\]\.route\.best_of\[1\]: unknown backend 'x'",
        ),
        ("{best_of: [a]}", r"best_of.*at least 2"),
        ("{best_of: [a, a]}", r"best_of names a more than once"),
        ("{best_of: [a, b], willingness_to_pay: -1}", r"willingness_to_pay.*greater than or equal"),
        (
            "{best_of: [a, b], max_cost_per_mtok: 1, max_cost_per_request: 1}",
            "give max_cost_per_mtok or max_cost_per_request, not both",
        ),
        (
            "{best_of: [a, b], budget: 3}",
            r"rules\[1\]\.route\.budget: unknown key; allowed: best_of",
        ),
    ],
)
def test_bad_best_of_routes_name_their_yaml_path(route: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        settings(route)


def test_best_of_needs_a_calibration() -> None:
    with pytest.raises(
        ConfigError,
        match=r"policies\.default\.rules\[1\]\.route: best_of needs a calibration with an N-way",
    ):
        settings("{best_of: [a, b]}", calibration=False)


# -- the engine ------------------------------------------------------------------------------------


def test_the_engine_picks_the_best_predicted_quality() -> None:
    engine = PolicyEngine(settings("{best_of: [a, b, c]}"))
    d = engine.decide("default", result(PREDICTED), RequestContext())
    assert (d.backend, d.rule, d.model, d.predicted_quality) == ("b", "nway", "model-b", 0.9)
    assert d.fallbacks == ("a", "c")  # the others, best first
    assert "best of a, b, c: b (model-b) predicted quality 0.9" in d.reason


def test_willingness_to_pay_and_the_cost_cap_trade_quality_for_cost() -> None:
    engine = PolicyEngine(settings("{best_of: [a, b, c], willingness_to_pay: 0.1}"))
    # 0.6 - 0.1 = 0.5, 0.9 - 1.0 = -0.1, 0.55 - 0.01 = 0.54
    assert engine.decide("default", result(PREDICTED), RequestContext()).backend == "c"
    capped = PolicyEngine(settings("{best_of: [a, b, c], max_cost_per_mtok: 2}"))
    d = capped.decide("default", result(PREDICTED), RequestContext())
    assert (d.backend, d.model) == ("a", "model-a")
    none_fit = PolicyEngine(settings("{best_of: [a, b], max_cost_per_mtok: 0.5}"))
    assert none_fit.decide("default", result(PREDICTED), RequestContext()).backend == "a"


def test_earlier_rules_probe_errors_and_missing_predictions() -> None:
    engine = PolicyEngine(settings("{best_of: [a, b, c]}"))
    assert engine.needs_probe("default")
    assert engine.decide("default", result(PREDICTED, n_tokens=3), RequestContext()).rule == "short"
    failed = engine.decide("default", None, RequestContext(), probe_failed=True)
    assert (failed.backend, failed.rule) == ("b", "on_probe_error")
    # no predictions (or none for one of the rule's models): the rule does not match
    assert engine.decide("default", result(None), RequestContext()).rule == "default"
    partial = {k: v for k, v in PREDICTED.items() if k != "c"}
    assert engine.decide("default", result(partial), RequestContext()).rule == "default"


# -- the start-up check against the calibration ----------------------------------------------------


def test_best_of_problems_name_the_rule_and_the_fix() -> None:
    s = settings("{best_of: [a, b, c], max_cost_per_request: 0.01}")
    assert best_of_problems(s, ("model-a", "model-b", "c"), "usd_per_request") == []
    (none,) = best_of_problems(s, None, None)
    assert none.startswith("policies.default.rules[1].route: best_of needs the calibration's N-way")
    problems = best_of_problems(s, ("model-a", "model-b"), "usd_per_mtok")
    assert problems[0].startswith(
        "policies.default.rules[1].route.best_of[2]: backend 'c' serves model 'c'"
    )
    assert problems[1].startswith(
        "policies.default.rules[1].route.max_cost_per_request: the calibration's costs are in "
        "usd_per_mtok"
    )


def test_malformed_predictions_match_nothing() -> None:
    engine = PolicyEngine(settings("{best_of: [a, b, c]}"))
    for bad in (
        {**PREDICTED, "c": (float("nan"), 0.1)},
        {**PREDICTED, "c": "high"},
        {**PREDICTED, "c": ()},
    ):
        d = engine.decide("default", result(bad), RequestContext())  # type: ignore[arg-type]
        assert d.rule == "default"
