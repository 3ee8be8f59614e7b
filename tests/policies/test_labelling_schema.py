"""The ``labelling:`` section: defaults, the example file, and errors naming their YAML path."""

from __future__ import annotations

from pathlib import Path

import pytest

import policies.schema as schema
from policies.errors import ConfigError
from policies.loader import load_settings, parse_settings
from policies.schema import LabellingSettings, ReferenceSettings
from policies.schema import labelling as labelling_module

ROOT = Path(__file__).resolve().parents[2]

BASE = """\
backends:
  small: {type: local}
  large: {type: openai, base_urls: ["http://127.0.0.1:9/v1"]}
  judge: {type: openai, base_urls: ["http://127.0.0.1:9/v1"], model: j}
  people: {type: human}
policies:
  default:
    default: small
    on_probe_error: small
events: {sink: sqlite, path: events.sqlite}
"""


def _error(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        parse_settings(text, "l.yaml", env={})
    return str(info.value)


def test_off_by_default_and_exported() -> None:
    s = parse_settings(BASE)
    assert s.labelling == LabellingSettings()
    assert not s.labelling.enabled and s.labelling.sample == 0.02 and s.labelling.queue == 100
    assert s.labelling.retention_s == 2_592_000 and not s.labelling.store_text
    for name in labelling_module.__all__:
        assert getattr(schema, name) is getattr(labelling_module, name)
    # disabled: names are not checked (the defaults name backends that may not exist)
    parse_settings(BASE + "labelling: {enabled: false, small: nope}\n")


def test_a_working_section() -> None:
    s = parse_settings(
        BASE + "labelling:\n  enabled: true\n  sample: 1\n  judge: judge\n"
        "  policies: default\n  models: [auto]\n  redact: ['\\d{4}']\n"
        "  reference: {field: metadata.answer, extract: choice_letter}\n"
    )
    lab = s.labelling
    assert lab.enabled and lab.sample == 1.0 and lab.judge == "judge"
    assert lab.policies == ("default",) and lab.models == ("auto",)
    assert lab.reference == ReferenceSettings(field="metadata.answer", extract="choice_letter")


def test_cross_checks_name_the_yaml_path() -> None:
    message = _error(
        BASE + "labelling:\n  enabled: true\n  small: small\n  large: huge\n  judge: x\n"
        "  policies: [nope]\n  models: [gpt]\n"
    )
    assert "l.yaml:14: labelling.large: no backend named 'huge'; known: judge, large" in message
    assert "labelling.judge: no backend named 'x'" in message
    assert "labelling.policies[0]: unknown policy 'nope'; known: default" in message
    assert "labelling.models[0]: 'gpt' is not a virtual model; known: auto" in message
    same = _error(BASE + "labelling: {enabled: true, small: small, large: small, judge: judge}\n")
    assert "labelling.large: large must differ from small (both are 'small')" in same
    human = _error(BASE + "labelling: {enabled: true, judge: people}\n")
    assert "labelling.judge: 'people' is a human backend" in human
    no_judge = _error(BASE + "labelling: {enabled: true}\n")
    assert "labelling.judge: enabled labelling needs a judge" in no_judge
    no_events = _error(
        BASE.replace("events: {sink: sqlite, path: events.sqlite}\n", "")
        + "labelling: {enabled: true, judge: judge}\n"
    )
    assert "labelling.enabled: labels are stored as event records" in no_events


def test_bad_values_and_regexes() -> None:
    bad = _error(BASE + "labelling:\n  redact: ['ok', '(unclosed']\n")
    assert "l.yaml:12: labelling.redact[1]: not a valid regular expression" in bad
    assert "'(unclosed'" in bad
    assert "labelling.sample" in _error(BASE + "labelling: {sample: 1.5}\n")
    assert "labelling.queue" in _error(BASE + "labelling: {queue: 0}\n")
    assert "labelling.reference.extract" in _error(
        BASE + "labelling: {reference: {extract: vibes}}\n"
    )
    assert "labelling: unknown key 'colour'" in _error(BASE + "labelling: {colour: blue}\n")


def test_the_example_file_loads() -> None:
    s = load_settings(ROOT / "config" / "examples" / "learning.yaml", env={})
    lab = s.labelling
    assert lab.enabled and lab.small == "small" and lab.large == "large" and lab.judge
    assert lab.reference is not None and s.events is not None
