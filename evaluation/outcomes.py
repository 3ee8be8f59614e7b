"""Outcome data for routing evaluation: prompts with the small and the large model's results.

CSV, JSONL or JSON files (a JSON file holds a list of objects; or folders of them), one prompt
per row, with a column for the prompt and one per model holding correctness (``True``/``False``,
``1``/``0``, ``yes``/``no``) or a quality in [0, 1]. The defaults are RouteLLM's column names
(``prompt``, ``mistralai/Mixtral-8x7B-Instruct-v0.1`` = small, ``gpt-4-1106-preview`` = large),
so its MMLU and GSM8K files work as they are; other names are options. ``exclude`` drops prompts
listed in a file (RouteLLM's ``contaminated_prompts.jsonl``: objects with ``eval_prompt``, or
plain lines).

A column is a key of the row; failing that, ``a.b`` names key ``b`` inside the object at key
``a`` (split at the first dot whose left part is an object of the row, then again inside it):
RouterDC's ``scores.mistralai/Mistral-7B-v0.1`` (:func:`column_value`). A prompt (or answer)
stored as a list of strings, or as a string holding a Python list literal of strings
(RouterBench's ``"['Question ...']"``), is read as those strings joined by a blank line
(:func:`as_text`).

``answer_col`` also reads the small model's answer text (RouteLLM: ``<small>_response``): the
probe then reads the prompt and that answer as a conversation (:attr:`OutcomeSet.probe_inputs`),
which is what a cascade router checks before it returns the small model's answer.
"""

from __future__ import annotations

import ast
import csv
import json
import math
import sys
from collections.abc import Iterable, Mapping, Sequence
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
    "as_text",
    "column_value",
    "concat_outcomes",
    "outcome_rows",
    "read_outcomes",
    "sample_outcomes",
]

DEFAULT_PROMPT: Final = "prompt"
DEFAULT_SMALL: Final = "mistralai/Mixtral-8x7B-Instruct-v0.1"
DEFAULT_LARGE: Final = "gpt-4-1106-preview"
_TRUE = {"true", "1", "yes", "y", "t"}
_FALSE = {"false", "0", "no", "n", "f"}
#: File suffixes read as outcome files (in a folder, the others are skipped).
_SUFFIXES: Final = (".csv", ".jsonl", ".json")

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
    #: what the probe read, when it was not the prompt text alone (a gateway's chat messages,
    #: from labels the gateway collected); None: the prompts (or prompt + answer)
    inputs: list[ProbeInput] | None = None
    #: rows read but left out because a model's outcome cell was empty (RouterBench has a few)
    unscored: int = 0

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
        if self.inputs is not None:
            return list(self.inputs)
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
            None if self.inputs is None else [self.inputs[i] for i in ids],
            self.unscored,
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
                if f.suffix in _SUFFIXES and (exclude is None or f.resolve() != exclude)
            )
            if not found:
                raise OutcomeDataError(f"folder {p} holds no .csv, .jsonl or .json files")
            out.extend(found)
        elif p.is_file():
            out.append(p)
        else:
            raise OutcomeDataError(f"outcome file {p} does not exist")
    return out


def outcome_rows(path: Path) -> Iterable[tuple[int, dict[str, Any]]]:
    """(row number, row) of a CSV, JSONL or JSON file (JSON: its list's index, from 1)."""
    try:
        if path.suffix == ".json":
            yield from _json_rows(path)
            return
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
                _allow_large_fields()
                for row_no, row in enumerate(csv.DictReader(f), 2):
                    yield row_no, dict(row)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise OutcomeDataError(f"cannot read {path}: {exc}") from None


def _json_rows(path: Path) -> Iterable[tuple[int, dict[str, Any]]]:
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise OutcomeDataError(f"{path}: bad JSON: {exc}") from None
    if not isinstance(rows, list):
        raise OutcomeDataError(
            f"{path}: expected a JSON list of objects, found {type(rows).__name__}. Fix: give "
            "one object per prompt in a list, or one per line in a .jsonl file"
        )
    for i, row in enumerate(rows, 1):
        if not isinstance(row, dict):
            raise OutcomeDataError(f"{path}:{i}: item {i} of the list is not a JSON object")
        yield i, row


def _allow_large_fields() -> None:
    """Let the csv module read fields of any size (RouterBench's prompts exceed its 128 kB)."""
    limit = sys.maxsize
    while True:
        try:
            csv.field_size_limit(limit)
            return
        except OverflowError:  # a C long narrower than sys.maxsize
            limit //= 2


def column_value(row: Mapping[str, Any], column: str) -> tuple[bool, Any]:
    """(found, value) of ``column`` in ``row``: the key itself, else a dotted path into a nested
    object, split at the first dot whose left part is an object of the row (then again inside
    it): ``scores.mistralai/Mistral-7B-v0.1`` is key ``mistralai/Mistral-7B-v0.1`` of
    ``row["scores"]``."""
    if column in row:
        return True, row[column]
    start = 0
    while (dot := column.find(".", start)) > 0:
        inner = row.get(column[:dot])
        if isinstance(inner, Mapping):
            found, value = column_value(inner, column[dot + 1 :])
            if found:
                return True, value
        start = dot + 1
    return False, None


def as_text(value: Any) -> Any:
    """A list of strings, or a string holding a Python list literal of strings (RouterBench's
    prompts), as those strings joined by a blank line; anything else as it is."""
    items = value
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            items = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            return value
    if isinstance(items, list) and items and all(isinstance(x, str) for x in items):
        return "\n\n".join(items)
    return value


def _excluded(path: Path) -> set[str]:
    """Prompts to drop: ``eval_prompt`` (or ``prompt``) of each JSONL object, else each line."""
    if path.suffix != ".jsonl":
        return set(path.read_text(encoding="utf-8").splitlines())
    out: set[str] = set()
    for _, row in outcome_rows(path):
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
    group: str | None = None,
) -> OutcomeSet:
    """Read outcome rows from files or folders (in sorted file order, rows as stored).

    ``answer_col`` names a column with the small model's answer text (kept in
    :attr:`OutcomeSet.answers`; none may be empty). ``sample`` keeps a seeded random subset of
    that many rows, in file order (the same rows as ``bench/_data.read_mmlu`` for RouteLLM's
    MMLU folder). Each row's group is ``group`` when given (a source's name), else its file's
    stem.
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
    unscored = 0
    for path in _files(paths, skip_path):
        for row_no, row in outcome_rows(path):
            where = f"{path}:{row_no}"
            values = [column_value(row, c) for c in columns]
            missing = [c for c, (found, _) in zip(columns, values, strict=True) if not found]
            if missing:
                have = ", ".join(repr(k) for k in row)
                fix = "name the columns with --prompt-column, --small-column and --large-column"
                if missing[0] == answer_col:
                    fix = "give the column of the small model's answer text with --answer-column"
                raise OutcomeDataError(
                    f"{where}: no column {missing[0]!r}; the row has {have}. Fix: {fix} (a "
                    "nested field as OBJECT.KEY, e.g. scores.MODEL)"
                )
            if any(_empty(values[i][1]) for i in (1, 2)):
                unscored += 1
                continue
            prompt = as_text(values[0][1])
            if not isinstance(prompt, str) or not prompt.strip():
                raise OutcomeDataError(f"{where}: the prompt is empty")
            if prompt in skip:
                continue
            if answer_col is not None and answers is not None:
                answer = as_text(values[3][1])
                if not isinstance(answer, str) or not answer.strip():
                    raise OutcomeDataError(
                        f"{where}: the answer in column {answer_col!r} is empty. Fix: drop the "
                        "row, or leave out --answer-column to probe the prompts alone"
                    )
                answers.append(answer)
            prompts.append(prompt)
            small.append(_value(values[1][1], where, small_col))
            large.append(_value(values[2][1], where, large_col))
            groups.append(path.stem if group is None else group)
    if not prompts:
        raise OutcomeDataError(
            "no outcome rows were read (all excluded, empty files, or no row with both "
            "models' outcomes)"
        )
    out = OutcomeSet(prompts, np.array(small), np.array(large), groups, answers, unscored=unscored)
    return out if sample is None else sample_outcomes(out, sample, seed)


def _empty(raw: Any) -> bool:
    """An outcome cell with nothing in it (the model was not scored on that prompt)."""
    return raw is None or (isinstance(raw, str) and not raw.strip())


def sample_outcomes(data: OutcomeSet, sample: int, seed: int = 0) -> OutcomeSet:
    """A seeded random subset of ``sample`` rows, in their order (all rows when fewer)."""
    if sample >= len(data):
        return data
    keep = np.sort(np.random.default_rng(seed).choice(len(data), size=sample, replace=False))
    return data.subset(keep)


def concat_outcomes(parts: Sequence[OutcomeSet]) -> OutcomeSet:
    """The rows of ``parts`` one after the other (answers and probe inputs kept only when every
    part has them: a part without answers mixed with one with them is an error)."""
    if not parts:
        raise OutcomeDataError("no outcome data to combine")
    with_answers = [p.answers is not None for p in parts]
    if any(with_answers) and not all(with_answers):
        raise OutcomeDataError(
            "some outcome files have the small model's answers and some do not. Fix: give an "
            "answer column for every file (answer=NAME in its mapping, or --answer-column), or "
            "for none"
        )
    answers = [a for p in parts for a in (p.answers or [])] if all(with_answers) else None
    with_inputs = all(p.inputs is not None for p in parts)
    return OutcomeSet(
        [x for p in parts for x in p.prompts],
        np.concatenate([p.small for p in parts]),
        np.concatenate([p.large for p in parts]),
        [g for p in parts for g in p.groups],
        answers,
        [x for p in parts for x in (p.inputs or [])] if with_inputs else None,
        sum(p.unscored for p in parts),
    )
