"""OpenAI-shaped answers written by the gateway itself: a ticket, or a reviewer's reply.

``completion_body`` gives a ``chat.completion`` (or ``text_completion`` for
``/v1/completions``); ``sse_chunks`` the same text as a stream of chunks ending in
``data: [DONE]``.
"""

from __future__ import annotations

import json
import time
from typing import Any

__all__ = ["completion_body", "completion_dict", "sse_chunks"]


def completion_dict(
    endpoint: str, id: str, model: str, text: str, created: int | None = None
) -> dict[str, Any]:
    created = int(time.time()) if created is None else created
    usage = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    if endpoint == "completions":
        return {
            "id": f"cmpl-{id}",
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "text": text, "finish_reason": "stop", "logprobs": None}],
            "usage": usage,
        }
    return {
        "id": f"chatcmpl-{id}",
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": "stop",
            }
        ],
        "usage": usage,
    }


def completion_body(endpoint: str, id: str, model: str, text: str) -> bytes:
    return json.dumps(completion_dict(endpoint, id, model, text)).encode()


def sse_chunks(endpoint: str, id: str, model: str, text: str) -> bytes:
    created = int(time.time())
    if endpoint == "completions":
        base: dict[str, Any] = {
            "id": f"cmpl-{id}",
            "object": "text_completion",
            "created": created,
            "model": model,
        }
        first = {**base, "choices": [{"index": 0, "text": text, "finish_reason": None}]}
        last = {**base, "choices": [{"index": 0, "text": "", "finish_reason": "stop"}]}
    else:
        base = {
            "id": f"chatcmpl-{id}",
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
        }
        delta = {"role": "assistant", "content": text}
        first = {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
        last = {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
    return b"".join(b"data: " + json.dumps(event).encode() + b"\n\n" for event in (first, last)) + (
        b"data: [DONE]\n\n"
    )
