"""A policy's cascade: the small backend answers first and the probe reads that answer.

The request goes to the checked backend without streaming; the probe then reads the prompt plus
the answer (``answer_input``), the answer calibration gives P(the large model does better), and
the route decides (``Cascade.when``) whether to return the answer or ask ``escalate_to``. A client
that asked for a stream gets the kept answer as server-sent events (``as_sse``): one chunk with
the whole text, one with the finish reason, the usage chunk when ``stream_options.include_usage``
asked for it, then ``[DONE]`` — what the OpenAI SDKs read as a stream.

Answers the probe cannot read as one text (several choices, tool calls, no content) are returned
unchecked (``skipped``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import Any, Literal

from probes.answers import answer_input
from router.backends.base import Endpoint
from router.usage import client_wants_usage
from router.wire import SSE_DONE, StreamHead, completion_id, sse_event

__all__ = ["Verdict", "answer_input", "answer_text", "as_sse", "without_stream"]

Verdict = Literal["kept", "escalated", "skipped", "escalation_failed"]


def without_stream(body: Mapping[str, Any]) -> dict[str, Any]:
    """The request body asking for one JSON answer (no ``stream``, no ``stream_options``)."""
    out = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
    out["stream"] = False
    return out


def answer_text(endpoint: Endpoint, body: bytes | None) -> str | None:
    """The answer's text, or None when it is not one plain text (unreadable JSON, several
    choices, tool calls, empty content)."""
    try:
        data = json.loads(body or b"")
    except ValueError:
        return None
    choices = data.get("choices") if isinstance(data, dict) else None
    if not isinstance(choices, list) or len(choices) != 1 or not isinstance(choices[0], dict):
        return None
    choice = choices[0]
    if endpoint == "completions":
        text = choice.get("text")
    else:
        message = choice.get("message")
        if not isinstance(message, dict) or message.get("tool_calls"):
            return None
        text = message.get("content")
    return text if isinstance(text, str) and text.strip() else None


def as_sse(endpoint: Endpoint, body: bytes, request: Mapping[str, Any]) -> bytes:
    """A complete JSON answer as the server-sent events of a stream (``answer_text`` must have
    accepted it)."""
    data = json.loads(body)
    choice = data["choices"][0]
    usage: Any = data.get("usage")  # the upstream's own object, passed on as is
    with_usage = client_wants_usage(request) and isinstance(usage, dict)
    fingerprint = data.get("system_fingerprint")
    head = StreamHead(
        endpoint,
        id=data.get("id") or completion_id(endpoint),
        created=data.get("created") or int(time.time()),
        model=data.get("model") or "",
        system_fingerprint=fingerprint if isinstance(fingerprint, str) else None,
        usage_field=with_usage,
    )
    finish = choice.get("finish_reason") or "stop"
    index = choice.get("index", 0)
    if endpoint == "completions":
        first = head.chunk(choice["text"], index=index)
    else:
        message = choice["message"]
        first = head.chunk(message["content"], role=message.get("role") or "assistant", index=index)
    chunks = [first, head.chunk(None, finish, index=index)]
    if with_usage:
        chunks.append(head.usage_chunk(usage))
    return b"".join(sse_event(c) for c in chunks) + SSE_DONE
