"""Outcome sources: an outcome file (or folder), its column mapping and a name.

Outcome files from different families name their columns differently (RouteLLM: ``prompt``
and one True/False column per model; RouterBench: a list-literal ``prompt`` and 0/1 columns;
RouterDC: a JSON list of ``{"question", "scores": {model: quality}}``). A :class:`SourceSpec`
says how to read one of them, so files of several families mix in one run:

- on the command line, ``FILE:key=value,key=value`` (:func:`parse_source`), keys ``prompt``,
  ``small``, ``large``, ``answer`` (columns), ``name`` (the source's name, default the file's
  stem) and ``group`` (sources sharing a group are held out together by
  ``eval --by-source``). The spec is split at the first ``:`` followed by ``KEY=`` and the
  pairs at each ``,`` followed by ``KEY=``, so values may hold ``/``, ``.``, ``|`` and ``:``
  (not ``,KEY=``)::

      routerdc.json:prompt=question,small=scores.mistralai/Mistral-7B-v0.1,name=routerdc

- in a manifest (YAML or JSON, :func:`load_manifest`): a list of sources (or ``{sources:
  [...]}``), each ``{path, prompt, small, large, answer, name, group, exclude, sample}``,
  paths relative to the manifest's folder.

Columns a source leaves unset are the command's (``--prompt-column`` ...). Every row read
through a source carries its name in :attr:`~evaluation.outcomes.OutcomeSet.groups`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from evaluation.outcomes import (
    DEFAULT_LARGE,
    DEFAULT_PROMPT,
    DEFAULT_SMALL,
    OutcomeDataError,
    OutcomeSet,
    concat_outcomes,
    read_outcomes,
    sample_outcomes,
)

__all__ = [
    "MAPPING_KEYS",
    "SourceSpec",
    "check_names",
    "holdout_groups",
    "load_manifest",
    "parse_source",
    "read_sources",
]

#: The keys of a ``FILE:key=value,...`` mapping.
MAPPING_KEYS: Final = ("prompt", "small", "large", "answer", "name", "group")
_KEY: Final = "(?:" + "|".join(MAPPING_KEYS) + ")="
_SPEC: Final = re.compile(rf"(?s)(.*?):(?={_KEY})(.*)")
_PAIR_SPLIT: Final = re.compile(rf",(?={_KEY})")


@dataclass(frozen=True, slots=True)
class SourceSpec:
    """One outcome source: a file or folder, its columns (None: the command's), its name (None:
    the file's stem), its hold-out group (None: its name), an exclude file and a sample size."""

    path: Path
    prompt: str | None = None
    small: str | None = None
    large: str | None = None
    answer: str | None = None
    name: str | None = None
    group: str | None = None
    exclude: Path | None = None
    sample: int | None = None

    @property
    def label(self) -> str:
        """The source's name: ``name``, else the file's (or folder's) stem."""
        return self.name if self.name is not None else self.path.stem

    @property
    def holdout(self) -> str:
        """The hold-out group: ``group``, else the name."""
        return self.group if self.group is not None else self.label


def parse_source(text: str) -> SourceSpec:
    """``FILE`` or ``FILE:key=value,...`` as a :class:`SourceSpec` (see the module docstring)."""
    match = _SPEC.fullmatch(text)
    if match is None or Path(text).exists():
        unknown = re.search(r":([A-Za-z_]+)=", text)
        if unknown is not None and not Path(text).exists():
            raise OutcomeDataError(
                f"{text!r}: unknown key {unknown.group(1)!r} in the column mapping. Fix: "
                f"FILE:key=value,... with keys {', '.join(MAPPING_KEYS)}"
            )
        return SourceSpec(Path(text))
    path, mapping = match.group(1), match.group(2)
    if not path:
        raise OutcomeDataError(f"{text!r}: no file before the ':'. Fix: FILE:key=value,...")
    given: dict[str, str] = {}
    for pair in _PAIR_SPLIT.split(mapping):
        key, _, value = pair.partition("=")
        if key in given:
            raise OutcomeDataError(f"{text!r}: {key}= is given twice")
        if not value:
            raise OutcomeDataError(
                f"{text!r}: {key}= has no value. Fix: give it one, or leave {key}= out"
            )
        stray = re.search(r",([A-Za-z_]+)=", value)
        if stray is not None:
            raise OutcomeDataError(
                f"{text!r}: unknown key {stray.group(1)!r} in the column mapping (or a {key}= "
                f"value holding ',{stray.group(1)}='). Fix: keys are {', '.join(MAPPING_KEYS)}"
            )
        given[key] = value
    return SourceSpec(
        Path(path),
        prompt=given.get("prompt"),
        small=given.get("small"),
        large=given.get("large"),
        answer=given.get("answer"),
        name=given.get("name"),
        group=given.get("group"),
    )


# -- the manifest -------------------------------------------------------------------------------


class _Entry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str = Field(min_length=1, description="outcome file or folder, relative to the manifest")
    prompt: str | None = Field(None, min_length=1, description="prompt column")
    small: str | None = Field(None, min_length=1, description="the small model's outcome column")
    large: str | None = Field(None, min_length=1, description="the large model's outcome column")
    answer: str | None = Field(None, min_length=1, description="the small model's answer column")
    name: str | None = Field(None, min_length=1, description="the source's name (default: stem)")
    group: str | None = Field(None, min_length=1, description="held out together with its group")
    exclude: str | None = Field(None, min_length=1, description="prompts to drop (a file)")
    sample: int | None = Field(None, ge=2, description="a seeded random sample of N rows")


class _Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sources: list[_Entry] = Field(min_length=1)


def _loc(loc: Sequence[int | str]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def load_manifest(path: str | Path) -> list[SourceSpec]:
    """The sources a manifest file lists (YAML, or JSON for a ``.json`` file); errors name the
    file and the entry (``sources.yaml: sources[2].small: ...``)."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
        raw: Any = json.loads(text) if file.suffix == ".json" else yaml.safe_load(text)
    except (OSError, UnicodeDecodeError) as exc:
        raise OutcomeDataError(f"cannot read the sources manifest {file}: {exc}") from None
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise OutcomeDataError(f"{file}: not valid YAML/JSON: {exc}") from None
    if isinstance(raw, list):
        raw = {"sources": raw}
    try:
        manifest = _Manifest.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{file.name}: {_loc(err['loc']) or 'top level'}: {err['msg']}" for err in exc.errors()
        )
        raise OutcomeDataError(
            f"{problems}. Fix: a list of sources (or sources: [...]), each with path and "
            f"optionally {', '.join(MAPPING_KEYS)}, exclude, sample"
        ) from None
    base = file.parent
    specs: list[SourceSpec] = []
    for i, entry in enumerate(manifest.sources):
        where = f"{file.name}: sources[{i}]"
        source = base / entry.path
        if not source.exists():
            raise OutcomeDataError(f"{where}.path: {source} does not exist")
        exclude = None if entry.exclude is None else base / entry.exclude
        if exclude is not None and not exclude.is_file():
            raise OutcomeDataError(f"{where}.exclude: {exclude} does not exist")
        fields = entry.model_dump(exclude={"path", "exclude"})
        specs.append(SourceSpec(source, exclude=exclude, **fields))
    return specs


# -- reading ------------------------------------------------------------------------------------


def read_sources(
    specs: Sequence[SourceSpec],
    *,
    prompt: str = DEFAULT_PROMPT,
    small: str = DEFAULT_SMALL,
    large: str = DEFAULT_LARGE,
    answer: str | None = None,
    exclude: str | Path | None = None,
    sample: int | None = None,
    seed: int = 0,
) -> OutcomeSet:
    """The rows of every source, one after the other, each row's group its source's name.

    Columns a source leaves unset are ``prompt``/``small``/``large``/``answer``; ``exclude``
    applies to sources without their own; ``sample`` keeps a seeded sample of the combined
    rows (a source's own ``sample`` is taken from its rows first)."""
    parts = [
        read_outcomes(
            [spec.path],
            prompt_col=spec.prompt or prompt,
            small_col=spec.small or small,
            large_col=spec.large or large,
            answer_col=spec.answer or answer,
            exclude=spec.exclude or exclude,
            sample=spec.sample,
            seed=seed,
            group=spec.label,
        )
        for spec in specs
    ]
    data = concat_outcomes(parts)
    return data if sample is None else sample_outcomes(data, sample, seed)


def check_names(specs: Sequence[SourceSpec]) -> None:
    """Two sources may not share a name where sources are held out one by one (their rows
    would be one source)."""
    seen: dict[str, Path] = {}
    for spec in specs:
        if spec.label in seen:
            raise OutcomeDataError(
                f"two sources are named {spec.label!r} ({seen[spec.label]} and {spec.path}). "
                "Fix: name them apart, FILE:name=NAME (or name: in the manifest)"
            )
        seen[spec.label] = spec.path


def holdout_groups(specs: Sequence[SourceSpec]) -> dict[str, str]:
    """Source name -> its hold-out group (sources sharing a group are held out together)."""
    return {spec.label: spec.holdout for spec in specs}
