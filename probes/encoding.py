"""Turn a probe input (a string or chat messages) into the exact token ids the probe model sees.

:class:`PromptEncoder` needs only the tokenizer, so a gateway that probes on a remote server
(:mod:`router.remote_probe`) tokenises exactly as the local :class:`~probes.probe.SparsityProbe`
does, without loading the model's weights: the chat template with the generation prompt (and
the configured system prompt), special tokens added once, the tail kept past ``max_tokens``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from probes.errors import ProbeInputError

if TYPE_CHECKING:
    from probes.probe import ProbeInput, ProbeSettings

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
        messages = self.messages(item, index)
        if self.templated:
            text = self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
            return str(text)
        return "\n".join(m["content"] for m in messages)

    def messages(self, item: ProbeInput, index: int = 0) -> list[dict[str, str]]:
        """The input as chat messages, the configured system prompt first."""
        if isinstance(item, str):
            if not item.strip():
                raise ProbeInputError(f"input {index} is empty: there is nothing to probe")
            messages = [{"role": "user", "content": item}]
        elif isinstance(item, Sequence) and not isinstance(item, bytes | bytearray):
            messages = [_message(m, index, j) for j, m in enumerate(item)]
            if not messages or not any(m["content"].strip() for m in messages):
                raise ProbeInputError(f"input {index} has no message text: nothing to probe")
        else:
            raise ProbeInputError(
                f"input {index} is a {type(item).__name__}: give a string or a list of "
                "chat messages ({'role': ..., 'content': ...})"
            )
        if self.settings.system_prompt and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": self.settings.system_prompt})
        return messages

    def encode(self, item: ProbeInput, index: int = 0) -> tuple[list[int], bool]:
        """Token ids of one input, tail-truncated to ``max_tokens``; and whether it was cut."""
        text = self.render(item, index)
        # A rendered chat template already holds its special tokens: do not add them twice.
        ids: list[int] = self.tokenizer(text, add_special_tokens=not self.templated)["input_ids"]
        if not ids:
            raise ProbeInputError(f"input {index} tokenizes to nothing: nothing to probe")
        limit = self.settings.max_tokens
        return (ids[-limit:], True) if len(ids) > limit else (ids, False)


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
