"""Read only what routing needs from an OpenAI request; everything else is forwarded unchanged.

Status codes: a body that is not JSON, not an object, or whose ``messages``/``prompt`` cannot be
read is a 400; a field of the wrong type (``model`` not a string, ``stream`` not a boolean, ...)
is a 422. Both come back in the OpenAI error envelope naming the field.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from probes.probe import ProbeInput
from router.backends.base import Endpoint
from router.errors import BadRequest, Unprocessable

__all__ = ["ParsedRequest", "parse_request"]


@dataclass(frozen=True, slots=True)
class ParsedRequest:
    endpoint: Endpoint
    body: dict[str, Any]
    model: str
    stream: bool
    probe_input: ProbeInput
    user: str | None
    metadata: Mapping[str, str]


def _load(raw: bytes) -> dict[str, Any]:
    if not raw.strip():
        raise BadRequest("the request body is empty: send a JSON object")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRequest(f"the request body is not valid UTF-8 (byte {exc.start})") from None
    try:
        body = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadRequest(
            f"could not parse the JSON body: {exc.msg} (line {exc.lineno}, column {exc.colno})"
        ) from None
    except RecursionError:
        raise BadRequest("could not parse the JSON body: nested too deeply") from None
    if not isinstance(body, dict):
        raise BadRequest(f"the request body must be a JSON object, not {_kind(body)}")
    return body


def _kind(value: Any) -> str:
    return {
        dict: "an object",
        list: "an array",
        str: "a string",
        bool: "a boolean",
        int: "a number",
        float: "a number",
        type(None): "null",
    }.get(type(value), type(value).__name__)


def _messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    messages = body.get("messages")
    if messages is None:
        raise BadRequest("'messages' is required", param="messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty array of messages", param="messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise BadRequest(
                f"messages[{i}] must be an object, not {_kind(m)}", param=f"messages[{i}]"
            )
        role = m.get("role")
        if not isinstance(role, str) or not role:
            raise BadRequest(
                f"messages[{i}].role must be a non-empty string", param=f"messages[{i}].role"
            )
        content = m.get("content")
        if content is not None and not isinstance(content, str | list):
            raise BadRequest(
                f"messages[{i}].content must be a string or an array of parts, "
                f"not {_kind(content)}",
                param=f"messages[{i}].content",
            )
    return messages


def _prompt(body: dict[str, Any]) -> str:
    prompt = body.get("prompt")
    if prompt is None:
        raise BadRequest("'prompt' is required", param="prompt")
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        return "\n".join(prompt)
    if isinstance(prompt, list) and prompt and all(isinstance(p, int) for p in prompt):
        raise BadRequest("token-id prompts cannot be routed: send text", param="prompt")
    raise BadRequest("'prompt' must be a string or an array of strings", param="prompt")


def parse_request(endpoint: Endpoint, raw: bytes) -> ParsedRequest:
    body = _load(raw)
    model = body.get("model")
    if model is None:
        raise BadRequest("'model' is required", param="model")
    if not isinstance(model, str) or not model:
        raise Unprocessable(
            f"'model' must be a non-empty string, not {_kind(model)}", param="model"
        )
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise Unprocessable(f"'stream' must be a boolean, not {_kind(stream)}", param="stream")
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise Unprocessable(f"'user' must be a string, not {_kind(user)}", param="user")
    metadata_raw = body.get("metadata")
    if metadata_raw is not None and not isinstance(metadata_raw, dict):
        raise Unprocessable(
            f"'metadata' must be an object, not {_kind(metadata_raw)}", param="metadata"
        )
    metadata = {str(k): str(v) for k, v in (metadata_raw or {}).items()}
    probe_input: ProbeInput = _messages(body) if endpoint == "chat/completions" else _prompt(body)
    return ParsedRequest(endpoint, body, model, stream, probe_input, user, metadata)
