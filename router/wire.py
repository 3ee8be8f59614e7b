"""The OpenAI wire format, for everything the gateway writes itself.

Backends' own answers pass through untouched; this module shapes what the gateway composes:
the local backend's answers, a cascade's kept answer replayed as a stream, an escalation's
ticket or reviewer reply, the error events of a broken stream and every error response.

- Bodies: :func:`completion` gives a ``chat.completion`` (``/v1/chat/completions``) or a
  ``text_completion`` (``/v1/completions``) with one choice and its ``usage``
  (:func:`usage_object`); :func:`json_bytes` encodes it.
- Streams: a :class:`StreamHead` holds what every chunk of one answer shares (id, created,
  model) and builds its ``chat.completion.chunk`` / ``text_completion`` chunks and the last,
  usage-only chunk (``choices: []``) that ``stream_options.include_usage`` asks for.
- Server-sent events: :func:`sse_event` frames a JSON payload as ``data: ...\\n\\n``,
  :data:`SSE_DONE` is the closing ``data: [DONE]`` line, :func:`sse_error` an error event
  (the error envelope as a ``data:`` line), :data:`SSE_HEADERS` the response headers of a stream.
- Errors: :func:`envelope` gives ``{"error": {"message", "type", "param", "code"}}``, the
  body of every error response (:class:`router.errors.HTTPError` renders itself with it).

Every choice carries ``"logprobs": null`` and every chunk of a stream that asked for usage
carries ``"usage": null``, as the OpenAI API does.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Final, Literal, NotRequired, TypedDict

from router.backends.base import Endpoint

__all__ = [
    "SSE_CONTENT_TYPE",
    "SSE_DONE",
    "SSE_HEADERS",
    "SSE_NO_BUFFERING",
    "ChatChoice",
    "ChatChunkChoice",
    "ChatCompletion",
    "ChatCompletionChunk",
    "ChatDelta",
    "ChatMessage",
    "Chunk",
    "Completion",
    "ErrorBody",
    "ErrorDetail",
    "StreamHead",
    "TextChoice",
    "TextChunkChoice",
    "TextCompletion",
    "TextCompletionChunk",
    "UsageObject",
    "completion",
    "completion_id",
    "envelope",
    "error_body",
    "json_bytes",
    "sse_data",
    "sse_error",
    "sse_event",
    "usage_object",
]


# -- shapes ---------------------------------------------------------------------------------


class UsageObject(TypedDict):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatMessage(TypedDict):
    role: str
    content: str


class ChatChoice(TypedDict):
    index: int
    message: ChatMessage
    logprobs: None
    finish_reason: str


class TextChoice(TypedDict):
    index: int
    text: str
    logprobs: None
    finish_reason: str


class ChatCompletion(TypedDict):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: UsageObject


class TextCompletion(TypedDict):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[TextChoice]
    usage: UsageObject


Completion = ChatCompletion | TextCompletion


class ChatDelta(TypedDict, total=False):
    role: str
    content: str


class ChatChunkChoice(TypedDict):
    index: int
    delta: ChatDelta
    logprobs: None
    finish_reason: str | None


class TextChunkChoice(TypedDict):
    index: int
    text: str
    logprobs: None
    finish_reason: str | None


class ChatCompletionChunk(TypedDict):
    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    system_fingerprint: NotRequired[str]
    choices: list[ChatChunkChoice]
    usage: NotRequired[UsageObject | None]


class TextCompletionChunk(TypedDict):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    system_fingerprint: NotRequired[str]
    choices: list[TextChunkChoice]
    usage: NotRequired[UsageObject | None]


Chunk = ChatCompletionChunk | TextCompletionChunk


class _ChunkStamp(TypedDict):
    """What the chunks of both endpoints share after ``id`` and ``object``."""

    created: int
    model: str
    system_fingerprint: NotRequired[str]
    usage: NotRequired[UsageObject | None]


class ErrorDetail(TypedDict):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(TypedDict):
    error: ErrorDetail


# -- bodies ---------------------------------------------------------------------------------


def usage_object(prompt_tokens: int, completion_tokens: int) -> UsageObject:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_id(endpoint: Endpoint, key: str | None = None) -> str:
    """``chatcmpl-<key>`` or ``cmpl-<key>``; a fresh random key when none is given."""
    prefix = "chatcmpl" if endpoint == "chat/completions" else "cmpl"
    return f"{prefix}-{uuid.uuid4().hex if key is None else key}"


def completion(
    endpoint: Endpoint,
    *,
    id: str,
    model: str,
    text: str,
    finish_reason: str,
    usage: UsageObject,
    created: int | None = None,
) -> Completion:
    """A complete answer with one choice (``created``: now when not given)."""
    created = int(time.time()) if created is None else created
    if endpoint == "chat/completions":
        return {
            "id": id,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": None,
                    "finish_reason": finish_reason,
                }
            ],
            "usage": usage,
        }
    return {
        "id": id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}],
        "usage": usage,
    }


@dataclass(frozen=True, slots=True)
class StreamHead:
    """What every chunk of one streamed answer shares.

    ``usage_field``: the client asked for usage (``stream_options.include_usage``), so every
    chunk carries ``"usage": null`` and the stream ends with :meth:`usage_chunk`.
    """

    endpoint: Endpoint
    id: str
    created: int
    model: str
    system_fingerprint: str | None = None
    usage_field: bool = False

    @classmethod
    def new(
        cls, endpoint: Endpoint, model: str, *, key: str | None = None, usage_field: bool = False
    ) -> StreamHead:
        """A head created now, with :func:`completion_id` of ``key``."""
        return cls(
            endpoint, completion_id(endpoint, key), int(time.time()), model, None, usage_field
        )

    def chunk(
        self,
        text: str | None,
        finish_reason: str | None = None,
        *,
        role: str | None = None,
        index: int = 0,
    ) -> Chunk:
        """One choice's chunk. Chat: a delta with ``role`` (when given) and ``content`` (when
        ``text`` is not None); completions: ``text`` ("" for None)."""
        if self.endpoint == "chat/completions":
            delta: ChatDelta = {}
            if role is not None:
                delta["role"] = role
            if text is not None:
                delta["content"] = text
            chat: ChatCompletionChunk = {
                **self._chat_head(),
                "choices": [
                    {
                        "index": index,
                        "delta": delta,
                        "logprobs": None,
                        "finish_reason": finish_reason,
                    }
                ],
            }
            if self.usage_field:
                chat["usage"] = None
            return chat
        plain: TextCompletionChunk = {
            **self._text_head(),
            "choices": [
                {
                    "index": index,
                    "text": text or "",
                    "logprobs": None,
                    "finish_reason": finish_reason,
                }
            ],
        }
        if self.usage_field:
            plain["usage"] = None
        return plain

    def usage_chunk(self, usage: UsageObject) -> Chunk:
        """The last chunk of a stream that asked for usage: no choices, the usage."""
        if self.endpoint == "chat/completions":
            return {**self._chat_head(), "choices": [], "usage": usage}
        return {**self._text_head(), "choices": [], "usage": usage}

    def _stamp(self) -> _ChunkStamp:
        stamp: _ChunkStamp = {"created": self.created, "model": self.model}
        if self.system_fingerprint is not None:
            stamp["system_fingerprint"] = self.system_fingerprint
        return stamp

    def _chat_head(self) -> ChatCompletionChunk:
        return {"id": self.id, "object": "chat.completion.chunk", **self._stamp(), "choices": []}

    def _text_head(self) -> TextCompletionChunk:
        return {"id": self.id, "object": "text_completion", **self._stamp(), "choices": []}


def json_bytes(payload: Completion | Chunk | ErrorBody) -> bytes:
    """A body as JSON bytes (a complete answer: ``application/json``)."""
    return json.dumps(payload).encode()


# -- errors ---------------------------------------------------------------------------------


def error_body(
    message: str, type_: str, param: str | None = None, code: str | None = None
) -> ErrorBody:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def envelope(message: str, type_: str, param: str | None = None, code: str | None = None) -> bytes:
    """The OpenAI error envelope as JSON bytes."""
    return json_bytes(error_body(message, type_, param, code))


# -- server-sent events ---------------------------------------------------------------------

#: The content type of a stream.
SSE_CONTENT_TYPE: Final = "text/event-stream"

#: The closing line of every stream.
SSE_DONE: Final = b"data: [DONE]\n\n"

#: Headers that keep proxies from buffering or caching a stream.
SSE_NO_BUFFERING: Final[tuple[tuple[str, str], ...]] = (
    ("cache-control", "no-cache"),
    ("x-accel-buffering", "no"),
)

#: The response headers of a stream (ASGI form).
SSE_HEADERS: Final[tuple[tuple[bytes, bytes], ...]] = (
    (b"content-type", SSE_CONTENT_TYPE.encode()),
    *((k.encode(), v.encode()) for k, v in SSE_NO_BUFFERING),
)


def sse_data(data: bytes) -> bytes:
    """One event carrying ``data`` (one line of JSON)."""
    return b"data: " + data + b"\n\n"


def sse_event(payload: Chunk | Completion | ErrorBody) -> bytes:
    """One event carrying ``payload`` as JSON (UTF-8, not ASCII-escaped)."""
    return sse_data(json.dumps(payload, ensure_ascii=False).encode())


def sse_error(message: str, type_: str, param: str | None = None, code: str | None = None) -> bytes:
    """An error event: the error envelope as one ``data:`` line."""
    return sse_data(envelope(message, type_, param, code))
