"""The OpenAI wire module: bodies, chunks, usage, SSE framing and the error envelope."""

from __future__ import annotations

import json
from typing import Any

from router.errors import BadRequest
from router.wire import (
    SSE_DONE,
    SSE_HEADERS,
    StreamHead,
    completion,
    completion_id,
    envelope,
    json_bytes,
    sse_data,
    sse_error,
    sse_event,
    usage_object,
)


def decoded(raw: bytes) -> Any:
    assert raw.startswith(b"data: ") and raw.endswith(b"\n\n") and raw.count(b"\n\n") == 1
    return json.loads(raw[6:])


def test_usage_and_ids() -> None:
    assert usage_object(3, 4) == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    assert completion_id("chat/completions", "abc") == "chatcmpl-abc"
    assert completion_id("completions", "abc") == "cmpl-abc"
    fresh = completion_id("chat/completions")
    assert fresh.startswith("chatcmpl-") and fresh != completion_id("chat/completions")


def test_completion_bodies() -> None:
    usage = usage_object(1, 2)
    chat = completion(
        "chat/completions", id="chatcmpl-1", model="m", text="hi", finish_reason="stop",
        usage=usage, created=5,
    )  # fmt: skip
    assert json.loads(json_bytes(chat)) == {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 5,
        "model": "m",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "hi"},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": usage,
    }
    text = completion(
        "completions", id="cmpl-1", model="m", text="hi", finish_reason="length", usage=usage
    )
    assert text["object"] == "text_completion" and isinstance(text["created"], int)
    assert text["choices"] == [
        {"index": 0, "text": "hi", "logprobs": None, "finish_reason": "length"}
    ]


def test_chat_chunks() -> None:
    head = StreamHead("chat/completions", "chatcmpl-7", 9, "m")
    first = head.chunk("", role="assistant")
    assert first == {
        "id": "chatcmpl-7",
        "object": "chat.completion.chunk",
        "created": 9,
        "model": "m",
        "choices": [
            {
                "index": 0,
                "delta": {"role": "assistant", "content": ""},
                "logprobs": None,
                "finish_reason": None,
            }
        ],
    }
    last = head.chunk(None, "stop")
    assert last["choices"][0]["delta"] == {} and last["choices"][0]["finish_reason"] == "stop"
    assert "usage" not in last and "system_fingerprint" not in last


def test_text_chunks_with_usage_and_fingerprint() -> None:
    head = StreamHead("completions", "cmpl-7", 9, "m", system_fingerprint="fp", usage_field=True)
    piece = head.chunk(" 4", index=2)
    assert piece["object"] == "text_completion" and piece["system_fingerprint"] == "fp"
    assert piece["choices"] == [{"index": 2, "text": " 4", "logprobs": None, "finish_reason": None}]
    assert piece["usage"] is None
    assert head.chunk(None, "stop")["choices"][0]["text"] == ""
    usage = head.usage_chunk(usage_object(2, 1))
    assert usage["choices"] == [] and usage["usage"] == usage_object(2, 1)
    fresh = StreamHead.new("completions", "m", key="k")
    assert fresh.id == "cmpl-k" and fresh.model == "m" and not fresh.usage_field


def test_sse_framing_and_errors() -> None:
    assert SSE_DONE == b"data: [DONE]\n\n"
    assert dict(SSE_HEADERS)[b"content-type"] == b"text/event-stream"
    head = StreamHead("chat/completions", "chatcmpl-1", 1, "m")
    event = sse_event(head.chunk("héllo"))
    assert "héllo".encode() in event  # UTF-8, not escaped
    assert decoded(event)["choices"][0]["delta"] == {"content": "héllo"}
    assert sse_data(b"{}") == b"data: {}\n\n"
    error = {"message": "broke", "type": "upstream_error", "param": None, "code": "x"}
    assert decoded(sse_error("broke", "upstream_error", code="x")) == {"error": error}
    assert json.loads(envelope("bad", "invalid_request_error", "model")) == {
        "error": {"message": "bad", "type": "invalid_request_error", "param": "model", "code": None}
    }
    assert BadRequest("bad", param="model").body() == envelope(
        "bad", "invalid_request_error", "model"
    )
