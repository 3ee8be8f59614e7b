"""Readers for the benchmark data and text perturbations for shift tests.

Only the standard library and numpy: no torch, no pandas. The benchmark data folder is the one
given with ``--data DIR``, else ``$SPARSITY_ROUTER_DATA``; nothing is vendored in this repository.
docs/benchmarks.md lists the public data sets, their sources and licences, and the folder layout
the readers expect. Every reader returns rows in a fixed order, so seeded samples are reproducible.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "DATA_ENV",
    "DOCS",
    "MGSM_LANGUAGES",
    "MathProblem",
    "Outcome",
    "add_data_argument",
    "char_noise",
    "data_root",
    "random_tokens",
    "read_gsm8k",
    "read_math500",
    "read_mgsm",
    "read_mmlu",
    "shuffle_words",
]

DATA_ENV = "SPARSITY_ROUTER_DATA"
DOCS = "docs/benchmarks.md"
MGSM_LANGUAGES = ("bn", "de", "en", "es", "fr", "ja", "ru", "sw", "te", "th", "zh")
WEAK_MODEL = "mistralai/Mixtral-8x7B-Instruct-v0.1"
STRONG_MODEL = "gpt-4-1106-preview"


def add_data_argument(parser: argparse.ArgumentParser) -> None:
    """Add the ``--data DIR`` option every benchmark takes (read it with :func:`data_root`)."""
    parser.add_argument(
        "--data",
        type=Path,
        default=None,
        help=f"the benchmark data folder (--data / ${DATA_ENV}, see {DOCS})",
    )


def data_root(override: str | os.PathLike[str] | None = None) -> Path:
    """The benchmark data folder: ``override`` (``--data``), else ``$SPARSITY_ROUTER_DATA``.

    Raises ``FileNotFoundError``, saying how to set it, when neither is given or it is missing.
    """
    if override is not None and str(override):
        root = Path(override).expanduser()
    elif os.environ.get(DATA_ENV):
        root = Path(os.environ[DATA_ENV]).expanduser()
    else:
        raise FileNotFoundError(
            f"no benchmark data folder: pass --data DIR or set {DATA_ENV}=DIR "
            f"(the public data sets and the layout under DIR: {DOCS})"
        )
    if not root.is_dir():
        raise FileNotFoundError(
            f"benchmark data folder {root} does not exist: pass --data DIR or set {DATA_ENV}=DIR "
            f"(see {DOCS})"
        )
    return root


@dataclass(frozen=True, slots=True)
class MathProblem:
    problem: str
    level: int
    subject: str


@dataclass(frozen=True, slots=True)
class Outcome:
    """A prompt and whether the weak (Mixtral) and strong (GPT-4) model answered it correctly."""

    prompt: str
    weak_correct: bool
    strong_correct: bool
    group: str  # MMLU subject; "gsm8k" for GSM8K


def read_math500(root: Path) -> list[MathProblem]:
    rows = []
    with (root / "math500" / "test.jsonl").open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                d = json.loads(line)
                rows.append(MathProblem(str(d["problem"]), int(d["level"]), str(d["subject"])))
    return rows


def read_mgsm(root: Path, lang: str) -> list[str]:
    """The 250 MGSM questions in ``lang`` (same problems, same order, in every language)."""
    if lang not in MGSM_LANGUAGES:
        raise ValueError(f"unknown MGSM language {lang!r}; known: {', '.join(MGSM_LANGUAGES)}")
    path = root / "mgsm" / f"mgsm_{lang}.tsv"
    with path.open(encoding="utf-8", newline="") as f:
        return [row[0] for row in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if row]


def _flag(value: str) -> bool:
    if value not in ("True", "False"):
        raise ValueError(f"expected True/False, got {value!r}")
    return value == "True"


def _read_outcomes(path: Path, group: str) -> list[Outcome]:
    with path.open(encoding="utf-8", newline="") as f:
        return [
            Outcome(row["prompt"], _flag(row[WEAK_MODEL]), _flag(row[STRONG_MODEL]), group)
            for row in csv.DictReader(f)
        ]


def read_gsm8k(root: Path) -> list[Outcome]:
    """All 1,319 GSM8K test questions with Mixtral/GPT-4 correctness (RouteLLM)."""
    return _read_outcomes(root / "routellm" / "gsm8k" / "gsm8k_responses.csv", "gsm8k")


def read_mmlu(root: Path, n: int | None = None, seed: int = 0) -> list[Outcome]:
    """RouteLLM's MMLU outcomes without its contaminated prompts; a seeded sample of ``n``.

    The sample keeps the file order (subjects alphabetically, rows as stored).
    """
    folder = root / "routellm" / "mmlu"
    with (folder / "contaminated_prompts.jsonl").open(encoding="utf-8") as f:
        contaminated = {json.loads(line)["eval_prompt"] for line in f if line.strip()}
    rows: list[Outcome] = []
    for path in sorted(folder.glob("mmlu_*.csv")):
        subject = path.stem.removeprefix("mmlu_")
        rows.extend(r for r in _read_outcomes(path, subject) if r.prompt not in contaminated)
    if n is not None and n < len(rows):
        keep = np.sort(np.random.default_rng(seed).choice(len(rows), size=n, replace=False))
        rows = [rows[int(i)] for i in keep]
    return rows


# -- perturbations ------------------------------------------------------------------------


def shuffle_words(text: str, rng: np.random.Generator) -> str:
    """The same whitespace-separated words in a random order."""
    words = text.split()
    order = rng.permutation(len(words))
    return " ".join(words[int(i)] for i in order)


_NOISE_ALPHABET = string.ascii_letters + string.digits + string.punctuation


def char_noise(text: str, rng: np.random.Generator, rate: float = 0.3) -> str:
    """Each non-space character replaced, with probability ``rate``, by a random printable one."""
    chars = list(text)
    hits = rng.random(len(chars)) < rate
    picks = rng.integers(0, len(_NOISE_ALPHABET), len(chars))
    for i, c in enumerate(chars):
        if hits[i] and not c.isspace():
            chars[i] = _NOISE_ALPHABET[int(picks[i])]
    return "".join(chars)


def random_tokens(
    text: str,
    rng: np.random.Generator,
    encode: Callable[[str], Sequence[int]],
    decode: Callable[[Sequence[int]], str],
    vocab: Sequence[int],
) -> str:
    """As many uniformly random token ids from ``vocab`` as ``text`` has tokens, decoded."""
    n = max(1, len(encode(text)))
    ids = rng.choice(np.asarray(vocab), size=n, replace=True)
    out = decode([int(i) for i in ids])
    return out if out.strip() else "?"
