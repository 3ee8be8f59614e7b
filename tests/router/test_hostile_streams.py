"""Regressions from a hardening report (official openai SDK, curl, raw sockets against the gateway
on a real uvicorn port): how streams are recorded, what error envelopes reveal, and the
request and body deadlines.

1. A complete stream from the in-process backend is a 200 in metrics and events, also when the
   client closes its socket right after ``data: [DONE]`` (it used to be a 499).
3. A stream the upstream breaks mid-way is recorded as a 502 (the client still gets the error
   event and ``[DONE]``).
4. Upstream failures reach the client as a generic message with the request id; the detail
   (URLs, aiohttp text) goes to the log.
6. ``server.request_timeout_s`` bounds the whole request (504 before the first byte, an error
   event after it) and ``server.body_timeout_s`` the request body (408).
"""

from __future__ import annotations

import json
import logging
import re
import socket
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.router.conftest import closed_port_url
from tests.router.escalation_helpers import escalation_yaml
from tests.servers import FakeUpstream, ServerThread, wait_for

Upstreams = dict[str, tuple[FakeUpstream, ServerThread]]
ServeYaml = Callable[[str], ServerThread]

MESSAGES: Any = [{"role": "user", "content": "What is two plus two?"}]
STREAM = {"model": "auto", "messages": MESSAGES, "stream": True}
LONG_STREAM = {**STREAM, "ignore_eos": True, "max_tokens": 4000}  # with max_new_tokens: 4000
# What the report saw leak into envelopes: replica URLs, aiohttp's and Python's own text.
LEAKS = ("127.0.0.1", "http://", "Cannot connect", "ssl:", "Connect call", "Payload", "Error:")


def client(gw: ServerThread) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key="none", max_retries=0, timeout=30)


def requests_total(gw: ServerThread, backend: str, status: int) -> float:
    """``sparsity_router_requests_total`` summed over rules for one backend and status."""
    text = httpx.get(gw.url + "/metrics", timeout=10).text
    labels = f'backend="{re.escape(backend)}",rule="[^"]*",status="{status}"'
    pattern = re.compile(r"^sparsity_router_requests_total\{" + labels + r"\} (\S+)$", re.M)
    return sum(float(m) for m in pattern.findall(text))


def stream_error(gw: ServerThread, body: dict[str, Any] = STREAM) -> dict[str, Any]:
    """The error event that ends a raw streamed chat completion (checked: ``[DONE]`` follows)."""
    with httpx.stream("POST", gw.url + "/v1/chat/completions", json=body, timeout=30) as r:
        events = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    error: dict[str, Any] = json.loads(events[-2][len("data: ") :])["error"]
    return error


def broken_stream(gw: ServerThread) -> tuple[str, openai.APIError, int]:
    """A stream read through the SDK that ends in an error: its request id, the error, and how
    many chunks came before it."""
    with client(gw).chat.completions.with_streaming_response.create(
        model="auto", messages=MESSAGES, stream=True
    ) as raw:
        received = 0
        with pytest.raises(openai.APIError) as info:
            for _chunk in raw.parse():
                received += 1
        return raw.headers["x-router-request-id"], info.value, received


def event_rows(path: Path) -> list[dict[str, Any]]:
    with sqlite3.connect(path) as db:
        db.row_factory = sqlite3.Row
        return [dict(r) for r in db.execute("SELECT * FROM requests ORDER BY time")]


def local_yaml(model_dir: Path, server: str = "{}") -> str:
    """The embedded default's shape: the probe's own model answers in-process."""
    return f"""
server: {server}
probe: {{model: "{model_dir}", layers: [1, 2, -1], token_mean: true, timeout_s: 10}}
backends:
  small: {{type: local, max_new_tokens: 12}}
policies:
  default: {{default: small, on_probe_error: small}}
events: {{sink: sqlite, path: events.sqlite}}
"""


def openai_yaml(model_dir: Path, url: str, server: str = "{}") -> str:
    """One openai-compatible backend ``large`` at ``url`` (its own timeouts far away)."""
    return f"""
server: {server}
probe: {{model: "{model_dir}", layers: [1, 2, -1], token_mean: true, timeout_s: 10}}
backends:
  large:
    type: openai
    base_urls: ["{url}"]
    model: large-served
    timeouts: {{connect_s: 5, read_s: 60, total_s: 60}}
policies:
  default: {{default: large, on_probe_error: large}}
events: {{sink: sqlite, path: events.sqlite}}
"""


# -- 1. complete local streams are 200s ----------------------------------------------------------


def test_complete_local_streams_are_recorded_as_200(
    tiny_model_dir: Path, serve_yaml: ServeYaml, tmp_path: Path
) -> None:
    gw = serve_yaml(local_yaml(tiny_model_dir))
    c = client(gw)
    ids: list[str] = []
    for _ in range(6):  # the SDK reads to [DONE], then closes the stream
        with c.chat.completions.with_streaming_response.create(
            model="auto", messages=MESSAGES, stream=True, temperature=0
        ) as raw:
            ids.append(raw.headers["x-router-request-id"])
            for _chunk in raw.parse():
                pass
    for _ in range(6):  # the socket closes the moment [DONE] arrives
        with httpx.stream("POST", gw.url + "/v1/chat/completions", json=STREAM, timeout=30) as r:
            assert r.status_code == 200
            ids.append(r.headers["x-router-request-id"])
            lines = r.iter_lines()
            assert any(line == "data: [DONE]" for line in lines)
        # leaving the block closes the connection without reading the end of the response
    assert wait_for(lambda: requests_total(gw, "small", 200) == 12)
    assert requests_total(gw, "small", 499) == 0
    gw.stop()  # drains the event queue
    statuses = {row["request_id"]: row["status"] for row in event_rows(tmp_path / "events.sqlite")}
    assert statuses == dict.fromkeys(ids, 200)


def test_a_client_gone_before_done_is_still_a_499(
    tiny_model_dir: Path, serve_yaml: ServeYaml
) -> None:
    # The other side of item 1: going away mid-stream is not a success.
    yaml = local_yaml(tiny_model_dir).replace("max_new_tokens: 12", "max_new_tokens: 4000")
    gw = serve_yaml(yaml)
    with httpx.stream("POST", gw.url + "/v1/chat/completions", json=LONG_STREAM, timeout=30) as r:
        assert r.status_code == 200
        next(r.iter_lines())
    assert wait_for(lambda: requests_total(gw, "small", 499) == 1)
    assert requests_total(gw, "small", 200) == 0


# -- 3. a stream the upstream breaks is a 502 ---------------------------------------------------


def test_stream_broken_by_the_upstream_is_recorded_as_502(
    tiny_model_dir: Path, upstreams: Upstreams, serve_yaml: ServeYaml, tmp_path: Path
) -> None:
    fake, server = upstreams["large"]
    fake.mode = "cut"
    gw = serve_yaml(openai_yaml(tiny_model_dir, server.url + "/v1"))
    rid, error, received = broken_stream(gw)
    assert received == 2  # the two chunks before the cut, then the error event
    assert rid in error.message
    # the error event is followed by [DONE]
    assert stream_error(gw)["code"] == "upstream_stream_error"
    assert wait_for(lambda: requests_total(gw, "large", 502) == 2)
    assert requests_total(gw, "large", 200) == 0
    gw.stop()
    rows = event_rows(tmp_path / "events.sqlite")
    assert [row["status"] for row in rows] == [502, 502]
    assert rows[0]["request_id"] == rid


# -- 4. envelopes reveal nothing ----------------------------------------------------------------


def test_upstream_down_gives_a_generic_503_with_the_request_id(
    tiny_model_dir: Path, serve_yaml: ServeYaml, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    url = closed_port_url()
    gw = serve_yaml(openai_yaml(tiny_model_dir, url))
    with pytest.raises(openai.InternalServerError) as info:
        client(gw).chat.completions.create(model="auto", messages=MESSAGES)
    exc = info.value
    assert exc.status_code == 503
    rid = exc.response.headers["x-router-request-id"]
    error = exc.response.json()["error"]
    assert error["type"] == "service_unavailable"
    assert rid in error["message"]
    assert not [leak for leak in LEAKS if leak in error["message"]], error["message"]
    # the detail is in the log, with the request id
    assert wait_for(
        lambda: any(
            r.levelno == logging.WARNING and rid in r.getMessage() and url in r.getMessage()
            for r in caplog.records
        )
    ), [r.getMessage() for r in caplog.records]


def test_mid_stream_error_event_is_generic_and_logged(
    tiny_model_dir: Path,
    upstreams: Upstreams,
    serve_yaml: ServeYaml,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    fake, server = upstreams["large"]
    fake.mode = "cut"
    gw = serve_yaml(openai_yaml(tiny_model_dir, server.url + "/v1"))
    rid, error, _ = broken_stream(gw)
    message = error.message
    assert rid in message
    assert not [leak for leak in LEAKS if leak in message], message
    assert wait_for(
        lambda: any(
            r.levelno == logging.WARNING and rid in r.getMessage() and "broke" in r.getMessage()
            for r in caplog.records
        )
    )


def test_client_errors_keep_their_specific_message(
    tiny_model_dir: Path, serve_yaml: ServeYaml
) -> None:
    gw = serve_yaml(openai_yaml(tiny_model_dir, closed_port_url()))
    with pytest.raises(openai.NotFoundError) as info:
        client(gw).chat.completions.create(model="no-such-model", messages=MESSAGES)
    assert "no-such-model" in info.value.message


# -- 6. deadlines -------------------------------------------------------------------------------


def test_request_deadline_before_the_first_byte_is_a_504(
    tiny_model_dir: Path, upstreams: Upstreams, serve_yaml: ServeYaml, tmp_path: Path
) -> None:
    fake, server = upstreams["large"]
    fake.mode = "stall"  # never answers; the backend's own timeouts are a minute away
    gw = serve_yaml(openai_yaml(tiny_model_dir, server.url + "/v1", "{request_timeout_s: 1}"))
    start = time.monotonic()
    with pytest.raises(openai.InternalServerError) as info:
        client(gw).chat.completions.create(model="auto", messages=MESSAGES)
    assert time.monotonic() - start < 20
    exc = info.value
    assert exc.status_code == 504
    error = exc.response.json()["error"]
    assert error["type"] == "timeout"
    assert exc.response.headers["x-router-request-id"] in error["message"]
    assert wait_for(lambda: fake.disconnects == 1)  # the upstream request was cancelled
    assert requests_total(gw, "large", 504) == 1
    gw.stop()
    assert [row["status"] for row in event_rows(tmp_path / "events.sqlite")] == [504]


def test_request_deadline_mid_stream_ends_with_an_error_event(
    tiny_model_dir: Path, upstreams: Upstreams, serve_yaml: ServeYaml, tmp_path: Path
) -> None:
    fake, server = upstreams["large"]
    fake.mode = "slow"  # a chunk every 50 ms for 5 s
    gw = serve_yaml(openai_yaml(tiny_model_dir, server.url + "/v1", "{request_timeout_s: 1}"))
    received: list[Any] = []
    with pytest.raises(openai.APIError) as info:
        for chunk in client(gw).chat.completions.create(
            model="auto", messages=MESSAGES, stream=True
        ):
            received.append(chunk)
    assert 0 < len(received) < 100
    assert "did not complete" in info.value.message
    error = stream_error(gw)
    assert (error["type"], error["code"]) == ("timeout", "request_timeout")
    assert wait_for(lambda: fake.disconnects == 2)  # both upstream streams were cancelled
    assert fake.completed == 0
    assert requests_total(gw, "large", 504) == 2
    gw.stop()
    assert [row["status"] for row in event_rows(tmp_path / "events.sqlite")] == [504, 504]


def test_request_deadline_also_bounds_a_local_stream(
    tiny_model_dir: Path, serve_yaml: ServeYaml
) -> None:
    yaml = local_yaml(tiny_model_dir, "{request_timeout_s: 1}")
    gw = serve_yaml(yaml.replace("max_new_tokens: 12", "max_new_tokens: 4000"))
    assert stream_error(gw, LONG_STREAM)["type"] == "timeout"
    assert requests_total(gw, "small", 504) == 1
    # the generation was stopped with the request
    assert wait_for(
        lambda: not [t for t in threading.enumerate() if t.name.startswith("local-generate-")]
    )


def test_a_human_hold_is_not_cut_by_the_request_deadline(
    tiny_model_dir: Path, tiny_calibration: Path, upstreams: Upstreams, serve_yaml: ServeYaml
) -> None:
    # hold mode keeps the request open up to wait_s, which adds to server.request_timeout_s:
    # nobody answers, so after 2.5 s the on_timeout backend does (not a 504 after 1 s)
    small_url = upstreams["small"][1].url + "/v1"
    text = escalation_yaml(tiny_model_dir, tiny_calibration, small_url, wait_s=2.5, auth=False)
    gw = serve_yaml("server: {request_timeout_s: 1}\n" + text)
    raw = client(gw).chat.completions.with_raw_response.create(model="ask-human", messages=MESSAGES)
    assert raw.headers["x-router-fallback"] == "holder"
    assert raw.parse().choices[0].message.content == "answer from small"
    assert requests_total(gw, "small", 200) == 1


def test_stalled_request_body_gets_a_408(tiny_model_dir: Path, serve_yaml: ServeYaml) -> None:
    gw = serve_yaml(
        openai_yaml(tiny_model_dir, closed_port_url(), "{body_timeout_s: 1, request_timeout_s: 60}")
    )
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\n"
        b"content-length: 200\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", gw.port), timeout=20) as sock:
        sock.sendall(head + b'{"model": "auto", "mess')  # ... and nothing more
        answer = b""
        while chunk := sock.recv(65536):  # the gateway answers, then closes the connection
            answer += chunk
    status_line, _, rest = answer.partition(b"\r\n")
    assert status_line == b"HTTP/1.1 408 Request Timeout", answer
    envelope = json.loads(rest.partition(b"\r\n\r\n")[2])
    assert envelope["error"]["type"] == "invalid_request_error"
    assert "body_timeout_s" in envelope["error"]["message"]
