"""Request body → generation parameters for the local backend, validated as OpenAI does.

Fields honoured: ``messages`` / ``prompt``, ``max_completion_tokens`` / ``max_tokens`` (capped at
the backend's ``max_new_tokens`` and the model's context), ``temperature`` (absent: 1.0 as in the
OpenAI API; 0: greedy), ``top_p``, ``seed``, ``stop``, ``n`` (1 only),
``stream_options.include_usage`` and vLLM's ``ignore_eos``. Everything else (tools,
response_format, logprobs, ...) is ignored. A field of the wrong type is answered with
:class:`~router.errors.UpstreamStatus` 400 and an OpenAI error envelope naming the field
(:func:`bad_request`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from router.backends.base import Endpoint
from router.errors import UpstreamStatus
from router.wire import envelope

__all__ = ["GenerationParams", "RequestParser", "bad_request", "context_length"]


@dataclass(frozen=True, slots=True)
class GenerationParams:
    """One generation: the prompt's token ids and how to decode after it."""

    prompt_ids: list[int]
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stop: tuple[str, ...]
    ignore_eos: bool
    include_usage: bool


def bad_request(message: str, param: str | None = None, code: str | None = None) -> UpstreamStatus:
    """A 400 in the OpenAI error envelope (``invalid_request_error``)."""
    return UpstreamStatus(
        400, envelope(message, "invalid_request_error", param, code), "application/json"
    )


def context_length(config: Any) -> int:
    """The model's context in tokens (0: unknown)."""
    return int(
        getattr(config, "max_position_embeddings", 0) or getattr(config, "n_positions", 0) or 0
    )


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _optional_int(body: dict[str, Any], key: str, *, minimum: int) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if not _is_int(value):
        raise bad_request(f"'{key}' must be an integer, got {json.dumps(value)}", key)
    if value < minimum:
        raise bad_request(f"'{key}' must be at least {minimum}, got {value}", key)
    return int(value)


def _optional_number(body: dict[str, Any], key: str) -> float | None:
    value = body.get(key)
    if value is None:
        return None
    if not _is_number(value) or not math.isfinite(value):
        raise bad_request(f"'{key}' must be a number, got {json.dumps(value)}", key)
    return float(value)


def _stop_strings(body: dict[str, Any]) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise bad_request("'stop' must be a string or a list of strings", "stop")
    return tuple(dict.fromkeys(s for s in stop if s))


def _message_text(content: object, index: int) -> str:
    param = f"messages[{index}].content"
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts: list[str] = []
        for part in content:
            if not isinstance(part, dict):
                raise bad_request(f"'{param}' parts must be objects", param)
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad_request(
                    f"'{param}': local backends accept text content only "
                    f"(got a part of type {json.dumps(part.get('type'))})",
                    param,
                )
            texts.append(part["text"])
        return "\n".join(texts)
    raise bad_request(f"'{param}' must be a string or a list of content parts", param)


def _messages(body: dict[str, Any]) -> list[dict[str, str]]:
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise bad_request("'messages' must be a non-empty list of messages", "messages")
    out: list[dict[str, str]] = []
    for i, message in enumerate(raw):
        if not isinstance(message, dict):
            raise bad_request(f"'messages[{i}]' must be an object", f"messages[{i}]")
        role = message.get("role")
        if not isinstance(role, str):
            raise bad_request(f"'messages[{i}].role' must be a string", f"messages[{i}].role")
        out.append({"role": role, "content": _message_text(message.get("content"), i)})
    return out


class RequestParser:
    """Reads request bodies for one model: its tokenizer (and chat template), vocabulary size,
    context length (0: unknown) and the backend's ``max_new_tokens``.

    :meth:`parse` tokenises (a chat template on a long conversation takes a while): call it off
    the event loop.
    """

    def __init__(
        self, tokenizer: Any, *, vocab_size: int, context: int, max_new_tokens: int
    ) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.context = context
        self.max_new_tokens = max_new_tokens

    def prompt_ids(self, endpoint: Endpoint, body: dict[str, Any]) -> list[int]:
        """The prompt's token ids: the chat template applied to ``messages``, or ``prompt``
        (a string, a list of one string, or token ids)."""
        tokenizer = self.tokenizer
        if endpoint == "chat/completions":
            messages = _messages(body)
            if getattr(tokenizer, "chat_template", None):
                try:
                    text = tokenizer.apply_chat_template(
                        messages, add_generation_prompt=True, tokenize=False
                    )
                except Exception as exc:  # jinja raises its own types (raise_exception)
                    raise bad_request(
                        f"the model's chat template rejected the messages: {exc}", "messages"
                    ) from exc
            else:
                text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
                text += "assistant:"
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
                prompt = prompt[0]
            if isinstance(prompt, str):
                ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
            elif isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
                ids = list(prompt)  # token ids
            elif isinstance(prompt, list) and len(prompt) > 1:
                raise bad_request(
                    "'prompt': local backends take one prompt per request (a string or a "
                    "list of one string)",
                    "prompt",
                )
            else:
                raise bad_request("'prompt' must be a string or a list of one string", "prompt")
        ids = [int(t) for t in ids]
        if not ids:
            bos = getattr(tokenizer, "bos_token_id", None)
            if bos is None:
                raise bad_request("the prompt is empty", "prompt")
            ids = [int(bos)]
        vocab = self.vocab_size
        if vocab and any(not 0 <= t < vocab for t in ids):
            raise bad_request(f"'prompt' has token ids outside 0..{vocab - 1}", "prompt")
        return ids

    def parse(self, endpoint: Endpoint, body: dict[str, Any], stream: bool) -> GenerationParams:
        """Validate ``body`` and tokenise its prompt; :func:`bad_request` on a bad field."""
        if not isinstance(body, dict):
            raise bad_request("the request body must be a JSON object")
        n = _optional_int(body, "n", minimum=1)
        if n is not None and n > 1:
            raise bad_request(f"n={n}: n>1 is not supported by local backends", "n")
        requested = _optional_int(body, "max_completion_tokens", minimum=1)
        if requested is None:
            requested = _optional_int(body, "max_tokens", minimum=1)
        temperature = _optional_number(body, "temperature")
        if temperature is not None and temperature < 0:
            raise bad_request(f"'temperature' must be >= 0, got {temperature:g}", "temperature")
        top_p = _optional_number(body, "top_p")
        if top_p is not None and not 0 < top_p <= 1:
            raise bad_request(f"'top_p' must be in (0, 1], got {top_p:g}", "top_p")
        seed = _optional_int(body, "seed", minimum=-(2**63))
        stop = _stop_strings(body)
        ignore_eos = body.get("ignore_eos", False)
        if not isinstance(ignore_eos, bool):
            raise bad_request("'ignore_eos' must be a boolean", "ignore_eos")
        include_usage = False
        options = body.get("stream_options")
        if options is not None:
            if not isinstance(options, dict):
                raise bad_request("'stream_options' must be an object", "stream_options")
            flag = options.get("include_usage", False)
            if not isinstance(flag, bool):
                raise bad_request(
                    "'stream_options.include_usage' must be a boolean",
                    "stream_options.include_usage",
                )
            include_usage = flag and stream
        prompt_ids = self.prompt_ids(endpoint, body)
        limit = self.max_new_tokens
        if self.context:
            room = self.context - len(prompt_ids)
            if room < 1:
                raise bad_request(
                    f"the prompt has {len(prompt_ids)} tokens; this model's context is "
                    f"{self.context} tokens",
                    "messages" if endpoint == "chat/completions" else "prompt",
                    "context_length_exceeded",
                )
            limit = min(limit, room)
        return GenerationParams(
            prompt_ids=prompt_ids,
            max_new_tokens=min(requested, limit) if requested is not None else limit,
            temperature=1.0 if temperature is None else temperature,
            top_p=1.0 if top_p is None else top_p,
            seed=seed,
            stop=stop,
            ignore_eos=ignore_eos,
            include_usage=include_usage,
        )
