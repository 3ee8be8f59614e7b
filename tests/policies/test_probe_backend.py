"""``probe.backend: vllm``: what the schema accepts and how it reports what it cannot."""

from __future__ import annotations

from pathlib import Path

import pytest

from policies.errors import ConfigError
from policies.loader import load_settings, parse_settings
from probes.types import ProbeSettings

EXAMPLE = Path(__file__).resolve().parents[2] / "config" / "examples" / "vllm-probe.yaml"

REST = """\
backends:
  small: {type: local}
policies:
  default:
    default: small
    on_probe_error: small
"""


def test_local_is_the_default_backend() -> None:
    s = parse_settings(REST)
    assert s.probe.backend == "local" and s.probe.vllm is None


def test_vllm_backend_parses_and_stays_out_of_probe_settings() -> None:
    s = parse_settings(
        "probe:\n  backend: vllm\n  vllm: {base_url: 'http://h:8010/v1/'}\n  layers: [-20]\n" + REST
    )
    assert s.probe.vllm is not None
    assert s.probe.vllm.base_url == "http://h:8010/v1"  # trailing slash dropped
    assert s.probe.vllm.model is None and s.probe.vllm.timeout_s == 5.0
    # The remote settings change no number: the plain ProbeSettings are the local probe's.
    assert s.probe.probe_settings() == ProbeSettings(layers=(-20,))


def test_example_loads() -> None:
    s = load_settings(EXAMPLE, env={})
    assert s.probe.backend == "vllm" and s.probe.vllm is not None
    assert s.probe.vllm.base_url == "http://127.0.0.1:8010/v1"


BAD = (
    """\
probe:
  backend: vllm
  layers: [8, 10]
  token_mean: true
"""
    + REST
)


def test_bad_remote_probe_names_the_yaml_path(tmp_path: Path) -> None:
    path = tmp_path / "bad-remote-probe.yaml"
    path.write_text(BAD)
    with pytest.raises(ConfigError) as info:
        load_settings(path, env={})
    assert f"{path}:1: probe.vllm: backend: vllm needs a `vllm:` section" in str(info.value)


@pytest.mark.parametrize(
    "probe",
    [
        "{layers: [8, 10], token_mean: true}",
        "{layers: [0, 10]}",
        "{score_layer: 5}",
        "{score_position: mean}",
        "{layers: [10], state_layers: [12, 30]}",
    ],
)
def test_the_feature_probe_takes_any_probe_section(probe: str) -> None:
    """Several layers, token means, hidden vectors: a vLLM feature probe serves them."""
    section = probe[1:-1]
    s = parse_settings(
        f"probe: {{backend: vllm, vllm: {{base_url: 'http://h/v1'}}, {section}}}\n" + REST
    )
    assert s.probe.backend == "vllm"


@pytest.mark.parametrize(
    ("probe", "message"),
    [
        ("{backend: vllm, vllm: {base_url: 'h:1'}}", "expected an http:// or https:// URL"),
        ("{backend: remote}", "probe.backend"),
        (
            "{backend: vllm, vllm: {base_url: 'http://h/v1', port: 1}}",
            "probe.vllm: unknown key 'port'",
        ),
    ],
)
def test_bad_remote_probe_settings(probe: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_settings(f"probe: {probe}\n" + REST)
    assert message in str(info.value)
