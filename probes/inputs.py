"""Read prompts to probe from a file: JSON Lines, CSV, or plain text.

The format follows the extension:

``.jsonl``, ``.ndjson``, ``.json``
    One JSON value per line: an object with a ``prompt`` string or a ``messages`` list (chat
    messages ``{"role": ..., "content": ...}``), or with the field named by ``field``/``column``;
    a bare JSON string is a prompt too. Blank lines are skipped.
``.csv``
    A header row, then one prompt per row in the column named ``column`` (default ``prompt``).
    Quoted fields may span lines and be arbitrarily large.
anything else
    Plain text, one prompt per non-empty line.

Bytes are decoded line by line, so an encoding problem is reported with its line number
(``FILE:LINE: not valid UTF-8 (...)``); a leading UTF-8 byte-order mark is ignored. Every
problem raises :class:`~probes.errors.ProbeInputError` saying where and how to fix it.
"""

from __future__ import annotations

import codecs
import csv
import json
import logging
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from probes.errors import ProbeInputError
from probes.types import ProbeInput

__all__ = ["DEFAULT_FIELD", "InputFormat", "detect_format", "read_inputs"]

logger = logging.getLogger(__name__)

InputFormat = Literal["jsonl", "csv", "text"]

#: The CSV column / JSON field read when none is named.
DEFAULT_FIELD = "prompt"
_MESSAGES_FIELD = "messages"
_JSON_SUFFIXES = frozenset({".jsonl", ".ndjson", ".json"})


def detect_format(path: str | Path) -> InputFormat:
    """The input format implied by a file name's extension."""
    suffix = Path(path).suffix.lower()
    if suffix in _JSON_SUFFIXES:
        return "jsonl"
    if suffix == ".csv":
        return "csv"
    return "text"


def read_inputs(
    path: str | Path, *, column: str | None = None, field: str | None = None
) -> list[ProbeInput]:
    """Every prompt in ``path``, in file order (see the module docstring for the formats).

    ``column`` names the CSV column or JSON field holding the prompt; ``field`` is the same for
    JSON Lines (give one or the other). Neither applies to plain-text files.
    """
    path = Path(path)
    if column is not None and field is not None and column != field:
        raise ProbeInputError(
            f"both column={column!r} and field={field!r} given: they name the same thing. "
            "Fix: give only one"
        )
    key = column if column is not None else field
    if key is not None and not key:
        raise ProbeInputError("the column/field name is empty. Fix: give the name of a column")
    fmt = detect_format(path)
    lines = _decode_lines(path)
    if fmt == "jsonl":
        items = _read_jsonl(path, lines, key)
    elif fmt == "csv":
        items = _read_csv(path, lines, key or DEFAULT_FIELD)
    else:
        if key is not None:
            raise ProbeInputError(
                f"{path}: a column/field ({key!r}) was given, but a plain-text file holds one "
                "prompt per line. Fix: drop --column, or use a .csv or .jsonl file"
            )
        items = [text for line in lines if (text := line.rstrip("\r\n")).strip()]
    if not items:
        what = "is empty" if not any(line.strip() for line in lines) else "holds no prompts"
        raise ProbeInputError(
            f"{path} {what}: there is nothing to probe. Fix: give a file with one prompt per "
            "line (text), a header and rows (.csv), or one JSON object per line (.jsonl)"
        )
    logger.debug("read %d inputs from %s (%s)", len(items), path, fmt)
    return items


def _decode_lines(path: Path) -> list[str]:
    """The file's lines (with their line endings), each decoded from UTF-8 on its own."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ProbeInputError(f"{path}: no such file. Fix: check the path") from None
    except IsADirectoryError:
        raise ProbeInputError(f"{path} is a directory. Fix: give a file of prompts") from None
    except OSError as exc:
        raise ProbeInputError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise ProbeInputError(
            f"{path}:1: not valid UTF-8 (the file is UTF-16). Fix: re-encode the file as UTF-8 "
            f"(e.g. iconv -f UTF-16 -t UTF-8)"
        )
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8) :]
    lines = []
    # bytes.splitlines splits on \n, \r and \r\n only, which never occur inside a UTF-8
    # multi-byte sequence: each physical line decodes on its own.
    for number, raw in enumerate(data.splitlines(keepends=True), 1):
        try:
            lines.append(raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            bad = raw[exc.start : min(exc.end, exc.start + 4)]
            raise ProbeInputError(
                f"{path}:{number}: not valid UTF-8 ({exc.reason}: byte(s) {bad!r} at column "
                f"{exc.start + 1}). Fix: re-encode the file as UTF-8 "
                "(e.g. iconv -f latin1 -t utf-8)"
            ) from None
    return lines


# -- JSON Lines ---------------------------------------------------------------------------


def _read_jsonl(path: Path, lines: list[str], key: str | None) -> list[ProbeInput]:
    items: list[ProbeInput] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            hint = (
                " The file looks like one JSON array; write one value per line instead"
                if not items and line.strip() in {"[", "{"}
                else ""
            )
            raise ProbeInputError(
                f"{path}:{number}: not valid JSON ({exc.msg} at column {exc.colno}).{hint} "
                'Fix: write one JSON object per line (JSON Lines), e.g. {"prompt": "..."}'
            ) from None
        items.append(_json_item(value, key, f"{path}:{number}"))
    return items


def _json_item(value: Any, key: str | None, where: str) -> ProbeInput:
    if isinstance(value, str) and key is None:
        return _prompt(value, where, "the prompt")
    if not isinstance(value, dict):
        expected = f"an object with a {key!r} field" if key else "an object or a string"
        raise ProbeInputError(
            f"{where}: expected {expected}, got {_json_type(value)}. "
            'Fix: write lines like {"prompt": "..."} or {"messages": [...]}'
        )
    if key is not None:
        if key not in value:
            raise ProbeInputError(
                f"{where}: no field {key!r} (fields: {_names(value)}). "
                "Fix: name the field holding the prompt with --field/--column"
            )
        found = value[key]
        if isinstance(found, str):
            return _prompt(found, where, repr(key))
        if isinstance(found, list):
            return _messages(found, where, key)
        raise ProbeInputError(
            f"{where}: field {key!r} is {_json_type(found)}; expected a string or a list of "
            "chat messages. Fix: name a text field with --field/--column"
        )
    if DEFAULT_FIELD in value:
        found = value[DEFAULT_FIELD]
        if not isinstance(found, str):
            raise ProbeInputError(
                f"{where}: 'prompt' is {_json_type(found)}, expected a string. "
                "Fix: make it a string, or use 'messages' for chat messages"
            )
        return _prompt(found, where, "'prompt'")
    if _MESSAGES_FIELD in value:
        found = value[_MESSAGES_FIELD]
        if not isinstance(found, list):
            raise ProbeInputError(
                f"{where}: 'messages' is {_json_type(found)}, expected a list of "
                '{"role": ..., "content": ...} objects. Fix: make it a list'
            )
        return _messages(found, where, _MESSAGES_FIELD)
    raise ProbeInputError(
        f"{where}: the object has neither 'prompt' nor 'messages' (fields: {_names(value)}). "
        "Fix: add one, or name the field holding the prompt with --field/--column"
    )


def _prompt(text: str, where: str, what: str) -> str:
    if not text.strip():
        raise ProbeInputError(
            f"{where}: {what} is empty: there is nothing to probe. Fix: remove the line or "
            "give it text"
        )
    return text


def _messages(items: list[Any], where: str, key: str) -> list[dict[str, Any]]:
    if not items:
        raise ProbeInputError(f"{where}: {key!r} is an empty list. Fix: give at least one message")
    messages = []
    for j, message in enumerate(items):
        if not isinstance(message, Mapping):
            raise ProbeInputError(
                f"{where}: {key}[{j}] is {_json_type(message)}; expected an object with "
                "'role' and 'content'. Fix: write messages as OpenAI chat messages"
            )
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise ProbeInputError(
                f'{where}: {key}[{j}] has no \'role\' string. Fix: add e.g. "role": "user"'
            )
        content = message.get("content")
        if content is not None and not isinstance(content, str | list):
            raise ProbeInputError(
                f"{where}: {key}[{j}].content is {_json_type(content)}; expected a string or a "
                "list of content parts. Fix: make it a string"
            )
        messages.append(dict(message))
    return messages


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}
    if value is None:
        return "null"
    return names.get(type(value), "a number" if isinstance(value, int | float) else "a value")


def _names(mapping: Mapping[str, Any]) -> str:
    return ", ".join(repr(k) for k in mapping) or "none"


# -- CSV ----------------------------------------------------------------------------------


@contextmanager
def _large_fields() -> Iterator[None]:
    """Lift csv's 128 KiB field limit while reading (long prompts are normal), then restore."""
    old = csv.field_size_limit()
    limit = sys.maxsize
    while True:
        try:
            csv.field_size_limit(limit)
            break
        except OverflowError:  # C long narrower than Py_ssize_t (e.g. Windows)
            limit //= 2
    try:
        yield
    finally:
        csv.field_size_limit(old)


def _read_csv(path: Path, lines: list[str], column: str) -> list[ProbeInput]:
    items: list[ProbeInput] = []
    with _large_fields():
        reader = csv.reader(iter(lines))
        try:
            header = next(reader, None)
            if header is None:
                return items
            names = [name.strip() for name in header]
            if column not in names:
                available = ", ".join(repr(n) for n in names if n) or "none"
                raise ProbeInputError(
                    f"{path}: no column {column!r} (available columns: {available}). "
                    "Fix: name the prompt column with --column"
                )
            index = names.index(column)
            for row in reader:
                if not row or not any(cell.strip() for cell in row):
                    continue
                where = f"{path}:{reader.line_num}"
                if index >= len(row):
                    raise ProbeInputError(
                        f"{where}: the row has {len(row)} field(s) but column {column!r} is "
                        f"field {index + 1}. Fix: give every row as many fields as the header"
                    )
                items.append(_prompt(row[index], where, f"column {column!r}"))
        except csv.Error as exc:
            raise ProbeInputError(
                f"{path}:{reader.line_num}: not valid CSV ({exc}). Fix: quote fields that "
                'contain commas, quotes or newlines ("..." with "" for a quote)'
            ) from None
    return items
