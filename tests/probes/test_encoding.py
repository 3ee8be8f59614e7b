"""PromptEncoder's input caps: the probe's cost is bounded before the chat template (the last
``max_messages`` messages and ``max_chars`` characters), and the defaults never change what the
``max_tokens`` tail holds."""

from __future__ import annotations

from typing import Any

import pytest

from probes.encoding import PromptEncoder
from probes.errors import ProbeInputError
from probes.probe import SparsityProbe
from probes.types import ProbeSettings, probe_fingerprint


class SpyTokenizer:
    """A tokenizer that records how many messages and characters it was handed."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.templated: list[int] = []  # messages per apply_chat_template call
        self.tokenised: list[int] = []  # characters per tokenizer call

    def apply_chat_template(self, messages: list[dict[str, str]], **kwargs: Any) -> Any:
        self.templated.append(len(messages))
        return self.inner.apply_chat_template(messages, **kwargs)

    def __call__(self, text: str, **kwargs: Any) -> Any:
        self.tokenised.append(len(text))
        return self.inner(text, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def conversation(n: int) -> list[dict[str, str]]:
    roles = ("user", "assistant")
    return [{"role": roles[i % 2], "content": f"message {i}: ok"} for i in range(n)]


def encoder(probe: SparsityProbe, **settings: Any) -> tuple[PromptEncoder, SpyTokenizer]:
    spy = SpyTokenizer(probe.loaded.tokenizer)
    return PromptEncoder(probe.settings.model_copy(update=settings), spy), spy


def test_a_20000_message_conversation_is_cut_before_the_template(
    tiny_probe: SparsityProbe,
) -> None:
    enc, spy = encoder(tiny_probe)
    big = conversation(20_000)
    ids, cut = enc.encode(big)
    assert cut and len(ids) == tiny_probe.settings.max_tokens
    # the template and the tokenizer saw max_messages (default: max_tokens) messages, not 20,000
    assert spy.templated == [tiny_probe.settings.max_tokens]
    assert max(spy.tokenised) < 64 * tiny_probe.settings.max_tokens
    assert enc.messages(big) == big[-tiny_probe.settings.max_tokens :]


def test_the_default_caps_keep_the_same_tail_of_tokens(tiny_probe: SparsityProbe) -> None:
    """The defaults cut only what max_tokens would drop anyway: same token ids as no caps."""
    capped, _ = encoder(tiny_probe)
    uncapped, _ = encoder(tiny_probe, max_messages=10**9, max_chars=10**12)
    for item in (conversation(3_000), "The quick brown fox jumps. " * 4_000, conversation(40)):
        assert capped.encode(item) == uncapped.encode(item)


def test_max_chars_keeps_the_last_characters(tiny_probe: SparsityProbe) -> None:
    enc, spy = encoder(tiny_probe, max_chars=100, chat_template=False)
    assert enc.messages("x" * 50 + "y" * 100) == [{"role": "user", "content": "y" * 100}]
    chat = [
        {"role": "system", "content": "s" * 80},
        {"role": "user", "content": "a" * 80},
        {"role": "assistant", "content": "b" * 80},
    ]
    # the earliest message kept is cut to its tail; the system message, outside it, is dropped
    assert enc.messages(chat) == [
        {"role": "user", "content": "a" * 20},
        {"role": "assistant", "content": "b" * 80},
    ]
    _, cut = enc.encode(chat)
    assert cut  # a cut input is reported as truncated even under max_tokens
    assert enc.encode("short") == (enc.encode("short")[0], False)
    assert max(spy.tokenised) <= 101  # 100 characters and the newline joining two messages


def test_max_messages_keeps_the_last_messages(tiny_probe: SparsityProbe) -> None:
    enc, _ = encoder(tiny_probe, max_messages=2, system_prompt="Be brief.")
    chat = conversation(5)
    # the configured system prompt is added to what was kept
    assert enc.messages(chat) == [{"role": "system", "content": "Be brief."}, *chat[-2:]]
    blank_tail = [{"role": "user", "content": "text"}, *({"role": "user", "content": " "},) * 2]
    with pytest.raises(ProbeInputError, match="no message text"):
        enc.messages(blank_tail)  # only the kept messages are read


def test_caps_enter_the_fingerprint_only_when_set() -> None:
    shape: dict[str, Any] = {"n_layers": 4, "hidden_size": 64, "dtype": "float32", "score_layer": 4}
    plain = probe_fingerprint(ProbeSettings(), **shape)
    assert "max_messages" not in plain and "max_chars" not in plain  # old calibrations match
    capped = probe_fingerprint(ProbeSettings(max_messages=8, max_chars=900), **shape)
    assert capped["max_messages"] == 8 and capped["max_chars"] == 900
    with pytest.raises(ValueError):
        ProbeSettings(max_chars=0)
