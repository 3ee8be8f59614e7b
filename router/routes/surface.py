"""What the routes beyond chat need: ``/v1/responses``, ``/v1/messages``, ``/v1/embeddings``.

They share :class:`router.routes.openai.CompletionsEndpoint` (auth, limits, probe, decision,
fallbacks, headers, events); this module holds what differs: which endpoints a cascade, the
usage tap or a human backend can serve (chat and completions only), and the error shape
(Anthropic's on ``/v1/messages``, so the ``anthropic`` SDK reads it; OpenAI's elsewhere).
"""

from __future__ import annotations

import json
from typing import Final

from router.anthropic import error_body
from router.asgi import Send, request_id_headers, send_error, send_json
from router.backends.base import Endpoint
from router.errors import BadRequest, HTTPError, UpstreamStatus
from router.wire import SSE_DONE

__all__ = ["CHAT_ENDPOINTS", "human_refusal", "send_endpoint_error", "stream_error_tail"]

#: The endpoints whose answers the gateway itself reads or writes (cascades, usage injection,
#: human answers); the others pass through.
CHAT_ENDPOINTS: Final = frozenset({"chat/completions", "completions"})


def human_refusal(endpoint: Endpoint, backend: str) -> BadRequest:
    """The 400 for a request on an endpoint a human backend cannot answer."""
    return BadRequest(
        f"backend {backend!r} is answered by people, on chat.completions and completions only; "
        f"route /v1/{endpoint} to an openai backend",
        param="model",
        code="unsupported_endpoint",
    )


def _upstream_message(exc: UpstreamStatus) -> str:
    """The message of an upstream's error body (OpenAI's or Anthropic's shape)."""
    try:
        payload = json.loads(exc.content)
        error = payload.get("error") if isinstance(payload, dict) else None
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return str(error["message"])
    except (ValueError, RecursionError):
        pass
    return f"the backend answered {exc.upstream_status}"


async def send_endpoint_error(
    send: Send, endpoint: Endpoint, exc: HTTPError, request_id: str | None = None
) -> None:
    """The error answer for ``endpoint``: :func:`router.asgi.send_error`, or on ``messages``
    Anthropic's ``{"type": "error", "error": {"type", "message"}}`` (same status and headers;
    an upstream's own error body is re-shaped, keeping its message)."""
    if endpoint != "messages":
        await send_error(send, exc, request_id)
        return
    headers = [(k.lower().encode(), v.encode()) for k, v in exc.headers.items()]
    if request_id:
        headers += request_id_headers(request_id)
    if isinstance(exc, UpstreamStatus):
        status, message = exc.upstream_status, _upstream_message(exc)
        body = error_body(status, message)
    else:
        status, message = exc.status, exc.client_message(request_id)
        body = error_body(status, message, exc.param, exc.code)
    await send_json(send, status, body, headers)


def stream_error_tail(endpoint: Endpoint, status: int, message: str, openai_event: bytes) -> bytes:
    """What ends a stream that broke or ran out of time: on ``messages`` Anthropic's
    ``event: error``; elsewhere ``openai_event`` and ``data: [DONE]``."""
    if endpoint == "messages":
        return b"event: error\ndata: " + error_body(status, message) + b"\n\n"
    return openai_event + SSE_DONE
