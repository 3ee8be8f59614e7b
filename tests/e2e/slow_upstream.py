"""A fake OpenAI upstream run as its own process (one "replica" host of the multi-host test).

``python -m tests.e2e.slow_upstream --host ADDR --port PORT --name NAME [--interval-s 0.1]``

* ``GET /v1/models`` and ``GET /health``: 200 (readiness).
* ``POST /v1/chat/completions``: a chat completion whose text is ``answer from NAME``; with
  ``"stream": true``, ``max_tokens`` chunks (default 20) ``"NAME i "``, one every
  ``--interval-s`` seconds, then ``data: [DONE]``: slow enough for a partition to hit mid-stream.

Every answer names the replica, so a client behind the gateway sees which replica served it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

import uvicorn

from tests.servers import Receive, Scope, Send, receive_body, serve_lifespan

__all__ = ["SlowUpstream", "main"]


class SlowUpstream:
    """The ASGI app; see the module docstring."""

    def __init__(self, name: str, interval_s: float) -> None:
        self.name = name
        self.interval_s = interval_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await serve_lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        if scope["method"] == "GET":
            await _json(send, 200, {"object": "list", "data": [{"id": "fake", "object": "model"}]})
            return
        body = json.loads(await receive_body(receive) or b"{}")
        model = str(body.get("model", "fake"))
        if body.get("stream"):
            await self._stream(send, model, int(body.get("max_tokens") or 20))
            return
        await _json(
            send,
            200,
            {
                "id": "chatcmpl-fake",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": f"answer from {self.name}"},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8},
            },
        )

    async def _stream(self, send: Send, model: str, chunks: int) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream")],
            }
        )
        for i in range(chunks):
            chunk = {
                "id": "chatcmpl-fake",
                "object": "chat.completion.chunk",
                "created": int(time.time()),
                "model": model,
                "choices": [{"index": 0, "delta": {"content": f"{self.name} {i} "}}],
            }
            data = f"data: {json.dumps(chunk)}\n\n".encode()
            await send({"type": "http.response.body", "body": data, "more_body": True})
            await asyncio.sleep(self.interval_s)
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})


async def _json(send: Send, status: int, payload: dict[str, Any]) -> None:
    data = json.dumps(payload).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": data})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--interval-s", type=float, default=0.1)
    args = parser.parse_args(argv)
    uvicorn.run(
        SlowUpstream(args.name, args.interval_s),
        host=args.host,
        port=args.port,
        log_level="warning",
        lifespan="on",
    )


if __name__ == "__main__":
    main()
