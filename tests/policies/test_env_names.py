"""One naming scheme: every variable the configs read is ``SPARSITY_ROUTER_*``; the old names
still work for one release, with a deprecation warning."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest

from policies.loader import (
    CONFIG_ENV,
    DEPRECATED_ALIASES,
    default_config_path,
    env_value,
    interpolate,
    load_settings,
    parse_settings,
    resolve_config_path,
)
from policies.schema import OpenAIBackend

ROOT = Path(__file__).resolve().parents[2]
DEFAULT = ROOT / "config" / "default.yaml"
CONFIGS = [DEFAULT, *sorted((ROOT / "config" / "examples").glob("*.yaml"))]


def _deprecations(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "policies.loader" and r.levelno == logging.WARNING
    ]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_configs_use_only_the_project_prefix(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    names = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", text)) - {"VAR"}
    names |= set(re.findall(r"api_key_env:\s*([A-Za-z_][A-Za-z0-9_]*)", text))
    assert names, "every config reads at least one variable"
    assert all(n.startswith("SPARSITY_ROUTER_") for n in names), sorted(names)
    # and every name the configs read has its old names in the alias table
    assert names <= set(DEPRECATED_ALIASES), sorted(names - set(DEPRECATED_ALIASES))


def test_old_name_is_read_with_one_warning_naming_both(caplog: pytest.LogCaptureFixture) -> None:
    env = {"LARGE_BASE_URL": "http://gpu-1:8000/v1", "ROUTER_API_KEY": "sekrit"}
    with caplog.at_level(logging.WARNING, logger="policies.loader"):
        s = load_settings(DEFAULT, env=env)
    large = s.backends["large"]
    assert isinstance(large, OpenAIBackend) and large.base_urls == ("http://gpu-1:8000/v1",)
    assert s.auth.api_keys == ("sekrit",)
    warnings = _deprecations(caplog)
    assert len(warnings) == 2, warnings
    assert any("LARGE_BASE_URL" in w and "SPARSITY_ROUTER_LARGE_URLS" in w for w in warnings)
    assert any("ROUTER_API_KEY" in w and "SPARSITY_ROUTER_API_KEY" in w for w in warnings)


def test_new_name_wins_over_the_old_one_without_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    env = {
        "SPARSITY_ROUTER_LARGE_URLS": "http://new:1/v1",
        "LARGE_BASE_URL": "http://old:1/v1",
        "LARGE_URLS": "http://older:1/v1",
    }
    with caplog.at_level(logging.WARNING, logger="policies.loader"):
        s = load_settings(DEFAULT, env=env)
    large = s.backends["large"]
    assert isinstance(large, OpenAIBackend) and large.base_urls == ("http://new:1/v1",)
    assert _deprecations(caplog) == []


def test_an_old_name_used_twice_warns_once_per_load(caplog: pytest.LogCaptureFixture) -> None:
    """A name referenced in several places warns once per load, and again on the next load."""
    text = (
        "backends:\n"
        "  small: {type: openai, base_urls: ['${SPARSITY_ROUTER_SMALL_URLS}']}\n"
        "  other: {type: openai, base_urls: ['${SPARSITY_ROUTER_SMALL_URLS}']}\n"
        "policies: {default: {default: small, on_probe_error: small}}\n"
    )
    env = {"SMALL_URL": "http://a:1/v1"}
    with caplog.at_level(logging.WARNING, logger="policies.loader"):
        parse_settings(text, env=env)
        assert len(_deprecations(caplog)) == 1
        parse_settings(text, env=env)
        assert len(_deprecations(caplog)) == 2


def test_interpolate_reports_the_aliases_it_used() -> None:
    used: set[tuple[str, str]] = set()
    value, problems = interpolate(
        "${SPARSITY_ROUTER_REDIS_URL}", {"REDIS_URL": "redis://r/0"}, aliases_used=used
    )
    assert (value, problems) == ("redis://r/0", [])
    assert used == {("REDIS_URL", "SPARSITY_ROUTER_REDIS_URL")}
    # an explicitly empty new name counts as set: no alias, the default applies
    used.clear()
    value, _ = interpolate(
        "${SPARSITY_ROUTER_REDIS_URL:-d}",
        {"SPARSITY_ROUTER_REDIS_URL": "", "REDIS_URL": "x"},
        aliases_used=used,
    )
    assert value == "d" and not used
    # names outside the table have no aliases
    _, problems = interpolate("${OTHER_URL}", {"URL": "x"})
    assert problems and "OTHER_URL is not set" in problems[0]


def test_env_value_reads_aliases(caplog: pytest.LogCaptureFixture) -> None:
    assert env_value("SPARSITY_ROUTER_LARGE_API_KEY", {"SPARSITY_ROUTER_LARGE_API_KEY": "k"}) == "k"
    assert env_value("SPARSITY_ROUTER_LARGE_API_KEY", {}) is None
    with caplog.at_level(logging.WARNING, logger="policies.loader"):
        assert env_value("SPARSITY_ROUTER_LARGE_API_KEY", {"LARGE_API_KEY": "old"}) == "old"
    assert any("LARGE_API_KEY" in w for w in _deprecations(caplog))


def test_config_env_picks_the_config(tmp_path: Path) -> None:
    given = tmp_path / "given.yaml"
    named = tmp_path / "named.yaml"
    assert resolve_config_path(given, env={CONFIG_ENV: str(named)}) == given
    assert resolve_config_path(None, env={CONFIG_ENV: str(named)}) == named
    assert resolve_config_path(None, env={CONFIG_ENV: ""}) == default_config_path()
    assert resolve_config_path(None, env={}) == default_config_path()
