"""A policy's cascade: the small backend answers first and the probe reads that answer.

The request goes to the checked backend without streaming; the probe then reads the prompt plus the
answer (:func:`probes.answers.answer_input`), the answer calibration gives P(the large model does
better), and the route decides (``Cascade.when``) whether to return the answer or ask
``escalate_to``. A client that asked for a stream gets the kept answer as server-sent events
(``as_sse``): one chunk with the whole text, one with the finish reason, the usage chunk when
``stream_options.include_usage`` asked for it, then ``[DONE]`` — what the OpenAI SDKs read as a
stream.

Answers the probe cannot read as one text (several choices, tool calls, no content) are returned
unchecked (``skipped``), streamed whole when the client asked for a stream (tool calls included).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import Any, Literal, cast

from router.backends.base import Endpoint
from router.usage import client_wants_usage
from router.wire import SSE_DONE, StreamHead, completion_id, sse_data, sse_event

__all__ = ["Verdict", "answer_text", "as_sse", "without_stream"]

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
    """A complete JSON answer as the server-sent events of a stream: for each choice, one chunk
    with its text (chat: its role and content, and its ``tool_calls``, each with its ``index``,
    ``function_call`` and ``refusal`` when present), then one finish chunk per choice, the usage
    chunk when asked for, ``[DONE]``. So a ``skipped`` answer (tool calls, several choices)
    reaches a streaming client whole."""
    data = json.loads(body)
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
    choices = [(k, c) for k, c in enumerate(data["choices"]) if isinstance(c, dict)]
    firsts: list[bytes] = []
    finishes: list[bytes] = []
    for k, choice in choices:
        index = choice.get("index", k)
        if endpoint == "completions":
            firsts.append(sse_event(head.chunk(choice.get("text") or "", index=index)))
        else:
            firsts.append(_chat_first(head, choice.get("message") or {}, index))
        finish = choice.get("finish_reason") or "stop"
        finishes.append(sse_event(head.chunk(None, finish, index=index)))
    tail = [sse_event(head.usage_chunk(usage))] if with_usage else []
    return b"".join([*firsts, *finishes, *tail]) + SSE_DONE


def _chat_first(head: StreamHead, message: Mapping[str, Any], index: int) -> bytes:
    """A chat choice's first chunk: role, content and what else its message carries."""
    chunk = cast(
        dict[str, Any],
        head.chunk(message.get("content"), role=message.get("role") or "assistant", index=index),
    )
    delta = chunk["choices"][0]["delta"]
    tool_calls = message.get("tool_calls")
    if isinstance(tool_calls, list) and tool_calls:
        delta["tool_calls"] = [
            {"index": i, **call} if isinstance(call, dict) else call
            for i, call in enumerate(tool_calls)
        ]
    for key in ("function_call", "refusal"):
        if message.get(key) is not None:
            delta[key] = message[key]
    return sse_data(json.dumps(chunk, ensure_ascii=False).encode())
