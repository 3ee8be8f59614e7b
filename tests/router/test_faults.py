"""Faults under load: Redis killed and restarted, a replica stopped, upstreams that stall, and
config reloads with a broken file. Real servers on loopback ports, the openai SDK as client."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import redis

from policies.loader import load_settings
from probes.probe import SparsityProbe
from router.app import create_app
from tests.router.conftest import gateway_yaml
from tests.servers import FakeUpstream, ServerThread, start_serve, stop_serve, wait_ready

Upstreams = dict[str, tuple[FakeUpstream, ServerThread]]
MakeGateway = Callable[..., ServerThread]
ROOT = Path(__file__).resolve().parents[2]


def _one(gw: ServerThread, i: int, model: str, key: str) -> str | None:
    """One request (every other one streaming); None when it succeeded, else what went wrong."""
    try:
        with openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0, timeout=30) as c:
            messages = [{"role": "user", "content": f"load request {i}"}]
            if i % 2:
                text = "".join(
                    chunk.choices[0].delta.content or ""
                    for chunk in c.chat.completions.create(
                        model=model, messages=messages, stream=True
                    )
                    if chunk.choices
                )
            else:
                out = c.chat.completions.create(model=model, messages=messages)
                text = out.choices[0].message.content or ""
        expected = "tok0" if i % 2 else "answer from"
        return None if text.startswith(expected) else f"request {i}: odd answer {text!r}"
    except openai.APIError as exc:
        return f"request {i}: {type(exc).__name__}: {exc}"


def load(
    gw: ServerThread,
    n: int,
    *,
    model: str = "auto",
    key: str = "none",
    clients: int = 16,
    at: dict[int, Callable[[], None]] | None = None,
) -> list[str]:
    """``n`` requests from ``clients`` concurrent SDK clients; ``at[k]`` runs once k are done."""
    done = 0
    lock = threading.Lock()
    actions = dict(at or {})

    def run(i: int) -> str | None:
        nonlocal done
        failure = _one(gw, i, model, key)
        with lock:
            done += 1
            action = actions.pop(done, None)
        if action is not None:
            action()
        return failure

    with ThreadPoolExecutor(clients) as pool:
        return [f for f in pool.map(run, range(n), timeout=120) if f is not None]


def metric(gw: ServerThread, name: str) -> float:
    total = 0.0
    for line in httpx.get(gw.url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_redis_killed_and_restarted_under_load_fails_no_request(
    make_gateway: MakeGateway, redis_server: Any
) -> None:
    """Rate limits and the probe cache live in Redis; Redis dies after 50 requests and is back
    after 120: 0 failed requests, and both come back to Redis."""
    gw = make_gateway(
        api_keys="[], keys: [{key: k1, name: loadgen}], public_metrics: true, "
        "rate_limit: {requests_per_s: 1000, "
        f'burst: 1000, redis_url: "{redis_server.url}"}}',
        extra=f'cache: {{memory: {{max_entries: 0}}, redis: {{url: "{redis_server.url}"}}}}',
    )
    failures = load(gw, 200, key="k1", at={50: redis_server.kill, 120: redis_server.restart})
    assert failures == []
    assert metric(gw, "sparsity_router_rate_limit_redis_errors_total") > 0  # Redis really was down
    cache_trouble = metric(gw, 'sparsity_router_cache_lookups_total{result="error",tier="redis"}')
    cache_trouble += metric(
        gw, 'sparsity_router_cache_lookups_total{result="skipped",tier="redis"}'
    )
    assert cache_trouble > 0  # the probe cache saw the outage too
    # after the restart the buckets and the probe results are in Redis again: a prompt probed
    # after the restart is a hit the second time (Redis is the only cache tier here)
    time.sleep(5.5)  # past the longest reconnect back-off
    load(gw, 4, key="k1", clients=2)
    hits = metric(gw, 'sparsity_router_cache_lookups_total{result="hit",tier="redis"}')
    load(gw, 4, key="k1", clients=2)
    assert metric(gw, 'sparsity_router_cache_lookups_total{result="hit",tier="redis"}') >= hits + 4
    with redis.Redis.from_url(redis_server.url) as r:
        assert r.exists("sparsity-router:ratelimit:loadgen")


def test_one_of_two_replicas_stopped_under_load(
    make_gateway: MakeGateway, upstreams: Upstreams
) -> None:
    """200 requests to the two-replica backend from 16 clients; one replica stops at 60."""
    gw = make_gateway()
    stopped = upstreams["large2"][1]
    failures = load(gw, 200, model="large", at={60: stopped.stop})
    assert failures == []
    first, second = upstreams["large"][0], upstreams["large2"][0]
    assert len(second.requests) > 0  # it did serve before it stopped
    assert len(first.requests) > len(second.requests)  # and the survivor took the rest
    # a stopped replica is not a failed request: the fallback backend was not needed
    assert metric(gw, "sparsity_router_fallbacks_total") == 0


def _with_task_count(app: Any) -> Any:
    """``GET /__tasks`` answers the number of asyncio tasks alive in the server's loop."""

    async def wrapped(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] == "/__tasks":
            body = json.dumps(len(asyncio.all_tasks())).encode()
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": body})
            return
        await app(scope, receive, send)

    return wrapped


def test_stalled_upstream_times_out_without_hung_connections_or_leaked_tasks(
    tiny_model_dir: Path,
    tiny_probe: SparsityProbe,
    tiny_calibration: Path,
    upstreams: Upstreams,
    tmp_path: Path,
) -> None:
    for name in ("large", "large2", "small"):
        upstreams[name][0].mode = "stall"
    text = gateway_yaml(
        tiny_model_dir,
        tiny_calibration,
        upstreams,
        # no circuit breakers: every request is to reach a stalled upstream and time out
        large_timeouts="timeouts: {connect_s: 1, read_s: 0.3, total_s: 1}\n    breaker: null",
    ).replace(
        "model: small-served,", "model: small-served, timeouts: {read_s: 0.3}, breaker: null,"
    )
    path = tmp_path / "gw.yaml"
    path.write_text(text)
    app = create_app(load_settings(path), probe=tiny_probe)
    with ServerThread(_with_task_count(app)) as gw:
        tasks = lambda: httpx.get(gw.url + "/__tasks", timeout=5).json()  # noqa: E731
        load(gw, 2, model="large", clients=2)  # warm up connection pools
        before = tasks()
        start = time.monotonic()
        failures = load(gw, 24, model="large", clients=12)
        elapsed = time.monotonic() - start
        # every request ends with the gateway's timeout error (large, then its fallback small)
        assert len(failures) == 24
        assert all("504" in f or "Timeout" in f or "timed out" in f for f in failures), failures
        assert elapsed < 20
        stalled = sum(len(upstreams[n][0].requests) for n in ("large", "large2", "small"))
        disconnects = lambda: sum(  # noqa: E731
            upstreams[n][0].disconnects for n in ("large", "large2", "small")
        )
        # the gateway dropped every upstream request it gave up on: no hung connection
        deadline = time.monotonic() + 10
        while disconnects() < stalled and time.monotonic() < deadline:
            time.sleep(0.05)
        assert disconnects() == stalled
        deadline = time.monotonic() + 10
        while tasks() > before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert tasks() <= before


RELOADABLE = """
auth:
  keys: [{{key: admin-k, scope: admin}}, {{key: client-k}}]
  public_metrics: true
backends:
  small: {{type: openai, base_urls: ["{small}"]}}
  large: {{type: openai, base_urls: ["{large}"]}}
policies:
  default: {{rules: [], default: {default}, on_probe_error: {default}}}
"""


def _write(path: Path, upstreams: Upstreams, default: str) -> None:
    path.write_text(
        RELOADABLE.format(
            small=upstreams["small"][1].url + "/v1",
            large=upstreams["large"][1].url + "/v1",
            default=default,
        )
    )


def _answered_by(base: str) -> str:
    r = httpx.post(
        base + "/v1/chat/completions",
        headers={"authorization": "Bearer client-k"},
        json={"model": "auto", "messages": [{"role": "user", "content": "hi"}]},
        timeout=10,
    )
    assert r.status_code == 200, r.text
    return r.headers["x-router-backend"]


def test_reload_applies_a_good_file_and_keeps_serving_on_a_broken_one(
    upstreams: Upstreams, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "gw.yaml"
    _write(path, upstreams, "small")
    with ServerThread(create_app(load_settings(path), config_path=path)) as gw:
        admin = {"authorization": "Bearer admin-k"}
        assert _answered_by(gw.url) == "small"
        _write(path, upstreams, "large")
        r = httpx.post(gw.url + "/admin/reload", headers=admin, timeout=10)
        assert r.status_code == 200 and r.json()["status"] == "reloaded"
        assert _answered_by(gw.url) == "large"

        caplog.set_level(logging.ERROR, logger="router.reload")
        for broken in (
            "policies: [unclosed",  # YAML syntax
            path.read_text().replace("default: large", "default: nowhere"),  # cross-check
            path.read_text().replace("http://", "ftp://").replace("small:", "tiny:"),  # restart
        ):
            path.write_text(broken)
            r = httpx.post(gw.url + "/admin/reload", headers=admin, timeout=10)
            assert r.status_code == 422, r.text
            err = r.json()["error"]
            assert err["code"] == "config_invalid" and str(path) in err["message"]
            assert "still serving the previous config" in err["message"]
            assert _answered_by(gw.url) == "large"
        assert metric(gw, 'sparsity_router_config_reloads_total{result="error"}') == 3
        assert metric(gw, 'sparsity_router_config_reloads_total{result="ok"}') == 1
        assert len([r for r in caplog.records if str(path) in r.getMessage()]) == 3


@pytest.mark.slow
def test_reload_refuses_a_cascade_the_running_gateway_cannot_check(
    upstreams: Upstreams, tmp_path: Path
) -> None:
    """No rule needed the probe, so none is loaded: a cascade added by a reload needs a restart
    (rather than being ignored)."""
    path = tmp_path / "gw.yaml"
    _write(path, upstreams, "small")
    text = path.read_text() + 'calibration: {answer_path: "answers.json"}\n'
    path.write_text(text)
    with ServerThread(create_app(load_settings(path), config_path=path)) as gw:
        path.write_text(
            text.replace(
                "on_probe_error: small}",
                "on_probe_error: small, cascade: {backend: small, escalate_to: large, "
                "when: {p_large: {min: 0.5}}}}",
            )
        )
        r = httpx.post(gw.url + "/admin/reload", headers={"authorization": "Bearer admin-k"})
        assert r.status_code == 422, r.text
        assert "need the probe, which is not loaded; restart" in r.json()["error"]["message"]
        assert _answered_by(gw.url) == "small"


def test_sighup_reloads_a_serve_process(upstreams: Upstreams, tmp_path: Path) -> None:
    path = tmp_path / "gw.yaml"
    _write(path, upstreams, "small")
    proc, base = start_serve("--config", str(path), env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        wait_ready(proc, base)
        assert _answered_by(base) == "small"
        _write(path, upstreams, "large")
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while _answered_by(base) != "large":
            assert time.monotonic() < deadline, "SIGHUP did not reload"
            time.sleep(0.1)
        path.write_text("backends: {")
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while (
            'sparsity_router_config_reloads_total{result="error"} 1.0'
            not in httpx.get(base + "/metrics", timeout=5).text
        ):
            assert time.monotonic() < deadline, "the failed reload was not counted"
            time.sleep(0.1)
        assert _answered_by(base) == "large"
    finally:
        log = stop_serve(proc)
    assert "config reload from" in log and str(path) in log and "failed" in log
