"""``sparsity-router experiments report`` on a JSONL event log, driven through main([...])."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cli.main import main
from tests.evaluation.event_logs import synthetic_log


def test_cli_report_from_jsonl(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    records, _ = synthetic_log()
    lines = "".join(json.dumps(r.to_record()) + "\n" for r in records)
    (tmp_path / "events.jsonl").write_text(lines)
    (tmp_path / "c.yaml").write_text(
        """\
backends: {small: {type: local}, large: {type: local}}
policies:
  p1: {default: small, on_probe_error: small}
  p2: {default: large, on_probe_error: large}
virtual_models: {auto: {policy: p1}}
experiments:
  - name: exp
    control: B
    arms: [{name: A, policy: p1, weight: 0.5}, {name: B, policy: p2, weight: 0.5}]
events: {sink: jsonl, path: events.jsonl}
"""
    )
    out = tmp_path / "out"
    argv = ["experiments", "report", "exp", "--config", str(tmp_path / "c.yaml")]
    assert main([*argv, "--out", str(out), "--resamples", "300"]) == 0
    printed = capsys.readouterr().out
    assert "Control arm: `B`" in printed and f"wrote {out / 'exp.md'}" in printed
    assert (out / "exp.md").read_text().startswith("# Experiment `exp`")
    png = (out / "exp.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert main([*argv[:2], "missing", *argv[3:], "--out", str(out), "--no-plot"]) == 2
    assert "no request events for experiment 'missing'" in capsys.readouterr().err
    (tmp_path / "events.jsonl").unlink()
    assert main([*argv, "--out", str(out)]) == 2
    assert "no event file at" in capsys.readouterr().err
