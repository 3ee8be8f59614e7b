"""Probe-result caches.

- ``MemoryCache``: an LRU with a TTL, for one process.
- ``RedisCache``: shared by every gateway on one Redis (redis-py asyncio). A Redis error or
  timeout is a miss: logged once per outage, counted, retried after a growing pause; never a
  failed request. Values are versioned and carry the probe fingerprint's digest, so foreign or
  corrupt values under our keys read as misses.
- ``TieredCache``: memory in front of Redis (a Redis hit fills memory).

Keys are computed by the caller (``ProbeService.key``: a hash of the probe fingerprint and the
probed text); a cache only stores ``ProbeResult`` values under them.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Protocol

import anyio

from probes.types import ProbeResult

__all__ = [
    "CacheEvent",
    "MemoryCache",
    "ProbeCache",
    "RedisCache",
    "TieredCache",
    "decode_result",
    "encode_result",
]

logger = logging.getLogger(__name__)

CacheEvent = Callable[[str, str], None]  # (tier, result): result in hit, miss, error, skipped
VALUE_VERSION = 1


class ProbeCache(Protocol):
    async def get(self, key: str) -> ProbeResult | None: ...

    async def set(self, key: str, value: ProbeResult) -> None: ...

    async def aclose(self) -> None: ...


def _ignore(_tier: str, _result: str) -> None:
    return None


class MemoryCache:
    """Least-recently-used cache of probe results, entries expiring after ``ttl_s``."""

    def __init__(
        self, max_entries: int = 10_000, ttl_s: float = 3600.0, *, on_event: CacheEvent = _ignore
    ) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.max_entries = max_entries
        self.ttl_s = ttl_s
        self._on_event = on_event
        self._data: OrderedDict[str, tuple[float, ProbeResult]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._data)

    async def get(self, key: str) -> ProbeResult | None:
        item = self._data.get(key)
        if item is None:
            self._on_event("memory", "miss")
            return None
        expires, value = item
        if expires < time.monotonic():
            del self._data[key]
            self._on_event("memory", "miss")
            return None
        self._data.move_to_end(key)
        self._on_event("memory", "hit")
        return value

    async def set(self, key: str, value: ProbeResult) -> None:
        self._data[key] = (time.monotonic() + self.ttl_s, value)
        self._data.move_to_end(key)
        while len(self._data) > self.max_entries:
            self._data.popitem(last=False)

    async def aclose(self) -> None:
        self._data.clear()


# -- the value stored in Redis -------------------------------------------------------------------


def encode_result(result: ProbeResult, fingerprint: str) -> bytes:
    """Compact JSON: ``{"v": 1, "fp": <fingerprint digest>, "r": <ProbeResult.to_dict()>}``."""
    payload = {"v": VALUE_VERSION, "fp": fingerprint, "r": result.to_dict()}
    return json.dumps(payload, separators=(",", ":"), allow_nan=False).encode()


def decode_result(raw: bytes, fingerprint: str) -> ProbeResult | None:
    """The stored result, or None for anything that is not one of ours (version, fingerprint,
    shape or numbers wrong)."""
    try:
        payload = json.loads(raw)
        if not isinstance(payload, dict):
            return None
        if payload.get("v") != VALUE_VERSION or payload.get("fp") != fingerprint:
            return None
        body = payload.get("r")
        if not isinstance(body, dict):
            return None
        result = ProbeResult.from_dict(body)
    except (ValueError, TypeError, KeyError, AttributeError):
        return None
    numbers = [result.score, *(v for layer in result.metrics.values() for v in layer.values())]
    if result.n_tokens < 1 or not all(math.isfinite(x) for x in numbers):
        return None
    return result


# -- Redis ---------------------------------------------------------------------------------------


class RedisCache:
    """Probe results in Redis under ``key_prefix + key``, expiring after ``ttl_s``.

    Every call is bounded by ``timeout_s``. After a failure the cache stays out of the way
    (calls are misses without touching the network) for a pause that doubles from
    ``backoff_s`` up to ``max_backoff_s``; the next call after the pause tries again, and the
    client reconnects. An outage is logged once when it starts and once when it ends.
    """

    def __init__(
        self,
        url: str,
        *,
        fingerprint: str,
        ttl_s: float = 86_400.0,
        timeout_s: float = 0.05,
        key_prefix: str = "sparsity-router:",
        backoff_s: float = 0.25,
        max_backoff_s: float = 5.0,
        on_event: CacheEvent = _ignore,
    ) -> None:
        from redis.asyncio import Redis  # imported here: nothing happens at import time
        from redis.exceptions import ResponseError

        self.url = url
        self.fingerprint = fingerprint
        self.ttl_ms = max(1, int(ttl_s * 1000))
        self.timeout_s = timeout_s
        self.key_prefix = key_prefix
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self._on_event = on_event
        self._client: Any = Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry_on_timeout=False,
            health_check_interval=0,
        )
        self._response_error = ResponseError
        self._down_since: float | None = None
        self._retry_at = 0.0
        self._pause = backoff_s
        self.errors = 0

    @property
    def available(self) -> bool:
        return self._down_since is None

    def _skip(self) -> bool:
        if self._down_since is not None and time.monotonic() < self._retry_at:
            self._on_event("redis", "skipped")
            return True
        return False

    def _failed(self, exc: BaseException) -> None:
        self.errors += 1
        self._on_event("redis", "error")
        now = time.monotonic()
        if self._down_since is None:
            self._down_since = now
            self._pause = self.backoff_s
            logger.warning(
                "redis cache at %s unavailable (%s: %s); probe results are cache misses "
                "until it is back (retrying with backoff)",
                _redact(self.url),
                type(exc).__name__,
                exc,
            )
        else:
            self._pause = min(self._pause * 2, self.max_backoff_s)
        self._retry_at = now + self._pause

    def _succeeded(self) -> None:
        if self._down_since is not None:
            logger.warning(
                "redis cache at %s is back after %.1f s",
                _redact(self.url),
                time.monotonic() - self._down_since,
            )
            self._down_since = None
            self._pause = self.backoff_s

    async def get(self, key: str) -> ProbeResult | None:
        if self._skip():
            return None
        try:
            with anyio.fail_after(self.timeout_s * 2):
                raw = await self._client.get(self.key_prefix + key)
        except self._response_error:  # the server answered, with an error (WRONGTYPE...)
            self._succeeded()
            self._on_event("redis", "invalid")
            return None
        except Exception as exc:  # any Redis or network failure is a miss
            self._failed(exc)
            return None
        self._succeeded()
        if raw is None:
            self._on_event("redis", "miss")
            return None
        result = decode_result(raw, self.fingerprint)
        if result is None:
            logger.debug("ignoring a foreign or corrupt value under a probe-cache key")
            self._on_event("redis", "invalid")
            return None
        self._on_event("redis", "hit")
        return result

    async def set(self, key: str, value: ProbeResult) -> None:
        if self._skip():
            return
        data = encode_result(value, self.fingerprint)
        try:
            with anyio.fail_after(self.timeout_s * 2):
                await self._client.set(self.key_prefix + key, data, px=self.ttl_ms)
        except Exception as exc:
            self._failed(exc)
            return
        self._succeeded()

    async def aclose(self) -> None:
        try:
            await self._client.aclose()
        except Exception:  # closing a client whose server is gone
            logger.debug("closing the redis client failed", exc_info=True)


def _redact(url: str) -> str:
    """The URL without a password."""
    if "@" not in url:
        return url
    scheme, _, rest = url.partition("://")
    return f"{scheme}://***@{rest.rsplit('@', 1)[1]}"


class TieredCache:
    """Memory in front of Redis: memory hits never touch the network; Redis hits fill memory."""

    def __init__(self, memory: MemoryCache | None, redis: RedisCache | None) -> None:
        self.memory = memory
        self.redis = redis

    async def get(self, key: str) -> ProbeResult | None:
        if self.memory is not None:
            found = await self.memory.get(key)
            if found is not None:
                return found
        if self.redis is not None:
            found = await self.redis.get(key)
            if found is not None and self.memory is not None:
                await self.memory.set(key, found)
            return found
        return None

    async def set(self, key: str, value: ProbeResult) -> None:
        if self.memory is not None:
            await self.memory.set(key, value)
        if self.redis is not None:
            await self.redis.set(key, value)

    async def aclose(self) -> None:
        for tier in (self.memory, self.redis):
            if tier is not None:
                await tier.aclose()
