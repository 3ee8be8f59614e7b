"""The Anthropic Messages API (``POST /v1/messages``) on OpenAI-compatible backends.

A backend with ``api: anthropic`` gets the body untouched. Any other OpenAI backend gets it
translated to ``chat.completions`` by :func:`to_chat`, and its answer translated back: a JSON
message by :func:`message_from_chat`, a stream by :class:`StreamTranslator` (Anthropic events
``message_start``, ``content_block_start``/``delta``/``stop``, ``message_delta``,
``message_stop``). Which fields survive is tabled in docs/api.md:

- kept: ``model`` (rewritten by the backend like chat), ``system`` (string or text blocks: one
  system message), ``messages`` (text blocks, ``image`` blocks as ``image_url`` (base64 as a data
  URL, or a URL), assistant ``tool_use`` blocks as ``tool_calls``, user ``tool_result`` blocks as
  ``tool`` messages), ``max_tokens``, ``temperature``, ``top_p``, ``stop_sequences`` (as
  ``stop``), ``stream``, ``tools`` (as functions), ``tool_choice`` (auto, any as required, tool
  as a named function, none), ``metadata.user_id`` (as ``user``);
- dropped: ``top_k``, ``thinking``, ``cache_control``, ``citations``, ``document`` blocks and
  any other field or block type.

Errors on ``/v1/messages`` take Anthropic's shape (:func:`error_body`), so the ``anthropic``
SDK reads them.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

__all__ = [
    "StreamTranslator",
    "error_body",
    "error_type",
    "message_from_chat",
    "to_chat",
]

logger = logging.getLogger(__name__)

_STOP_REASONS = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
}

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    408: "timeout_error",
    413: "request_too_large",
    422: "invalid_request_error",
    429: "rate_limit_error",
    504: "timeout_error",
    529: "overloaded_error",
}


def error_type(status: int) -> str:
    """Anthropic's error type for an HTTP status."""
    return _ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")


def error_body(
    status: int, message: str, param: str | None = None, code: str | None = None
) -> bytes:
    """``{"type": "error", "error": {"type", "message", "param", "code"}}`` as JSON bytes
    (Anthropic's shape; ``param`` and ``code``, OpenAI's extras naming the field, are ignored
    by the ``anthropic`` SDK)."""
    error = {"type": error_type(status), "message": message, "param": param, "code": code}
    return json.dumps({"type": "error", "error": error}, ensure_ascii=False).encode()


def _text_of(content: Any) -> str:
    """The text of a string or of a list of blocks (text blocks only)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(
            b["text"]
            for b in content
            if isinstance(b, dict) and b.get("type") == "text" and isinstance(b.get("text"), str)
        )
    return ""


def _image_part(block: dict[str, Any]) -> dict[str, Any] | None:
    source = block.get("source")
    if not isinstance(source, dict):
        return None
    if source.get("type") == "base64":
        url = f"data:{source.get('media_type', 'image/png')};base64,{source.get('data', '')}"
    elif source.get("type") == "url" and isinstance(source.get("url"), str):
        url = source["url"]
    else:
        return None
    return {"type": "image_url", "image_url": {"url": url}}


def _chat_messages(message: dict[str, Any]) -> list[dict[str, Any]]:
    """One Anthropic message as chat messages (tool results become ``tool`` messages)."""
    role = message.get("role")
    content = message.get("content")
    if isinstance(content, str):
        return [{"role": role, "content": content}]
    if not isinstance(content, list):
        return [{"role": role, "content": ""}]
    parts: list[dict[str, Any]] = []
    tool_calls: list[dict[str, Any]] = []
    tool_messages: list[dict[str, Any]] = []
    for block in content:
        if not isinstance(block, dict):
            continue
        kind = block.get("type")
        if kind == "text" and isinstance(block.get("text"), str):
            parts.append({"type": "text", "text": block["text"]})
        elif kind == "image":
            if (part := _image_part(block)) is not None:
                parts.append(part)
        elif kind == "tool_use":
            tool_calls.append(
                {
                    "id": block.get("id", ""),
                    "type": "function",
                    "function": {
                        "name": block.get("name", ""),
                        "arguments": json.dumps(block.get("input", {}), ensure_ascii=False),
                    },
                }
            )
        elif kind == "tool_result":
            tool_messages.append(
                {
                    "role": "tool",
                    "tool_call_id": block.get("tool_use_id", ""),
                    "content": _text_of(block.get("content", "")),
                }
            )
    out: list[dict[str, Any]] = list(tool_messages)
    if role == "assistant" and tool_calls:
        text = "".join(p["text"] for p in parts if p["type"] == "text")
        out.append({"role": "assistant", "content": text or None, "tool_calls": tool_calls})
    elif parts:
        if all(p["type"] == "text" for p in parts):
            out.append({"role": role, "content": "".join(p["text"] for p in parts)})
        else:
            out.append({"role": role, "content": parts})
    return out


def _tool_choice(choice: Any) -> Any:
    if not isinstance(choice, dict):
        return None
    kind = choice.get("type")
    if kind == "tool":
        return {"type": "function", "function": {"name": choice.get("name", "")}}
    return {"auto": "auto", "any": "required", "none": "none"}.get(str(kind))


def to_chat(body: dict[str, Any]) -> dict[str, Any]:
    """A Messages request as a ``chat.completions`` request (see the module docstring)."""
    messages: list[dict[str, Any]] = []
    system = body.get("system")
    if system is not None and (text := _text_of(system)):
        messages.append({"role": "system", "content": text})
    for message in body.get("messages") or []:
        if isinstance(message, dict):
            messages.extend(_chat_messages(message))
    chat: dict[str, Any] = {"model": body.get("model"), "messages": messages}
    for key in ("max_tokens", "temperature", "top_p"):
        if body.get(key) is not None:
            chat[key] = body[key]
    if body.get("stop_sequences"):
        chat["stop"] = body["stop_sequences"]
    if isinstance(tools := body.get("tools"), list) and tools:
        chat["tools"] = [
            {
                "type": "function",
                "function": {
                    "name": t.get("name", ""),
                    "description": t.get("description", ""),
                    "parameters": t.get("input_schema") or {"type": "object", "properties": {}},
                },
            }
            for t in tools
            if isinstance(t, dict)
        ]
    if (choice := _tool_choice(body.get("tool_choice"))) is not None:
        chat["tool_choice"] = choice
    metadata = body.get("metadata")
    if isinstance(metadata, dict) and isinstance(metadata.get("user_id"), str):
        chat["user"] = metadata["user_id"]
    if body.get("stream") is True:
        chat["stream"] = True
        chat["stream_options"] = {"include_usage": True}
    return chat


def _message_id() -> str:
    return f"msg_{uuid.uuid4().hex[:24]}"


def _arguments(text: Any) -> Any:
    try:
        return json.loads(text) if isinstance(text, str) and text else {}
    except ValueError:
        return {"arguments": text}


def message_from_chat(raw: bytes, model: str) -> bytes:
    """A ``chat.completion`` answer as an Anthropic message (JSON bytes)."""
    chat = json.loads(raw)
    choice = (chat.get("choices") or [{}])[0]
    message = choice.get("message") or {}
    content: list[dict[str, Any]] = []
    if isinstance(text := message.get("content"), str) and text:
        content.append({"type": "text", "text": text})
    for call in message.get("tool_calls") or []:
        function = call.get("function") or {}
        content.append(
            {
                "type": "tool_use",
                "id": call.get("id") or f"toolu_{uuid.uuid4().hex[:24]}",
                "name": function.get("name", ""),
                "input": _arguments(function.get("arguments")),
            }
        )
    usage = chat.get("usage") or {}
    payload = {
        "id": _message_id(),
        "type": "message",
        "role": "assistant",
        "model": chat.get("model") or model,
        "content": content,
        "stop_reason": _STOP_REASONS.get(choice.get("finish_reason") or "stop", "end_turn"),
        "stop_sequence": None,
        "usage": {
            "input_tokens": usage.get("prompt_tokens") or 0,
            "output_tokens": usage.get("completion_tokens") or 0,
        },
    }
    return json.dumps(payload, ensure_ascii=False).encode()


def _event(name: str, data: dict[str, Any]) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


class StreamTranslator:
    """Chat-completion SSE bytes in, Anthropic Messages SSE bytes out."""

    def __init__(self, model: str) -> None:
        self.model = model
        self._buffer = b""
        self._started = False
        self._finished = False
        self._block: int = -1  # index of the open content block, -1: none
        self._block_kind = ""  # "text" or "tool_use"
        self._tools: dict[int, int] = {}  # chat tool-call index -> block index
        self._stop_reason = "end_turn"
        self._input_tokens = 0
        self._output_tokens = 0

    async def translate(self, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        """The Anthropic events for a chat stream (closed with ``message_stop``)."""
        async for chunk in chunks:
            out = self.feed(chunk)
            if out:
                yield out
        if rest := self.finish():
            yield rest

    def feed(self, chunk: bytes) -> bytes:
        """The events for the complete SSE lines of ``chunk`` (a partial line waits)."""
        self._buffer += chunk
        out = b""
        while b"\n" in self._buffer:
            line, self._buffer = self._buffer.split(b"\n", 1)
            line = line.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                out += self.finish()
                continue
            try:
                payload = json.loads(data)
            except ValueError:
                logger.warning("skipping an unreadable chunk of a chat stream")
                continue
            if isinstance(payload, dict):
                out += self._chunk(payload)
        return out

    def _start(self, payload: dict[str, Any]) -> bytes:
        self._started = True
        message: dict[str, Any] = {
            "id": _message_id(),
            "type": "message",
            "role": "assistant",
            "model": payload.get("model") or self.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": 0, "output_tokens": 0},
        }
        return _event("message_start", {"type": "message_start", "message": message})

    def _close_block(self) -> bytes:
        if self._block < 0 or not self._block_kind:
            return b""
        self._block_kind = ""
        return _event("content_block_stop", {"type": "content_block_stop", "index": self._block})

    def _open(self, kind: str, block: dict[str, Any]) -> bytes:
        out = self._close_block()
        self._block += 1
        self._block_kind = kind
        start = {"type": "content_block_start", "index": self._block, "content_block": block}
        return out + _event("content_block_start", start)

    def _delta(self, delta: dict[str, Any]) -> bytes:
        data = {"type": "content_block_delta", "index": self._block, "delta": delta}
        return _event("content_block_delta", data)

    def _chunk(self, payload: dict[str, Any]) -> bytes:
        if self._finished:
            return b""
        if "error" in payload:
            error = payload["error"] if isinstance(payload["error"], dict) else {}
            message = str(error.get("message", "the upstream stream failed"))
            self._finished = True
            return _event(
                "error", {"type": "error", "error": {"type": "api_error", "message": message}}
            )
        out = b"" if self._started else self._start(payload)
        usage = payload.get("usage")
        if isinstance(usage, dict):
            self._input_tokens = usage.get("prompt_tokens") or self._input_tokens
            self._output_tokens = usage.get("completion_tokens") or self._output_tokens
        for choice in payload.get("choices") or []:
            delta = choice.get("delta") or {}
            text = delta.get("content")
            if isinstance(text, str) and text:
                if self._block_kind != "text":
                    out += self._open("text", {"type": "text", "text": ""})
                out += self._delta({"type": "text_delta", "text": text})
            for call in delta.get("tool_calls") or []:
                index = call.get("index", 0)
                function = call.get("function") or {}
                if index not in self._tools:
                    block = {
                        "type": "tool_use",
                        "id": call.get("id") or f"toolu_{uuid.uuid4().hex[:24]}",
                        "name": function.get("name", ""),
                        "input": {},
                    }
                    out += self._open("tool_use", block)
                    self._tools[index] = self._block
                if isinstance(args := function.get("arguments"), str) and args:
                    out += self._delta({"type": "input_json_delta", "partial_json": args})
            if reason := choice.get("finish_reason"):
                self._stop_reason = _STOP_REASONS.get(reason, "end_turn")
        return out

    def finish(self) -> bytes:
        """Close the open block and the message (once)."""
        if self._finished:
            return b""
        out = b"" if self._started else self._start({})
        self._finished = True
        out += self._close_block()
        out += _event(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": self._stop_reason, "stop_sequence": None},
                "usage": {
                    "input_tokens": self._input_tokens,
                    "output_tokens": self._output_tokens,
                },
            },
        )
        return out + _event("message_stop", {"type": "message_stop"})
