"""What the probe reads to check an answer, without torch.

A cascade (the gateway's :mod:`router.cascade`) and the offline reader of outcome data
(:mod:`evaluation.outcomes`) both probe a prompt followed by the small model's answer: the
conversation with that answer as the assistant's turn. Both build it here, so that a calibration
fitted offline (``calibrate --labels --answer-column``) reads the same shape the gateway serves.
"""

from __future__ import annotations

from typing import Literal

from probes.types import ProbeInput

__all__ = ["AnswerEndpoint", "answer_input"]

#: The OpenAI endpoint an answer came from: a chat completion or a (legacy) text completion.
AnswerEndpoint = Literal["chat/completions", "completions"]


def answer_input(endpoint: AnswerEndpoint, probe_input: ProbeInput, text: str) -> ProbeInput:
    """What the probe reads to check an answer: the conversation with the answer as the
    assistant's turn (the shape ``calibrate --labels --answer-column`` fits on)."""
    answer = {"role": "assistant", "content": text.strip()}
    if endpoint == "completions" or isinstance(probe_input, str):
        return [{"role": "user", "content": str(probe_input)}, answer]
    return [*probe_input, answer]
