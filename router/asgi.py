"""Small ASGI helpers shared by the routes (plain ASGI: no framework, no buffering)."""

from __future__ import annotations

from starlette.types import Send

__all__ = ["send_json"]


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
