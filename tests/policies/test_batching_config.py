"""``probe.batching`` and ``cache.redis`` in the config file."""

from __future__ import annotations

import pytest

from policies.errors import ConfigError
from policies.loader import default_config_path, load_settings, parse_settings

MINIMAL = """\
backends:
  small: {type: local}
policies:
  default: {default: small, on_probe_error: small}
"""


def test_the_default_config_batches_and_has_no_redis() -> None:
    settings = load_settings(default_config_path())
    batching = settings.probe.batching
    assert batching.enabled and batching.max_batch == 16 and batching.window_ms == 5
    assert settings.cache.redis is None
    assert "batching" not in settings.probe.probe_settings().model_dump()


def test_batching_and_redis_are_read() -> None:
    settings = parse_settings(
        MINIMAL + "probe: {batching: {enabled: false, max_batch: 4, window_ms: 2.5}}\n"
        'cache: {redis: {url: "redis://127.0.0.1:6390/1", ttl_s: 60}}\n',
        source_name="c.yaml",
    )
    assert not settings.probe.batching.enabled and settings.probe.batching.max_batch == 4
    assert settings.cache.redis is not None and settings.cache.redis.ttl_s == 60


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("probe: {batching: {max_batch: 0}}\n", "probe.batching.max_batch"),
        ("probe: {batching: {window_ms: -1}}\n", "probe.batching.window_ms"),
        ("probe: {batching: {windw_ms: 3}}\n", "probe.batching"),
        ('cache: {redis: {url: "http://x"}}\n', "cache.redis.url"),
    ],
)
def test_bad_values_name_their_path(text: str, where: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_settings(MINIMAL + text, source_name="c.yaml")
    assert f"c.yaml:5: {where}" in str(info.value)
