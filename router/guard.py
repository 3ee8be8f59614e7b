"""The door of every route: check the key's scope, then the caller's rate limit.

The key comes in ``authorization: Bearer KEY`` or, when that header is absent, in
``x-api-key: KEY`` (the ``anthropic`` SDK's header). ``await admit(state, scope, "client")``
returns the :class:`~router.auth.Caller` or raises the 401/403/429
:class:`~router.errors.HTTPError` the route renders as an OpenAI error envelope.
When a rate limit applies, the caller's ``x-ratelimit-*-requests`` headers go on the 429 and are
left in the scope (:func:`router.asgi.add_response_headers`) for the answer.

With authentication off, an ``admin`` route answers only local clients: the peer address, as
uvicorn reports it, is 127.0.0.1 or ::1 (what a tool on the gateway's host connects from; behind
a proxy on the same host, pass the real client on in ``X-Forwarded-For``). Anyone else gets a
403 ``permission_error`` / ``loopback_only``.
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import MutableMapping
from typing import Any

from router.asgi import add_response_headers
from router.auth import Caller
from router.auth import Scope as KeyScope
from router.errors import Forbidden, RateLimited
from router.state import GatewayState

__all__ = ["admit", "client_address", "is_local_client"]


def client_address(scope: MutableMapping[str, Any]) -> str:
    client = scope.get("client")
    return f"addr-{client[0]}" if client else "anonymous"


#: The addresses a client on the gateway's own host connects from.
_LOCAL = frozenset({ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")})


def is_local_client(scope: MutableMapping[str, Any]) -> bool:
    """Whether the ASGI scope's client is 127.0.0.1 or ::1 (also as ``::ffff:127.0.0.1``);
    False when the scope has no client."""
    client = scope.get("client")
    if not client:
        return False
    try:
        address = ipaddress.ip_address(str(client[0]))
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped in _LOCAL
    return address in _LOCAL


def _header(scope: MutableMapping[str, Any], name: bytes) -> bytes | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return bytes(value)
    return None


def _credentials(scope: MutableMapping[str, Any]) -> bytes | None:
    """The ``authorization`` header, or an ``x-api-key`` (what the ``anthropic`` SDK sends)
    as a bearer token when there is none."""
    header = _header(scope, b"authorization")
    if header is None and (key := _header(scope, b"x-api-key")) is not None:
        return b"Bearer " + key
    return header


async def admit(state: GatewayState, scope: MutableMapping[str, Any], needs: KeyScope) -> Caller:
    """The caller of a route that needs a ``needs``-scoped key (see the module docstring)."""
    if needs == "admin" and not state.keys.enabled and not is_local_client(scope):
        raise Forbidden(
            "authentication is off, so admin routes answer only local clients "
            "(127.0.0.1, ::1); configure a key with scope admin (auth.keys) to call them "
            "from elsewhere",
            code="loopback_only",
        )
    caller = state.caller(_credentials(scope), needs, client_address(scope))
    limiter = state.rate_limiter
    if limiter is not None:
        admission = await limiter.acquire(caller.name)
        limit_headers = admission.headers()
        add_response_headers(scope, limit_headers)
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
                headers={
                    "retry-after": str(wait),
                    **{k.decode(): v.decode() for k, v in limit_headers},
                },
            )
    return caller
