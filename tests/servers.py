"""Real servers for tests: uvicorn on loopback ports in a thread, and a fake OpenAI upstream.

Every server has a start and a stop timeout; fixtures stop what they start.
"""

from __future__ import annotations

import asyncio
import base64
import json
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import uvicorn

ROOT = Path(__file__).resolve().parents[1]

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


class ServerThread:
    """Run an ASGI app with uvicorn on 127.0.0.1:<free port> in a background thread."""

    def __init__(self, app: Any, *, lifespan: str = "on") -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port: int = self.sock.getsockname()[1]
        config = uvicorn.Config(
            app, lifespan=lifespan, log_level="warning", timeout_graceful_shutdown=2
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("server thread died during start-up")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"server did not start within {timeout} s")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        if self.thread.is_alive():
            self.server.force_exit = True
            self.thread.join(timeout)
        self.sock.close()

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


async def receive_body(receive: Receive) -> bytes:
    """The whole request body of an ASGI http scope."""
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            return body


async def serve_lifespan(receive: Receive, send: Send) -> None:
    """Answer an ASGI lifespan scope: nothing to start or stop."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


@dataclass
class FakeUpstream:
    """A fake OpenAI-compatible server (the upstream LLM), steered by ``mode``.

    modes: ok | error500 | error400 | stall (never answers) | cut (streams two chunks, then drops
    the connection) | slow (streams a chunk every 50 ms, 100 chunks) | tools (like ok, but a
    request offering ``tools`` whose last message is not a tool result is answered, streamed or
    not, with one call of the first tool, arguments ``tool_arguments``). ``reply(body)``, when
    set, gives the text of a non-streamed answer (default: "answer from NAME").

    Besides chat and completions it answers ``/v1/responses`` (a response, or its SSE events),
    ``/v1/embeddings`` (floats, or base64 when asked) and ``/v1/messages`` (an Anthropic
    message, or its SSE events), in every mode but the error and stall ones.
    """

    name: str = "fake"
    mode: str = "ok"
    requests: list[dict[str, Any]] = field(default_factory=list)
    disconnects: int = 0
    completed: int = 0
    chunks: int = 3
    reply: Callable[[dict[str, Any]], str] | None = None
    tool_arguments: dict[str, Any] = field(default_factory=lambda: {"city": "Paris"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await serve_lifespan(receive, send)
            return
        path = scope["path"]
        if scope["method"] == "GET" and path.endswith("/models"):
            await _json(
                send,
                200,
                {"object": "list", "data": [{"id": f"{self.name}-model", "object": "model"}]},
            )
            return
        raw = await receive_body(receive)
        body = json.loads(raw)
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        self.requests.append({"path": path, "body": body, "headers": headers})
        mode = self.mode
        if mode == "error500":
            await _json(send, 500, {"error": {"message": "boom", "type": "server_error"}})
        elif mode == "error400":
            await _json(
                send,
                400,
                {
                    "error": {
                        "message": "bad field",
                        "type": "invalid_request_error",
                        "param": "temperature",
                        "code": None,
                    }
                },
            )
        elif mode == "stall":
            await self._until_disconnect(receive)
        elif path.endswith("/embeddings"):
            await _json(send, 200, _embeddings(body))
            self.completed += 1
        elif path.endswith("/responses") or path.endswith("/messages"):
            events = _response_events if path.endswith("/responses") else _message_events
            answer = events(body, f"answer from {self.name}")
            if body.get("stream"):
                await _sse(send, answer)
            else:
                await _json(send, 200, answer[-1][1]["response"])
            self.completed += 1
        elif mode == "tools" and self._wants_tool_call(body):
            await self._tool_call(body, receive, send)
        elif body.get("stream"):
            await self._stream(body, receive, send)
        else:
            await _json(send, 200, self._completion(body, path))
            self.completed += 1

    async def _until_disconnect(self, receive: Receive) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                self.disconnects += 1
                return

    @staticmethod
    def _wants_tool_call(body: dict[str, Any]) -> bool:
        messages = body.get("messages") or [{}]
        return bool(body.get("tools")) and messages[-1].get("role") != "tool"

    async def _tool_call(self, body: dict[str, Any], receive: Receive, send: Send) -> None:
        """Answer with one call of the first offered tool (mode "tools")."""
        name = body["tools"][0]["function"]["name"]
        arguments = json.dumps(self.tool_arguments)
        call = {"id": "call_1", "type": "function", "function": {"name": name}}
        usage = {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9}
        if not body.get("stream"):
            message = {
                "role": "assistant",
                "content": None,
                "tool_calls": [{**call, "function": {"name": name, "arguments": arguments}}],
            }
            choice = {"index": 0, "message": message, "finish_reason": "tool_calls"}
            await _json(
                send,
                200,
                {
                    "id": "chatcmpl-1",
                    "object": "chat.completion",
                    "created": 1,
                    "model": body.get("model"),
                    "choices": [choice],
                    "usage": usage,
                },
            )
            self.completed += 1
            return
        half = len(arguments) // 2
        deltas: list[tuple[dict[str, Any], str | None]] = [
            ({"role": "assistant", "content": None}, None),
            (
                {"tool_calls": [{"index": 0, **call, "function": {"name": name, "arguments": ""}}]},
                None,
            ),
            ({"tool_calls": [{"index": 0, "function": {"arguments": arguments[:half]}}]}, None),
            ({"tool_calls": [{"index": 0, "function": {"arguments": arguments[half:]}}]}, None),
            ({}, "tool_calls"),
        ]
        events = b""
        for delta, finish in deltas:
            chunk = {
                "id": "chatcmpl-1",
                "object": "chat.completion.chunk",
                "created": 1,
                "model": body.get("model"),
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            }
            events += b"data: " + json.dumps(chunk).encode() + b"\n\n"
        if (body.get("stream_options") or {}).get("include_usage"):
            tail = {
                "id": "chatcmpl-1",
                "object": "chat.completion.chunk",
                "created": 1,
                "model": body.get("model"),
                "choices": [],
                "usage": usage,
            }
            events += b"data: " + json.dumps(tail).encode() + b"\n\n"
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream")],
            }
        )
        await send({"type": "http.response.body", "body": events + b"data: [DONE]\n\n"})
        self.completed += 1

    def _completion(self, body: dict[str, Any], path: str) -> dict[str, Any]:
        text = self.reply(body) if self.reply is not None else f"answer from {self.name}"
        if path.endswith("/completions") and not path.endswith("chat/completions"):
            return {
                "id": "cmpl-1",
                "object": "text_completion",
                "created": 1,
                "model": body.get("model"),
                "choices": [{"index": 0, "text": text, "finish_reason": "stop", "logprobs": None}],
                "usage": {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9},
            }
        return {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "created": 1,
            "model": body.get("model"),
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9},
            "echo": {k: v for k, v in body.items() if k not in ("messages",)},
        }

    async def _stream(self, body: dict[str, Any], receive: Receive, send: Send) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream")],
            }
        )
        n = 100 if self.mode == "slow" else self.chunks
        disconnected = asyncio.Event()

        async def watch() -> None:
            await self._until_disconnect(receive)
            disconnected.set()

        watcher = asyncio.ensure_future(watch())
        try:
            for i in range(n):
                if disconnected.is_set():
                    return
                chunk = {
                    "id": "chatcmpl-1",
                    "object": "chat.completion.chunk",
                    "created": 1,
                    "model": body.get("model"),
                    "choices": [
                        {
                            "index": 0,
                            "delta": {"content": f"tok{i} "}
                            if i
                            else {"role": "assistant", "content": f"tok{i} "},
                            "finish_reason": None,
                        }
                    ],
                }
                await send(
                    {
                        "type": "http.response.body",
                        "body": b"data: " + json.dumps(chunk).encode() + b"\n\n",
                        "more_body": True,
                    }
                )
                if self.mode == "cut" and i == 1:
                    raise RuntimeError("fake upstream drops the connection mid-stream")
                if self.mode == "slow":
                    await asyncio.sleep(0.05)
            final = {
                "id": "chatcmpl-1",
                "object": "chat.completion.chunk",
                "created": 1,
                "model": body.get("model"),
                "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
            }
            tail = b"data: " + json.dumps(final).encode() + b"\n\n"
            if (body.get("stream_options") or {}).get("include_usage"):
                usage = {
                    "id": "chatcmpl-1",
                    "object": "chat.completion.chunk",
                    "created": 1,
                    "model": body.get("model"),
                    "choices": [],
                    "usage": {"prompt_tokens": 5, "completion_tokens": n, "total_tokens": 5 + n},
                }
                tail += b"data: " + json.dumps(usage).encode() + b"\n\n"
            await send(
                {
                    "type": "http.response.body",
                    "body": tail + b"data: [DONE]\n\n",
                    "more_body": False,
                }
            )
            self.completed += 1
        finally:
            watcher.cancel()


async def _json(send: Send, status: int, payload: dict[str, Any]) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": json.dumps(payload).encode()})


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Poll ``predicate`` until it holds or ``timeout`` seconds pass; its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def free_port() -> int:
    """A loopback port nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_serve(
    *args: str, env: Mapping[str, str] | None = None
) -> tuple[subprocess.Popen[bytes], str]:
    """``python -m cli.main serve ARGS --port <free port>`` run from the repository root, its
    output piped; the process and its base URL (see :func:`wait_ready`, :func:`stop_serve`)."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli.main", "serve", *args, "--port", str(port)],
        cwd=ROOT,
        env=None if env is None else dict(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    return proc, f"http://127.0.0.1:{port}"


def wait_ready(
    proc: subprocess.Popen[bytes], base: str, timeout: float = 90.0, poll_s: float = 0.2
) -> None:
    """Wait until the serve process at ``base`` answers ``/readyz`` with 200 (fail if it exits)."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
            raise AssertionError(f"gateway exited during start-up:\n{out[-3000:]}")
        try:
            if httpx.get(base + "/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, f"gateway at {base} not ready in {timeout} s"
        time.sleep(poll_s)


def stop_serve(proc: subprocess.Popen[bytes]) -> str:
    """SIGTERM a serve process (killed after 20 s); what it wrote."""
    proc.send_signal(signal.SIGTERM)
    try:
        out, _ = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate(timeout=10)
    return out.decode(errors="replace") if out else ""


async def _sse(send: Send, events: list[tuple[str, dict[str, Any]]]) -> None:
    """Send ``events`` (name, data) as one SSE stream, one chunk each."""
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"text/event-stream")],
        }
    )
    for name, data in events:
        data = {k: v for k, v in data.items() if k != "response" or name != "message_stop"}
        chunk = f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()
        await send({"type": "http.response.body", "body": chunk, "more_body": True})
    await send({"type": "http.response.body", "body": b""})


def _embeddings(body: dict[str, Any]) -> dict[str, Any]:
    inputs = body.get("input")
    texts = inputs if isinstance(inputs, list) else [inputs]
    data = []
    for i, text in enumerate(texts):
        vector = [float(len(str(text))), float(i), 0.5]
        embedding: Any = vector
        if body.get("encoding_format") == "base64":
            embedding = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
        data.append({"object": "embedding", "index": i, "embedding": embedding})
    return {
        "object": "list",
        "data": data,
        "model": body.get("model"),
        "usage": {"prompt_tokens": len(texts), "total_tokens": len(texts)},
    }


def _response_events(body: dict[str, Any], text: str) -> list[tuple[str, dict[str, Any]]]:
    """A Responses API stream; the last event's ``response`` is the non-streamed answer."""
    message = {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "status": "completed",
        "content": [{"type": "output_text", "text": text, "annotations": []}],
    }

    def response(status: str, output: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": "resp_1",
            "object": "response",
            "created_at": 1,
            "status": status,
            "model": body.get("model"),
            "output": output,
            "parallel_tool_calls": True,
            "tool_choice": "auto",
            "tools": [],
            "usage": {
                "input_tokens": 5,
                "output_tokens": 4,
                "total_tokens": 9,
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens_details": {"reasoning_tokens": 0},
            },
        }

    words = text.split(" ")
    events: list[tuple[str, dict[str, Any]]] = [
        ("response.created", {"type": "response.created", "response": response("in_progress", [])})
    ]
    for n, word in enumerate(words):
        delta = {
            "type": "response.output_text.delta",
            "item_id": "msg_1",
            "output_index": 0,
            "content_index": 0,
            "delta": word if n == 0 else " " + word,
            "sequence_number": n + 1,
        }
        events.append(("response.output_text.delta", delta))
    done = {"type": "response.completed", "response": response("completed", [message])}
    events.append(("response.completed", done))
    return events


def _message_events(body: dict[str, Any], text: str) -> list[tuple[str, dict[str, Any]]]:
    """An Anthropic Messages stream; the last event's ``response`` (not sent) is the
    non-streamed answer."""
    usage = {"input_tokens": 5, "output_tokens": 4}
    message = {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": body.get("model"),
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": usage,
    }
    done = {**message, "content": [{"type": "text", "text": text}], "stop_reason": "end_turn"}
    block = {"type": "text", "text": ""}
    start = {"type": "content_block_start", "index": 0, "content_block": block}
    delta = {"type": "text_delta", "text": text}
    return [
        ("message_start", {"type": "message_start", "message": message}),
        ("content_block_start", start),
        ("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": delta}),
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        (
            "message_delta",
            {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": usage},
        ),
        ("message_stop", {"type": "message_stop", "response": done}),
    ]


_Server = TypeVar("_Server", bound=ServerThread)


class ServerPool:
    """The servers one fixture starts (:meth:`start`), all stopped when its ``with`` block ends."""

    def __init__(self) -> None:
        self.running: list[ServerThread] = []

    def start(self, server: _Server, timeout: float = 60.0) -> _Server:
        server.start(timeout)
        self.running.append(server)
        return server

    def __enter__(self) -> ServerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        for server in self.running:
            server.stop()
