"""Reading token usage from SSE bytes without changing what the client gets."""

from __future__ import annotations

import itertools
import json

import pytest

from router.usage import Usage, UsageTap, client_wants_usage, request_usage, usage_of_body


def _event(obj: object) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


CONTENT = [
    _event({"choices": [{"index": 0, "delta": {"content": f"t{i}"}}], "usage": None})
    for i in range(3)
]
USAGE = _event({"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 3}})
DONE = b"data: [DONE]\n\n"
STREAM = b"".join([*CONTENT, USAGE, DONE])


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = [0, *cuts, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(points)]


@pytest.mark.parametrize("cut", range(1, len(STREAM), 7))
def test_passive_tap_reads_usage_and_forwards_every_byte(cut: int) -> None:
    tap = UsageTap(strip=False)
    out = b"".join(tap.feed(c) for c in _split(STREAM, [cut, min(len(STREAM), cut + 3)]))
    out += tap.flush()
    assert out == STREAM
    assert tap.usage == Usage(7, 3)


@pytest.mark.parametrize("cut", range(1, len(STREAM), 5))
def test_strip_tap_drops_only_the_usage_chunk(cut: int) -> None:
    tap = UsageTap(strip=True)
    out = b"".join(tap.feed(c) for c in _split(STREAM, [cut]))
    out += tap.flush()
    assert out == b"".join([*CONTENT, DONE])
    assert tap.usage == Usage(7, 3)


def test_strip_tap_byte_by_byte_and_crlf() -> None:
    crlf = STREAM.replace(b"\n", b"\r\n")
    tap = UsageTap(strip=True)
    out = b"".join(tap.feed(crlf[i : i + 1]) for i in range(len(crlf))) + tap.flush()
    assert out == crlf.replace(USAGE.replace(b"\n", b"\r\n"), b"")
    assert tap.usage == Usage(7, 3)


def test_no_usage_and_garbage() -> None:
    tap = UsageTap(strip=True)
    data = b'data: {"usage": broken\n\n' + b"".join(CONTENT) + b"data: unterminated"
    assert tap.feed(data) + tap.flush() == data
    assert tap.usage is None


def test_body_usage_and_request_helpers() -> None:
    body = json.dumps({"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 4}})
    assert usage_of_body(body.encode()) == Usage(5, 4)
    assert usage_of_body(b'{"usage": {"prompt_tokens": true}}') == Usage(None, None)
    assert usage_of_body(b"not json usage") is None and usage_of_body(None) is None
    assert not client_wants_usage({"stream": True})
    assert client_wants_usage({"stream_options": {"include_usage": True}})
    asked = request_usage({"stream": True, "stream_options": {"x": 1}})
    assert asked == {"stream": True, "stream_options": {"x": 1, "include_usage": True}}
    assert request_usage({"stream_options": "bad"}) is None


def test_responses_and_messages_usage_shapes_are_read() -> None:
    responses = b'{"object": "response", "usage": {"input_tokens": 7, "output_tokens": 3}}'
    assert usage_of_body(responses) == Usage(7, 3)
    messages = b'{"type": "message", "usage": {"input_tokens": 11, "output_tokens": 2}}'
    assert usage_of_body(messages) == Usage(11, 2)
    tap = UsageTap(strip=False)
    stream = (
        b'event: response.output_text.delta\ndata: {"type": "response.output_text.delta"}\n\n'
        b'event: response.completed\ndata: {"type": "response.completed", "response": '
        b'{"usage": {"input_tokens": 5, "output_tokens": 9}}}\n\n'
    )
    assert tap.feed(stream) == stream  # read, never changed
    assert tap.usage == Usage(5, 9)
