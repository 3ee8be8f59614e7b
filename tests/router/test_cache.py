"""The probe cache against a real redis-server: hit/miss/TTL, outages, foreign values,
single flight."""

from __future__ import annotations

import json
import time
from typing import Any

import anyio
import pytest
import redis

from probes.probe import SparsityProbe
from probes.types import ProbeResult
from router.cache import MemoryCache, RedisCache, TieredCache, decode_result, encode_result
from router.probing import ProbeService
from tests.redis_server import RedisServer

pytestmark = pytest.mark.anyio

FP = "0123456789abcdef"
RESULT = ProbeResult(
    n_tokens=7, score=0.42, metrics={10: {"top10_energy": 0.58, "hoyer": 0.3}}, truncated=False
)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Events:
    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []

    def __call__(self, tier: str, result: str) -> None:
        self.seen.append((tier, result))

    def count(self, tier: str, result: str) -> int:
        return self.seen.count((tier, result))


def service(probe: SparsityProbe, cache: Any, **kwargs: Any) -> ProbeService:
    return ProbeService(probe, calibration=None, cache=cache, timeout_s=30, **kwargs)


async def test_redis_hit_miss_and_ttl(redis_server: RedisServer) -> None:
    events = Events()
    cache = RedisCache(redis_server.url, fingerprint=FP, ttl_s=0.3, on_event=events)
    try:
        assert await cache.get("k") is None
        await cache.set("k", RESULT)
        assert await cache.get("k") == RESULT
        assert events.count("redis", "miss") == 1 and events.count("redis", "hit") == 1
        raw = redis.Redis.from_url(redis_server.url, socket_timeout=5)
        assert raw.ttl("sparsity-router:k") in (0, 1)  # stored with an expiry, under the prefix
        raw.close()
        await anyio.sleep(0.5)
        assert await cache.get("k") is None  # expired
    finally:
        await cache.aclose()


async def test_memory_in_front_of_redis(redis_server: RedisServer) -> None:
    events = Events()
    shared = RedisCache(redis_server.url, fingerprint=FP, on_event=events)
    first = TieredCache(MemoryCache(10, on_event=events), shared)
    second = TieredCache(MemoryCache(10, on_event=events), shared)
    try:
        await first.set("k", RESULT)
        assert await second.get("k") == RESULT  # from Redis, now in second's memory too
        assert events.count("redis", "hit") == 1
        assert await second.get("k") == RESULT
        assert events.count("memory", "hit") == 1 and events.count("redis", "hit") == 1
    finally:
        await shared.aclose()


async def test_foreign_and_corrupt_values_are_misses(redis_server: RedisServer) -> None:
    events = Events()
    cache = RedisCache(redis_server.url, fingerprint=FP, on_event=events)
    good = json.loads(encode_result(RESULT, FP))
    bad_values: list[bytes] = [
        b"\x00\xff not json",
        b"[1, 2, 3]",
        b'"a string"',
        json.dumps({**good, "v": 99}).encode(),  # another format version
        json.dumps({**good, "fp": "another-probe"}).encode(),  # another probe
        json.dumps({**good, "r": {"score": 1}}).encode(),  # missing fields
        json.dumps({**good, "r": {**good["r"], "score": "high"}}).encode(),
        json.dumps({**good, "r": {**good["r"], "metrics": {"ten": {"x": 1}}}}).encode(),
        encode_result(RESULT, FP).replace(b"0.42", b"NaN"),
        encode_result(RESULT, FP)[:-5],  # truncated
    ]
    raw = redis.Redis.from_url(redis_server.url, socket_timeout=5)
    try:
        for i, value in enumerate(bad_values):
            raw.set(f"sparsity-router:bad{i}", value)
            assert await cache.get(f"bad{i}") is None, value
        raw.lpush("sparsity-router:a-list", b"x")  # WRONGTYPE from Redis: a miss as well
        assert await cache.get("a-list") is None
        assert events.count("redis", "invalid") == len(bad_values) + 1
        assert cache.available and events.count("redis", "error") == 0
        await cache.set("fine", RESULT)
        assert await cache.get("fine") == RESULT
        assert decode_result(encode_result(RESULT, FP), FP) == RESULT
    finally:
        raw.close()
        await cache.aclose()


async def test_redis_killed_then_restarted(
    redis_server: RedisServer, tiny_probe: SparsityProbe, caplog: pytest.LogCaptureFixture
) -> None:
    events = Events()
    redis_cache = RedisCache(
        redis_server.url, fingerprint=FP, backoff_s=0.05, max_backoff_s=0.2, on_event=events
    )
    svc = service(tiny_probe, TieredCache(None, redis_cache))
    try:
        first = await svc.measure("What is two plus two?")
        assert first.cache == "miss" and first.result is not None
        assert (await svc.measure("What is two plus two?")).cache == "hit"

        redis_server.kill()
        for i in range(20):  # every request still gets its probe result
            outcome = await svc.measure(f"question {i} while Redis is down")
            assert outcome.error is None and outcome.result is not None
            assert outcome.cache == "miss"
            await anyio.sleep(0.02)
        assert events.count("redis", "error") >= 1
        outage_logs = [r for r in caplog.records if "unavailable" in r.getMessage()]
        assert len(outage_logs) == 1  # logged once per outage

        redis_server.restart()
        deadline = time.monotonic() + 15
        while True:  # the cache comes back by itself (the restarted server is empty)
            await svc.measure("after the restart")
            if (await svc.measure("after the restart")).cache == "hit":
                break
            assert time.monotonic() < deadline, "the Redis cache did not come back"
            await anyio.sleep(0.05)
        assert redis_cache.available
        assert any("is back" in r.getMessage() for r in caplog.records)
    finally:
        await svc.aclose()


async def test_a_slow_redis_is_a_miss_within_its_timeout(tiny_probe: SparsityProbe) -> None:
    """A server that accepts connections but never answers: every call gives up on time."""
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    url = f"redis://127.0.0.1:{listener.getsockname()[1]}/0"
    events = Events()
    cache = RedisCache(url, fingerprint=FP, timeout_s=0.05, backoff_s=0.01, on_event=events)
    try:
        start = time.monotonic()
        assert await cache.get("k") is None
        await cache.set("k", RESULT)
        assert time.monotonic() - start < 2
        assert events.count("redis", "error") >= 1
    finally:
        await cache.aclose()
        listener.close()


@pytest.mark.parametrize("batching", [False, True])
async def test_single_flight_under_50_identical_requests(
    redis_server: RedisServer, tiny_probe: SparsityProbe, batching: bool
) -> None:
    from router.probing import BatchingConfig

    cache = TieredCache(MemoryCache(100), RedisCache(redis_server.url, fingerprint=FP))
    svc = service(tiny_probe, cache, batching=BatchingConfig() if batching else None)
    outcomes: list[Any] = []

    async def one() -> None:
        outcomes.append(await svc.measure("The same prompt, fifty times at once."))

    try:
        async with anyio.create_task_group() as tg:
            for _ in range(50):
                tg.start_soon(one)
        assert svc.passes == 1
        assert len(outcomes) == 50
        assert all(o.result == outcomes[0].result for o in outcomes)
        assert outcomes[0].result is not None
        # the one that probed is the miss; the 49 that waited for it shared its pass
        assert sorted(o.cache for o in outcomes) == ["miss"] + ["shared"] * 49
        assert (await svc.measure("The same prompt, fifty times at once.")).cache == "hit"
        assert svc.passes == 1
    finally:
        await svc.aclose()


async def test_warm_up_runs_one_uncached_pass(tiny_probe: SparsityProbe) -> None:
    """The start-up pass warms the probe thread without filling the cache or the metrics."""
    measured: list[Any] = []
    cache = TieredCache(MemoryCache(100), None)
    svc = ProbeService(
        tiny_probe, calibration=None, cache=cache, timeout_s=30, on_measured=measured.append
    )
    try:
        seconds = await svc.warm_up()
        assert seconds is not None and seconds > 0
        assert svc.passes == 1 and measured == []
        outcome = await svc.measure("Hello, how are you today?")
        assert outcome.cache == "miss" and svc.passes == 2
    finally:
        await svc.aclose()


async def test_warm_up_failure_is_reported_not_raised(tiny_probe: SparsityProbe) -> None:
    svc = service(tiny_probe, None)
    await svc.aclose()  # a closed batcher refuses work: the warm-up must fail quietly
    assert await svc.warm_up(timeout_s=5) is None


async def test_hidden_vectors_round_trip_through_redis_and_key_the_cache(
    redis_server: RedisServer, tiny_probe: SparsityProbe
) -> None:
    """A result with hidden vectors is stored and read back exactly; a probe that keeps vectors
    (or other layers) never reads what a probe that did not keep them stored."""
    keeps = SparsityProbe(
        tiny_probe.settings.model_copy(update={"state_layers": (4,)}), loaded=tiny_probe.loaded
    )
    plain, rich = service(tiny_probe, None), service(keeps, None)
    assert plain.key("hello") != rich.key("hello")
    assert plain.fingerprint_digest != rich.fingerprint_digest
    assert tiny_probe.fingerprint() == keeps.fingerprint()  # calibrations still carry over
    result = keeps.measure_one("hello")
    assert result.states is not None and len(result.states["L4.last"]) == 64
    cache = RedisCache(redis_server.url, fingerprint=rich.fingerprint_digest)
    try:
        await cache.set(rich.key("hello"), result)
        assert await cache.get(rich.key("hello")) == result
    finally:
        await cache.aclose()
