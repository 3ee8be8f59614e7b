"""The cascade's pieces: which answers it can read, what the probe reads, the replayed stream."""

from __future__ import annotations

import json
from typing import Any

import pytest

from probes.answers import answer_input
from router.cascade import answer_text, as_sse, without_stream


def chat_body(*choices: dict[str, Any], usage: bool = True) -> bytes:
    body: dict[str, Any] = {
        "id": "chatcmpl-9",
        "object": "chat.completion",
        "created": 7,
        "model": "small-served",
        "choices": list(choices),
    }
    if usage:
        body["usage"] = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    return json.dumps(body).encode()


def message(content: Any, **extra: Any) -> dict[str, Any]:
    return {
        "index": 0,
        "message": {"role": "assistant", "content": content, **extra},
        "finish_reason": "length",
    }


@pytest.mark.parametrize(
    ("body", "text"),
    [
        (chat_body(message("Paris.")), "Paris."),
        (chat_body(message("   ")), None),
        (chat_body(message(None, tool_calls=[{"id": "c", "type": "function"}])), None),
        (chat_body(message("a", tool_calls=[{"id": "c", "type": "function"}])), None),
        (chat_body(message("a"), message("b")), None),
        (chat_body(), None),
        (b"not json", None),
        (b"[1, 2]", None),
        (None, None),
    ],
)
def test_answer_text_reads_one_plain_text_only(body: bytes | None, text: str | None) -> None:
    assert answer_text("chat/completions", body) == text


def test_answer_text_of_a_completion() -> None:
    body = json.dumps({"choices": [{"index": 0, "text": " 4", "finish_reason": "stop"}]})
    assert answer_text("completions", body.encode()) == " 4"


def test_the_probe_reads_the_conversation_with_the_answer_last() -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    assert answer_input("chat/completions", messages, " 4\n") == [
        *messages,
        {"role": "assistant", "content": "4"},
    ]
    assert answer_input("completions", "2 + 2 =", "4") == [
        {"role": "user", "content": "2 + 2 ="},
        {"role": "assistant", "content": "4"},
    ]
    assert messages[-1]["role"] == "user"  # the request's list is not changed


def test_the_first_call_is_not_streamed() -> None:
    body = {"model": "auto", "stream": True, "stream_options": {"include_usage": True}, "n": 1}
    assert without_stream(body) == {"model": "auto", "n": 1, "stream": False}
    assert body["stream"] is True


def events(raw: bytes) -> list[Any]:
    assert raw.endswith(b"data: [DONE]\n\n")
    parts = [p for p in raw.decode().split("\n\n") if p]
    assert all(p.startswith("data: ") for p in parts)
    return [json.loads(p[6:]) for p in parts[:-1]]


def test_a_kept_chat_answer_replays_as_chunks() -> None:
    body = chat_body(message("Paris."))
    chunks = events(as_sse("chat/completions", body, {"stream": True}))
    assert [c["object"] for c in chunks] == ["chat.completion.chunk"] * 2
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": "Paris."}
    assert chunks[1]["choices"][0] == {
        "index": 0,
        "delta": {},
        "logprobs": None,
        "finish_reason": "length",
    }
    assert all("usage" not in c for c in chunks)  # the client did not ask for it
    assert {c["id"] for c in chunks} == {"chatcmpl-9"} and chunks[0]["created"] == 7
    with_usage = events(
        as_sse(
            "chat/completions", body, {"stream": True, "stream_options": {"include_usage": True}}
        )
    )
    assert with_usage[-1]["choices"] == [] and with_usage[-1]["usage"]["total_tokens"] == 5
    assert [c["usage"] for c in with_usage[:-1]] == [None, None]  # as OpenAI sends it


def test_a_kept_completion_replays_as_text_chunks() -> None:
    body = json.dumps(
        {"id": "cmpl-1", "choices": [{"index": 0, "text": " 4", "finish_reason": None}]}
    ).encode()
    chunks = events(as_sse("completions", body, {"stream": True}))
    assert [c["choices"][0]["text"] for c in chunks] == [" 4", ""]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert chunks[0]["object"] == "text_completion"
