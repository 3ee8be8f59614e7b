"""Retries, ``retry-after``, jittered backoff and the per-replica circuit breaker.

Real gateways on loopback ports in front of scripted fake upstreams, driven by the openai SDK
with ``max_retries=0`` (so that the SDK's own retries hide nothing); the breaker, the
``retry-after`` parser and the backoff are also checked on their own.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from uvicorn.protocols.http.h11_impl import H11Protocol

from policies.errors import ConfigError
from policies.loader import parse_settings
from router.app import create_app
from router.breaker import CircuitBreaker
from router.retry import RetryPolicy, parse_retry_after
from tests.servers import FakeUpstream, Receive, Scope, Send, ServerPool, ServerThread, receive_body

Answer = tuple[int, dict[str, str]]


class CountingServer(ServerThread):
    """A :class:`ServerThread` that counts the TCP connections its uvicorn accepts."""

    def __init__(self, app: Any) -> None:
        super().__init__(app)
        self.connections = 0
        outer = self

        class Counting(H11Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                outer.connections += 1
                super().connection_made(transport)  # type: ignore[arg-type]

        self.server.config.http = Counting


@dataclass
class Scripted:
    """A fake upstream answering the statuses of ``script`` in turn (an error envelope with the
    given headers), then like :class:`FakeUpstream`. Every answer closes its connection, so
    that each request the gateway sends opens one."""

    name: str
    script: list[Answer] = field(default_factory=list)
    times: list[float] = field(default_factory=list)  # when each request arrived
    fake: FakeUpstream = field(init=False)

    def __post_init__(self) -> None:
        self.fake = FakeUpstream(name=self.name)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.fake(scope, receive, send)
            return
        self.times.append(time.monotonic())

        async def closing(message: Any) -> None:
            if message["type"] == "http.response.start":
                headers = [*message.get("headers", []), (b"connection", b"close")]
                message = {**message, "headers": headers}
            await send(message)

        if not self.script:
            await self.fake(scope, receive, closing)
            return
        await receive_body(receive)
        status, headers = self.script.pop(0)
        body = json.dumps(
            {"error": {"message": f"{self.name} says {status}", "type": "upstream", "code": None}}
        ).encode()
        await closing(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    *((k.encode(), v.encode()) for k, v in headers.items()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    @property
    def requests(self) -> int:
        return len(self.times)


Upstream = tuple[Scripted, CountingServer]


@pytest.fixture
def upstream() -> Iterator[Callable[[str], Upstream]]:
    """Start a scripted upstream; every one started is stopped after the test."""
    with ServerPool() as pool:

        def start(name: str) -> Upstream:
            scripted = Scripted(name)
            return scripted, pool.start(CountingServer(scripted), timeout=30)

        yield start


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[Callable[..., ServerThread]]:
    """Start a gateway whose policy sends everything to ``big`` (replicas ``big_urls``, extra
    YAML ``big``), with ``small`` as its fallback when given, and ``top`` as top-level YAML;
    stopped after the test."""
    with ServerPool() as pool:

        def start(
            big_urls: list[str], *, small: str | None = None, big: str = "", top: str = ""
        ) -> ServerThread:
            urls = ", ".join(f'"{u}/v1"' for u in big_urls)
            text = f"{top}\nbackends:\n  big:\n    type: openai\n    base_urls: [{urls}]\n"
            if small is not None:
                text += "    fallback: [small]\n"
            text += "".join(f"    {line}\n" for line in big.splitlines())
            if small is not None:
                text += f'  small: {{type: openai, base_urls: ["{small}/v1"]}}\n'
            text += "policies:\n  default: {rules: [], default: big, on_probe_error: big}\n"
            settings = parse_settings(text, source_name="gw.yaml", base_dir=tmp_path)
            return pool.start(ServerThread(create_app(settings)), timeout=30)

        yield start


def client(gw: ServerThread) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key="none", max_retries=0, timeout=30)


def ask(gw: ServerThread, *, stream: bool = False) -> tuple[str, str]:
    """One chat request through the SDK: (the answer's text, the backend that answered)."""
    messages: list[Any] = [{"role": "user", "content": "hello"}]
    with client(gw) as c:
        if stream:
            with c.chat.completions.with_streaming_response.create(
                model="auto", messages=messages, stream=True
            ) as response:
                backend = response.headers["x-router-backend"]
                text = "".join(
                    chunk.choices[0].delta.content or ""
                    for chunk in response.parse()
                    if chunk.choices
                )
            return text, backend
        raw = c.chat.completions.with_raw_response.create(model="auto", messages=messages)
        return raw.parse().choices[0].message.content or "", raw.headers["x-router-backend"]


def metric(gw: ServerThread, name: str, **labels: str) -> float | None:
    """The value of the sample ``name`` whose labels include ``labels``; None when absent."""
    text = httpx.get(gw.url + "/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and labels.items() <= sample.labels.items():
                return float(sample.value)
    return None


@pytest.mark.parametrize("stream", [False, True])
def test_429_then_200_is_retried_on_the_other_replica_then_the_same(
    upstream: Callable[[str], Upstream], gateway: Callable[..., ServerThread], stream: bool
) -> None:
    """Both replicas answer 429 once: the gateway tries the other one at once, then one of them
    again after a backoff; the client sees a 200 (not the 429) and no fallback was needed."""
    (a, a_server), (b, b_server) = upstream("big-a"), upstream("big-b")
    a.script = [(429, {})]
    b.script = [(429, {})]
    gw = gateway([a_server.url, b_server.url])
    text, backend = ask(gw, stream=stream)
    assert backend == "big"
    assert text.startswith("tok0" if stream else "answer from big-")
    assert a.requests + b.requests == 3 and a.requests >= 1 and b.requests >= 1
    assert metric(gw, "sparsity_router_upstream_retries_total", backend="big", reason="429") == 2
    assert metric(gw, "sparsity_router_upstream_failures_total", backend="big", reason="429") == 2


def test_retry_after_is_honoured(
    upstream: Callable[[str], Upstream], gateway: Callable[..., ServerThread]
) -> None:
    """One replica, ``429`` with ``retry-after: 1``: the gateway waits about a second (not a
    10-ms backoff) before it asks the same replica again, and the client gets the 200."""
    big, server = upstream("big")
    big.script = [(429, {"retry-after": "1"})]
    gw = gateway([server.url])
    start = time.monotonic()
    text, _ = ask(gw)
    elapsed = time.monotonic() - start
    assert text == "answer from big"
    assert big.requests == 2
    assert 0.95 <= big.times[1] - big.times[0] < 3.0
    assert 0.95 <= elapsed < 5.0


def test_retry_after_beyond_the_cap_fails_over_to_the_fallback_at_once(
    upstream: Callable[[str], Upstream], gateway: Callable[..., ServerThread]
) -> None:
    """A replica asking (by an HTTP date) for 60 s, past ``retry_after_max_s`` (5 s): no wait,
    no retry of that replica; the fallback backend answers."""
    big, big_server = upstream("big")
    small, small_server = upstream("small")
    later = email.utils.formatdate(time.time() + 60, usegmt=True)
    big.script = [(429, {"retry-after": later})]
    gw = gateway([big_server.url], small=small_server.url)
    start = time.monotonic()
    text, backend = ask(gw)
    assert time.monotonic() - start < 3.0
    assert (text, backend) == ("answer from small", "small")
    assert big.requests == 1 and small.requests == 1
    assert metric(gw, "sparsity_router_fallbacks_total", failed="big", answered="small") == 1
    assert metric(gw, "sparsity_router_upstream_retries_total", backend="big", reason="429") is None


def test_every_replica_rate_limited_gives_the_client_a_429_with_retry_after(
    upstream: Callable[[str], Upstream], gateway: Callable[..., ServerThread]
) -> None:
    """No fallback, both replicas ask for 30 s: the client gets a 429 ``rate_limit_error``
    envelope with the upstream's ``retry-after`` passed on, rather than a 503."""
    (a, a_server), (b, b_server) = upstream("big-a"), upstream("big-b")
    a.script = [(429, {"retry-after": "30"})]
    b.script = [(429, {"retry-after": "40"})]
    gw = gateway([a_server.url, b_server.url])
    with client(gw) as c, pytest.raises(openai.RateLimitError) as info:
        c.chat.completions.create(model="auto", messages=[{"role": "user", "content": "hi"}])
    exc = info.value
    assert exc.type == "rate_limit_error" and exc.code == "upstream_rate_limited"
    assert 25 <= int(exc.response.headers["retry-after"]) <= 30
    assert a.requests == 1 and b.requests == 1


def test_statuses_outside_retry_on_are_the_clients_answer_untouched(
    upstream: Callable[[str], Upstream], gateway: Callable[..., ServerThread]
) -> None:
    """A 400 is passed through as the upstream wrote it, with no retry and no fallback; so is a
    429 once ``retry_on`` leaves it out. Neither counts against the replica's breaker."""
    big, big_server = upstream("big")
    small, small_server = upstream("small")
    big.script = [(400, {}), (429, {"retry-after": "1"})]
    gw = gateway(
        [big_server.url],
        small=small_server.url,
        big="retry_on: [500, 502, 503, 504]\nbreaker: {failures: 1, cooldown_s: 60}",
    )
    messages: list[Any] = [{"role": "user", "content": "hi"}]
    with client(gw) as c:
        with pytest.raises(openai.BadRequestError) as bad:
            c.chat.completions.create(model="auto", messages=messages)
        assert bad.value.body == {"message": "big says 400", "type": "upstream", "code": None}
        with pytest.raises(openai.RateLimitError) as limited:
            c.chat.completions.create(model="auto", messages=messages)
        assert limited.value.body == {"message": "big says 429", "type": "upstream", "code": None}
        assert c.chat.completions.create(model="auto", messages=messages).choices[0].message
    assert big.requests == 3 and small.requests == 0
    assert metric(gw, "sparsity_router_breaker_state", backend="big") == 0
    assert metric(gw, "sparsity_router_upstream_failures_total", backend="big") is None


def test_breaker_opens_skips_the_replica_and_recovers_through_a_half_open_trial(
    upstream: Callable[[str], Upstream], gateway: Callable[..., ServerThread]
) -> None:
    big, big_server = upstream("big")
    small, small_server = upstream("small")
    big.script = [(503, {})] * 4
    gw = gateway(
        [big_server.url],
        small=small_server.url,
        big="retries: 2\nbreaker: {failures: 3, cooldown_s: 1}",
    )
    labels = {"backend": "big", "replica": big_server.url + "/v1"}
    assert metric(gw, "sparsity_router_breaker_state", **labels) == 0

    # three 503s in a row (one try and two retries): open; the fallback answers
    assert ask(gw)[1] == "small"
    assert big.requests == 3 and big_server.connections == 3
    assert metric(gw, "sparsity_router_breaker_state", **labels) == 2
    assert metric(gw, "sparsity_router_breaker_opens_total", **labels) == 1

    # open: the replica is skipped, not even connected to, and the backend fails at once
    start = time.monotonic()
    assert ask(gw)[1] == "small"
    assert time.monotonic() - start < 0.5
    assert big.requests == 3 and big_server.connections == 3
    assert (
        metric(gw, "sparsity_router_upstream_failures_total", backend="big", reason="breaker_open")
        == 1
    )

    # after the cooldown one trial goes through; it fails (the 4th 503): open again at once
    time.sleep(1.2)
    assert ask(gw)[1] == "small"
    assert big.requests == 4
    assert metric(gw, "sparsity_router_breaker_opens_total", **labels) == 2
    assert ask(gw)[1] == "small"
    assert big.requests == 4 and big_server.connections == 4

    # the next trial succeeds: closed, and the replica answers again
    time.sleep(1.2)
    assert ask(gw) == ("answer from big", "big")
    assert metric(gw, "sparsity_router_breaker_state", **labels) == 0
    assert ask(gw) == ("answer from big", "big")
    assert big.requests == 6 and small.requests == 4


def test_one_open_replica_is_skipped_while_the_other_serves(
    upstream: Callable[[str], Upstream], gateway: Callable[..., ServerThread]
) -> None:
    """Replica A answers 503, B serves; with the default breaker (5 failures, 10 s) A opens after
    its fifth failure and gets no request after that, B answers all of them."""
    (a, a_server), (b, b_server) = upstream("big-a"), upstream("big-b")
    a.script = [(503, {})] * 20
    gw = gateway([a_server.url, b_server.url])
    for _ in range(20):
        assert ask(gw) == ("answer from big-b", "big")
    assert a.requests == 5 and a_server.connections == 5
    assert b.requests == 20
    assert metric(gw, "sparsity_router_breaker_state", replica=a_server.url + "/v1") == 2
    assert metric(gw, "sparsity_router_breaker_state", replica=b_server.url + "/v1") == 0
    assert metric(gw, "sparsity_router_upstream_retries_total", backend="big", reason="503") == 5


def test_a_backend_with_every_replica_open_fails_at_once_with_retry_after(
    upstream: Callable[[str], Upstream], gateway: Callable[..., ServerThread]
) -> None:
    """No fallback: once the only replica's breaker is open, a request is answered 503 at once,
    with ``retry-after`` saying when the trial comes, and the upstream is not contacted."""
    big, big_server = upstream("big")
    big.script = [(502, {})]
    gw = gateway([big_server.url], big="breaker: {failures: 1, cooldown_s: 30}")
    messages: list[Any] = [{"role": "user", "content": "hi"}]
    with client(gw) as c:
        with pytest.raises(openai.InternalServerError) as first:
            c.chat.completions.create(model="auto", messages=messages)
        assert first.value.status_code == 503 and "retry-after" not in first.value.response.headers
        start = time.monotonic()
        with pytest.raises(openai.InternalServerError) as skipped:
            c.chat.completions.create(model="auto", messages=messages)
        assert time.monotonic() - start < 0.5
    assert skipped.value.status_code == 503
    assert 25 <= int(skipped.value.response.headers["retry-after"]) <= 30
    assert big.requests == 1 and big_server.connections == 1


@pytest.mark.parametrize(
    ("top", "big"),
    [("", "timeouts: {total_s: 2}"), ("server: {request_timeout_s: 2}", "")],
    ids=["backend-total_s", "server-request_timeout_s"],
)
def test_waits_are_bounded_by_the_deadline(
    upstream: Callable[[str], Upstream], gateway: Callable[..., ServerThread], top: str, big: str
) -> None:
    """A 2-s deadline (the backend's or the request's): a 503's ``retry-after: 0.3`` is waited
    for, the next one's ``retry-after: 4`` (under the 5-s cap, past the deadline) is not: the
    fallback answers at once."""
    upstream_big, big_server = upstream("big")
    small, small_server = upstream("small")
    upstream_big.script = [(503, {"retry-after": "0.3"}), (503, {"retry-after": "4"})]
    gw = gateway([big_server.url], small=small_server.url, big=big, top=top)
    start = time.monotonic()
    assert ask(gw) == ("answer from small", "small")
    assert time.monotonic() - start < 1.5
    assert upstream_big.requests == 2 and small.requests == 1
    assert upstream_big.times[1] - upstream_big.times[0] >= 0.28


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_breaker_states() -> None:
    clock = Clock()
    changes: list[str] = []
    breaker = CircuitBreaker(2, 5.0, clock=clock, on_change=changes.append)
    breaker.failed()
    breaker.succeeded()  # a success resets the count
    breaker.failed()
    assert breaker.state == "closed" and breaker.acquire()
    breaker.failed()
    assert breaker.state == "open" and not breaker.allows() and not breaker.acquire()
    assert breaker.retry_in() == 5.0
    clock.now += 5.0
    assert breaker.acquire() and breaker.holds_trial() and breaker.state == "half_open"
    assert not breaker.acquire()  # one trial at a time
    breaker.abandoned(trial=True)  # the trial's client went away: the next request tries
    assert breaker.acquire()
    breaker.failed()
    assert breaker.state == "open" and not breaker.acquire()
    clock.now += 5.0
    assert breaker.acquire()
    breaker.succeeded()
    assert breaker.state == "closed" and breaker.acquire() and not breaker.holds_trial()
    assert changes == ["open", "half_open", "open", "half_open", "closed"]


def test_parse_retry_after() -> None:
    now = 1_700_000_000.0
    date = email.utils.formatdate(now + 30, usegmt=True)
    assert parse_retry_after({"retry-after": "2"}) == 2.0
    assert parse_retry_after({"retry-after": " 1.5 "}) == 1.5
    assert parse_retry_after({"retry-after": date}, now=lambda: now) == pytest.approx(30.0)
    past = email.utils.formatdate(now - 30, usegmt=True)
    assert parse_retry_after({"retry-after": past}, now=lambda: now) == 0.0
    assert parse_retry_after({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    assert parse_retry_after({"retry-after-ms": "x", "retry-after": "9"}) == 9.0
    for bad in ("soon", "-1", "nan", ""):
        assert parse_retry_after({"retry-after": bad}) is None
    assert parse_retry_after({}) is None


def test_backoff_is_exponential_with_full_jitter() -> None:
    policy = RetryPolicy(backoff_base_s=0.1, backoff_max_s=1.0)
    assert [policy.backoff(n, rand=lambda: 1.0) for n in range(6)] == pytest.approx(
        [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    )
    assert policy.backoff(3, rand=lambda: 0.0) == 0.0
    assert policy.backoff(10_000, rand=lambda: 0.5) == 0.5
    waits = {policy.backoff(2) for _ in range(50)}
    assert len(waits) > 1 and all(0 <= w <= 0.4 for w in waits)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("retry_on: [429, 200]", "backends.big.retry_on[1]: must be greater than or equal to 400"),
        ("backoff: {base_s: 1, max_s: 0.5}", "backends.big.backoff.max_s: must be at least base_s"),
        ("breaker: {failures: 0}", "backends.big.breaker.failures: must be greater than or equal"),
        ("retry_after_max_s: -1", "backends.big.retry_after_max_s: must be greater than or equal"),
    ],
)
def test_settings_are_checked_with_their_yaml_path(extra: str, message: str) -> None:
    text = (
        f'backends:\n  big:\n    type: openai\n    base_urls: ["http://x/v1"]\n    {extra}\n'
        "policies:\n  default: {rules: [], default: big, on_probe_error: big}\n"
    )
    with pytest.raises(ConfigError) as info:
        parse_settings(text, source_name="gw.yaml")
    assert f"gw.yaml:5: {message}" in str(info.value)


def test_settings_defaults() -> None:
    text = (
        'backends:\n  big: {type: openai, base_urls: ["http://x/v1"], retry_on: 503, '
        "breaker: null}\npolicies:\n  default: {rules: [], default: big, on_probe_error: big}\n"
    )
    big = parse_settings(text, source_name="gw.yaml").backends["big"]
    assert big.retry_on == (503,) and big.breaker is None  # type: ignore[union-attr]
