"""Token usage from upstream answers, for event records, without touching what clients get.

- Non-streamed: the ``usage`` object of the JSON body (:func:`usage_of_body`).
- Streamed: OpenAI-compatible servers send usage in a last chunk with ``choices: []`` when the
  request has ``stream_options.include_usage: true``. :class:`UsageTap` reads the SSE events it
  is fed. When the client asked for usage itself, the bytes pass through unchanged. When it did
  not and the gateway added the option (:func:`request_usage`, ``events.usage: inject``), the
  tap holds back incomplete events and drops the usage-only chunk the client did not ask for;
  every other byte passes through unchanged and in order.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["Usage", "UsageTap", "client_wants_usage", "request_usage", "usage_of_body"]

_EVENT_END = re.compile(rb"\r?\n\r?\n")
_USAGE_OBJECT = re.compile(rb'"usage"\s*:\s*\{')  # not `"usage": null` (OpenAI sends it per chunk)


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int | None
    completion_tokens: int | None


def _usage(obj: Any) -> Usage | None:
    """Chat/completions ``usage`` (prompt/completion tokens), or the Responses and Anthropic
    Messages shape (input/output tokens; a Responses stream carries it in
    ``response.completed``'s ``response``)."""
    if not isinstance(obj, Mapping):
        return None
    usage = obj.get("usage")
    if not isinstance(usage, Mapping) and isinstance(obj.get("response"), Mapping):
        usage = obj["response"].get("usage")
    if not isinstance(usage, Mapping):
        return None

    def count(*names: str) -> int | None:
        for name in names:
            value = usage.get(name)
            if isinstance(value, int) and not isinstance(value, bool):
                return value
        return None

    return Usage(
        count("prompt_tokens", "input_tokens"), count("completion_tokens", "output_tokens")
    )


def usage_of_body(body: bytes | None) -> Usage | None:
    """The ``usage`` of a non-streamed JSON answer (None when absent or unreadable)."""
    if not body or b'"usage"' not in body:
        return None
    try:
        return _usage(json.loads(body))
    except (ValueError, RecursionError):
        return None


def client_wants_usage(body: Mapping[str, Any]) -> bool:
    options = body.get("stream_options")
    return isinstance(options, Mapping) and options.get("include_usage") is True


def request_usage(body: dict[str, Any]) -> dict[str, Any] | None:
    """A copy of a streaming request body asking for usage, or None when it cannot be added
    (``stream_options`` is there but not an object: the upstream's error is the answer)."""
    options = body.get("stream_options")
    if options is None:
        return {**body, "stream_options": {"include_usage": True}}
    if isinstance(options, Mapping):
        return {**body, "stream_options": {**options, "include_usage": True}}
    return None


class UsageTap:
    """Reads usage from SSE bytes on their way to the client.

    ``strip``: drop usage-only events (``choices: []`` with a ``usage`` object), for streams
    where the gateway asked for usage on the client's behalf. Without it, :meth:`feed` returns
    its input unchanged.
    """

    __slots__ = ("_pending", "strip", "usage")

    def __init__(self, *, strip: bool) -> None:
        self.strip = strip
        self.usage: Usage | None = None
        self._pending = b""

    def feed(self, chunk: bytes) -> bytes:
        """Scan ``chunk``; return the bytes to send on now."""
        if not self._pending and chunk.endswith(b"\n\n") and not _USAGE_OBJECT.search(chunk):
            return chunk  # whole events without usage: the common case, nothing to hold back
        data = self._pending + chunk
        out: list[bytes] = []
        pos = 0
        for end in _EVENT_END.finditer(data):
            event = data[pos : end.end()]
            pos = end.end()
            if _USAGE_OBJECT.search(event) and self._read(event) and self.strip:
                continue
            if self.strip:
                out.append(event)
        self._pending = data[pos:]
        return b"".join(out) if self.strip else chunk

    def flush(self) -> bytes:
        """What is held back at the end of the stream (an unterminated last event)."""
        rest, self._pending = self._pending, b""
        if rest and _USAGE_OBJECT.search(rest):
            usage_only = self._read(rest)
            if usage_only and self.strip:
                return b""
        return rest if self.strip else b""

    def _read(self, event: bytes) -> bool:
        """Record the event's usage; True when it is a usage-only chunk."""
        lines = [line[5:].lstrip(b" ") for line in event.splitlines() if line.startswith(b"data:")]
        if not lines:
            return False
        try:
            obj = json.loads(b"\n".join(lines))
        except (ValueError, RecursionError):
            return False
        usage = _usage(obj)
        if usage is None:
            return False
        self.usage = usage
        return not obj.get("choices")
