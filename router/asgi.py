"""Small ASGI helpers shared by the routes (plain ASGI: no framework, no buffering).

Reading a request (:func:`read_body`, :class:`Disconnected` when the client goes away first),
answering one (:func:`send_json`, :func:`send_error`; :class:`SentTracker` remembers what went
out), and cancelling work when the client disconnects (:class:`DisconnectWatcher`).

Request ids: :func:`request_id_of` takes the client's ``x-request-id`` (or
``x-router-request-id``) when it is sane (1 to 200 printable ASCII characters), else makes one;
answers carry it in both headers (:func:`request_id_headers`). Headers decided before the answer
(the rate limit's) wait in the scope (:func:`add_response_headers`) until a :class:`SentTracker`
made with that scope starts the response.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any, Final

from router.errors import HTTPError, PayloadTooLarge, RequestTimeout, UpstreamStatus

__all__ = [
    "DisconnectWatcher",
    "Disconnected",
    "Message",
    "Receive",
    "Scope",
    "Send",
    "SentTracker",
    "add_response_headers",
    "read_body",
    "request_id_headers",
    "request_id_of",
    "send_error",
    "send_json",
]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

#: Where :func:`add_response_headers` leaves headers in the ASGI scope.
_RESPONSE_HEADERS: Final = "sparsity_router.response_headers"

#: A client's request id we adopt: printable ASCII, no more than 200 characters.
_SANE_ID: Final = re.compile(rb"[\x21-\x7e][\x20-\x7e]{0,199}")


def request_id_of(scope: Scope) -> str:
    """The client's ``x-request-id`` (else ``x-router-request-id``) when sane, stripped of
    surrounding spaces; otherwise a new random id (32 hex digits)."""
    found: dict[bytes, bytes] = {}
    for key, value in scope.get("headers", ()):
        if key in (b"x-request-id", b"x-router-request-id") and key not in found:
            found[key] = bytes(value).strip()
    for name in (b"x-request-id", b"x-router-request-id"):
        value = found.get(name)
        if value is not None and _SANE_ID.fullmatch(value):
            return value.decode("ascii")
    return uuid.uuid4().hex


def request_id_headers(request_id: str) -> list[tuple[bytes, bytes]]:
    """``x-request-id`` and ``x-router-request-id``, both naming ``request_id``."""
    value = request_id.encode()
    return [(b"x-request-id", value), (b"x-router-request-id", value)]


def add_response_headers(scope: Scope, headers: Iterable[tuple[bytes, bytes]]) -> None:
    """Headers for the answer to this request, added by a :class:`SentTracker` made with
    ``scope`` when the response starts (unless the answer sets the same names itself)."""
    headers = list(headers)
    if headers:
        scope.setdefault(_RESPONSE_HEADERS, []).extend(headers)


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


async def send_error(send: Send, exc: HTTPError, request_id: str | None = None) -> None:
    """An error answer: the error envelope, or an upstream's own error status and body.

    With ``request_id`` the answer carries ``x-request-id`` and ``x-router-request-id`` and the
    envelope names it where the message is generic
    (:meth:`~router.errors.HTTPError.client_message`)."""
    headers = [(k.lower().encode(), v.encode()) for k, v in exc.headers.items()]
    if request_id:
        headers += request_id_headers(request_id)
    if isinstance(exc, UpstreamStatus):
        await send(
            {
                "type": "http.response.start",
                "status": exc.upstream_status,
                "headers": [(b"content-type", exc.content_type.encode()), *headers],
            }
        )
        await send({"type": "http.response.body", "body": exc.content})
        return
    await send_json(send, exc.status, exc.body(request_id), headers)


class Disconnected(Exception):
    """The client went away before its request body was read."""


async def read_body(
    receive: Receive,
    limit: int,
    *,
    timeout_s: float | None = None,
    timeout_setting: str = "server.body_timeout_s",
) -> bytes:
    """The whole request body; :class:`~router.errors.PayloadTooLarge` past ``limit`` bytes,
    :class:`~router.errors.RequestTimeout` when it has not all arrived within ``timeout_s``
    (the setting named ``timeout_setting``), :class:`Disconnected` when the client disconnects
    first."""
    if timeout_s is None:
        return await _read_body(receive, limit)
    try:
        async with asyncio.timeout(timeout_s):
            return await _read_body(receive, limit)
    except TimeoutError:
        raise RequestTimeout(
            f"the request body did not arrive within {timeout_s:g} s ({timeout_setting})"
        ) from None


async def _read_body(receive: Receive, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise Disconnected
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(
                f"the request body is larger than the limit of {limit} bytes "
                "(server.max_body_bytes)"
            )
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


class SentTracker:
    """A ``send`` that remembers what went out: whether the response has started and ended,
    and how its body ends (:attr:`stream_done`: a stream's closing ``data: [DONE]`` is out).

    State changes after the wrapped ``send`` returns, so a send cut short by a cancellation
    does not count. With ``scope``, the response starts with the headers
    :func:`add_response_headers` left there too.
    """

    __slots__ = ("_scope", "_send", "complete", "started", "tail")

    def __init__(self, send: Send, scope: Scope | None = None) -> None:
        self._send = send
        self._scope = scope
        self.started = False
        self.complete = False
        self.tail = b""  # the last bytes of the body sent so far

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start" and self._scope is not None:
            extra = self._scope.get(_RESPONSE_HEADERS)
            if extra:
                headers = list(message.get("headers", ()))
                names = {bytes(k).lower() for k, _ in headers}
                headers += [(k, v) for k, v in extra if k not in names]
                message = {**message, "headers": headers}
        await self._send(message)
        if message["type"] == "http.response.start":
            self.started = True
            return
        body = message.get("body", b"")
        if body:
            self.tail = (self.tail + body)[-32:]
        if not message.get("more_body", False):
            self.complete = True

    @property
    def stream_done(self) -> bool:
        """The body sent so far ends with ``data: [DONE]``: the client has the whole stream."""
        return self.tail.rstrip().endswith(b"data: [DONE]")

    @property
    def at_event_boundary(self) -> bool:
        """The body sent so far ends between two server-sent events (or is empty)."""
        return not self.tail or self.tail.endswith((b"\n\n", b"\r\n\r\n"))


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
