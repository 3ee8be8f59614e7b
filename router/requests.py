"""Read only what routing needs from an OpenAI request; everything else is forwarded unchanged.

Status codes: a body that is not JSON, not an object, or whose ``messages``/``prompt`` cannot be
read is a 400; a field of the wrong type (``model`` not a string, ``stream`` not a boolean, ...)
is a 422. Both come back in the OpenAI error envelope naming the field.

What the OpenAI API itself rejects is a 400 ``invalid_request_error`` whose ``param`` names the
JSON path, so no backend (and no probe) ever sees it:

- a lone UTF-16 surrogate anywhere in the body (``"\\ud800"``: Python's ``json`` accepts it,
  UTF-8 cannot encode it), keys included (code ``invalid_unicode``);
- a message without content (``missing_required_parameter``), except an ``assistant`` message
  carrying ``tool_calls``, ``function_call``, ``audio`` or ``refusal``, and a ``function``
  message, whose content may be null;
- content that is an empty array (``empty_array``), a content part that is not an object with a
  non-empty string ``type``, or a ``text`` part whose ``text`` is not a string
  (``invalid_type``).

Other part types (``image_url``, ``input_audio``, ``file``, ``refusal``, and a server's own such
as vLLM's ``video_url``) and unknown fields pass through. :attr:`ParsedRequest.has_text` says
whether the request holds any readable text (a non-blank string content, ``text`` part or
prompt); a request without (only images or audio, a blank prompt) is routed by the policy's
``on_no_text`` action, never probed (docs/routing.md).

The request's shape, read once here for rule conditions and capabilities (docs/routing.md,
"Capabilities"): ``has_tools`` (a non-empty ``tools`` or ``functions`` array), ``has_images``
(an ``image_url``, ``input_image`` or Anthropic ``image`` part), ``response_format`` (its
``type``, a Responses body's ``text.format.type``; ``text`` when absent), ``n_messages`` (the
``messages``, or a Responses body's ``input`` items; 0 for a ``/v1/completions`` prompt), and
:attr:`ParsedRequest.needs`, each capability the request needs (``tools``, ``vision``, ``json``
for a format other than ``text``) -> the field that needs it. ``tools``/``functions`` that are
not arrays and a ``response_format`` that is not an object with a string ``type`` are 422s.
Embeddings have no shape.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from probes.types import ProbeInput
from router.api_inputs import embeddings_input, messages_input, responses_input
from router.backends.base import Endpoint
from router.errors import BadRequest, Unprocessable

__all__ = ["ParsedRequest", "check_unicode", "parse_request"]

#: A JSON ``\\uD800``-``\\uDFFF`` escape: only such an escape can put a surrogate into a body
#: that decoded as strict UTF-8.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
#: Roles whose message may carry null content, and (for assistant) the fields that stand in.
_NULL_CONTENT_ROLES = frozenset({"function"})
_ASSISTANT_PAYLOAD = ("tool_calls", "function_call", "audio", "refusal")
#: Content part types holding an image.
_IMAGE_PARTS = frozenset({"image_url", "input_image", "image"})  # image: Anthropic messages
_NO_NEEDS: Mapping[str, str] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class ParsedRequest:
    """What routing reads of a request; ``body`` is forwarded as sent."""

    endpoint: Endpoint
    body: dict[str, Any]
    model: str
    stream: bool
    probe_input: ProbeInput
    user: str | None
    metadata: Mapping[str, str]
    has_text: bool = True  # False: nothing the probe could read (images, audio, blank text)
    has_tools: bool = False  # a non-empty ``tools`` or ``functions``
    has_images: bool = False  # an ``image_url`` or ``input_image`` part
    response_format: str = "text"  # response_format.type
    n_messages: int = 0  # chat messages (0: a /v1/completions prompt)
    #: capability (tools, vision, json) -> the field needing it (``tools``, a part's path,
    #: ``response_format``)
    needs: Mapping[str, str] = field(default_factory=lambda: _NO_NEEDS)


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
    if _SURROGATE_ESCAPE.search(raw) is not None:  # rare: escaped emoji, or a hostile body
        check_unicode(body)
    return body


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _path(parent: str, key: str | int) -> str:
    """``messages`` + 0 -> ``messages[0]``; + ``content`` -> ``messages[0].content``."""
    if isinstance(key, int):
        return f"{parent}[{key}]"
    if _IDENTIFIER.fullmatch(key):
        return f"{parent}.{key}" if parent else key
    # json.dumps escapes a lone surrogate (ensure_ascii), so the path itself stays valid text
    return f"{parent}[{json.dumps(key)}]"


def check_unicode(body: dict[str, Any]) -> None:
    """400 naming the first string (value or key) holding a lone surrogate, if any.

    Iterative, so a body nested as deeply as ``json.loads`` allows cannot overflow the stack.
    """
    stack: list[tuple[str, Any]] = [("", body)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, str):
            if not _encodable(value):
                raise BadRequest(
                    f"{path} holds a lone UTF-16 surrogate (an unpaired \\ud800-\\udfff escape), "
                    "which is not valid Unicode text: send valid UTF-8",
                    param=path,
                    code="invalid_unicode",
                )
        elif isinstance(value, dict):
            items: list[tuple[str, Any]] = []
            for key, item in value.items():
                where = _path(path, key)
                if not _encodable(key):
                    raise BadRequest(
                        f"the key {where} holds a lone UTF-16 surrogate, which is not valid "
                        "Unicode text: send valid UTF-8",
                        param=where,
                        code="invalid_unicode",
                    )
                items.append((where, item))
            stack.extend(reversed(items))  # report the first offender in document order
        elif isinstance(value, list):
            stack.extend((_path(path, i), item) for i, item in reversed(list(enumerate(value))))


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


def _may_lack_content(message: dict[str, Any]) -> bool:
    """Whether the OpenAI API accepts this message with null (or absent) content."""
    role = message.get("role")
    if role in _NULL_CONTENT_ROLES:
        return True
    return role == "assistant" and any(message.get(k) is not None for k in _ASSISTANT_PAYLOAD)


def _parts_text(i: int, parts: list[Any]) -> bool:
    """Validate content parts; whether one of them is a non-blank ``text`` part."""
    found = False
    for j, part in enumerate(parts):
        where = f"messages[{i}].content[{j}]"
        if not isinstance(part, dict):
            raise BadRequest(
                f"{where} must be a content part (an object with a 'type', e.g. "
                f'{{"type": "text", "text": "..."}}), not {_kind(part)}',
                param=where,
                code="invalid_type",
            )
        kind = part.get("type")
        if not isinstance(kind, str) or not kind:
            raise BadRequest(
                f"{where}.type must be a non-empty string ('text', 'image_url', 'input_audio', "
                f"'file', ...), not {_kind(kind)}",
                param=f"{where}.type",
                code="invalid_type" if "type" in part else "missing_required_parameter",
            )
        if kind == "text":
            text = part.get("text")
            if not isinstance(text, str):
                raise BadRequest(
                    f"{where}.text must be a string, not {_kind(text)}",
                    param=f"{where}.text",
                    code="invalid_type" if "text" in part else "missing_required_parameter",
                )
            found = found or bool(text.strip())
    return found


def _messages(body: dict[str, Any]) -> tuple[list[dict[str, Any]], bool]:
    """The messages (validated) and whether any of them holds readable text."""
    messages = body.get("messages")
    if messages is None:
        raise BadRequest("'messages' is required", param="messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty array of messages", param="messages")
    has_text = False
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
        where = f"messages[{i}].content"
        content = m.get("content")
        if content is None:
            if not _may_lack_content(m):
                raise BadRequest(
                    f"{where} is required for a {role!r} message (only an assistant message "
                    "with tool_calls or function_call may leave it null)",
                    param=where,
                    code="missing_required_parameter",
                )
        elif isinstance(content, str):
            has_text = has_text or bool(content.strip())
        elif isinstance(content, list):
            if not content and not _may_lack_content(m):
                raise BadRequest(
                    f"{where} is an empty array: give a string or at least one content part",
                    param=where,
                    code="empty_array",
                )
            has_text = _parts_text(i, content) or has_text
        else:
            raise BadRequest(
                f"{where} must be a string or an array of content parts, not {_kind(content)}",
                param=where,
                code="invalid_type",
            )
    return messages, has_text


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
    """Parse and check a request body (see the module docstring; responses, messages and
    embeddings: :mod:`router.api_inputs`); raises the 400/422."""
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
    probe_input: ProbeInput
    if endpoint == "chat/completions":
        probe_input, has_text = _messages(body)
    elif endpoint == "responses":
        probe_input, has_text = responses_input(body)
    elif endpoint == "messages":
        probe_input, has_text = messages_input(body)
    elif endpoint == "embeddings":
        embeddings_input(body)
        probe_input, has_text = "", False  # never probed: routed by model name
    else:
        probe_input = _prompt(body)
        has_text = bool(probe_input.strip())
    return ParsedRequest(
        endpoint,
        body,
        model,
        stream,
        probe_input,
        user,
        metadata,
        has_text,
        **_shape(endpoint, body),
    )


def _tools_field(body: dict[str, Any]) -> str | None:
    """``tools`` or ``functions`` when it is a non-empty array (422 when not an array)."""
    found = None
    for key in ("tools", "functions"):
        value = body.get(key)
        if value is None:
            continue
        if not isinstance(value, list):
            raise Unprocessable(f"'{key}' must be an array, not {_kind(value)}", param=key)
        if value and found is None:
            found = key
    return found


def _turns(endpoint: Endpoint, body: dict[str, Any]) -> tuple[str, list[Any]] | None:
    """The conversation's field and turns: ``messages`` (chat, messages), ``input``
    (responses; a string is one turn); None for a prompt."""
    if endpoint in ("chat/completions", "messages"):
        messages = body.get("messages")
        return ("messages", messages) if isinstance(messages, list) else None
    if endpoint == "responses":
        given = body.get("input")
        if isinstance(given, str):
            return "input", [given]
        return ("input", given) if isinstance(given, list) else None
    return None


def _first_image(field: str, turns: list[Any]) -> str | None:
    """The path of the first image part (``messages[i].content[j]``), or None."""
    for i, m in enumerate(turns):
        content = m.get("content") if isinstance(m, dict) else None
        for j, part in enumerate(content if isinstance(content, list) else ()):
            if isinstance(part, dict) and part.get("type") in _IMAGE_PARTS:
                return f"{field}[{i}].content[{j}]"
    return None


def _text_format(body: dict[str, Any]) -> str:
    """A Responses body's ``text.format.type`` (``text`` when absent or unreadable: the
    Responses parser owns that field's checks)."""
    text = body.get("text")
    form = text.get("format") if isinstance(text, dict) else None
    kind = form.get("type") if isinstance(form, dict) else None
    return kind if isinstance(kind, str) and kind else "text"


def _response_format(body: dict[str, Any]) -> str:
    """``response_format.type`` (``text`` when absent; 422 when malformed)."""
    value = body.get("response_format")
    if value is None:
        return "text"
    if not isinstance(value, dict):
        raise Unprocessable(
            f"'response_format' must be an object, not {_kind(value)}", param="response_format"
        )
    kind = value.get("type")
    if not isinstance(kind, str) or not kind:
        raise Unprocessable(
            "'response_format.type' must be a non-empty string ('text', 'json_object', "
            f"'json_schema'), not {_kind(kind)}",
            param="response_format.type",
        )
    return kind


def _shape(endpoint: Endpoint, body: dict[str, Any]) -> dict[str, Any]:
    """The shape fields of :class:`ParsedRequest` (after the conversation was validated).

    Responses bodies: turns from ``input``, the format from ``text.format``; Anthropic
    messages: ``image`` parts are images too."""
    if endpoint == "embeddings":
        return {}
    tools = _tools_field(body)
    turns = _turns(endpoint, body)
    image = _first_image(*turns) if turns is not None else None
    if endpoint == "responses":
        response_format, format_field = _text_format(body), "text.format"
    else:
        response_format, format_field = _response_format(body), "response_format"
    needs: dict[str, str] = {}
    if tools is not None:
        needs["tools"] = tools
    if image is not None:
        needs["vision"] = image
    if response_format != "text":
        needs["json"] = format_field
    return {
        "has_tools": tools is not None,
        "has_images": image is not None,
        "response_format": response_format,
        "n_messages": len(turns[1]) if turns is not None else 0,
        "needs": MappingProxyType(needs) if needs else _NO_NEEDS,
    }
