"""Config schema and loader: good files load; broken ones fail with exact, line-numbered errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from policies.errors import ConfigError, ConfigProblem
from policies.loader import default_config_path, interpolate, load_settings, parse_settings
from policies.schema import (
    EscalationSettings,
    HumanBackend,
    LocalBackend,
    OpenAIBackend,
    ProbeSection,
    Settings,
    format_loc,
)
from probes.types import ProbeSettings

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = Path(__file__).resolve().parent / "configs"
DEFAULT = ROOT / "config" / "default.yaml"
EXAMPLES = ROOT / "config" / "examples"

MINIMAL = """\
backends:
  small: {type: local}
policies:
  default:
    default: small
    on_probe_error: small
"""


def _load_error(path: Path, env: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load_settings(path, env={} if env is None else env)
    return str(info.value)


# -- good files ----------------------------------------------------------------------------------


def test_default_config_env_unset() -> None:
    s = load_settings(DEFAULT, env={})
    assert default_config_path() == DEFAULT
    assert s.auth.api_keys == () and not s.auth.enabled
    large = s.backends["large"]
    assert isinstance(large, OpenAIBackend)
    assert large.base_urls == ("http://127.0.0.1:8001/v1",)
    assert large.model == "large" and large.fallback == ("small",)
    small = s.backends["small"]
    assert isinstance(small, LocalBackend) and small.share_probe_model
    assert s.local_model("small") == ProbeSettings().model
    assert s.calibration_path() == ROOT / "config" / "calibration" / "default.json"
    assert s.base_dir == DEFAULT.parent
    assert s.probe.timeout_s == 2.0
    # metric and layer are not pinned: the code's defaults apply
    assert s.probe.probe_settings() == ProbeSettings(prefix_cache=True)
    assert s.probe.warm_up and s.probe.batching.enabled
    assert s.virtual_models["auto"].policy == "default"
    policy = s.policies["default"]
    assert [r.name for r in policy.rules] == ["tools", "images", "json", "sparse"]
    tools, images, json_format, sparse = policy.rules
    assert tools.when.has_tools is True and images.when.has_images is True
    assert set(json_format.when.response_format or ()) == {"json_object", "json_schema"}
    assert all(r.route == "large" for r in policy.rules)
    assert sparse.when.share == 0.3
    assert policy.default.route == "small" and policy.on_probe_error == "large"
    assert s.cache.redis is None and s.cache.memory.max_entries > 0
    assert s.server.max_body_bytes == 1 << 20 and s.server.passthrough_direct_models


def test_default_config_env_set() -> None:
    env = {
        "SPARSITY_ROUTER_API_KEY": "sekrit",
        "SPARSITY_ROUTER_LARGE_URLS": "http://gpu-1:8000/v1/",
        "SPARSITY_ROUTER_LARGE_MODEL": "Qwen/Qwen2.5-32B-Instruct",
    }
    s = load_settings(DEFAULT, env=env)
    assert s.auth.api_keys == ("sekrit",) and s.auth.enabled
    assert "sekrit" not in repr(s.auth)
    large = s.backends["large"]
    assert isinstance(large, OpenAIBackend)
    assert large.base_urls == ("http://gpu-1:8000/v1",)
    assert large.model == "Qwen/Qwen2.5-32B-Instruct"


def test_default_config_empty_var_uses_default() -> None:
    s = load_settings(
        DEFAULT, env={"SPARSITY_ROUTER_LARGE_URLS": "", "SPARSITY_ROUTER_API_KEY": ""}
    )
    large = s.backends["large"]
    assert isinstance(large, OpenAIBackend) and large.base_urls == ("http://127.0.0.1:8001/v1",)
    assert s.auth.api_keys == ()


def test_vllm_example() -> None:
    env = {
        "SPARSITY_ROUTER_SMALL_URLS": "http://a:1/v1, http://b:1/v1",
        "SPARSITY_ROUTER_REDIS_URL": "redis://r:6379/2",
    }
    s = load_settings(EXAMPLES / "vllm-small-large.yaml", env=env)
    small = s.backends["small"]
    assert isinstance(small, OpenAIBackend)
    assert small.base_urls == ("http://a:1/v1", "http://b:1/v1")
    assert s.cache.redis is not None and s.cache.redis.url == "redis://r:6379/2"
    assert s.server.port == 8080 and s.server.host == "0.0.0.0"
    assert s.direct_models() == {"small": "small", "large": "large"}
    assert s.calibration_path() == ROOT / "config" / "calibration" / "default.json"
    assert set(s.virtual_models) == {"auto", "auto-cheap"}


def test_supervised_example_feeds_the_default_recipe() -> None:
    from evaluation.recipes import neighbour_blocks, supervised_features

    s = load_settings(EXAMPLES / "supervised.yaml")
    probe = s.probe
    assert probe.state_layers == (12, 18, 30) and probe.token_mean and probe.score_layer == 10
    recipe = supervised_features(30)
    metric_layers = {int(f.split(".")[0][1:]) for f in recipe if ".state." not in f}
    assert metric_layers <= set(probe.layers)
    assert {int(f.split(".")[0][1:]) for f in recipe if ".state." in f} == {30}
    # the votes' vectors: layer 12, and layer 18 from 2,500 labelled prompts on
    assert neighbour_blocks(30) == ("L12.state.mean", "L18.state.mean")
    rule = s.policies["default"].rules[0]
    assert rule.when.p_large is not None and rule.route == "large"
    assert s.calibration_path() == EXAMPLES / "supervised.json"


def test_cascade_example_checks_the_small_models_answers() -> None:
    s = load_settings(EXAMPLES / "cascade.yaml", env={})
    cascade = s.policies["default"].cascade
    assert cascade is not None
    assert (cascade.backend, cascade.escalate_to, cascade.on_probe_error) == (
        "small",
        "large",
        "keep",
    )
    assert cascade.when.p_large.contains(0.5) and not cascade.when.p_large.contains(0.49)
    assert s.answer_calibration_path() == EXAMPLES / "answers.json"
    assert s.calibration_path() is None
    assert s.probe.state_layers == (12,) and max(s.probe.layers) == 12
    from evaluation.recipes import answer_features

    assert {int(f.split(".")[0][1:]) for f in answer_features(30)} <= set(s.probe.layers)


def test_three_tier_example_loads_with_its_human_tier() -> None:
    s = load_settings(EXAMPLES / "three-tier.yaml")
    human = s.backends["human"]
    assert isinstance(human, HumanBackend)
    assert (human.mode, human.wait_s, human.on_timeout) == ("hold", 120, "large")
    esc = s.escalation_settings()
    assert esc is not None and esc.store == "sqlite" and esc.lease_s == 300
    assert s.resolve_path(esc.path) == EXAMPLES / "escalations.sqlite"
    assert "DOES NOT LOAD YET" not in (EXAMPLES / "three-tier.yaml").read_text()


@pytest.mark.parametrize("name", ["good-minimal.yaml", "good-all-conditions.yaml"])
def test_good_fixtures_load(name: str) -> None:
    s = load_settings(CONFIGS / name, env={})
    assert s.policies


def test_rule_names_default_to_their_index() -> None:
    s = load_settings(CONFIGS / "good-all-conditions.yaml", env={})
    assert [r.name for r in s.policies["by-score"].rules] == ["rules[0]", "rules[1]"]
    medium = s.backends["medium"]
    assert isinstance(medium, OpenAIBackend)
    assert medium.base_urls == ("http://127.0.0.1:9001/v1", "http://127.0.0.1:9002/v1")
    cond = s.policies["default"].rules[1].when
    assert cond.header == {"x-tier": ("gold",)}
    assert s.policies["default"].rules[0].when.user == ("alice", "bob")
    assert s.policies["default"].rules[3].when.model == ("pick-large",)


def test_calibration_path_resolution(tmp_path: Path) -> None:
    text = MINIMAL + "calibration: {path: cal/x.json}\n"
    assert parse_settings(text, base_dir=tmp_path).calibration_path() == tmp_path / "cal/x.json"
    assert parse_settings(text).calibration_path() == Path("cal/x.json")
    absolute = MINIMAL + f"calibration: {{path: {tmp_path}/c.json}}\n"
    assert parse_settings(absolute, base_dir="/elsewhere").calibration_path() == tmp_path / "c.json"
    assert parse_settings(MINIMAL).calibration_path() is None


def test_probe_section_is_probe_settings() -> None:
    s = parse_settings(MINIMAL + "probe: {max_tokens: 256, timeout_s: 0.5, token_mean: true}\n")
    assert isinstance(s.probe, ProbeSection) and isinstance(s.probe, ProbeSettings)
    plain = s.probe.probe_settings()
    assert type(plain) is ProbeSettings and plain.max_tokens == 256 and plain.token_mean


def test_settings_defaults_and_direct_python_use() -> None:
    s = Settings.model_validate(
        {
            "backends": {"small": {"type": "local"}},
            "policies": {"default": {"default": "small", "on_probe_error": "small"}},
        }
    )
    assert s.base_dir is None and s.experiments == () and s.events is None
    with pytest.raises(ValidationError, match="unknown backend 'nope'; known: small"):
        Settings.model_validate(
            {
                "backends": {"small": {"type": "local"}},
                "policies": {"default": {"default": "nope", "on_probe_error": "small"}},
            }
        )


def test_empty_sections_for_future_features_are_accepted() -> None:
    s = parse_settings(MINIMAL + "experiments: []\nescalation: {}\nevents:\n")
    assert s.experiments == () and s.events is None
    # an empty escalation section is the defaults; without a human backend it is unused
    assert s.escalation == EscalationSettings() and s.escalation_settings() is None


def test_format_loc_and_problem_rendering() -> None:
    assert format_loc(("policies", "default", "rules", 2, "route")) == (
        "policies.default.rules[2].route"
    )
    assert str(ConfigProblem("f.yaml", 3, "bad", "a.b", column=4)) == "f.yaml:3:4: a.b: bad"
    assert str(ConfigProblem("f.yaml", None, "bad")) == "f.yaml: bad"


# -- interpolation -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "env", "expected"),
    [
        ("plain", {}, "plain"),
        ("${A}", {"A": "1"}, "1"),
        ("x-${A}-${B}", {"A": "1", "B": "2"}, "x-1-2"),
        ("${A:-d}", {}, "d"),
        ("${A:-d}", {"A": ""}, "d"),
        ("${A:-d}", {"A": "v"}, "v"),
        ("${A:-}", {}, ""),
        ("${A:-http://h:1/v1}", {}, "http://h:1/v1"),
        ("${A}", {"A": ""}, ""),
        ("$${A}", {"A": "1"}, "${A}"),
        ("cost: $5", {}, "cost: $5"),
    ],
)
def test_interpolate(text: str, env: dict[str, str], expected: str) -> None:
    assert interpolate(text, env) == (expected, [])


def test_interpolate_problems() -> None:
    assert interpolate("${NOPE}", {})[1] == [
        "environment variable NOPE is not set (write ${NOPE:-default} to give a default)"
    ]
    assert "malformed reference '${1X}'" in interpolate("${1X}", {})[1][0]
    assert "malformed reference" in interpolate("${A:-${B}}", {})[1][0]
    assert "malformed reference '${A'" in interpolate("${A", {})[1][0]


def test_interpolation_is_typed_by_the_schema() -> None:
    text = MINIMAL + "server: {port: '${PORT:-9000}', passthrough_direct_models: '${PT}'}\n"
    s = parse_settings(text, env={"PT": "false"})
    assert s.server.port == 9000 and s.server.passthrough_direct_models is False


def test_interpolation_does_not_touch_keys_or_non_strings() -> None:
    text = MINIMAL + "server: {port: 8081}\n"
    assert parse_settings(text, env={}).server.port == 8081


def test_missing_env_vars_are_all_reported() -> None:
    text = MINIMAL + "auth:\n  api_keys: [a, '${K1}', '${K2}']\n"
    with pytest.raises(ConfigError) as info:
        parse_settings(text, "x.yaml", env={})
    assert str(info.value) == (
        "x.yaml:8: auth.api_keys[1]: environment variable K1 is not set "
        "(write ${K1:-default} to give a default)\n"
        "x.yaml:8: auth.api_keys[2]: environment variable K2 is not set "
        "(write ${K2:-default} to give a default)"
    )


# -- broken files: exact messages --------------------------------------------------------------

BROKEN: dict[str, list[str]] = {
    "bad-unknown-backend.yaml": [
        "14: policies.default.rules[2].route: unknown backend 'lage'; known: large, small"
    ],
    "bad-fallback-cycle.yaml": ["5: backends.a.fallback[0]: fallback cycle a → b → a"],
    "bad-band-order.yaml": [
        "8: policies.default.rules[0].when.score: min (0.8) must be less than max (0.8)"
    ],
    "bad-unknown-key.yaml": [
        "7: policies.default: unknown key 'fallback' (allowed: cascade, default, on_no_text, "
        "on_probe_error, rules)"
    ],
    "bad-wrong-type.yaml": [
        "2: server.port: must be a valid integer, unable to parse string as an integer, "
        "got 'eighty'"
    ],
    "bad-missing-default.yaml": ["4: policies.default: missing required key 'default'"],
    "bad-missing-on-probe-error.yaml": [
        "4: policies.default: missing required key 'on_probe_error'"
    ],
    "bad-share-over-one.yaml": [
        "12: policies.default.rules[2].when.share: the shares of this policy's rules add up to "
        "1.05 (0.5 + 0.25 + 0.3); they must add up to at most 1"
    ],
    "bad-virtual-model-policy.yaml": [
        "5: virtual_models.smart.policy: unknown policy 'smrt'; known: default, smart"
    ],
    "bad-human-backend.yaml": [
        "6: backends.large.fallback[0]: 'human' is a human backend and cannot be a fallback; "
        "route to it with a rule (route:) instead",
        "7: backends.human.on_timeout: unknown backend 'lage'; known: desk, human, large, small "
        "(or 'ticket' to answer with a ticket)",
        "8: backends.desk.wait_s: a hold of 600 s outlives escalation.expire_s (300 s): the "
        "escalation would expire before on_timeout answers. Fix: make wait_s shorter than "
        "expire_s",
    ],
    "bad-cascade.yaml": [
        "9: policies.default.cascade: a cascade needs an answer calibration: set "
        "calibration.answer_path to a file from `sparsity-router calibrate --labels FILE "
        "--answer-column NAME`",
        "10: policies.default.cascade.backend: 'desk' is a human backend; a cascade checks and "
        "escalates between model backends (route to a human with a rule instead)",
        "11: policies.default.cascade.escalate_to: unknown backend 'lage'; known: desk, large, "
        "small",
        "16: policies.same.cascade: a cascade needs an answer calibration: set "
        "calibration.answer_path to a file from `sparsity-router calibrate --labels FILE "
        "--answer-column NAME`",
        "16: policies.same.cascade.escalate_to: escalate_to must differ from the checked backend",
    ],
    "bad-yaml-syntax.yaml": ["6:20: YAML syntax error: mapping values are not allowed here"],
    "bad-missing-env.yaml": [
        "6: backends.large.base_urls[0]: environment variable SPARSITY_TEST_UNSET_URL is not "
        "set (write ${SPARSITY_TEST_UNSET_URL:-default} to give a default)"
    ],
    "bad-percentile-no-calibration.yaml": [
        "9: policies.default.rules[0].when.percentile: percentile conditions need a "
        "calibration: set calibration.path (or use score, which needs none)"
    ],
    "bad-empty-condition.yaml": [
        "6: policies.default.rules[0].when: empty condition: give at least one of always, "
        "percentile, share, p_large, score, metric, n_tokens, model, user, header, metadata, "
        "has_text, has_tools, has_images, response_format, n_messages (write `always: true` for "
        "a rule that matches every request)"
    ],
    "bad-backend-type.yaml": [
        "3: backends.large: unknown type 'vllm' (allowed: human, local, openai)"
    ],
    "bad-duplicate-key.yaml": ["7: duplicate key 'backends' (first at line 1)"],
    "bad-experiments.yaml": [
        "9: experiments[0].control: unknown arm 'c'; arms: a",
        "10: experiments[0].arms: arm weights add up to 0.9 (0.5 + 0.4); they must add up to 1",
        "12: experiments[0].arms[1].name: duplicate arm name 'a' (see arms[0])",
    ],
    "bad-experiment-refs.yaml": [
        "14: experiments[0].arms[1].policy: unknown policy 'cheep'; known: cheap, default",
        "15: experiments[1].model: virtual model 'auto' already has an experiment "
        "(experiments[0]); one experiment per virtual model: set enabled: false on the old one "
        "or remove it",
        "20: experiments[2].model: 'smart' is not a virtual model; known: auto",
    ],
    "bad-metric-not-measured.yaml": [
        "10: policies.default.rules[0].when.metric.name: metric 'gini' is not measured by the "
        "probe; probe.metrics: top1_energy, hoyer",
        "10: policies.default.rules[0].when.metric.position: position 'mean' needs token-mean "
        "metrics: set probe.token_mean: true",
    ],
    "bad-several.yaml": [
        "3: backends.small.fallback[0]: unknown backend 'big'; known: large, small",
        "12: policies.default.default.fallback[0]: fallback cycle small → small: a backend "
        "cannot be its own fallback",
        "13: policies.default.on_probe_error: unknown backend 'larg'; known: large, small",
    ],
    "bad-field-errors.yaml": [
        "3: backends.small.max_new_tokens: must be greater than or equal to 1, got 0",
        "6: backends.large.base_urls: expected an http:// or https:// URL, got "
        "'ftp://127.0.0.1/v1'",
        "10: policies.default.rules[0].when: `always: true` cannot be combined with model",
    ],
}


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_broken_fixture_message(name: str) -> None:
    path = CONFIGS / name
    assert _load_error(path) == "\n".join(f"{path}:{line}" for line in BROKEN[name])


def test_every_broken_fixture_is_checked() -> None:
    on_disk = {p.name for p in CONFIGS.glob("bad-*.yaml")}
    assert on_disk == set(BROKEN)
    assert len(BROKEN) >= 12


def test_problems_carry_structured_fields() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(CONFIGS / "bad-unknown-backend.yaml", env={})
    (problem,) = info.value.problems
    assert (problem.line, problem.path) == (14, "policies.default.rules[2].route")
    assert problem.source == str(CONFIGS / "bad-unknown-backend.yaml")


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (
            "server: 8080\n",
            "s.yaml:7: server: expected a mapping (key: value lines), got 8080",
        ),
        (
            "probe: {score_position: first}\n",
            "s.yaml:7: probe.score_position: must be 'last' or 'mean', got 'first'",
        ),
        (
            "probe: {scor_metric: hoyer}\n",
            "s.yaml:7: probe: unknown key 'scor_metric' (allowed: backend, batch_size, batching, "
            "chat_template, device, dtype, layers, max_chars, max_messages, max_tokens, metrics, "
            "model, prefix_cache, score_layer, score_metric, "
            "score_position, state_layers, system_prompt, threads, timeout_s, token_mean, vllm, "
            "warm_up)",
        ),
        (
            "cache: {redis: {url: 'http://r'}}\n",
            "s.yaml:7: cache.redis.url: expected a redis://, rediss:// or unix:// URL, "
            "got 'http://r'",
        ),
        (
            "events: {sink: redis}\n",
            "s.yaml:7: events.redis_url: sink 'redis' needs redis_url (e.g. "
            "redis://127.0.0.1:6379/0)",
        ),
        (
            "events: {sink: sqlite, queue_size: 0}\n",
            "s.yaml:7: events.queue_size: must be greater than or equal to 1, got 0",
        ),
        (
            "escalation:\n  timeout_s: 60\n",
            "s.yaml:8: escalation: unknown key 'timeout_s' (allowed: expire_s, key_prefix, "
            "lease_s, path, redis_url, retention_s, reviewer_keys, store, webhook)",
        ),
        (
            "escalation: {lease_s: 0, webhook: {url: 'ftp://x'}}\n",
            "s.yaml:7: escalation.lease_s: must be greater than 0, got 0\n"
            "s.yaml:7: escalation.webhook.url: expected an http:// or https:// URL, "
            "got 'ftp://x'",
        ),
        (
            "virtual_models: {auto: {policy: default, x: 1}}\n",
            "s.yaml:7: virtual_models.auto: unknown key 'x' (allowed: policy)",
        ),
    ],
)
def test_inline_errors(extra: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_settings(MINIMAL + extra, "s.yaml", env={})
    assert str(info.value) == expected


def _policy_error(policy_yaml: str, backends: str = "", calibrated: bool = True) -> str:
    text = (
        ("calibration: {path: c.json}\n" if calibrated else "")
        + "backends:\n  small: {type: local}\n  large: {type: local}\n"
        + backends
        + "policies:\n  default:\n"
        + policy_yaml
    )
    with pytest.raises(ConfigError) as info:
        parse_settings(text, "p.yaml", env={})
    return str(info.value)


def test_unknown_backend_in_default_bare_name_points_at_the_key() -> None:
    assert _policy_error("    default: smal\n    on_probe_error: small\n") == (
        "p.yaml:7: policies.default.default: unknown backend 'smal'; known: large, small"
    )


def test_unknown_backend_in_fallback_and_missing_type() -> None:
    assert (
        _policy_error(
            "    default: small\n    on_probe_error: small\n",
            backends="  extra: {base_urls: [http://x/v1]}\n",
        )
        == "p.yaml:5: backends.extra: missing key 'type' (one of: human, local, openai)"
    )


def test_rule_fallback_naming_its_own_route() -> None:
    policy = (
        "    rules:\n      - when: {model: m}\n        route: large\n        fallback: large\n"
        "    default: small\n    on_probe_error: small\n"
    )
    assert _policy_error(policy) == (
        "p.yaml:10: policies.default.rules[0].fallback: fallback cycle large → large: a "
        "backend cannot be its own fallback"
    )


def test_self_fallback_backend_cycle() -> None:
    text = MINIMAL.replace("{type: local}", "{type: local, fallback: [small]}")
    with pytest.raises(ConfigError) as info:
        parse_settings(text, "c.yaml")
    assert str(info.value) == "c.yaml:2: backends.small.fallback[0]: fallback cycle small → small"


def test_long_cycle_is_reported_once() -> None:
    text = """\
backends:
  a: {type: local, fallback: [b]}
  b: {type: local, fallback: [c]}
  c: {type: local, fallback: [a]}
  d: {type: local, fallback: [a]}
policies:
  default: {default: d, on_probe_error: d}
"""
    with pytest.raises(ConfigError) as info:
        parse_settings(text, "c.yaml")
    assert str(info.value) == "c.yaml:2: backends.a.fallback[0]: fallback cycle a → b → c → a"


def test_share_without_calibration_and_share_with_percentile() -> None:
    policy = (
        "    rules:\n      - when: {share: 0.1}\n        route: large\n"
        "    default: small\n    on_probe_error: small\n"
    )
    assert _policy_error(policy, calibrated=False) == (
        "p.yaml:7: policies.default.rules[0].when.share: share conditions need a calibration: "
        "set calibration.path (or use score, which needs none)"
    )
    both = policy.replace("{share: 0.1}", "{share: 0.1, percentile: {min: 0.5}}")
    assert _policy_error(both) == (
        "p.yaml:8: policies.default.rules[0].when: use either share or percentile in one "
        "condition, not both"
    )


@pytest.mark.parametrize(
    ("when", "message"),
    [
        ("{share: 0}", "when.share: must be greater than 0, got 0"),
        ("{share: 1.5}", "when.share: must be less than or equal to 1, got 1.5"),
        (
            "{percentile: {min: 1.2}}",
            "when.percentile.min: must be less than or equal to 1, got 1.2",
        ),
        ("{percentile: {}}", "when.percentile: give min, max or both"),
        ("{n_tokens: {min: 10, max: 5}}", "when.n_tokens: min (10) must be less than max (5)"),
        ("{always: false}", "when: `always: false` never matches; remove the rule instead"),
        ("{model: []}", "when: model: give at least one value"),
    ],
)
def test_condition_errors(when: str, message: str) -> None:
    policy = (
        f"    rules:\n      - when: {when}\n        route: large\n"
        "    default: small\n    on_probe_error: small\n"
    )
    assert _policy_error(policy) == f"p.yaml:8: policies.default.rules[0].{message}"


def test_unreachable_rule_after_always_and_duplicate_names() -> None:
    policy = (
        "    rules:\n"
        "      - {name: all, when: {always: true}, route: large}\n"
        "      - {name: all, when: {model: x}, route: small}\n"
        "    default: small\n    on_probe_error: small\n"
    )
    assert _policy_error(policy) == (
        "p.yaml:9: policies.default.rules[1]: this rule can never match: rules[0] "
        "(`always: true`) before it matches every request\n"
        "p.yaml:9: policies.default.rules[1].name: duplicate rule name 'all' (see rules[0])"
    )


def test_direct_model_conflicts() -> None:
    backends = "  api:\n    type: openai\n    base_urls: [http://x/v1]\n    models: [auto]\n"
    assert _policy_error("    default: small\n    on_probe_error: small\n", backends) == (
        "p.yaml:8: backends.api.models[0]: model 'auto' is also a virtual model; rename one of them"
    )


def test_default_virtual_model_hint() -> None:
    text = MINIMAL.replace("  default:\n", "  main:\n")
    with pytest.raises(ConfigError) as info:
        parse_settings(text, "v.yaml")
    assert str(info.value) == (
        "v.yaml:1: virtual_models.auto.policy: unknown policy 'default'; known: main "
        "(virtual_models is not set, so the built-in `auto: {policy: default}` applies: name a "
        "policy 'default' or set virtual_models)"
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "e.yaml:1: the file is empty: it needs at least backends and policies"),
        (
            "- a\n",
            "e.yaml:1: the top level must be a mapping of sections (server, probe, "
            "backends, policies, ...), not a list",
        ),
        (
            "backends: {}\n",
            "e.yaml:1: missing required key 'policies'\n"
            "e.yaml:1: backends: must have at least 1 item, not 0",
        ),
        (
            "a: [1, 2\n",
            "e.yaml:2:1: YAML syntax error: expected ',' or ']', but got '<stream "
            "end>' (while parsing a flow sequence at line 1)",
        ),
        (
            "a: [${X}]\n",
            "e.yaml:1:6: YAML syntax error: expected ',' or ']', but got '{' "
            "(while parsing a flow sequence at line 1); inside [ ] or { } quote values that use "
            "${...}: ['${URL}']",
        ),
    ],
)
def test_file_level_errors(text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_settings(text, "e.yaml", env={})
    assert str(info.value) == expected


def test_unreadable_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    assert _load_error(missing) == f"{missing}: config file not found"


def test_aliases_are_interpolated_once() -> None:
    text = MINIMAL + "x-url: &u '${U:-http://h/v1}'\n"
    # an unknown top-level key, but the alias machinery must not break interpolation
    with pytest.raises(ConfigError, match="unknown key 'x-url'"):
        parse_settings(text, env={})
    ok = MINIMAL.replace(
        "  small: {type: local}",
        "  small: {type: local}\n  big: {type: openai, base_urls: [&u '${U:-http://h/v1}']}\n"
        "  big2: {type: openai, base_urls: [*u]}",
    )
    s = parse_settings(ok, env={"U": "http://v/$${x}"})
    assert [b.base_urls for b in s.backends.values() if isinstance(b, OpenAIBackend)] == [
        ("http://v/$${x}",),
        ("http://v/$${x}",),
    ]


HUMAN = """\
backends:
  small: {type: local}
  human: {type: human, mode: hold, wait_s: 5, on_timeout: small}
policies:
  default:
    rules:
      - {name: review, when: {always: true}, route: human, fallback: [small]}
    default: small
    on_probe_error: small
"""


def test_human_backend_and_escalation_section() -> None:
    s = parse_settings(HUMAN + "escalation: {store: redis, redis_url: 'redis://r:6379/1'}\n")
    human = s.backends["human"]
    assert isinstance(human, HumanBackend) and human.on_timeout == "small"
    esc = s.escalation_settings()
    assert esc is not None and esc.store == "redis" and esc.redis_url == "redis://r:6379/1"
    # no escalation section: the defaults (SQLite next to the config file)
    assert parse_settings(HUMAN).escalation_settings() == EscalationSettings()
    with pytest.raises(ConfigError) as info:
        parse_settings(HUMAN + "escalation: {store: redis}\n", "h.yaml", env={})
    assert str(info.value) == (
        "h.yaml:10: escalation.redis_url: store 'redis' needs escalation.redis_url "
        "(or cache.redis.url)"
    )
    with pytest.raises(ConfigError) as info:
        parse_settings(
            HUMAN.replace("on_timeout: small", "on_timeout: human, ticket_message: 'x {nope}'"),
            "h.yaml",
            env={},
        )
    assert "h.yaml:3: backends.human.ticket_message: " in str(info.value)
    assert "may only use the placeholder {id}" in str(info.value)


def test_the_schema_package_re_exports_every_section() -> None:
    import policies.schema as schema
    from policies.schema import (
        backends,
        common,
        escalation,
        experiments,
        probe,
        rules,
        server,
        settings,
    )

    for module in (backends, escalation, experiments, probe, rules, server, settings):
        for name in module.__all__:
            assert name in schema.__all__ and getattr(schema, name) is getattr(module, name)
    for name in ("Loc", "SchemaProblems", "format_loc"):
        assert name in schema.__all__ and getattr(schema, name) is getattr(common, name)
    assert all(hasattr(schema, name) for name in schema.__all__)
