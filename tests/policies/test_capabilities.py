"""Request-shape conditions (has_tools, has_images, response_format, n_messages), backend
capabilities, and how the engine cuts a decision's chain to the backends that can serve it."""

from __future__ import annotations

import pytest

from policies.engine import Decision, MissingCapability, PolicyEngine, RequestContext
from policies.errors import ConfigError
from policies.loader import parse_settings
from policies.schema import Settings
from policies.schema.backends import CAPABILITIES
from probes.types import ProbeResult

CONFIG = """
backends:
  small: {type: openai, base_urls: ["http://small/v1"], capabilities: [json], fallback: [mid]}
  mid: {type: openai, base_urls: ["http://mid/v1"], capabilities: [vision], fallback: [large]}
  large: {type: openai, base_urls: ["http://large/v1"]}
  blind: {type: openai, base_urls: ["http://blind/v1"], capabilities: tools}
  here: {type: local}
  person: {type: human}
policies:
  default:
    rules:
      - {name: tools, when: {has_tools: true}, route: large}
      - {name: pictures, when: {has_images: true, n_messages: {max: 3}}, route: mid}
      - {name: json, when: {response_format: [json_object, json_schema]}, route: small}
      - {name: long, when: {n_messages: {min: 10}}, route: large}
      - {name: plain, when: {has_tools: false, response_format: text, score: {min: 0.5}},
         route: mid}
    default: small
    on_probe_error: large
"""


def settings(text: str = CONFIG) -> Settings:
    return parse_settings(text, source_name="gateway.yaml")


@pytest.fixture(scope="module")
def engine() -> PolicyEngine:
    return PolicyEngine(settings())


def probe(score: float = 0.0) -> ProbeResult:
    return ProbeResult(n_tokens=10, score=score, metrics={1: {"hoyer": 0.5}})


@pytest.mark.parametrize(
    ("context", "rule", "reason"),
    [
        (RequestContext(has_tools=True, n_messages=1), "tools", "has tools"),
        (
            RequestContext(has_images=True, n_messages=2),
            "pictures",
            "has images; n_messages 2 in [0, 3)",
        ),
        (RequestContext(has_images=True, n_messages=3), "default", None),  # band excludes max
        (RequestContext(response_format="json_schema", n_messages=1), "json", None),
        (RequestContext(response_format="json_object", n_messages=1), "json", None),
        (RequestContext(response_format="regex", n_messages=1), "default", None),
        (RequestContext(n_messages=10), "long", "n_messages 10 in [10, inf)"),
        (RequestContext(n_messages=None), "default", None),  # unknown count: no match
        (RequestContext(n_messages=1), "default", None),  # the score rule needs 0.5
    ],
)
def test_shape_conditions(
    engine: PolicyEngine, context: RequestContext, rule: str, reason: str | None
) -> None:
    d = engine.decide("default", probe(), context)
    assert d.rule == rule
    if reason is not None:
        assert d.reason == f"rule {rule}: {reason}"


def test_shape_conditions_combine_with_probe_conditions(engine: PolicyEngine) -> None:
    ctx = RequestContext(n_messages=1)
    d = engine.decide("default", probe(score=0.9), ctx)
    assert d.rule == "plain"
    assert d.reason == "rule plain: no tools; response_format text; score 0.9 in [0.5, inf)"
    with_tools = engine.decide("default", probe(score=0.9), RequestContext(has_tools=True))
    assert with_tools.rule == "tools"


def test_shape_conditions_need_no_probe(engine: PolicyEngine) -> None:
    # the probe failed, but a rule on the request's shape still routes it
    d = engine.decide("default", None, RequestContext(has_tools=True), probe_failed=True)
    assert (d.rule, d.backend) == ("tools", "large")
    # and a request with no text (an image only) is routed by its shape, never probed
    ctx = RequestContext(has_text=False, has_images=True, n_messages=1)
    img = engine.decide("default", None, ctx)
    assert (img.rule, img.backend) == ("pictures", "mid")


def test_capability_defaults() -> None:
    s = settings()
    assert s.backends["large"].capabilities == CAPABILITIES  # openai: all, configs unbroken
    assert s.backends["person"].capabilities == CAPABILITIES
    assert s.backends["here"].capabilities == ()  # local: tools/response_format ignored
    assert s.backends["blind"].capabilities == ("tools",)  # one name stands for a list


def decision(backend: str, fallbacks: tuple[str, ...]) -> Decision:
    return Decision(backend, fallbacks, rule="r", policy="default", reason="rule r: x")


def test_select_keeps_a_capable_backend(engine: PolicyEngine) -> None:
    d = decision("large", ("mid", "small"))
    assert engine.select(d, {}) is d  # nothing needed: untouched
    assert engine.select(d, {"tools": "tools"}) == decision("large", ())  # chain cut
    assert engine.select(d, {"vision": "messages[0].content[1]"}).fallbacks == ("mid",)


def test_select_moves_to_the_first_capable_backend(engine: PolicyEngine) -> None:
    d = engine.select(decision("small", ("mid", "large")), {"tools": "tools"})
    assert (d.backend, d.fallbacks) == ("large", ())
    assert d.capability_fallback == "small:tools"
    assert d.reason == "rule r: x; small lacks tools, so large answers"
    both = engine.select(decision("small", ("mid", "large")), {"tools": "t", "vision": "v"})
    assert (both.backend, both.capability_fallback) == ("large", "small:tools,vision")
    assert engine.lacking("mid", ("json", "vision", "tools")) == ("tools", "json")
    assert engine.lacking("nowhere", ("json",)) == ("json",)


def test_select_raises_when_no_backend_can_serve(engine: PolicyEngine) -> None:
    with pytest.raises(MissingCapability) as info:
        engine.select(decision("small", ("here",)), {"tools": "tools", "json": "response_format"})
    assert info.value.missing == ("tools",)  # small has json; nobody has tools
    assert info.value.chain == ("small", "here")
    # each capability somewhere, never together: both are named
    with pytest.raises(MissingCapability) as together:
        engine.select(decision("small", ("mid",)), {"vision": "v", "json": "j"})
    assert together.value.missing == ("vision", "json")


def test_engine_fallback_chain_then_select(engine: PolicyEngine) -> None:
    d = engine.decide("default", probe(), RequestContext(n_messages=1))
    assert (d.backend, d.fallbacks) == ("small", ("mid", "large"))
    images = engine.select(d, {"vision": "messages[0].content[0]"})
    assert (images.backend, images.fallbacks) == ("mid", ("large",))
    assert images.capability_fallback == "small:vision"


@pytest.mark.parametrize(
    ("patch", "where", "message"),
    [
        (
            ("capabilities: [json]", "capabilities: [json, audio]"),
            "backends.small.capabilities[1]",
            "must be 'tools', 'vision' or 'json', got 'audio'",
        ),
        (
            ("here: {type: local}", "here: {type: local, capabilities: [tools]}"),
            "backends.here.capabilities",
            "a local backend cannot serve tools",
        ),
        (
            ("n_messages: {max: 3}", "n_messages: {min: 3, max: 3}"),
            "policies.default.rules[1].when.n_messages",
            "min (3) must be less than max (3)",
        ),
        (
            ("n_messages: {max: 3}", "n_messages: {min: -1}"),
            "policies.default.rules[1].when.n_messages.min",
            "",
        ),
        (
            ("response_format: [json_object, json_schema]", "response_format: [yaml]"),
            "policies.default.rules[2].when.response_format[0]",
            "'text', 'json_object' or 'json_schema'",
        ),
        (
            ("response_format: [json_object, json_schema]", "response_format: []"),
            "policies.default.rules[2].when",
            "response_format: give at least one value",
        ),
        (
            ("{has_tools: true}, route: large", "{has_tools: true}, route: mid, fallback: []"),
            "policies.default.rules[0].when.has_tools",
            "no backend of its chain (mid) lists it",
        ),
        (
            ("{has_tools: true}, route: large", "{has_tools: true}, route: here"),
            "policies.default.rules[0].when.has_tools",
            "no backend of its chain (here) lists it",
        ),
        (
            ("route: small}", "route: blind}"),
            "policies.default.rules[2].when.response_format",
            "needs 'json'",
        ),
    ],
)
def test_bad_capability_config_names_the_path(
    patch: tuple[str, str], where: str, message: str
) -> None:
    old, new = patch
    assert old in CONFIG
    with pytest.raises(ConfigError) as info:
        settings(CONFIG.replace(old, new, 1))
    text = str(info.value)
    assert f"{where}:" in text and message in text, text


def test_rules_that_only_may_need_a_capability_are_not_refused() -> None:
    # has_tools: false, or a response_format band that includes text, implies no capability
    text = CONFIG.replace("{has_tools: true}, route: large", "{has_tools: false}, route: here")
    assert settings(text).policies["default"].rules[0].route == "here"
    text = CONFIG.replace(
        "[json_object, json_schema]}, route: small", "[text, json_object]}, route: here"
    )
    assert settings(text).policies["default"].rules[2].route == "here"
