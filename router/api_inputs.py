"""What the probe reads of a Responses, Messages or Embeddings request (chat messages).

- ``/v1/responses``: ``instructions`` (a system message) + ``input``: a string (one user
  message) or items; a message item (``{"role", "content"}``, ``type`` absent or ``message``)
  gives its string content or its ``input_text``/``output_text``/``text`` parts; other items
  (``function_call``, ``function_call_output``, ``reasoning``, images, files) are skipped.
- ``/v1/messages``: ``system`` (a string or text blocks) + ``messages``; ``text`` blocks are
  read, a ``tool_result`` block's text is read as user text, ``tool_use``, ``image``,
  ``document`` and ``thinking`` blocks are skipped.
- ``/v1/embeddings``: never probed; ``input`` must be present.

Each reader checks the shape routing needs (a 400 naming the field) and says whether any text
was found (``has_text``: a request without is routed by the policy's ``on_no_text``).
"""

from __future__ import annotations

from typing import Any

from router.errors import BadRequest

__all__ = ["embeddings_input", "messages_input", "responses_input"]

_RESPONSE_TEXT_PARTS = frozenset({"input_text", "output_text", "text"})


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    return {dict: "an object", list: "an array", str: "a string", type(None): "null"}.get(
        type(value), type(value).__name__
    )


def _role(role: Any) -> str:
    return role if role in ("system", "user", "assistant") else "user"


def _add(out: list[dict[str, Any]], role: str, text: str) -> bool:
    out.append({"role": role, "content": text})
    return bool(text.strip())


def responses_input(body: dict[str, Any]) -> tuple[list[dict[str, Any]], bool]:
    """The chat messages the probe reads of a Responses request, and whether any holds text."""
    out: list[dict[str, Any]] = []
    has_text = False
    instructions = body.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise BadRequest(
                f"'instructions' must be a string, not {_kind(instructions)}",
                param="instructions",
                code="invalid_type",
            )
        if instructions.strip():
            has_text = _add(out, "system", instructions)
    items = body.get("input")
    if items is None:
        raise BadRequest("'input' is required", param="input", code="missing_required_parameter")
    if isinstance(items, str):
        has_text = _add(out, "user", items) or has_text
        return out, has_text
    if not isinstance(items, list):
        raise BadRequest(
            f"'input' must be a string or an array of items, not {_kind(items)}",
            param="input",
            code="invalid_type",
        )
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise BadRequest(
                f"input[{i}] must be an object, not {_kind(item)}",
                param=f"input[{i}]",
                code="invalid_type",
            )
        if item.get("type", "message") != "message" or "role" not in item:
            continue  # function calls and their outputs, reasoning, references
        content = item.get("content")
        if isinstance(content, str):
            has_text = _add(out, _role(item["role"]), content) or has_text
        elif isinstance(content, list):
            texts = [
                p["text"]
                for p in content
                if isinstance(p, dict)
                and p.get("type") in _RESPONSE_TEXT_PARTS
                and isinstance(p.get("text"), str)
            ]
            if texts:
                has_text = _add(out, _role(item["role"]), "\n".join(texts)) or has_text
        else:
            raise BadRequest(
                f"input[{i}].content must be a string or an array of parts, not {_kind(content)}",
                param=f"input[{i}].content",
                code="invalid_type",
            )
    return out, has_text


def _blocks_text(where: str, content: Any) -> str:
    """The text of an Anthropic content value: a string, or text and tool_result blocks."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise BadRequest(
            f"{where} must be a string or an array of content blocks, not {_kind(content)}",
            param=where,
            code="invalid_type",
        )
    texts: list[str] = []
    for j, block in enumerate(content):
        if not isinstance(block, dict) or not isinstance(block.get("type"), str):
            raise BadRequest(
                f"{where}[{j}] must be a content block (an object with a 'type')",
                param=f"{where}[{j}]",
                code="invalid_type",
            )
        kind = block["type"]
        if kind == "text":
            if not isinstance(block.get("text"), str):
                raise BadRequest(
                    f"{where}[{j}].text must be a string",
                    param=f"{where}[{j}].text",
                    code="invalid_type",
                )
            texts.append(block["text"])
        elif kind == "tool_result" and block.get("content") is not None:
            texts.append(_blocks_text(f"{where}[{j}].content", block["content"]))
    return "\n".join(t for t in texts if t)


def messages_input(body: dict[str, Any]) -> tuple[list[dict[str, Any]], bool]:
    """The chat messages the probe reads of an Anthropic Messages request, and whether any
    holds text."""
    out: list[dict[str, Any]] = []
    has_text = False
    system = body.get("system")
    if system is not None:
        text = _blocks_text("system", system)
        if text.strip():
            has_text = _add(out, "system", text)
    messages = body.get("messages")
    if messages is None:
        raise BadRequest(
            "'messages' is required", param="messages", code="missing_required_parameter"
        )
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty array of messages", param="messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise BadRequest(
                f"messages[{i}] must be an object, not {_kind(message)}", param=f"messages[{i}]"
            )
        role = message.get("role")
        if role not in ("user", "assistant"):
            raise BadRequest(
                f"messages[{i}].role must be 'user' or 'assistant'", param=f"messages[{i}].role"
            )
        if "content" not in message:
            raise BadRequest(
                f"messages[{i}].content is required",
                param=f"messages[{i}].content",
                code="missing_required_parameter",
            )
        text = _blocks_text(f"messages[{i}].content", message["content"])
        if text:
            has_text = _add(out, role, text) or has_text
    return out, has_text


def embeddings_input(body: dict[str, Any]) -> None:
    """Check that an Embeddings request has an ``input`` (forwarded as is, never probed)."""
    if body.get("input") is None:
        raise BadRequest("'input' is required", param="input", code="missing_required_parameter")
