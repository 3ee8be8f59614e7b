"""Real servers for tests: uvicorn on loopback ports in a thread, and a fake OpenAI upstream.

Every server has a start and a stop timeout; fixtures stop what they start.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any

import uvicorn

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
    the connection) | slow (streams a chunk every 50 ms, 100 chunks). ``reply(body)``, when set,
    gives the text of a non-streamed answer (default: "answer from NAME").
    """

    name: str = "fake"
    mode: str = "ok"
    requests: list[dict[str, Any]] = field(default_factory=list)
    disconnects: int = 0
    completed: int = 0
    chunks: int = 3
    reply: Callable[[dict[str, Any]], str] | None = None

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
