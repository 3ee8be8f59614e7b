"""One naming scheme on the wire: ``sparsity_router_*`` metrics, ``x-request-id`` accepted and
echoed, OpenAI's ``x-ratelimit-*-requests`` headers, a stable ``created`` in ``/v1/models``, and
JSON log lines that carry the request id. A real gateway on loopback, the openai SDK as client."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import pytest

from policies.schema import RateLimitSettings
from router.logs import REQUEST_ID, JsonFormatter, RequestIdFilter, configure_logging
from router.ratelimit import Admission, MemoryRateLimiter, format_duration
from router.routes.admin import MODELS_CREATED
from tests.router.conftest import closed_port_url
from tests.servers import ServerThread

MakeGateway = Callable[..., ServerThread]
MESSAGES: Any = [{"role": "user", "content": "hello there"}]


def sdk(gw: ServerThread, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0, timeout=20)


# -- metrics ------------------------------------------------------------------------------------


def test_every_metric_is_named_sparsity_router(make_gateway: MakeGateway) -> None:
    gw = make_gateway()
    with sdk(gw) as client:
        client.chat.completions.create(model="auto", messages=MESSAGES)
    text = httpx.get(gw.url + "/metrics", timeout=10).text
    names = {line.split()[2] for line in text.splitlines() if line.startswith(("# TYPE", "# HELP"))}
    assert len(names) > 15
    assert all(n.startswith("sparsity_router_") for n in names), sorted(names)
    for family in (
        "sparsity_router_requests_total",
        "sparsity_router_probe_seconds",
        "sparsity_router_upstream_seconds",
        "sparsity_router_breaker_state",
        "sparsity_router_rate_limited_total",
    ):
        assert family in names
    assert re.search(
        r'^sparsity_router_requests_total\{backend="\w+",rule="\w+",status="200"\} 1\.0$',
        text,
        re.M,
    )


# -- request ids --------------------------------------------------------------------------------


def test_a_client_request_id_is_used_and_echoed(make_gateway: MakeGateway) -> None:
    gw = make_gateway()
    with sdk(gw) as client:
        raw = client.chat.completions.with_raw_response.create(
            model="auto",
            messages=MESSAGES,
            extra_headers={"x-request-id": "trace-42/abc:def"},
        )
        assert raw.headers["x-request-id"] == "trace-42/abc:def"
        assert raw.headers["x-router-request-id"] == "trace-42/abc:def"
        assert raw.parse().choices[0].message.content
        # the older header is accepted too
        raw = client.chat.completions.with_raw_response.create(
            model="auto",
            messages=MESSAGES,
            extra_headers={"x-router-request-id": "mine-7"},
        )
        assert raw.headers["x-request-id"] == raw.headers["x-router-request-id"] == "mine-7"
        # none sent: one is made, under both names
        raw = client.chat.completions.with_raw_response.create(
            model="auto",
            messages=MESSAGES,
        )
        made = raw.headers["x-request-id"]
        assert re.fullmatch(r"[0-9a-f]{32}", made) and raw.headers["x-router-request-id"] == made
        # an insane one (too long) is replaced
        raw = client.chat.completions.with_raw_response.create(
            model="auto",
            messages=MESSAGES,
            extra_headers={"x-request-id": "x" * 201},
        )
        assert re.fullmatch(r"[0-9a-f]{32}", raw.headers["x-request-id"])
        # errors carry it too, in the headers and in a generic message
        with pytest.raises(openai.NotFoundError) as exc:
            client.chat.completions.create(
                model="no-such-model",
                messages=MESSAGES,
                extra_headers={"x-request-id": "err-1"},
            )
    headers = exc.value.response.headers
    assert headers["x-request-id"] == headers["x-router-request-id"] == "err-1"


# -- rate limits ----------------------------------------------------------------------------------


def test_rate_limit_headers_on_answers_and_the_429(make_gateway: MakeGateway) -> None:
    gw = make_gateway(
        api_keys="[], keys: [{key: ka, name: alice}], rate_limit: {requests_per_s: 0.2, burst: 3}"
    )
    with sdk(gw, "ka") as client:
        remaining = []
        for _ in range(3):
            raw = client.chat.completions.with_raw_response.create(
                model="auto",
                messages=MESSAGES,
            )
            assert raw.headers["x-ratelimit-limit-requests"] == "3"
            remaining.append(int(raw.headers["x-ratelimit-remaining-requests"]))
            reset = raw.headers["x-ratelimit-reset-requests"]
            assert re.fullmatch(r"\d+(\.\d+)?s|\d+ms", reset), reset
        assert remaining == [2, 1, 0]
        with pytest.raises(openai.RateLimitError) as exc:
            client.chat.completions.create(model="auto", messages=MESSAGES)
    headers = exc.value.response.headers
    assert headers["x-ratelimit-limit-requests"] == "3"
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert headers["x-ratelimit-reset-requests"].endswith("s")
    assert headers.get_list("x-ratelimit-limit-requests") == ["3"]  # not twice


def test_rate_limit_headers_from_the_redis_buckets(
    make_gateway: MakeGateway, redis_server: Any
) -> None:
    gw = make_gateway(
        api_keys="[], keys: [{key: ka, name: alice}], "
        f'rate_limit: {{requests_per_s: 0.2, burst: 2, redis_url: "{redis_server.url}"}}'
    )
    with sdk(gw, "ka") as client:
        raw = client.chat.completions.with_raw_response.create(model="auto", messages=MESSAGES)
        assert raw.headers["x-ratelimit-limit-requests"] == "2"
        assert raw.headers["x-ratelimit-remaining-requests"] == "1"
        assert re.fullmatch(r"\d+(\.\d+)?s", raw.headers["x-ratelimit-reset-requests"])
        client.chat.completions.create(model="auto", messages=MESSAGES)
        with pytest.raises(openai.RateLimitError) as exc:
            client.chat.completions.create(model="auto", messages=MESSAGES)
    assert exc.value.response.headers["x-ratelimit-remaining-requests"] == "0"


def test_no_rate_limit_headers_without_a_rate_limit(make_gateway: MakeGateway) -> None:
    gw = make_gateway()
    with sdk(gw) as client:
        raw = client.chat.completions.with_raw_response.create(
            model="auto",
            messages=MESSAGES,
        )
    assert "x-ratelimit-limit-requests" not in raw.headers


def test_token_bucket_values_for_the_headers() -> None:
    now = [0.0]
    limiter = MemoryRateLimiter(
        RateLimitSettings(requests_per_s=2.0, burst=4), clock=lambda: now[0]
    )
    first = limiter.take("a")
    assert (first.limit, first.remaining, first.reset_s) == (4, 3, 0.5)
    for _ in range(3):
        limiter.take("a")
    refused = limiter.take("a")
    assert not refused.allowed and refused.remaining == 0 and refused.reset_s == 2.0
    assert dict(refused.headers())[b"x-ratelimit-reset-requests"] == b"2s"
    assert Admission(True).headers() == []
    assert [format_duration(s) for s in (0, 0.0004, 0.25, 1.5, 59.9991, 61, 3600)] == [
        "0s",
        "1ms",
        "250ms",
        "1.5s",
        "60s",
        "1m1s",
        "60m0s",
    ]


# -- /v1/models -----------------------------------------------------------------------------------


def test_models_created_is_stable(make_gateway: MakeGateway) -> None:
    first = make_gateway()
    with sdk(first) as client:
        a = [(m.id, m.created) for m in client.models.list()]
        b = [(m.id, m.created) for m in client.models.list()]
    second = make_gateway()  # another gateway: a restart, or another replica
    with sdk(second) as client:
        c = [(m.id, m.created) for m in client.models.list()]
    assert a == b == c and a
    assert {created for _, created in a} == {MODELS_CREATED}


# -- JSON logs ------------------------------------------------------------------------------------


@pytest.fixture
def json_log() -> Iterator[io.StringIO]:
    """Every record the process logs at INFO and above, as JSON lines (what serve
    --log-format json installs on the root logger)."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield stream
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def test_json_log_lines_carry_the_request_id(
    make_gateway: MakeGateway, json_log: io.StringIO
) -> None:
    gw = make_gateway(large_urls=[closed_port_url()])  # large fails: a WARNING, then small
    secret = "my secret prompt 9137"
    with sdk(gw) as client:
        raw = client.chat.completions.with_raw_response.create(
            model="large",
            messages=[{"role": "user", "content": secret}],
            extra_headers={"x-request-id": "json-log-1"},
        )
    assert raw.headers["x-router-backend"] == "small"
    lines = [json.loads(line) for line in json_log.getvalue().splitlines()]
    assert lines
    for entry in lines:
        assert {"time", "level", "logger", "message"} <= set(entry)
    mine = [e for e in lines if e.get("request_id") == "json-log-1"]
    assert mine and any(e["level"] == "WARNING" for e in mine), lines
    assert all(secret not in json.dumps(e) for e in lines)
    # records outside a request have no id
    assert REQUEST_ID.get() is None


def test_configure_logging_json_and_text() -> None:
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    try:
        stream = io.StringIO()
        configure_logging("info", "json", stream=stream)
        token = REQUEST_ID.set("req-9")
        try:
            logging.getLogger("router.test").warning("hello %s", "there")
        finally:
            REQUEST_ID.reset(token)
        logging.getLogger("router.test").info("outside")
        logging.getLogger("router.test").debug("not at info")
        first, second = (json.loads(line) for line in stream.getvalue().splitlines())
        assert first["message"] == "hello there" and first["request_id"] == "req-9"
        assert first["level"] == "WARNING" and first["logger"] == "router.test"
        assert "request_id" not in second and second["message"] == "outside"
        stream = io.StringIO()
        configure_logging("warning", "text", stream=stream)
        logging.getLogger("router.test").warning("plain")
        assert stream.getvalue().rstrip().endswith("WARNING router.test: plain")
        with pytest.raises(ValueError):
            configure_logging("info", "xml")
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
