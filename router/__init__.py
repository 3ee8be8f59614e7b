"""The ASGI gateway: routes, backends, dispatch, cascades, escalation (docs/architecture.md)."""

from __future__ import annotations

__all__: list[str] = []
