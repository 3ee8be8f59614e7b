"""The door of every route: check the key's scope, then the caller's rate limit.

``await admit(state, scope, "client")`` returns the :class:`~router.auth.Caller` or raises the
401/403/429 :class:`~router.errors.HTTPError` the route renders as an OpenAI error envelope.
"""

from __future__ import annotations

import math
from collections.abc import MutableMapping
from typing import Any

from router.auth import Caller
from router.auth import Scope as KeyScope
from router.errors import RateLimited
from router.state import GatewayState

__all__ = ["admit", "client_address"]


def client_address(scope: MutableMapping[str, Any]) -> str:
    client = scope.get("client")
    return f"addr-{client[0]}" if client else "anonymous"


def _header(scope: MutableMapping[str, Any], name: bytes) -> bytes | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return bytes(value)
    return None


async def admit(state: GatewayState, scope: MutableMapping[str, Any], needs: KeyScope) -> Caller:
    caller = state.caller(_header(scope, b"authorization"), needs, client_address(scope))
    limiter = state.rate_limiter
    if limiter is not None:
        admission = await limiter.acquire(caller.name)
        if not admission.allowed:
            # Key names are bounded by the config; client addresses are not, so they share a label.
            state.metrics.rate_limited.labels(
                caller.name if caller.scope is not None else "anonymous"
            ).inc()
            wait = max(1, math.ceil(admission.retry_after_s))
            rl = state.settings.auth.rate_limit
            rate = rl.per_key.get(caller.name, rl.requests_per_s) if rl is not None else 0.0
            raise RateLimited(
                f"rate limit reached for {caller.name}: {rate:g} requests/s "
                f"(auth.rate_limit); retry after {wait} s",
                code="rate_limit_exceeded",
                headers={"retry-after": str(wait)},
            )
    return caller
