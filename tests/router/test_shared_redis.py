"""Two gateway processes on different ports sharing one Redis: a prompt probed by one is a cache
hit on the other."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.redis_server import RedisServer
from tests.router.conftest import gateway_yaml
from tests.servers import FakeUpstream, ServerThread, start_serve, stop_serve, wait_ready


@pytest.fixture
def config(
    tiny_model_dir: Path,
    tiny_calibration: Path,
    upstreams: dict[str, tuple[FakeUpstream, ServerThread]],
    redis_server: RedisServer,
    tmp_path: Path,
) -> Path:
    extra = f'cache: {{memory: {{max_entries: 100}}, redis: {{url: "{redis_server.url}"}}}}\n'
    path = tmp_path / "gateway.yaml"
    path.write_text(gateway_yaml(tiny_model_dir, tiny_calibration, upstreams, extra=extra))
    return path


@pytest.fixture
def two_gateways(config: Path) -> Iterator[tuple[str, str]]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    started = [start_serve("--config", str(config), env=env) for _ in range(2)]
    try:
        for proc, base in started:
            wait_ready(proc, base)
        yield started[0][1], started[1][1]
    finally:
        for proc, _ in started:
            stop_serve(proc)


def route(base: str, prompt: str) -> httpx.Response:
    body = {"model": "auto", "messages": [{"role": "user", "content": prompt}]}
    response = httpx.post(base + "/v1/route", json=body, timeout=30)
    assert response.status_code == 200, response.text
    return response


def test_a_prompt_probed_by_one_gateway_is_a_hit_on_the_other(
    two_gateways: tuple[str, str],
) -> None:
    one, two = two_gateways
    prompt = "Janet has 16 eggs and eats three; how many are left?"
    first = route(one, prompt)
    assert first.headers["x-router-cache"] == "miss"
    second = route(two, prompt)
    assert second.headers["x-router-cache"] == "hit"
    probed, cached = first.json()["probe"]["result"], second.json()["probe"]["result"]
    assert cached == probed  # the same numbers, percentile included
    assert second.json()["decision"] == first.json()["decision"]
    assert route(one, "Another prompt entirely, never seen.").headers["x-router-cache"] == "miss"
    metrics = httpx.get(two + "/metrics", timeout=10).text
    assert 'sparsity_router_cache_lookups_total{result="hit",tier="redis"} 1.0' in metrics


def test_requests_succeed_through_a_redis_outage(
    make_gateway: Callable[..., ServerThread], redis_server: RedisServer
) -> None:
    """The openai SDK against the gateway while Redis dies and comes back."""
    extra = (
        f'cache: {{memory: {{max_entries: 0}}, redis: {{url: "{redis_server.url}", '
        "timeout_s: 0.05}}\n"
    )
    gw = make_gateway(extra=extra)
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key="k", max_retries=0, timeout=20)

    def ask(prompt: str) -> str:
        raw = client.chat.completions.with_raw_response.create(
            model="auto", messages=[{"role": "user", "content": prompt}]
        )
        assert raw.parse().choices[0].message.content
        return raw.headers["x-router-cache"]

    assert ask("What is two plus two?") == "miss"
    assert ask("What is two plus two?") == "hit"
    redis_server.kill()
    for i in range(5):
        assert ask(f"Question {i} while Redis is down") == "miss"
    assert ask("What is two plus two?") == "miss"  # Redis gone, memory tier off
    redis_server.restart()
    deadline = time.monotonic() + 20
    while not (ask("Back again?") == "hit"):
        assert time.monotonic() < deadline, "the Redis cache did not come back"
        time.sleep(0.2)
    metrics = httpx.get(gw.url + "/metrics", timeout=10).text
    assert 'sparsity_router_cache_lookups_total{result="error",tier="redis"}' in metrics
