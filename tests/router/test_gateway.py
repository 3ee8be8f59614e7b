"""The gateway on a real uvicorn port, driven by the official openai SDK, with fake upstreams
on real ports (the upstream LLM is the only fake)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable

import httpx
import openai
import pytest

from probes.errors import ProbeInputError
from probes.probe import SparsityProbe
from tests.router.conftest import REFERENCE, closed_port_url
from tests.servers import FakeUpstream, ServerThread, wait_for

Upstreams = dict[str, tuple[FakeUpstream, ServerThread]]
MakeGateway = Callable[..., ServerThread]


def client(gw: ServerThread, key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0, timeout=20)


def test_routes_by_percentile_band_with_headers(
    make_gateway: MakeGateway, upstreams: Upstreams
) -> None:
    gw = make_gateway()
    c = client(gw)
    seen = set()
    for prompt in REFERENCE[:24]:
        raw = c.chat.completions.with_raw_response.create(
            model="auto", messages=[{"role": "user", "content": prompt}]
        )
        completion = raw.parse()
        h = raw.headers
        percentile = float(h["x-router-percentile"])
        expected = "large" if percentile >= 0.5 else "small"
        assert h["x-router-backend"] == expected, (prompt, percentile)
        assert h["x-router-rule"] == ("sparse" if expected == "large" else "default")
        assert float(h["x-router-score"]) > 0 and h["x-router-cache"] in ("hit", "miss")
        assert completion.choices[0].message.content.startswith(f"answer from {expected}")
        assert completion.model == f"{expected}-served"  # model rewritten for the backend
        seen.add(expected)
    assert seen == {"small", "large"}
    # the second time round, the probe result comes from the cache
    again = c.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": REFERENCE[0]}]
    )
    assert again.headers["x-router-cache"] == "hit"


def test_dry_run_route_matches_dispatch(make_gateway: MakeGateway) -> None:
    gw = make_gateway()
    body = {"model": "auto", "messages": [{"role": "user", "content": REFERENCE[5]}]}
    route = httpx.post(gw.url + "/v1/route", json=body, timeout=20).json()
    assert route["object"] == "router.decision"
    result = route["probe"]["result"]
    assert set(result["metrics"]) == {"L1", "L2", "L4"} and result["n_tokens"] > 0
    real = httpx.post(gw.url + "/v1/chat/completions", json=body, timeout=20)
    assert real.headers["x-router-backend"] == route["decision"]["backend"]
    assert float(real.headers["x-router-percentile"]) == pytest.approx(
        result["percentile"], abs=1e-4
    )


def test_passes_unknown_fields_through_untouched(
    make_gateway: MakeGateway, upstreams: Upstreams
) -> None:
    gw = make_gateway()
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    ]
    response_format = {
        "type": "json_schema",
        "json_schema": {"name": "x", "schema": {"type": "object"}},
    }
    client(gw).chat.completions.create(
        model="small-direct",
        messages=[{"role": "user", "content": "hi"}],
        tools=tools,  # type: ignore[arg-type]
        response_format=response_format,  # type: ignore[arg-type]
        logprobs=True,
        n=2,
        temperature=0.25,
        extra_body={"vendor_field": {"nested": [1, 2, 3]}},
    )
    sent = upstreams["small"][0].requests[-1]["body"]
    assert sent["tools"] == tools and sent["response_format"] == response_format
    assert sent["logprobs"] is True and sent["n"] == 2 and sent["temperature"] == 0.25
    assert sent["vendor_field"] == {"nested": [1, 2, 3]}
    assert sent["model"] == "small-served"


def test_direct_model_skips_the_probe(make_gateway: MakeGateway) -> None:
    gw = make_gateway()
    raw = client(gw).chat.completions.with_raw_response.create(
        model="large", messages=[{"role": "user", "content": "hi"}]
    )
    assert raw.headers["x-router-backend"] == "large"
    assert raw.headers["x-router-rule"] == "direct" and raw.headers["x-router-cache"] == "off"
    assert "x-router-score" not in raw.headers


def test_streaming_sync_and_async(make_gateway: MakeGateway) -> None:
    gw = make_gateway()
    chunks = list(
        client(gw).chat.completions.create(
            model="small-direct",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "tok0 tok1 tok2 "
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 8

    async def run() -> tuple[str, dict[str, str]]:
        aclient = openai.AsyncOpenAI(
            base_url=gw.url + "/v1", api_key="x", max_retries=0, timeout=20
        )
        raw = await aclient.chat.completions.with_raw_response.create(
            model="auto", messages=[{"role": "user", "content": REFERENCE[3]}], stream=True
        )
        out = ""
        async for chunk in raw.parse():
            out += chunk.choices[0].delta.content or ""
        await aclient.close()
        return out, dict(raw.headers)

    text, headers = asyncio.run(run())
    assert text == "tok0 tok1 tok2 "
    assert headers["content-type"].startswith("text/event-stream")
    assert headers["cache-control"] == "no-cache" and headers["x-accel-buffering"] == "no"
    assert headers["x-router-backend"] in ("small", "large") and "x-router-percentile" in headers


def test_async_non_streaming_and_completions(make_gateway: MakeGateway) -> None:
    gw = make_gateway()

    async def run() -> tuple[str, str]:
        aclient = openai.AsyncOpenAI(
            base_url=gw.url + "/v1", api_key="x", max_retries=0, timeout=20
        )
        chat = await aclient.chat.completions.create(
            model="auto", messages=[{"role": "user", "content": "hello"}]
        )
        text = await aclient.completions.create(model="auto", prompt="Once upon a time")
        await aclient.close()
        return chat.choices[0].message.content or "", text.choices[0].text

    chat, completion = asyncio.run(run())
    assert chat.startswith("answer from") and completion.startswith("answer from")


def test_replica_failover(make_gateway: MakeGateway, upstreams: Upstreams) -> None:
    dead = closed_port_url()
    gw = make_gateway(large_urls=[dead, upstreams["large"][1].url + "/v1"])
    c = client(gw)
    for _ in range(6):
        raw = c.chat.completions.with_raw_response.create(
            model="large", messages=[{"role": "user", "content": "hi"}]
        )
        assert raw.headers["x-router-backend"] == "large" and "x-router-fallback" not in raw.headers
    assert len(upstreams["large"][0].requests) == 6


def test_replicas_share_load(make_gateway: MakeGateway, upstreams: Upstreams) -> None:
    gw = make_gateway()
    c = client(gw)
    for _ in range(10):
        c.chat.completions.create(model="large", messages=[{"role": "user", "content": "hi"}])
    a, b = len(upstreams["large"][0].requests), len(upstreams["large2"][0].requests)
    assert a + b == 10 and a >= 3 and b >= 3


def test_fallback_on_upstream_500(make_gateway: MakeGateway, upstreams: Upstreams) -> None:
    upstreams["large"][0].mode = upstreams["large2"][0].mode = "error500"
    gw = make_gateway()
    raw = client(gw).chat.completions.with_raw_response.create(
        model="large", messages=[{"role": "user", "content": "hi"}]
    )
    assert raw.headers["x-router-backend"] == "small"
    assert raw.headers["x-router-fallback"] == "large"
    assert raw.parse().choices[0].message.content == "answer from small"
    metrics = httpx.get(gw.url + "/metrics").text
    assert 'sparsity_router_fallbacks_total{answered="small",failed="large"} 1.0' in metrics


def test_fallback_on_upstream_timeout(make_gateway: MakeGateway, upstreams: Upstreams) -> None:
    upstreams["large"][0].mode = upstreams["large2"][0].mode = "stall"
    gw = make_gateway(large_timeouts="timeouts: {connect_s: 1, read_s: 0.3, total_s: 0.6}")
    start = time.monotonic()
    raw = client(gw).chat.completions.with_raw_response.create(
        model="large", messages=[{"role": "user", "content": "hi"}]
    )
    assert (
        raw.headers["x-router-backend"] == "small" and raw.headers["x-router-fallback"] == "large"
    )
    assert time.monotonic() - start < 5
    # the stalled upstream requests were closed, not leaked
    assert wait_for(
        lambda: upstreams["large"][0].disconnects + upstreams["large2"][0].disconnects >= 1
    )


def test_upstream_4xx_is_passed_through(make_gateway: MakeGateway, upstreams: Upstreams) -> None:
    upstreams["small"][0].mode = "error400"
    gw = make_gateway()
    with pytest.raises(openai.BadRequestError) as info:
        client(gw).chat.completions.create(
            model="small", messages=[{"role": "user", "content": "hi"}]
        )
    assert info.value.body["param"] == "temperature"  # type: ignore[index]


def test_everything_down_is_a_503_envelope(make_gateway: MakeGateway, upstreams: Upstreams) -> None:
    upstreams["small"][0].mode = "error500"
    gw = make_gateway(large_urls=[closed_port_url()])
    r = httpx.post(
        gw.url + "/v1/chat/completions",
        json={"model": "large", "messages": [{"role": "user", "content": "x"}]},
        timeout=20,
    )
    assert r.status_code == 503
    error = r.json()["error"]
    assert error["type"] == "service_unavailable"
    # a generic message with the request id; the replica URLs and aiohttp's text stay in the log
    assert "no backend could answer" in error["message"]
    assert "cannot connect" not in error["message"]
    assert r.headers["x-router-request-id"] in error["message"]


def test_stream_cut_midway_ends_with_error_event_and_done(
    make_gateway: MakeGateway, upstreams: Upstreams
) -> None:
    upstreams["small"][0].mode = "cut"
    gw = make_gateway()
    body = {"model": "small", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    with httpx.stream("POST", gw.url + "/v1/chat/completions", json=body, timeout=20) as r:
        assert r.status_code == 200
        events = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    error = json.loads(events[-2][len("data: ") :])
    assert error["error"]["code"] == "upstream_stream_error"
    assert "broke" in error["error"]["message"]
    assert len(events) == 4  # two content chunks, the error, [DONE]
    with pytest.raises(openai.APIError):
        for _ in client(gw).chat.completions.create(
            model="small", messages=[{"role": "user", "content": "hi"}], stream=True
        ):
            pass


def test_client_disconnect_cancels_upstream_stream(
    make_gateway: MakeGateway, upstreams: Upstreams
) -> None:
    fake = upstreams["small"][0]
    fake.mode = "slow"
    gw = make_gateway()
    body = {"model": "small", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    with httpx.stream("POST", gw.url + "/v1/chat/completions", json=body, timeout=20) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(3)]
        assert any(line.startswith("data: ") for line in got)
    # 100 chunks at 50 ms would take 5 s; the upstream sees the disconnect well before that.
    assert wait_for(lambda: fake.disconnects == 1, timeout=3)
    assert fake.completed == 0


def test_client_disconnect_cancels_upstream_request(
    make_gateway: MakeGateway, upstreams: Upstreams
) -> None:
    fake = upstreams["small"][0]
    fake.mode = "stall"
    gw = make_gateway()
    body = {"model": "small", "messages": [{"role": "user", "content": "hi"}]}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(gw.url + "/v1/chat/completions", json=body, timeout=httpx.Timeout(5, read=0.5))
    assert wait_for(lambda: fake.disconnects == 1, timeout=3)


def test_probe_failure_goes_to_on_probe_error(
    make_gateway: MakeGateway, tiny_probe: SparsityProbe, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args: object, **kwargs: object) -> object:
        raise ProbeInputError("input 0 tokenizes to nothing: nothing to probe")

    gw = make_gateway()
    # blank text is no probe error any more (rule no_text: tests/router/test_hostile.py)
    for name in ("encode", "measure", "measure_one"):
        monkeypatch.setattr(tiny_probe, name, refuse)
    r = httpx.post(
        gw.url + "/v1/chat/completions",
        json={"model": "auto", "messages": [{"role": "user", "content": "unreadable"}]},
        timeout=20,
    )
    assert r.status_code == 200
    assert (
        r.headers["x-router-backend"] == "large" and r.headers["x-router-rule"] == "on_probe_error"
    )
    assert r.headers["x-router-probe-error"] == "1"
    assert (
        'sparsity_router_probe_errors_total{reason="input"} 1.0'
        in httpx.get(gw.url + "/metrics").text
    )


@pytest.mark.parametrize(
    ("content", "headers", "status", "fragment"),
    [
        (b"{not json", {}, 400, "could not parse the JSON body"),
        (b"[1, 2]", {}, 400, "must be a JSON object, not an array"),
        (b"", {}, 400, "body is empty"),
        (b'{"model": "auto"}', {}, 400, "'messages' is required"),
        (b'{"model": "auto", "messages": "hi"}', {}, 400, "'messages' must be a non-empty array"),
        (b'{"model": "auto", "messages": [{"content": "x"}]}', {}, 400, "messages[0].role"),
        (b'{"messages": [{"role": "user", "content": "x"}]}', {}, 400, "'model' is required"),
        (
            b'{"model": "gpt-17", "messages": [{"role": "user", "content": "x"}]}',
            {},
            404,
            "model 'gpt-17' not found; available: auto",
        ),
        (
            b'{"model": 7, "messages": [{"role": "user", "content": "x"}]}',
            {},
            422,
            "'model' must be a non-empty string",
        ),
        (
            b'{"model": "auto", "stream": "yes", "messages": [{"role": "user", "content": "x"}]}',
            {},
            422,
            "'stream' must be a boolean",
        ),
        (
            b'{"model": "auto", "messages": [{"role": "user", "content": "x"}]}' + b" " * 70000,
            {},
            413,
            "larger than the limit of 65536 bytes",
        ),
        (
            b'{"model": "auto", "messages": [{"role": "user", "content": "\xff\xfe"}]}',
            {},
            400,
            "not valid UTF-8",
        ),
        (b"[" * 100000 + b"]" * 100000, {}, 413, "larger than the limit"),
        (b'{"a":' * 5000 + b"1" + b"}" * 5000, {}, 400, "nested too deeply"),
    ],
)
def test_bad_input_gets_an_openai_error(
    make_gateway: MakeGateway, content: bytes, headers: dict[str, str], status: int, fragment: str
) -> None:
    gw = make_gateway()
    r = httpx.post(
        gw.url + "/v1/chat/completions",
        content=content,
        headers={"content-type": "application/json", **headers},
        timeout=20,
    )
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert fragment in error["message"]
    assert set(error) == {"message", "type", "param", "code"}


def test_auth(make_gateway: MakeGateway) -> None:
    gw = make_gateway(api_keys='["sk-good", "sk-other"]')
    with pytest.raises(openai.AuthenticationError) as info:
        client(gw, "sk-bad").chat.completions.create(
            model="auto", messages=[{"role": "user", "content": "hi"}]
        )
    assert "invalid API key" in str(info.value)
    assert httpx.get(gw.url + "/v1/models").status_code == 401
    ok = client(gw, "sk-other").chat.completions.create(
        model="auto", messages=[{"role": "user", "content": "hi"}]
    )
    assert ok.choices[0].message.content


def test_unknown_paths_and_methods_use_the_envelope(make_gateway: MakeGateway) -> None:
    gw = make_gateway()
    r = httpx.get(gw.url + "/v1/nope")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    r = httpx.get(gw.url + "/v1/chat/completions")
    assert r.status_code == 405 and "not allowed" in r.json()["error"]["message"]


def test_models_health_ready_metrics(make_gateway: MakeGateway) -> None:
    gw = make_gateway()
    ids = [m.id for m in client(gw).models.list()]
    assert ids[0] == "auto" and {"small", "large", "small-direct"} <= set(ids)
    assert httpx.get(gw.url + "/healthz").json() == {"status": "ok"}
    ready = httpx.get(gw.url + "/readyz").json()
    assert ready["status"] == "ready" and ready["calibration"] == "loaded"
    client(gw).chat.completions.create(model="auto", messages=[{"role": "user", "content": "hi"}])
    text = httpx.get(gw.url + "/metrics").text
    assert (
        "sparsity_router_requests_total{" in text and "sparsity_router_probe_seconds_bucket" in text
    )
    assert "sparsity_router_upstream_seconds_bucket" in text


def test_unexpected_error_on_the_hot_path_is_a_logged_500_envelope(
    make_gateway: MakeGateway, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import router.routes.openai as routes

    async def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("boom from a bug")

    gw = make_gateway()
    monkeypatch.setattr(routes, "dispatch", broken)
    body = {"model": "small", "messages": [{"role": "user", "content": "hi"}]}
    with caplog.at_level("ERROR", logger="router.app"):
        r = httpx.post(gw.url + "/v1/chat/completions", json=body, timeout=10)
    assert r.status_code == 500
    assert r.json()["error"]["type"] == "server_error"
    assert "boom" not in r.text  # no internals in the response
    assert any("boom from a bug" in str(rec.exc_info) for rec in caplog.records)


def test_keep_alive_connection_serves_many_requests(make_gateway: MakeGateway) -> None:
    """The disconnect watcher is stopped before it can see the end of a response: a kept-alive
    connection goes on serving, stream and not, with no request cancelled by mistake."""
    gw = make_gateway()
    with client(gw) as c:
        for i in range(30):
            messages = [{"role": "user", "content": f"question {i}"}]
            if i % 2:
                chunks = list(
                    c.chat.completions.create(model="small", messages=messages, stream=True)
                )  # type: ignore[arg-type]
                assert chunks
            else:
                answer = c.chat.completions.create(model="small", messages=messages)  # type: ignore[arg-type]
                assert answer.choices[0].message.content
