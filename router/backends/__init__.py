"""Backends: where a routed request is answered (OpenAI-compatible servers, in-process model)."""

__all__: list[str] = []
