"""Small ASGI helpers shared by the routes (plain ASGI: no framework, no buffering)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

__all__ = ["DisconnectWatcher", "Message", "Receive", "Scope", "Send", "send_json"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


async def send_json(
    send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    """A complete JSON answer: status, content-type and content-length, then the body."""
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class DisconnectWatcher:
    """Cancel ``task`` when the client disconnects (``receive`` yields ``http.disconnect``).

    Stopped (synchronously) as soon as the answer is sent: uvicorn's ``receive`` also reports a
    disconnect once the response is complete, which must not cancel anything.
    """

    __slots__ = ("_watch", "fired")

    def __init__(self, receive: Receive, task: asyncio.Task[Any]) -> None:
        self.fired = False

        async def watch() -> None:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    self.fired = True
                    task.cancel()
                    return

        self._watch = asyncio.get_running_loop().create_task(watch())

    def stop(self) -> None:
        self._watch.cancel()
