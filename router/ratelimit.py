"""Per-key request rate limits: a token bucket per caller, in memory or in Redis.

A bucket holds up to ``burst`` tokens and refills at ``requests_per_s``; a request takes one
token or is refused with the time until one is back (the ``retry-after`` of the 429). Every
:class:`Admission` also says what is left, for OpenAI's ``x-ratelimit-*-requests`` headers
(:meth:`Admission.headers`): the limit is the burst, the remaining count the whole tokens left,
and the reset the time until the bucket is full again.

:class:`RedisRateLimiter` keeps the buckets in Redis (one hash per caller, updated atomically
by a Lua script) so that every gateway replica shares them. A Redis error never fails a
request: the limiter falls back to its own memory buckets (fail open to a per-replica limit),
logs the first failure of a run of failures once, and counts every one. After a failure it stays
on memory, without touching Redis, for a pause that doubles from ``backoff_s`` up to
``max_backoff_s`` (as the probe cache does), so that a Redis that times out (partitioned, not
refusing) does not add its timeout to every request.
"""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from policies.schema import RateLimitSettings

__all__ = [
    "Admission",
    "MemoryRateLimiter",
    "RateLimiter",
    "RedisRateLimiter",
    "build_rate_limiter",
    "format_duration",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Admission:
    """One request's turn at its caller's bucket."""

    allowed: bool
    retry_after_s: float = 0.0
    limit: int | None = None  # the bucket's size (burst); None: unknown
    remaining: int = 0  # whole tokens left after this request
    reset_s: float = 0.0  # until the bucket is full again

    def headers(self) -> list[tuple[bytes, bytes]]:
        """``x-ratelimit-limit-requests``, ``-remaining-requests``, ``-reset-requests`` (OpenAI's
        names; the reset as a duration such as ``250ms``, ``1.5s``, ``2m0s``); none when the
        limit is unknown."""
        if self.limit is None:
            return []
        return [
            (b"x-ratelimit-limit-requests", str(self.limit).encode()),
            (b"x-ratelimit-remaining-requests", str(max(0, self.remaining)).encode()),
            (b"x-ratelimit-reset-requests", format_duration(self.reset_s).encode()),
        ]


def format_duration(seconds: float) -> str:
    """A duration the way OpenAI's rate-limit headers write it: ``0s``, ``250ms``, ``1.5s``,
    ``2m0s``."""
    seconds = max(0.0, seconds)
    if seconds < 1.0:
        ms = math.ceil(seconds * 1000)
        return f"{ms}ms" if ms else "0s"
    if seconds < 60.0:
        return f"{math.ceil(seconds * 1000) / 1000:g}s"
    minutes, rest = divmod(math.ceil(seconds), 60)
    return f"{minutes}m{rest}s"


def _admission(allowed: bool, wait: float, tokens: float, burst: float, rate: float) -> Admission:
    return Admission(
        allowed,
        wait,
        limit=math.floor(burst),
        remaining=math.floor(tokens),
        reset_s=max(0.0, burst - tokens) / rate,
    )


class RateLimiter(Protocol):
    async def acquire(self, caller: str) -> Admission: ...

    async def aclose(self) -> None: ...


class MemoryRateLimiter:
    """Token buckets in this process, least recently used dropped past ``max_callers``."""

    def __init__(
        self,
        settings: RateLimitSettings,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_callers: int = 100_000,
    ) -> None:
        self.settings = settings
        self._clock = clock
        self._max = max_callers
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # tokens, stamp

    def take(self, caller: str) -> Admission:
        rate = self.settings.per_key.get(caller, self.settings.requests_per_s)
        burst = float(self.settings.burst)
        now = self._clock()
        tokens, stamp = self._buckets.pop(caller, (burst, now))
        tokens = min(burst, tokens + (now - stamp) * rate)
        if tokens >= 1.0:
            tokens -= 1.0
            admission = _admission(True, 0.0, tokens, burst, rate)
        else:
            admission = _admission(False, (1.0 - tokens) / rate, tokens, burst, rate)
        self._buckets[caller] = (tokens, now)
        if len(self._buckets) > self._max:
            self._buckets.popitem(last=False)
        return admission

    async def acquire(self, caller: str) -> Admission:
        return self.take(caller)

    async def aclose(self) -> None:
        return None


# KEYS[1] bucket; ARGV: rate, burst, ttl_ms. Redis's own clock (TIME) so replicas agree.
_LUA = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local state = redis.call('HMGET', KEYS[1], 'tokens', 'stamp')
local tokens = tonumber(state[1]) or burst
local stamp = tonumber(state[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - stamp) * rate)
local allowed = 0
local wait = 0
if tokens >= 1 then
  allowed = 1
  tokens = tokens - 1
else
  wait = (1 - tokens) / rate
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'stamp', tostring(now))
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return {allowed, tostring(wait), tostring(tokens)}
"""


class RedisRateLimiter:
    """Buckets shared through Redis; memory buckets while Redis fails."""

    def __init__(
        self,
        settings: RateLimitSettings,
        url: str,
        *,
        timeout_s: float = 0.05,
        key_prefix: str = "sparsity-router:ratelimit:",
        on_redis_error: Callable[[], None] | None = None,
        backoff_s: float = 0.25,
        max_backoff_s: float = 5.0,
    ) -> None:
        import redis.asyncio

        self.settings = settings
        self._prefix = key_prefix
        self._fallback = MemoryRateLimiter(settings)
        self._on_error = on_redis_error
        self._failing = False
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self._pause = backoff_s
        self._retry_at = 0.0  # while failing: memory only until then
        self._client: Any = redis.asyncio.Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry_on_timeout=False,
        )
        self._script: Any = self._client.register_script(_LUA)
        # A full bucket refills in burst / rate seconds; keep it a little longer than that.
        self._ttl_ms = max(1000, math.ceil(1000 * 2 * settings.burst / settings.requests_per_s))

    async def acquire(self, caller: str) -> Admission:
        rate = self.settings.per_key.get(caller, self.settings.requests_per_s)
        if self._failing and time.monotonic() < self._retry_at:
            return self._fallback.take(caller)  # Redis failed a moment ago: not yet again
        try:
            allowed, wait, tokens = await self._script(
                keys=[self._prefix + caller], args=[rate, self.settings.burst, self._ttl_ms]
            )
        except Exception as exc:  # any Redis failure: limit in memory instead
            if self._on_error is not None:
                self._on_error()
            if not self._failing:
                self._failing = True
                self._pause = self.backoff_s
                logger.warning(
                    "rate limiting falls back to memory: Redis failed (%s: %s)",
                    type(exc).__name__,
                    exc,
                )
            else:
                self._pause = min(self._pause * 2, self.max_backoff_s)
            self._retry_at = time.monotonic() + self._pause
            return self._fallback.take(caller)
        if self._failing:
            self._failing = False
            self._pause = self.backoff_s
            logger.info("rate limiting is back on Redis")
        burst = float(self.settings.burst)
        return _admission(bool(int(allowed)), float(wait), float(tokens), burst, rate)

    async def aclose(self) -> None:
        await self._client.aclose()


def build_rate_limiter(
    settings: RateLimitSettings | None,
    cache_redis_url: str | None,
    *,
    on_redis_error: Callable[[], None] | None = None,
) -> RateLimiter | None:
    """The limiter ``auth.rate_limit`` describes: Redis when a URL is known, else memory."""
    if settings is None:
        return None
    url = settings.redis_url or cache_redis_url
    if url:
        return RedisRateLimiter(settings, url, on_redis_error=on_redis_error)
    return MemoryRateLimiter(settings)
