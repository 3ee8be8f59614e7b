"""Labels from a known answer: both answers checked against the expected one, no judge call.

``labelling.reference`` names where a request body carries its expected answer (a dotted path,
e.g. ``metadata.reference``) and how answers are compared (``extract``):

- ``last_number``: the last number in each text (``1,234.50`` and ``1234.5`` are equal);
- ``choice_letter``: the letter A-J a multiple-choice answer chose ("The answer is (C)",
  "Answer: C", a lone "C.");
- ``exact``: the whole text, case and surrounding or repeated whitespace ignored.

The label: only the large answer right: 1.0; only the small one right: 0.0; both or neither:
0.5.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

__all__ = ["Checked", "Extract", "check", "expected_answer", "extract"]

Extract = Literal["last_number", "choice_letter", "exact"]

_NUMBER: Final = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
_CHOICE_STATED: Final = re.compile(
    r"(?i:answer|choice|option)\s*(?:is|:|=)?\s*(?:(?i:option|choice)\s*)?[(\[*]*\s*([A-J])\b"
)
_CHOICE_ALONE: Final = re.compile(r"^\W*\(?([A-J])\)?\W*$")
_CHOICE_PARENS: Final = re.compile(r"\(([A-J])\)")


def expected_answer(body: Mapping[str, Any], field: str) -> str | None:
    """The expected answer at the dotted path ``field`` of a request body (a string, or a
    number written as text), None when absent or of another type."""
    value: Any = body
    for part in field.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        return None
    text = str(value).strip()
    return text or None


def extract(text: str, how: Extract) -> str | None:
    """The comparable part of an answer (see the module docstring), None when it has none."""
    if how == "exact":
        return " ".join(text.split()).casefold() or None
    if how == "last_number":
        numbers = _NUMBER.findall(text)
        if not numbers:
            return None
        try:
            value = float(numbers[-1].replace(",", ""))
        except ValueError:
            return None
        return repr(value)
    for pattern in (_CHOICE_STATED, _CHOICE_ALONE, _CHOICE_PARENS):
        found = pattern.findall(text.strip())
        if found:
            return str(found[-1])
    return None


@dataclass(frozen=True, slots=True)
class Checked:
    """Both answers against the expected one: ``large_better`` and what was compared."""

    large_better: float
    notes: tuple[str, str]  # "small: <extracted> (right|wrong; expected <x>)", then large
    short: tuple[str, str]  # "small: right|wrong", then large (no answer text)


def check(expected: str, small: str, large: str, how: Extract) -> Checked:
    """Compare both answers with ``expected`` (the expected answer goes through the same
    extraction, so ``"42"`` and ``"#### 42"`` both work)."""
    want = extract(expected, how) or " ".join(expected.split()).casefold()
    got_small, got_large = extract(small, how), extract(large, how)
    small_ok, large_ok = got_small == want, got_large == want
    large_better = 0.5 if small_ok == large_ok else (1.0 if large_ok else 0.0)
    marks = ("right" if small_ok else "wrong", "right" if large_ok else "wrong")
    notes = (
        f"small: {got_small} ({marks[0]}; expected {want})",
        f"large: {got_large} ({marks[1]}; expected {want})",
    )
    return Checked(large_better, notes, (f"small: {marks[0]}", f"large: {marks[1]}"))
