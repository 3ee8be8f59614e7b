"""Scoped API keys: who is calling, and may they call this route.

Every configured key is held only as its SHA-256 digest (a ``sha256:<hex>`` entry already is
one), so plain and hashed keys are checked the same way: hash what the client sent, compare it
in constant time against *every* digest (the time taken does not reveal which one matched, or
whether any did). Scopes: ``client`` (the OpenAI routes, ``/openapi.json``), ``reviewer``
(escalation review), ``metrics`` (``/metrics``, unless ``auth.public_metrics``), ``admin``
(``/admin/*``); an admin key is accepted on every route. Who may call which route, with
authentication on and off: docs/security.md.

A missing or unknown key is a 401, a known key of the wrong scope a 403, both in the OpenAI
error envelope. With no key configured at all, authentication is off.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Literal

from policies.schema import AuthSettings
from router.errors import Forbidden, Unauthorized

__all__ = ["Caller", "KeyRing", "Scope"]

Scope = Literal["client", "reviewer", "metrics", "admin"]


@dataclass(frozen=True, slots=True)
class Caller:
    """Who sent a request: a name safe to log (never the key) and the key's scope."""

    name: str
    scope: Scope | None  # None: authentication is off


@dataclass(frozen=True, slots=True)
class _Entry:
    digest: bytes = b""
    scope: Scope = "client"
    name: str = ""


def _digest(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()


def _entry(key: str, scope: Scope, name: str | None) -> _Entry:
    if key.startswith("sha256:"):
        digest = bytes.fromhex(key[7:])
    else:
        digest = _digest(key.encode())
    # A name for logs and rate limits: the configured one, else a short prefix of the digest
    # (a hash prefix reveals nothing usable about the key).
    return _Entry(digest, scope, name or f"key-{digest.hex()[:10]}")


class KeyRing:
    """The configured keys; :meth:`check` answers a request's ``Authorization`` header."""

    __slots__ = ("_entries",)

    def __init__(self, entries: tuple[_Entry, ...] = ()) -> None:
        self._entries = entries

    @classmethod
    def from_settings(cls, auth: AuthSettings, *, reviewer_keys: tuple[str, ...] = ()) -> KeyRing:
        """``auth.api_keys`` are client keys, ``reviewer_keys`` reviewer keys, ``auth.keys``
        carry their own scope."""
        entries = [_entry(k, "client", None) for k in auth.api_keys]
        entries += [_entry(k, "reviewer", None) for k in reviewer_keys if k]
        entries += [_entry(k.key, k.scope, k.name) for k in auth.keys]
        return cls(tuple(entries))

    @property
    def enabled(self) -> bool:
        return bool(self._entries)

    def identify(self, header: bytes | None) -> _Entry | None:
        """The entry whose key the ``Authorization: Bearer`` header carries, or None."""
        if header is None or not header[:7].lower() == b"bearer ":
            return None
        given = _digest(header[7:].strip())
        found: _Entry | None = None
        for entry in self._entries:  # no early exit: every digest is compared
            if hmac.compare_digest(given, entry.digest) and found is None:
                found = entry
        return found

    def check(self, header: bytes | None, scope: Scope, *, fallback_name: str = "") -> Caller:
        """The caller, or :class:`Unauthorized` (no/unknown key) / :class:`Forbidden` (scope)."""
        if not self._entries:
            return Caller(fallback_name or "anonymous", None)
        entry = self.identify(header)
        if entry is None:
            raise Unauthorized(
                "missing or invalid API key: send 'Authorization: Bearer KEY' with a key from "
                "auth.api_keys or auth.keys",
                code="invalid_api_key",
            )
        if entry.scope != scope and entry.scope != "admin":
            raise Forbidden(
                f"this API key ({entry.name}) has scope {entry.scope!r}; this route needs a "
                f"key with scope {scope!r} (auth.keys[].scope)",
                code="insufficient_scope",
            )
        return Caller(entry.name, entry.scope)
