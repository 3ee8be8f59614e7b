"""A replica that breaks a stream off mid-way counts against that replica, and every upstream
timeout names the deadline that ran out (found by tests/e2e/test_multihost.py: a replica
partitioned mid-stream got the next request too, and the errors blamed ``total_s``)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator

import pytest

from router.backends.openai import OpenAIBackend
from router.errors import UpstreamTimeout
from tests.servers import (
    FakeUpstream,
    Receive,
    Scope,
    Send,
    ServerThread,
    receive_body,
    serve_lifespan,
)

pytestmark = pytest.mark.anyio

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


class StallsMidStream:
    """Streams one chunk, then sends nothing more until the client leaves; ``stall_first``:
    sends nothing at all (not even headers) until then. Non-streamed requests get an answer."""

    def __init__(self, *, stall_first: bool = False) -> None:
        self.stall_first = stall_first

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await serve_lifespan(receive, send)
            return
        body = await receive_body(receive)
        if self.stall_first:
            await _until_disconnect(receive)
            return
        stream = bool(json.loads(body).get("stream"))
        content_type = b"text/event-stream" if stream else b"application/json"
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", content_type)],
            }
        )
        if not stream:
            answer = {"choices": [{"index": 0, "message": {"content": "stalling replica"}}]}
            await send({"type": "http.response.body", "body": json.dumps(answer).encode()})
            return
        chunk = {"choices": [{"index": 0, "delta": {"content": "first "}}]}
        data = b"data: " + json.dumps(chunk).encode() + b"\n\n"
        await send({"type": "http.response.body", "body": data, "more_body": True})
        await _until_disconnect(receive)


async def _until_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


@pytest.fixture
def stalling() -> Iterator[ServerThread]:
    with ServerThread(StallsMidStream()) as server:
        yield server


@pytest.fixture
def healthy() -> Iterator[ServerThread]:
    with ServerThread(FakeUpstream(name="healthy")) as server:
        yield server


async def test_a_stream_broken_off_sends_the_next_requests_to_the_other_replica(
    stalling: ServerThread, healthy: ServerThread
) -> None:
    """Replica A (tried first) stalls after one chunk: the stream ends with an UpstreamTimeout
    naming read_s within about read_s, and A's breaker opens (failures: 1), so the next
    requests, which A would otherwise share by rotation, all go to B."""
    a, b = stalling.url + "/v1", healthy.url + "/v1"
    backend = OpenAIBackend("main", [a, b], read_s=0.3, breaker_failures=1, breaker_cooldown_s=60)
    try:
        result = await backend.send("chat/completions", {**CHAT, "stream": True}, stream=True)
        assert result.replica == a and result.stream is not None
        chunks: list[bytes] = []
        start = time.monotonic()
        with pytest.raises(UpstreamTimeout, match=r"stalled: no data for 0\.3 s"):
            async for chunk in result.stream:
                chunks.append(chunk)
                start = time.monotonic()
        assert 0.2 < time.monotonic() - start < 2.0
        assert chunks and b"first" in chunks[0]
        await result.close()
        replicas = []
        for _ in range(4):
            answer = await backend.send("chat/completions", CHAT, stream=False)
            replicas.append(answer.replica)
        assert replicas == [b] * 4
        breaker = backend._replicas[0].breaker
        assert breaker is not None and breaker.state == "open"
    finally:
        await backend.aclose()


async def test_a_stream_that_completes_keeps_the_replica_in_rotation(
    healthy: ServerThread,
) -> None:
    """The control: a stream read to its end counts nothing against the replica."""
    backend = OpenAIBackend("main", [healthy.url + "/v1"], breaker_failures=1)
    try:
        result = await backend.send("chat/completions", {**CHAT, "stream": True}, stream=True)
        assert result.stream is not None
        body = b"".join([chunk async for chunk in result.stream])
        await result.close()
        assert body.rstrip().endswith(b"data: [DONE]")
        breaker = backend._replicas[0].breaker
        assert breaker is not None and breaker.state == "closed"
        assert backend._replicas[0].down_until < time.monotonic()
    finally:
        await backend.aclose()


async def test_a_silent_replica_is_a_timeout_naming_read_s_not_total_s() -> None:
    """No headers within read_s: the error names timeouts.read_s (it used to say "no answer
    within 600 s", the total_s that had not run out)."""
    with ServerThread(StallsMidStream(stall_first=True)) as server:
        backend = OpenAIBackend(
            "main", [server.url + "/v1"], read_s=0.2, total_s=600, retry=None, breaker_failures=None
        )
        try:
            start = time.monotonic()
            with pytest.raises(UpstreamTimeout) as caught:
                await asyncio.wait_for(
                    backend.send("chat/completions", CHAT, stream=False), timeout=10
                )
            assert "no data for 0.2 s (timeouts.read_s)" in caught.value.message
            assert "600 s" not in caught.value.message and "total_s" not in caught.value.message
            assert time.monotonic() - start < 5
        finally:
            await backend.aclose()
