"""Outcome data for routing evaluation: prompts with the small and the large model's results.

CSV or JSONL files (or folders of them), one prompt per row, with a column for the prompt and
one per model holding correctness (``True``/``False``, ``1``/``0``, ``yes``/``no``) or a
quality in [0, 1]. The defaults are RouteLLM's column names (``prompt``,
``mistralai/Mixtral-8x7B-Instruct-v0.1`` = small, ``gpt-4-1106-preview`` = large), so its MMLU and
GSM8K files work as they are; other names are options. ``exclude`` drops prompts listed in a
file (RouteLLM's ``contaminated_prompts.jsonl``: objects with ``eval_prompt``, or plain lines).

``answer_col`` also reads the small model's answer text (RouteLLM: ``<small>_response``): the
probe then reads the prompt and that answer as a conversation (:attr:`OutcomeSet.probe_inputs`),
which is what a cascade router checks before it returns the small model's answer.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
from numpy.typing import NDArray

from probes.answers import answer_input
from probes.errors import RouterError
from probes.types import ProbeInput

__all__ = [
    "DEFAULT_LARGE",
    "DEFAULT_PROMPT",
    "DEFAULT_SMALL",
    "OutcomeDataError",
    "OutcomeSet",
    "read_outcomes",
]

DEFAULT_PROMPT: Final = "prompt"
DEFAULT_SMALL: Final = "mistralai/Mixtral-8x7B-Instruct-v0.1"
DEFAULT_LARGE: Final = "gpt-4-1106-preview"
_TRUE = {"true", "1", "yes", "y", "t"}
_FALSE = {"false", "0", "no", "n", "f"}

FloatArray = NDArray[np.float64]


class OutcomeDataError(RouterError, ValueError):
    """An outcome file is missing, unreadable or has bad rows or columns."""


@dataclass(slots=True)
class OutcomeSet:
    """n prompts with the small and the large model's quality (1 = correct)."""

    prompts: list[str]
    small: FloatArray
    large: FloatArray
    groups: list[str]  # the file each row came from (its stem: MMLU subject)
    answers: list[str] | None = None  # the small model's answer to each prompt, when read

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def large_better(self) -> NDArray[np.bool_]:
        """The large model did better than the small one (right where it was wrong)."""
        return np.asarray(self.large > self.small, dtype=bool)

    @property
    def probe_inputs(self) -> list[ProbeInput]:
        """What the probe reads: the prompts; with answers, each prompt and the small model's
        answer (stripped) as a user/assistant conversation (a cascade's check: the gateway's
        cascade reads the same shape, :func:`probes.answers.answer_input`)."""
        if self.answers is None:
            return list(self.prompts)
        return [
            answer_input("chat/completions", [{"role": "user", "content": p}], a)
            for p, a in zip(self.prompts, self.answers, strict=True)
        ]

    def subset(self, idx: Sequence[int] | NDArray[np.int64]) -> OutcomeSet:
        ids = [int(i) for i in idx]
        return OutcomeSet(
            [self.prompts[i] for i in ids],
            self.small[ids],
            self.large[ids],
            [self.groups[i] for i in ids],
            None if self.answers is None else [self.answers[i] for i in ids],
        )


def _value(raw: Any, where: str, column: str) -> float:
    if isinstance(raw, bool):
        return 1.0 if raw else 0.0
    if isinstance(raw, int | float):
        x = float(raw)
    else:
        text = str(raw).strip().lower() if raw is not None else ""
        if text in _TRUE:
            return 1.0
        if text in _FALSE:
            return 0.0
        try:
            x = float(text)
        except ValueError:
            raise OutcomeDataError(
                f"{where}: column {column!r} holds {raw!r}; expected True/False, 1/0 or a "
                "quality in [0, 1]"
            ) from None
    if not (math.isfinite(x) and 0.0 <= x <= 1.0):
        raise OutcomeDataError(f"{where}: column {column!r} holds {x!r}, outside [0, 1]")
    return x


def _files(paths: Iterable[str | Path], exclude: Path | None) -> list[Path]:
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(
                f
                for f in p.iterdir()
                if f.suffix in (".csv", ".jsonl") and (exclude is None or f.resolve() != exclude)
            )
            if not found:
                raise OutcomeDataError(f"folder {p} holds no .csv or .jsonl files")
            out.extend(found)
        elif p.is_file():
            out.append(p)
        else:
            raise OutcomeDataError(f"outcome file {p} does not exist")
    return out


def _rows(path: Path) -> Iterable[tuple[int, dict[str, Any]]]:
    try:
        with path.open(encoding="utf-8", newline="") as f:
            if path.suffix == ".jsonl":
                for line_no, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            row = json.loads(line)
                        except json.JSONDecodeError as exc:
                            raise OutcomeDataError(f"{path}:{line_no}: bad JSON: {exc}") from None
                        if not isinstance(row, dict):
                            raise OutcomeDataError(f"{path}:{line_no}: expected a JSON object")
                        yield line_no, row
            else:
                for row_no, row in enumerate(csv.DictReader(f), 2):
                    yield row_no, dict(row)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise OutcomeDataError(f"cannot read {path}: {exc}") from None


def _excluded(path: Path) -> set[str]:
    """Prompts to drop: ``eval_prompt`` (or ``prompt``) of each JSONL object, else each line."""
    if path.suffix != ".jsonl":
        return set(path.read_text(encoding="utf-8").splitlines())
    out: set[str] = set()
    for _, row in _rows(path):
        for key in ("eval_prompt", "prompt"):
            if isinstance(row.get(key), str):
                out.add(row[key])
                break
    return out


def read_outcomes(
    paths: Sequence[str | Path],
    *,
    prompt_col: str = DEFAULT_PROMPT,
    small_col: str = DEFAULT_SMALL,
    large_col: str = DEFAULT_LARGE,
    answer_col: str | None = None,
    exclude: str | Path | None = None,
    sample: int | None = None,
    seed: int = 0,
) -> OutcomeSet:
    """Read outcome rows from files or folders (in sorted file order, rows as stored).

    ``answer_col`` names a column with the small model's answer text (kept in
    :attr:`OutcomeSet.answers`; none may be empty). ``sample`` keeps a seeded random subset of
    that many rows, in file order (the same rows as ``bench/_data.read_mmlu`` for RouteLLM's
    MMLU folder).
    """
    skip_path = Path(exclude).resolve() if exclude is not None else None
    if skip_path is not None and not skip_path.is_file():
        raise OutcomeDataError(f"--exclude file {exclude} does not exist")
    skip = _excluded(skip_path) if skip_path is not None else set()
    prompts: list[str] = []
    small: list[float] = []
    large: list[float] = []
    groups: list[str] = []
    answers: list[str] | None = [] if answer_col is not None else None
    columns = (prompt_col, small_col, large_col, *(() if answer_col is None else (answer_col,)))
    for path in _files(paths, skip_path):
        for row_no, row in _rows(path):
            where = f"{path}:{row_no}"
            missing = [c for c in columns if c not in row]
            if missing:
                have = ", ".join(repr(k) for k in row)
                fix = "name the columns with --prompt-column, --small-column and --large-column"
                if missing[0] == answer_col:
                    fix = "give the column of the small model's answer text with --answer-column"
                raise OutcomeDataError(
                    f"{where}: no column {missing[0]!r}; the row has {have}. Fix: {fix}"
                )
            prompt = row[prompt_col]
            if not isinstance(prompt, str) or not prompt.strip():
                raise OutcomeDataError(f"{where}: the prompt is empty")
            if prompt in skip:
                continue
            if answer_col is not None and answers is not None:
                answer = row[answer_col]
                if not isinstance(answer, str) or not answer.strip():
                    raise OutcomeDataError(
                        f"{where}: the answer in column {answer_col!r} is empty. Fix: drop the "
                        "row, or leave out --answer-column to probe the prompts alone"
                    )
                answers.append(answer)
            prompts.append(prompt)
            small.append(_value(row[small_col], where, small_col))
            large.append(_value(row[large_col], where, large_col))
            groups.append(path.stem)
    if not prompts:
        raise OutcomeDataError("no outcome rows were read (all excluded or empty files)")
    out = OutcomeSet(prompts, np.array(small), np.array(large), groups, answers)
    if sample is not None and sample < len(out):
        keep = np.sort(np.random.default_rng(seed).choice(len(out), size=sample, replace=False))
        out = out.subset(keep)
    return out
