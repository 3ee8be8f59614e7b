"""What every backend offers the dispatcher.

A backend answers one OpenAI-style call. ``send`` returns once the answer is *committed*: for a
non-streaming call the whole body is there; for a streaming call the upstream status is known to
be 2xx and ``stream`` yields the raw SSE bytes. Anything that goes wrong before that point is
raised as :class:`router.errors.UpstreamError` (retry the next replica or the fallback backend);
an upstream 4xx is raised as :class:`router.errors.UpstreamStatus` and passed to the client.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

__all__ = ["Backend", "Endpoint", "UpstreamResult", "noop_close"]

Endpoint = Literal["chat/completions", "completions", "responses", "messages", "embeddings"]
"""The API call, as the path under ``/v1``: ``responses`` is the OpenAI Responses API,
``messages`` the Anthropic Messages API (translated to chat for OpenAI-compatible backends,
:mod:`router.anthropic`), ``embeddings`` a pass-through that is never probed."""


async def noop_close() -> None:
    return None


@dataclass(slots=True)
class UpstreamResult:
    status: int
    content_type: str
    body: bytes | None = None
    stream: AsyncIterator[bytes] | None = None
    close: Callable[[], Awaitable[None]] = noop_close
    replica: str = ""
    extra_headers: list[tuple[str, str]] = field(default_factory=list)


class Backend(Protocol):
    name: str

    async def send(
        self, endpoint: Endpoint, body: dict[str, Any], *, stream: bool
    ) -> UpstreamResult: ...

    def model_names(self) -> list[str]:
        """Model names this backend serves directly (for /v1/models and pass-through)."""
        ...

    async def ping(self) -> str:
        """Check the backend is reachable; return a one-line status or raise UpstreamError."""
        ...

    async def aclose(self) -> None: ...
