"""`sparsity-router serve` and `check` as a user runs them: real processes, real ports."""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from cli.main import main
from tests.router.conftest import closed_port_url
from tests.servers import FakeUpstream, ServerThread

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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
    port = free_port()
    env = {**os.environ, "LARGE_BASE_URL": large[1].url + "/v1", "HF_HUB_OFFLINE": "1"}
    env["ROUTER_EVENTS_PATH"] = str(tmp_path / "events.sqlite")
    env.pop("ROUTER_API_KEY", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli.main", "serve", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
            try:
                if httpx.get(base + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "gateway did not become ready in 120 s"
            time.sleep(0.5)
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
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        if proc.stdout:
            proc.stdout.close()
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
    monkeypatch.setenv("LARGE_BASE_URL", large[1].url + "/v1")
    assert main(["check", str(ROOT / "config/default.yaml"), "--ping"]) == 0
    assert "ping large: " in capsys.readouterr().out
    monkeypatch.setenv("LARGE_BASE_URL", closed_port_url())
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
    monkeypatch.setenv("ANSWER_CALIBRATION_PATH", str(tmp_path / "answers.json"))
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
