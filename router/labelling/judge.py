"""The pairwise judge: its prompt, reading its verdict from free text, and combining two verdicts.

The prompt follows MT-Bench's pairwise comparison (Zheng et al., 2023, "Judging LLM-as-a-Judge"):
the question, answer A, answer B, and an instruction to finish with ``[[A]]``, ``[[B]]`` or
``[[C]]`` (a tie). The gateway asks it twice with the answers' positions swapped (small as A,
then large as A) to cancel the judge's position bias; both verdicts naming the large answer give
1.0, both naming the small one 0.0, anything else (a tie, or the verdicts disagree) 0.5.

:func:`parse_verdict` reads a verdict from a model's free text: the last ``[[A]]``, ``[[B]]``
or ``[[C]]`` (spaces inside allowed), else a few conservative phrasings ("Assistant A is
better", "Final verdict: B", "verdict: tie", a lone ``[A]`` at the very end); phrasings that
point both ways, or none, give None (the label is dropped, counted as ``unparsed``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, Final, Literal

__all__ = [
    "JUDGE_SYSTEM",
    "JUDGE_USER",
    "Side",
    "Verdict",
    "combine",
    "judge_messages",
    "parse_verdict",
    "question_text",
    "side",
]

Verdict = Literal["A", "B", "C"]
#: Which answer a verdict prefers, once positions are undone: large, small or tie.
Side = Literal["large", "small", "tie"]

JUDGE_SYSTEM: Final = (
    "Please act as an impartial judge and evaluate the quality of the responses provided by "
    "two AI assistants to the user question displayed below. You should choose the assistant "
    "that follows the user's instructions and answers the user's question better. Your "
    "evaluation should consider factors such as the helpfulness, relevance, accuracy, depth, "
    "creativity, and level of detail of their responses. Begin your evaluation by comparing "
    "the two responses and provide a short explanation. Avoid any position biases and ensure "
    "that the order in which the responses were presented does not influence your decision. "
    "Do not allow the length of the responses to influence your evaluation. Be as objective "
    "as possible. After providing your explanation, output your final verdict by strictly "
    'following this format: "[[A]]" if assistant A is better, "[[B]]" if assistant B is '
    'better, and "[[C]]" for a tie.'
)

JUDGE_USER: Final = (
    "[User Question]\n{question}\n\n"
    "[The Start of Assistant A's Answer]\n{answer_a}\n[The End of Assistant A's Answer]\n\n"
    "[The Start of Assistant B's Answer]\n{answer_b}\n[The End of Assistant B's Answer]"
)


def question_text(prompt: str | Sequence[Mapping[str, Any]]) -> str:
    """What the judge is shown as the question: a prompt as is; chat messages as one text (a
    lone user message as its content, a conversation as ``role: content`` lines; content
    parts' texts joined, other parts shown as ``[image]`` and the like)."""
    if isinstance(prompt, str):
        return prompt
    lines = [(str(m.get("role") or "user"), _content_text(m.get("content"))) for m in prompt]
    if len(lines) == 1 and lines[0][0] == "user":
        return lines[0][1]
    return "\n\n".join(f"{role}: {text}" for role, text in lines)


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return ""
    parts: list[str] = []
    for part in content:
        if isinstance(part, Mapping):
            text = part.get("text")
            parts.append(text if isinstance(text, str) else f"[{part.get('type', 'part')}]")
    return "\n".join(parts)


def judge_messages(question: str, answer_a: str, answer_b: str) -> list[dict[str, str]]:
    """The chat messages of one judge call: :data:`JUDGE_SYSTEM`, then :data:`JUDGE_USER`."""
    user = JUDGE_USER.format(question=question, answer_a=answer_a, answer_b=answer_b)
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": user}]


_MARKER = re.compile(r"\[\[\s*([ABC])\s*\]\]")
_FALLBACKS: Final = (
    # "Final verdict: [A]", "verdict: B", "My verdict is (C)"
    re.compile(r"\b(?i:verdict)\s*(?:is|:|-)?\s*[\[(\"'*]*\s*([ABC])\b(?![\w'])"),
    # "Assistant A is better", "Answer B is clearly better", "Response A's answer is better"
    re.compile(
        r"\b(?i:assistant|answer|response)\s+([AB])(?:'s\s+(?i:answer|response))?\s+is\s+"
        r"(?:clearly\s+|slightly\s+|much\s+)?(?:the\s+)?better\b"
    ),
    # "A is better", "Overall, B is the better answer" (at the start of a sentence or clause,
    # so that "neither A nor B is better" is no verdict)
    re.compile(r"(?:^|[.,:;!\n]\s*)([AB])\s+is\s+(?:clearly\s+)?(?:the\s+)?better\b", re.M),
)
_TIE = re.compile(r"\bverdict\s*(?:is|:|-)?\s*(?:a\s+)?tie\b|\bit'?s\s+a\s+tie\b", re.IGNORECASE)
_FINAL_BRACKET = re.compile(r"\[\s*([ABC])\s*\]\W*$")


def parse_verdict(text: str) -> Verdict | None:
    """The verdict in a judge's free text (see the module docstring), None when there is none
    or the fallback phrasings disagree."""
    markers = _MARKER.findall(text)
    if markers:
        return _verdict(markers[-1])
    found: set[str] = set()
    for pattern in _FALLBACKS:
        found.update(m.upper() for m in pattern.findall(text))
    if _TIE.search(text):
        found.add("C")
    final = _FINAL_BRACKET.search(text)
    if final is not None:
        found.add(final.group(1))
    return _verdict(found.pop()) if len(found) == 1 else None


def _verdict(letter: str) -> Verdict | None:
    if letter == "A":
        return "A"
    if letter == "B":
        return "B"
    if letter == "C":
        return "C"
    return None


def side(verdict: Verdict, large_is: Literal["A", "B"]) -> Side:
    """Which answer ``verdict`` prefers when the large answer was shown as ``large_is``."""
    if verdict == "C":
        return "tie"
    return "large" if verdict == large_is else "small"


def combine(first: Side, second: Side) -> float:
    """``large_better`` from the two verdicts: 1.0 when both prefer the large answer, 0.0 when
    both prefer the small one, else 0.5."""
    if first == second == "large":
        return 1.0
    if first == second == "small":
        return 0.0
    return 0.5
