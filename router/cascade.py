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
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

from router.usage import client_wants_usage

if TYPE_CHECKING:
    from probes.probe import ProbeInput
    from router.backends.base import Endpoint

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


def answer_input(endpoint: Endpoint, probe_input: ProbeInput, text: str) -> ProbeInput:
    """What the probe reads to check an answer: the conversation with the answer as the
    assistant's turn (the shape ``calibrate --labels --answer-column`` fits on)."""
    answer = {"role": "assistant", "content": text.strip()}
    if endpoint == "completions" or isinstance(probe_input, str):
        return [{"role": "user", "content": str(probe_input)}, answer]
    return [*probe_input, answer]


def as_sse(endpoint: Endpoint, body: bytes, request: Mapping[str, Any]) -> bytes:
    """A complete JSON answer as the server-sent events of a stream (``answer_text`` must have
    accepted it)."""
    data = json.loads(body)
    choice = data["choices"][0]
    base = {k: data[k] for k in ("id", "created", "model", "system_fingerprint") if k in data}
    finish = choice.get("finish_reason") or "stop"
    index = choice.get("index", 0)
    if endpoint == "completions":
        base["object"] = "text_completion"
        chunks = [
            {**base, "choices": [{"index": index, "text": choice["text"], "finish_reason": None}]},
            {**base, "choices": [{"index": index, "text": "", "finish_reason": finish}]},
        ]
    else:
        base["object"] = "chat.completion.chunk"
        message = choice["message"]
        delta = {"role": message.get("role") or "assistant", "content": message["content"]}
        chunks = [
            {**base, "choices": [{"index": index, "delta": delta, "finish_reason": None}]},
            {**base, "choices": [{"index": index, "delta": {}, "finish_reason": finish}]},
        ]
    if client_wants_usage(request) and isinstance(data.get("usage"), dict):
        chunks.append({**base, "choices": [], "usage": data["usage"]})
    events = [b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks]
    return b"".join(events) + b"data: [DONE]\n\n"
