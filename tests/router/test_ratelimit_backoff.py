"""A failing Redis rate limiter backs off: memory buckets only for a growing pause, so a Redis
that times out does not cost every request its timeout (found by tests/e2e/test_multihost.py:
with gateway 1 partitioned from Redis its p50 went from ~60 ms to ~125 ms, the limiter waiting
its 50 ms socket timeout on every request while the probe cache had backed off)."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from policies.schema import RateLimitSettings
from router.ratelimit import RedisRateLimiter

pytestmark = pytest.mark.anyio


class FakeScript:
    """Stands in for the registered Lua script: fails while ``down``, counts its calls."""

    def __init__(self) -> None:
        self.calls = 0
        self.down = True

    async def __call__(self, *, keys: list[str], args: list[Any]) -> tuple[int, float, float]:
        self.calls += 1
        if self.down:
            raise ConnectionError("redis unreachable")
        return 1, 0.0, 9.0


async def test_a_failing_redis_is_left_alone_for_a_doubling_pause_then_used_again() -> None:
    errors: list[int] = []
    limiter = RedisRateLimiter(
        RateLimitSettings(requests_per_s=100, burst=10),
        "redis://127.0.0.1:1/0",
        on_redis_error=lambda: errors.append(1),
        backoff_s=0.2,
        max_backoff_s=0.3,
    )
    script = FakeScript()
    limiter._script = script
    try:
        assert (await limiter.acquire("k")).allowed  # fails: memory answers
        assert script.calls == 1 and len(errors) == 1
        for _ in range(20):  # within the pause: memory only, Redis untouched
            await limiter.acquire("k")
        assert script.calls == 1 and len(errors) == 1
        await anyio.sleep(0.25)
        await limiter.acquire("k")  # the pause is over: Redis tried again, fails again
        assert script.calls == 2 and len(errors) == 2
        await limiter.acquire("k")  # the pause doubled (capped at 0.3 s): untouched
        assert script.calls == 2
        await anyio.sleep(0.35)
        script.down = False
        admission = await limiter.acquire("k")  # back on Redis
        assert script.calls == 3 and admission.allowed
        await limiter.acquire("k")  # no pause once Redis answered
        await limiter.acquire("k")
        assert script.calls == 5 and len(errors) == 2
    finally:
        await limiter.aclose()


async def test_memory_buckets_still_limit_during_the_pause() -> None:
    """Falling back is failing open to a per-replica limit, not to no limit."""
    limiter = RedisRateLimiter(
        RateLimitSettings(requests_per_s=0.001, burst=3), "redis://127.0.0.1:1/0", backoff_s=60
    )
    limiter._script = FakeScript()
    try:
        allowed = [(await limiter.acquire("k")).allowed for _ in range(5)]
        assert allowed == [True, True, True, False, False]
    finally:
        await limiter.aclose()
