"""Reading prompts from JSONL, CSV and text files, and every way that can go wrong."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from probes.errors import ProbeInputError
from probes.inputs import detect_format, read_inputs


def write(path: Path, text: str) -> Path:
    path.write_bytes(text.encode("utf-8"))
    return path


def test_detect_format() -> None:
    assert detect_format("a.jsonl") == "jsonl"
    assert detect_format("a.JSON") == "jsonl"
    assert detect_format("a.csv") == "csv"
    assert detect_format("a.txt") == "text"
    assert detect_format("prompts") == "text"


# -- plain text ------------------------------------------------------------------------------


def test_text_one_prompt_per_non_empty_line(tmp_path: Path) -> None:
    path = write(tmp_path / "p.txt", "first prompt\r\n\n   \nsecond, with comma\nthird")
    assert read_inputs(path) == ["first prompt", "second, with comma", "third"]


def test_text_strips_utf8_bom(tmp_path: Path) -> None:
    path = tmp_path / "p.txt"
    path.write_bytes(b"\xef\xbb\xbfhello\n")
    assert read_inputs(path) == ["hello"]


def test_text_refuses_a_column(tmp_path: Path) -> None:
    path = write(tmp_path / "p.txt", "hello\n")
    with pytest.raises(ProbeInputError, match="plain-text file"):
        read_inputs(path, column="prompt")


def test_undecodable_line_reports_its_line_number(tmp_path: Path) -> None:
    path = tmp_path / "p.txt"
    path.write_bytes("ok line\nsecond ok ü\n".encode() + b"caf\xe9 latin-1\nfourth\n")
    with pytest.raises(ProbeInputError) as info:
        read_inputs(path)
    message = str(info.value)
    assert message.startswith(f"{path}:3: not valid UTF-8 (")
    assert "Fix: re-encode the file as UTF-8" in message


def test_utf16_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "p.txt"
    path.write_bytes("hello\n".encode("utf-16"))
    with pytest.raises(ProbeInputError, match=r":1: not valid UTF-8 \(the file is UTF-16\)"):
        read_inputs(path)


@pytest.mark.parametrize(("name", "content"), [("e.txt", ""), ("e.jsonl", "\n \n"), ("e.csv", "")])
def test_empty_file(tmp_path: Path, name: str, content: str) -> None:
    path = write(tmp_path / name, content)
    with pytest.raises(ProbeInputError, match="is empty: there is nothing to probe"):
        read_inputs(path)


def test_header_only_csv_holds_no_prompts(tmp_path: Path) -> None:
    path = write(tmp_path / "p.csv", "id,prompt\n")
    with pytest.raises(ProbeInputError, match="holds no prompts"):
        read_inputs(path)


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(ProbeInputError, match="no such file"):
        read_inputs(tmp_path / "nope.txt")
    with pytest.raises(ProbeInputError, match="is a directory"):
        read_inputs(tmp_path)


# -- JSON Lines ------------------------------------------------------------------------------


def test_jsonl_prompt_messages_and_strings(tmp_path: Path) -> None:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    lines = [
        json.dumps({"prompt": "What is 2+2?", "id": 1}),
        "",
        json.dumps({"messages": messages}),
        json.dumps("a bare string"),
    ]
    path = write(tmp_path / "p.jsonl", "\n".join(lines) + "\n")
    assert read_inputs(path) == ["What is 2+2?", messages, "a bare string"]


def test_jsonl_named_field(tmp_path: Path) -> None:
    path = write(tmp_path / "p.jsonl", '{"question": "why?", "prompt": "ignored"}\n')
    assert read_inputs(path, field="question") == ["why?"]
    assert read_inputs(path, column="question") == ["why?"]


def test_jsonl_missing_named_field_lists_fields(tmp_path: Path) -> None:
    path = write(tmp_path / "p.jsonl", '{"question": "why?"}\n{"answer": "because"}\n')
    with pytest.raises(
        ProbeInputError, match=r"p\.jsonl:2: no field 'question' \(fields: 'answer'"
    ):
        read_inputs(path, field="question")


def test_jsonl_bad_json_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path / "p.jsonl", '{"prompt": "ok"}\n\n{"prompt": "broken\n')
    with pytest.raises(ProbeInputError) as info:
        read_inputs(path)
    assert str(info.value).startswith(f"{path}:3: not valid JSON (")


def test_jsonl_array_gets_a_hint(tmp_path: Path) -> None:
    path = write(tmp_path / "p.json", '[\n  {"prompt": "a"}\n]\n')
    with pytest.raises(ProbeInputError, match="looks like one JSON array"):
        read_inputs(path)


@pytest.mark.parametrize(
    ("line", "match"),
    [
        ('{"text": "hi"}', "neither 'prompt' nor 'messages' \\(fields: 'text'\\)"),
        ('{"prompt": 3}', "'prompt' is a number"),
        ('{"prompt": "   "}', "'prompt' is empty"),
        ('{"messages": "hi"}', "'messages' is a string"),
        ('{"messages": []}', "empty list"),
        ('{"messages": [{"content": "x"}]}', r"messages\[0\] has no 'role'"),
        ('{"messages": [{"role": "user", "content": 5}]}', r"messages\[0\]\.content is a number"),
        ("[1, 2]", "expected an object or a string, got a list"),
    ],
)
def test_jsonl_shape_errors_name_the_line(tmp_path: Path, line: str, match: str) -> None:
    path = write(tmp_path / "p.jsonl", '{"prompt": "fine"}\n' + line + "\n")
    with pytest.raises(ProbeInputError, match=match) as info:
        read_inputs(path)
    assert str(info.value).startswith(f"{path}:2: ")


# -- CSV -------------------------------------------------------------------------------------


def test_csv_default_and_named_column(tmp_path: Path) -> None:
    path = write(
        tmp_path / "p.csv",
        'id,prompt,question\n1,"hello, world",q1\n\n2,"two\nlines ""quoted""",q2\n',
    )
    assert read_inputs(path) == ["hello, world", 'two\nlines "quoted"']
    assert read_inputs(path, column="question") == ["q1", "q2"]


def test_csv_missing_column_lists_available(tmp_path: Path) -> None:
    path = write(tmp_path / "p.csv", "id,text\n1,hello\n")
    with pytest.raises(ProbeInputError) as info:
        read_inputs(path)
    message = str(info.value)
    assert "no column 'prompt'" in message
    assert "available columns: 'id', 'text'" in message
    assert "--column" in message


def test_csv_large_field(tmp_path: Path) -> None:
    big = "word " * 100_000  # 500 kB, beyond csv's default 128 KiB field limit
    path = tmp_path / "p.csv"
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["prompt"])
        writer.writerow([big])
    limit = csv.field_size_limit()
    assert read_inputs(path) == [big]
    assert csv.field_size_limit() == limit  # restored


def test_csv_short_row_and_empty_cell(tmp_path: Path) -> None:
    path = write(tmp_path / "p.csv", "id,prompt\n1,ok\n2\n")
    with pytest.raises(ProbeInputError, match=r"p\.csv:3: the row has 1 field"):
        read_inputs(path)
    path = write(tmp_path / "q.csv", "id,prompt\n1,ok\n2,\n")
    with pytest.raises(ProbeInputError, match=r"q\.csv:3: column 'prompt' is empty"):
        read_inputs(path)


def test_csv_undecodable_line(tmp_path: Path) -> None:
    path = tmp_path / "p.csv"
    path.write_bytes(b"prompt\nfine\n\xff\xfe bad\n")
    with pytest.raises(ProbeInputError, match=r"p\.csv:3: not valid UTF-8"):
        read_inputs(path)
