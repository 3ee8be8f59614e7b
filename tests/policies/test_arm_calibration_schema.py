"""An experiment arm's ``calibration``: a path resolved like ``calibration.path``, blank is none,
and an arm whose policy does not route on a calibration is refused with the YAML path."""

from __future__ import annotations

from pathlib import Path

import pytest

from policies.errors import ConfigError
from policies.loader import parse_settings

BASE = """\
calibration: {path: serving.json}
backends:
  small: {type: local}
  large: {type: local}
policies:
  default:
    rules: [{name: hard, when: {p_large: {min: 0.5}}, route: large}]
    default: small
    on_probe_error: large
  scored:
    rules: [{name: long, when: {n_tokens: {min: 100}}, route: large}]
    default: small
    on_probe_error: large
  plain: {default: small, on_probe_error: small}
"""


def _experiment(challenger_policy: str, calibration: str) -> str:
    return f"""\
experiments:
  - name: learn-abc
    arms:
      - {{name: control, policy: default, weight: 0.9}}
      - {{name: challenger, policy: {challenger_policy}, weight: 0.1, calibration: {calibration}}}
"""


def test_an_arm_calibration_resolves_like_calibration_path(tmp_path: Path) -> None:
    settings = parse_settings(BASE + _experiment("default", "cand/new.json"), "e.yaml", tmp_path)
    control, challenger = settings.experiments[0].arms
    assert control.calibration is None  # the gateway's
    assert challenger.calibration == "cand/new.json"
    assert settings.resolve_path(challenger.calibration) == tmp_path / "cand" / "new.json"
    blank = parse_settings(BASE + _experiment("default", '" "'), "e.yaml", tmp_path)
    assert blank.experiments[0].arms[1].calibration is None


@pytest.mark.parametrize(
    ("policy", "why"),
    [
        ("plain", "policy 'plain' never runs the probe"),
        ("scored", "policy 'scored' reads only the raw probe reading (score, metric, n_tokens)"),
    ],
)
def test_an_arm_calibration_needs_a_policy_routing_on_the_probe(policy: str, why: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_settings(BASE + _experiment(policy, "new.json"), "e.yaml", env={})
    assert str(info.value) == (
        f"e.yaml:19: experiments[0].arms[1].calibration: an arm calibration needs the probe and "
        f"a policy routing on it: {why}, so the calibration would change nothing. Fix: give the "
        "arm a policy with a percentile, share, p_large or best_of rule, or remove calibration"
    )


def test_an_arm_calibration_is_a_string() -> None:
    with pytest.raises(ConfigError, match=r"experiments\[0\]\.arms\[1\]\.calibration"):
        parse_settings(BASE + _experiment("default", "[a, b]"), "e.yaml", env={})
