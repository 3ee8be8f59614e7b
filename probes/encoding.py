"""Turn a probe input (a string or chat messages) into the exact token ids the probe model sees.

:class:`PromptEncoder` needs only the tokenizer, so a gateway that probes on a remote server
(:mod:`router.remote_probe`) tokenises exactly as the local :class:`~probes.probe.SparsityProbe`
does, without loading the model's weights: the chat template with the generation prompt (and
the configured system prompt), special tokens added once, the tail kept past ``max_tokens``.

The probe's cost is bounded *before* the chat template and the tokenizer: only the last
``max_messages`` messages and the last ``max_chars`` characters of text are read (their
defaults never cut into what ``max_tokens`` keeps), so a 20,000-message conversation costs
about what a ``max_tokens`` prompt does. A leading system message is not kept apart: a
conversation long enough to lose it would lose it to the ``max_tokens`` tail anyway.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from probes.errors import ProbeInputError
from probes.types import ProbeInput, ProbeSettings

__all__ = ["PromptEncoder"]


class PromptEncoder:
    """Renders and tokenises probe inputs as the probe's settings say."""

    def __init__(self, settings: ProbeSettings, tokenizer: Any) -> None:
        self.settings = settings
        self.tokenizer = tokenizer

    @property
    def templated(self) -> bool:
        """Whether inputs go through the tokenizer's chat template."""
        return self.settings.chat_template and bool(getattr(self.tokenizer, "chat_template", None))

    def render(self, item: ProbeInput, index: int = 0) -> str:
        """The exact text the model sees for one input (chat template applied when enabled)."""
        return self._render(self._bounded(item, index)[0])

    def messages(self, item: ProbeInput, index: int = 0) -> list[dict[str, str]]:
        """The input as chat messages, the configured system prompt first; only the last
        ``max_messages`` messages and ``max_chars`` characters of text are kept."""
        return self._bounded(item, index)[0]

    def encode(self, item: ProbeInput, index: int = 0) -> tuple[list[int], bool]:
        """Token ids of one input, tail-truncated to ``max_chars``/``max_messages`` before
        templating and to ``max_tokens`` after; and whether anything was cut."""
        messages, cut = self._bounded(item, index)
        text = self._render(messages)
        # A rendered chat template already holds its special tokens: do not add them twice.
        ids: list[int] = self.tokenizer(text, add_special_tokens=not self.templated)["input_ids"]
        if not ids:
            raise ProbeInputError(f"input {index} tokenizes to nothing: nothing to probe")
        limit = self.settings.max_tokens
        return (ids[-limit:], True) if len(ids) > limit else (ids, cut)

    def _render(self, messages: list[dict[str, str]]) -> str:
        if self.templated:
            text = self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
            return str(text)
        return "\n".join(m["content"] for m in messages)

    def _bounded(self, item: ProbeInput, index: int) -> tuple[list[dict[str, str]], bool]:
        """The input's last messages and characters, as chat messages; and whether it was cut.

        Work here is bounded by the limits too: only the kept messages are read."""
        max_chars = self.settings.char_limit
        if isinstance(item, str):
            if not item or item.isspace():
                raise ProbeInputError(f"input {index} is empty: there is nothing to probe")
            cut = len(item) > max_chars
            messages = [{"role": "user", "content": item[-max_chars:] if cut else item}]
        elif isinstance(item, Sequence) and not isinstance(item, bytes | bytearray):
            limit = self.settings.message_limit
            cut = len(item) > limit
            tail = item[-limit:] if cut else item
            first = len(item) - len(tail)
            messages = [_message(m, index, first + j) for j, m in enumerate(tail)]
            messages, cut_chars = _last_chars(messages, max_chars)
            cut = cut or cut_chars
            if not messages or not any(m["content"].strip() for m in messages):
                raise ProbeInputError(f"input {index} has no message text: nothing to probe")
        else:
            raise ProbeInputError(
                f"input {index} is a {type(item).__name__}: give a string or a list of "
                "chat messages ({'role': ..., 'content': ...})"
            )
        if self.settings.system_prompt and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": self.settings.system_prompt})
        return messages, cut


def _last_chars(messages: list[dict[str, str]], budget: int) -> tuple[list[dict[str, str]], bool]:
    """The messages whose contents make up the last ``budget`` characters (the earliest one kept
    cut to its tail); and whether anything was cut."""
    if sum(len(m["content"]) for m in messages) <= budget:
        return messages, False
    kept: list[dict[str, str]] = []
    for m in reversed(messages):
        if budget <= 0:
            break
        content = m["content"]
        if len(content) > budget:
            m = {"role": m["role"], "content": content[-budget:]}
        budget -= len(m["content"])
        kept.append(m)
    kept.reverse()
    return kept, True


def _message(m: Any, index: int, j: int) -> dict[str, str]:
    if not isinstance(m, Mapping):
        raise ProbeInputError(f"input {index}, message {j}: expected an object with role/content")
    role = m.get("role")
    if not isinstance(role, str) or not role:
        raise ProbeInputError(f"input {index}, message {j}: 'role' must be a non-empty string")
    content = m.get("content")
    if content is None:
        content = ""
    elif isinstance(content, list):  # OpenAI content parts: keep the text ones
        content = "\n".join(
            str(p.get("text", "")) for p in content if isinstance(p, Mapping) and "text" in p
        )
    elif not isinstance(content, str):
        raise ProbeInputError(
            f"input {index}, message {j}: 'content' must be a string or a list of parts"
        )
    return {"role": role, "content": content}
