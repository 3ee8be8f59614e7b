"""A/B arm assignment: sticky, weighted, deterministic across processes, with a kill switch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from policies.engine import PolicyEngine
from policies.errors import ConfigError
from policies.experiments import ExperimentRouter, assign, bucket, experiment_key
from policies.loader import parse_settings
from policies.schema import Experiment

ROOT = Path(__file__).resolve().parents[2]

BASE = """\
backends:
  small: {type: local, price: {input_per_mtok: 0.1, output_per_mtok: 0.4}}
policies:
  default: {default: small, on_probe_error: small}
  cheap: {default: small, on_probe_error: small}
  other: {default: small, on_probe_error: small}
"""


def experiment(**overrides: object) -> Experiment:
    data: dict[str, object] = {
        "name": "exp-1",
        "arms": [
            {"name": "control", "policy": "default", "weight": 0.5},
            {"name": "cheap", "policy": "cheap", "weight": 0.3},
            {"name": "other", "policy": "other", "weight": 0.2},
        ],
    }
    data.update(overrides)
    return Experiment.model_validate(data)


def test_assignment_matches_weights_within_2_percent_over_100k_keys() -> None:
    exp = experiment()
    counts = Counter(assign(exp, f"user-{i}").arm for i in range(100_000))
    assert sum(counts.values()) == 100_000
    for arm in exp.arms:
        assert abs(counts[arm.name] / 100_000 - arm.weight) < 0.02, (arm.name, counts)
    # and the buckets are uniform: each tenth of [0, 1) holds about a tenth of the keys
    deciles = Counter(int(bucket("exp-1", f"user-{i}") * 10) for i in range(100_000))
    assert set(deciles) == set(range(10))
    assert all(abs(n / 100_000 - 0.1) < 0.01 for n in deciles.values()), deciles


def test_assignment_is_sticky_and_depends_on_the_experiment_name() -> None:
    exp = experiment()
    first = [assign(exp, f"k{i}").arm for i in range(2000)]
    again = [assign(exp, f"k{i}").arm for i in range(2000)]
    assert first == again
    renamed = experiment(name="exp-2")
    moved = sum(a != assign(renamed, f"k{i}").arm for i, a in enumerate(first))
    assert moved > 500  # a new experiment reshuffles its keys
    assert all(assign(exp, f"k{i}").why == "hash" for i in range(10))


def test_weights_change_moves_only_keys_across_the_boundary() -> None:
    before = experiment()
    after = experiment(
        arms=[
            {"name": "control", "policy": "default", "weight": 0.4},
            {"name": "cheap", "policy": "cheap", "weight": 0.4},
            {"name": "other", "policy": "other", "weight": 0.2},
        ]
    )
    for i in range(5000):
        a, b = assign(before, f"u{i}").arm, assign(after, f"u{i}").arm
        u = bucket("exp-1", f"u{i}")
        if a != b:
            assert (a, b) == ("control", "cheap") and 0.4 <= u < 0.5


def test_kill_switch_and_keyless_requests_go_to_control() -> None:
    killed = experiment(enabled=False, control="other")
    results = {assign(killed, f"user-{i}") for i in range(1000)}
    assert {(r.arm, r.policy, r.why) for r in results} == {("other", "other", "disabled")}
    live = experiment()
    assert assign(live, None).arm == "control" and assign(live, None).why == "no_key"
    assert experiment(control="cheap").control_arm.name == "cheap"


def test_assignment_keys() -> None:
    headers = {"authorization": "Bearer sk-abc", "x-tenant": "acme"}
    assert experiment_key(experiment(), user="u1", headers=headers) == "u1"
    assert experiment_key(experiment(), user="", headers=headers) is None
    assert experiment_key(experiment(key="api_key"), user="u1", headers=headers) == "sk-abc"
    assert experiment_key(experiment(key="api_key"), user=None, headers={}) is None
    assert experiment_key(experiment(key="header:X-Tenant"), user=None, headers=headers) == "acme"
    assert experiment_key(experiment(key="header:x-other"), user="u", headers=headers) is None
    with pytest.raises(ValueError, match="expected user, api_key or header:<name>, got 'ip'"):
        experiment(key="ip")


def test_router_by_virtual_model_from_yaml() -> None:
    settings = parse_settings(
        BASE
        + """\
virtual_models:
  auto: {policy: default}
  plain: {policy: default}
experiments:
  - name: cheap-vs-default
    model: auto
    key: header:x-team
    control: control
    arms:
      - {name: control, policy: default, weight: 0.5}
      - {name: cheap, policy: cheap, weight: 0.5}
""",
        "exp.yaml",
    )
    engine = PolicyEngine(settings)
    router = engine.experiments
    assert isinstance(router, ExperimentRouter)
    assert router.for_model("plain") is None
    assert router.assign("plain", user="u", headers={"x-team": "a"}) is None
    arms = {router.assign("auto", user=None, headers={"x-team": f"t{i}"}) for i in range(200)}
    assert {a.arm for a in arms if a is not None} == {"control", "cheap"}
    keyless = router.assign("auto", user="someone", headers={})
    assert keyless is not None and (keyless.arm, keyless.why) == ("control", "no_key")
    price = settings.backends["small"].price  # type: ignore[union-attr]
    assert price is not None and price.cost(1000, 500) == pytest.approx(0.0003)
    assert price.cost(None, 3) is None


def test_schema_errors_name_the_yaml_path() -> None:
    with pytest.raises(ConfigError) as info:
        parse_settings(
            BASE
            + """\
experiments:
  - name: "bad name!"
    arms:
      - {name: a, policy: default, weight: 0.7}
      - {name: b, policy: default, weight: 0.3}
  - name: second
    arms:
      - {name: a, policy: default, weight: 1.5}
      - {name: b, policy: default, weight: 0.3}
""",
            "e.yaml",
            env={},
        )
    assert str(info.value) == (
        "e.yaml:14: experiments[1].arms[0].weight: must be less than or equal to 1, got 1.5"
    )
    with pytest.raises(ConfigError) as info:
        parse_settings(
            BASE
            + """\
experiments:
  - name: "bad name!"
    arms:
      - {name: a, policy: default, weight: 0.7}
      - {name: b, policy: default, weight: 0.3}
""",
            "e.yaml",
            env={},
        )
    assert str(info.value) == (
        "e.yaml:8: experiments[0].name: bad experiment name 'bad name!': use letters, digits, "
        "'_', '.' and '-'"
    )


_CHILD = """
import json, sys
from policies.experiments import assign
from policies.schema import Experiment
exp = Experiment.model_validate(json.loads(sys.argv[1]))
print(json.dumps([assign(exp, f"key-{i}").arm for i in range(3000)]))
"""


def test_two_processes_assign_identical_arms() -> None:
    """The hash is not Python's salted hash(): two processes with different hash seeds agree."""
    spec = experiment().model_dump_json()
    outputs = []
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(ROOT)}
        done = subprocess.run(
            [sys.executable, "-c", _CHILD, spec],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        outputs.append(json.loads(done.stdout))
    here = [assign(experiment(), f"key-{i}").arm for i in range(3000)]
    assert outputs[0] == outputs[1] == here
    assert set(here) == {"control", "cheap", "other"}


def test_ab_example_config_loads() -> None:
    from policies.loader import load_settings

    path = ROOT / "config" / "examples" / "ab-experiment.yaml"
    s = load_settings(path, env={})
    (exp,) = s.experiments
    assert exp.control_arm.name == "large-30" and exp.enabled
    assert s.events is not None and s.events.sink == "sqlite"
    assert s.resolve_path(s.events.path) == path.parent / "events.sqlite"
    large = s.backends["large"]
    assert large.price is not None and large.price.cost(1_000_000, 0) == 2.5  # type: ignore[union-attr]
