"""The YAML configuration (schema, loader) and the policy engine (docs/architecture.md)."""

from __future__ import annotations

__all__: list[str] = []
