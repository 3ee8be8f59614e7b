"""OpenAI-shaped answers written by the gateway itself: a ticket, or a reviewer's reply.

``completion_body`` gives a ``chat.completion`` (or ``text_completion`` for
``/v1/completions``) whose id is the escalation's; ``sse_chunks`` the same text as a stream of
chunks ending in ``data: [DONE]``. The shapes come from :mod:`router.wire`; usage is zero (no
model generated the text).
"""

from __future__ import annotations

from router.backends.base import Endpoint
from router.wire import (
    SSE_DONE,
    Completion,
    StreamHead,
    completion,
    completion_id,
    json_bytes,
    sse_event,
    usage_object,
)

__all__ = ["completion_body", "completion_dict", "sse_chunks"]


def _endpoint(endpoint: str) -> Endpoint:
    return "completions" if endpoint == "completions" else "chat/completions"


def completion_dict(
    endpoint: str, id: str, model: str, text: str, created: int | None = None
) -> Completion:
    """The answer ``text`` to escalation ``id`` (``created``: now when not given)."""
    wire_endpoint = _endpoint(endpoint)
    return completion(
        wire_endpoint,
        id=completion_id(wire_endpoint, id),
        model=model,
        text=text,
        finish_reason="stop",
        usage=usage_object(0, 0),
        created=created,
    )


def completion_body(endpoint: str, id: str, model: str, text: str) -> bytes:
    return json_bytes(completion_dict(endpoint, id, model, text))


def sse_chunks(endpoint: str, id: str, model: str, text: str) -> bytes:
    """The answer as a stream: one chunk with the text, one with the finish reason, [DONE]."""
    head = StreamHead.new(_endpoint(endpoint), model, key=id)
    chunks = (head.chunk(text, role="assistant"), head.chunk(None, "stop"))
    return b"".join(sse_event(c) for c in chunks) + SSE_DONE
