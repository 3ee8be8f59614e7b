"""`sparsity-router serve` and `check` as a user runs them: real processes, real ports."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from cli.main import build_parser, main
from cli.serve import log_format
from probes.errors import RouterError
from tests.router.conftest import closed_port_url
from tests.servers import ROOT, FakeUpstream, ServerThread, start_serve, stop_serve, wait_ready


@pytest.fixture
def large() -> Iterator[tuple[FakeUpstream, ServerThread]]:
    fake = FakeUpstream(name="large")
    with ServerThread(fake) as server:
        yield fake, server


@pytest.mark.slow
def test_serve_on_the_embedded_default(
    large: tuple[FakeUpstream, ServerThread], tmp_path: Path
) -> None:
    """The README's first command: the embedded default answers the openai SDK, streaming too."""
    env = {
        **os.environ,
        "SPARSITY_ROUTER_LARGE_URLS": large[1].url + "/v1",
        "HF_HUB_OFFLINE": "1",
    }
    env["SPARSITY_ROUTER_EVENTS_PATH"] = str(tmp_path / "events.sqlite")
    for name in ("SPARSITY_ROUTER_API_KEY", "ROUTER_API_KEY", "SPARSITY_ROUTER_CONFIG"):
        env.pop(name, None)
    proc, base = start_serve(env=env)
    try:
        wait_ready(proc, base, timeout=120, poll_s=0.5)
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=120)
        backends = set()
        prompts = ["What is the capital of France?", "Xq zzv plok wumm trr? Gnarf blee."]
        for prompt in prompts:
            raw = client.chat.completions.with_raw_response.create(
                model="auto", messages=[{"role": "user", "content": prompt}], max_tokens=8
            )
            backends.add(raw.headers["x-router-backend"])
            assert 0.0 <= float(raw.headers["x-router-percentile"]) <= 1.0
            assert raw.parse().choices[0].message.content
        stream = client.chat.completions.create(
            model="small",
            messages=[{"role": "user", "content": "Say hi"}],
            max_tokens=8,
            stream=True,
        )
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        assert text
        assert backends <= {"small", "large"}
        assert "auto" in [m.id for m in client.models.list()]
    finally:
        stop_serve(proc)
    # the embedded default records events: three requests, tokens from the local model's usage
    with sqlite3.connect(tmp_path / "events.sqlite") as db:
        rows = db.execute("SELECT backend, stream, prompt_tokens, completion_tokens FROM requests")
        records = rows.fetchall()
    assert len(records) == 3
    streamed = [r for r in records if r[1] == 1]
    assert len(streamed) == 1 and streamed[0][0] == "small" and streamed[0][2] > 0
    assert 0 < streamed[0][3] <= 8


def test_check_the_default_config(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check"]) == 0
    out = capsys.readouterr().out
    assert "valid" in out and "backend small: local" in out and "policy default" in out


def test_check_loads_no_torch() -> None:
    """`check` validates a config without the probe: torch and transformers stay unloaded."""
    code = (
        "import sys; from cli.main import main; status = main(['check', 'config/default.yaml']); "
        "sys.exit(status or 10 * any(m in sys.modules for m in ('torch', 'transformers')))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_check_ping(
    large: tuple[FakeUpstream, ServerThread],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("SPARSITY_ROUTER_LARGE_URLS", large[1].url + "/v1")
    assert main(["check", str(ROOT / "config/default.yaml"), "--ping"]) == 0
    assert "ping large: " in capsys.readouterr().out
    monkeypatch.setenv("SPARSITY_ROUTER_LARGE_URLS", closed_port_url())
    assert main(["check", str(ROOT / "config/default.yaml"), "--ping"]) == 1
    assert "ping large: FAILED" in capsys.readouterr().out


def test_check_accepts_the_three_tier_example(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", str(ROOT / "config/examples/three-tier.yaml")]) == 0
    out = capsys.readouterr().out
    assert "backend human: human (hold 120 s, then large; queue: sqlite " in out
    assert "policy default: review -> human, sparse -> large" in out


def test_check_names_the_cascade_and_its_missing_calibration(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    example = ROOT / "config/examples/cascade.yaml"
    monkeypatch.setenv("SPARSITY_ROUTER_ANSWER_CALIBRATION_PATH", str(tmp_path / "answers.json"))
    assert main(["check", str(example)]) == 1
    out = capsys.readouterr().out
    assert "cascade: small's answers -> large when p_large in [0.5, inf)" in out
    assert f"answer calibration {tmp_path / 'answers.json'} (MISSING: fit it with " in out
    (tmp_path / "answers.json").write_text("{}")
    assert main(["check", str(example)]) == 0
    assert f"answer calibration {tmp_path / 'answers.json'} (found)" in capsys.readouterr().out


def test_check_reports_yaml_path_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "backends:\n  small: {type: openai, base_urls: ['http://127.0.0.1:1/v1']}\n"
        "policies:\n  default:\n    rules:\n      - {when: {always: true}, route: lage}\n"
        "    default: small\n    on_probe_error: small\n"
    )
    assert main(["check", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:6: policies.default.rules[0].route: unknown backend 'lage'; known: small" in err


# -- serve [CONFIG], --log-format ---------------------------------------------------------------


def test_serve_takes_the_config_as_an_argument_or_an_option(
    capsys: pytest.CaptureFixture[str],
) -> None:
    parser = build_parser()
    assert parser.parse_args(["serve", "a.yaml"]).config == "a.yaml"
    assert parser.parse_args(["serve", "--config", "a.yaml"]).config == "a.yaml"
    assert parser.parse_args(["serve", "--config", "a.yaml", "./a.yaml"]).config == "./a.yaml"
    assert parser.parse_args(["serve"]).config is None
    assert parser.parse_args(["check", "--config", "b.yaml"]).config == "b.yaml"
    args = parser.parse_args(["serve", "a.yaml", "--log-format", "json", "--port", "1"])
    assert (args.config, args.log_format, args.port) == ("a.yaml", "json", 1)
    capsys.readouterr()
    assert main(["serve", "a.yaml", "--config", "b.yaml"]) == 2
    err = capsys.readouterr().err
    assert "usage: sparsity-router serve" in err
    assert "two different config files: CONFIG 'a.yaml' and --config 'b.yaml'" in err
    assert main(["serve", "--log-format", "xml"]) == 2


def test_log_format_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    parser = build_parser()
    monkeypatch.setenv("SPARSITY_ROUTER_LOG_FORMAT", "JSON")
    assert log_format(parser.parse_args(["serve"])) == "json"
    assert log_format(parser.parse_args(["serve", "--log-format", "text"])) == "text"
    monkeypatch.setenv("SPARSITY_ROUTER_LOG_FORMAT", "xml")
    with pytest.raises(RouterError, match="SPARSITY_ROUTER_LOG_FORMAT='xml'"):
        log_format(parser.parse_args(["serve"]))
    monkeypatch.delenv("SPARSITY_ROUTER_LOG_FORMAT")
    assert log_format(parser.parse_args(["serve"])) == "text"


def test_serve_config_positional_with_json_logs(tmp_path: Path) -> None:
    """`sparsity-router serve FILE --log-format json` (what config/examples tell users): every
    log line is a JSON object; the request's lines carry the client's x-request-id; the old
    variable name still works, with a deprecation warning."""
    config = tmp_path / "gw.yaml"
    config.write_text(
        "backends:\n"
        '  small: {type: openai, base_urls: ["${SPARSITY_ROUTER_SMALL_URLS}"], '
        "timeouts: {connect_s: 2}}\n"
        "policies:\n  default: {default: small, on_probe_error: small}\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPARSITY_ROUTER_")}
    env.update({"SMALL_URLS": closed_port_url(), "HF_HUB_OFFLINE": "1"})
    proc, base = start_serve(str(config), "--log-format", "json", env=env)
    try:
        wait_ready(proc, base)
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=30)
        with pytest.raises(openai.APIStatusError) as exc:
            client.chat.completions.create(
                model="small",
                messages=[{"role": "user", "content": "a prompt never logged 5521"}],
                extra_headers={"x-request-id": "cli-json-1"},
            )
        client.close()
        assert exc.value.response.headers["x-request-id"] == "cli-json-1"
    finally:
        out = stop_serve(proc)
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert lines and len(lines) == len([line for line in out.splitlines() if line.strip()]), out
    assert all({"time", "level", "logger", "message"} <= set(e) for e in lines)
    assert any(
        e["level"] == "WARNING"
        and "SMALL_URLS" in e["message"]
        and "SPARSITY_ROUTER_SMALL_URLS" in e["message"]
        for e in lines
    ), lines
    assert any(e.get("request_id") == "cli-json-1" and e["level"] == "WARNING" for e in lines)
    assert any(e["logger"].startswith("uvicorn") for e in lines)  # uvicorn's lines too
    assert "5521" not in out
