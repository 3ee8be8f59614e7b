"""A policy's cascade served by a real gateway: the small backend answers, the probe reads the
prompt plus that answer, the answer calibration's P decides between returning it and asking the
large backend; streams (official openai SDK), events, failures and start-up refusals."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from policies.loader import parse_settings
from policies.schema import Settings
from probes.answers import answer_input
from probes.calibration import Calibration
from probes.errors import CalibrationError
from probes.probe import SparsityProbe
from probes.supervised import SupervisedModel
from router.app import create_app
from router.state import build_state
from tests.router.conftest import LONG_ANSWER, SHORT_ANSWER, fit_answer_calibration
from tests.servers import FakeUpstream, ServerThread

SHORT, LONG = SHORT_ANSWER, LONG_ANSWER

CONFIG = """
probe:
  model: "{model}"
  layers: [1]
  timeout_s: 10
calibration: {{answer_path: "{answer}"{prompt}}}
backends:
  small:
    type: openai
    base_urls: ["{small}"]
    model: small-served
    price: {{input_per_mtok: 1, output_per_mtok: 2}}
  large:
    type: openai
    base_urls: ["{large}"]
    model: large-served
    price: {{input_per_mtok: 10, output_per_mtok: 20}}
policies:
  default:
    default: small
    on_probe_error: small
    cascade:
      backend: small
      escalate_to: large
      when: {{p_large: {{min: 0.5}}}}
events: {{sink: sqlite, path: "{events}"}}
"""


def reply(body: dict[str, Any]) -> str:
    """The fake small model rambles on prompts that say "hard"."""
    return LONG if "hard" in json.dumps(body["messages"]) else SHORT


@pytest.fixture
def answer_calibration(tiny_probe: SparsityProbe, tmp_path: Path) -> tuple[Path, SupervisedModel]:
    """An answer calibration: P(large does better) rises with the length of prompt + answer."""
    path = tmp_path / "answers.json"
    return path, fit_answer_calibration(tiny_probe, path)


def settings_for(
    probe: SparsityProbe, answer: Path, urls: tuple[str, str], base: Path, prompt: str = ""
) -> Settings:
    text = CONFIG.format(
        model=probe.settings.model,
        answer=answer,
        prompt=f', path: "{prompt}"' if prompt else "",
        small=urls[0],
        large=urls[1],
        events=base / "events.sqlite",
    )
    return parse_settings(text, source_name="gateway.yaml", base_dir=base)


@dataclass
class Running:
    url: str
    small: FakeUpstream
    large: FakeUpstream
    model: SupervisedModel
    reference: SparsityProbe
    events: Path

    def expected_p(self, prompt: str, answer: str) -> float:
        conversation = answer_input(
            "chat/completions", [{"role": "user", "content": prompt}], answer
        )
        return self.model.predict(self.reference.measure_one(conversation))


def _serve(
    tiny_probe: SparsityProbe,
    tmp_path: Path,
    calibration: tuple[Path, SupervisedModel],
    large_mode: str = "ok",
) -> Iterator[Running]:
    path, model = calibration
    small = FakeUpstream(name="small", reply=reply)
    large = FakeUpstream(name="large", mode=large_mode)
    upstreams = [ServerThread(small).start(), ServerThread(large).start()]
    try:
        urls = (upstreams[0].url + "/v1", upstreams[1].url + "/v1")
        settings = settings_for(tiny_probe, path, urls, tmp_path)
        served = SparsityProbe(settings.probe.probe_settings(), loaded=tiny_probe.loaded)
        gateway = ServerThread(create_app(settings, probe=served)).start()
        try:
            yield Running(gateway.url, small, large, model, served, tmp_path / "events.sqlite")
        finally:
            gateway.stop()
    finally:
        for server in upstreams:
            server.stop()


@pytest.fixture
def running(
    tiny_probe: SparsityProbe, tmp_path: Path, answer_calibration: tuple[Path, SupervisedModel]
) -> Iterator[Running]:
    yield from _serve(tiny_probe, tmp_path, answer_calibration)


def chat(url: str, prompt: str, **extra: Any) -> httpx.Response:
    body = {"model": "auto", "messages": [{"role": "user", "content": prompt}], **extra}
    return httpx.post(url + "/v1/chat/completions", json=body, timeout=30)


def test_a_short_answer_is_kept_and_a_rambling_one_escalated(running: Running) -> None:
    easy = chat(running.url, "What is 2 + 2?")
    assert easy.status_code == 200, easy.text
    assert easy.headers["x-router-backend"] == "small"
    assert easy.headers["x-router-cascade"] == "kept"
    p_easy = float(easy.headers["x-router-answer-p-large"])
    assert p_easy == pytest.approx(running.expected_p("What is 2 + 2?", SHORT), abs=2e-4)
    assert p_easy < 0.5
    assert easy.json()["choices"][0]["message"]["content"] == SHORT
    assert len(running.large.requests) == 0
    first = running.small.requests[-1]["body"]
    assert first["stream"] is False and first["model"] == "small-served"

    hard = chat(running.url, "A hard question about tax law?", temperature=0.3)
    assert hard.status_code == 200, hard.text
    assert hard.headers["x-router-backend"] == "large"
    assert hard.headers["x-router-cascade"] == "escalated"
    p_hard = float(hard.headers["x-router-answer-p-large"])
    assert p_hard == pytest.approx(
        running.expected_p("A hard question about tax law?", LONG), abs=2e-4
    )
    assert p_hard >= 0.5
    assert hard.json()["choices"][0]["message"]["content"] == "answer from large"
    sent = running.large.requests[-1]["body"]
    assert sent["model"] == "large-served" and sent["temperature"] == 0.3
    assert sent["messages"] == [{"role": "user", "content": "A hard question about tax law?"}]


def test_the_dry_run_says_the_answer_will_be_checked(running: Running) -> None:
    body = {"model": "auto", "messages": [{"role": "user", "content": "hi"}]}
    decision = httpx.post(running.url + "/v1/route", json=body, timeout=30).json()["decision"]
    assert decision["backend"] == "small"
    assert decision["cascade"] == {
        "backend": "small",
        "escalate_to": "large",
        "when": {"p_large": {"min": 0.5, "max": None}},
        "on_probe_error": "keep",
    }
    assert not running.small.requests and not running.large.requests


def test_streams_through_the_openai_sdk(running: Running) -> None:
    client = openai.OpenAI(base_url=running.url + "/v1", api_key="unused", timeout=30)
    messages: Any = [{"role": "user", "content": "What is 2 + 2?"}]
    kept = list(
        client.chat.completions.create(
            model="auto", messages=messages, stream=True, stream_options={"include_usage": True}
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in kept if c.choices)
    assert text == SHORT
    assert [c.choices[0].finish_reason for c in kept if c.choices][-1] == "stop"
    assert kept[-1].usage is not None and kept[-1].usage.completion_tokens == 4
    assert running.small.requests[-1]["body"]["stream"] is False

    hard: Any = [{"role": "user", "content": "A hard one?"}]
    with client.chat.completions.with_streaming_response.create(
        model="auto", messages=hard, stream=True
    ) as response:
        assert response.headers["x-router-cascade"] == "escalated"
        chunks = list(response.parse())
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == (
        "tok0 tok1 tok2 "
    )
    assert running.large.requests[-1]["body"]["stream"] is True


def test_completions_endpoint_is_checked_too(running: Running) -> None:
    client = openai.OpenAI(base_url=running.url + "/v1", api_key="unused", timeout=30)
    running.small.reply = lambda body: SHORT
    out = client.completions.with_raw_response.create(model="auto", prompt="2 + 2 =")
    assert out.headers["x-router-cascade"] == "kept"
    assert out.parse().choices[0].text == SHORT
    streamed = list(client.completions.create(model="auto", prompt="2 + 2 =", stream=True))
    assert "".join(c.choices[0].text for c in streamed if c.choices) == SHORT


def test_answers_that_are_not_one_text_are_returned_unchecked(running: Running) -> None:
    running.small.reply = lambda body: ""
    empty = chat(running.url, "hard: say nothing")
    assert empty.headers["x-router-cascade"] == "skipped"
    assert empty.headers["x-router-backend"] == "small"
    assert "x-router-answer-p-large" not in empty.headers


def test_events_record_the_verdict_and_both_costs(
    tiny_probe: SparsityProbe, tmp_path: Path, answer_calibration: tuple[Path, SupervisedModel]
) -> None:
    serving = _serve(tiny_probe, tmp_path, answer_calibration)
    run = next(serving)
    ids = []
    for prompt in ("What is 2 + 2?", "A hard question?"):
        ids.append(chat(run.url, prompt).headers["x-router-request-id"])
    metrics = httpx.get(run.url + "/metrics", timeout=10).text
    assert 'sparsity_router_cascades_total{verdict="kept"} 1.0' in metrics
    assert 'sparsity_router_cascades_total{verdict="escalated"} 1.0' in metrics
    serving.close()  # stops the gateway: the event log is drained
    with sqlite3.connect(run.events) as db:
        db.row_factory = sqlite3.Row
        rows = {r["request_id"]: dict(r) for r in db.execute("SELECT * FROM requests")}
    kept, escalated = rows[ids[0]], rows[ids[1]]
    assert kept["cascade"] == "kept" and kept["backend"] == "small"
    assert kept["answer_p_large"] < 0.5
    assert kept["cost"] == pytest.approx((5 * 1 + 4 * 2) / 1e6)
    assert escalated["cascade"] == "escalated" and escalated["backend"] == "large"
    assert escalated["answer_p_large"] >= 0.5
    assert escalated["cost"] == pytest.approx((5 * 1 + 4 * 2 + 5 * 10 + 4 * 20) / 1e6)


def test_a_failing_escalation_returns_the_checked_answer(
    tiny_probe: SparsityProbe, tmp_path: Path, answer_calibration: tuple[Path, SupervisedModel]
) -> None:
    serving = _serve(tiny_probe, tmp_path, answer_calibration, large_mode="error500")
    run = next(serving)
    try:
        r = chat(run.url, "A hard question?", stream=True)
        assert r.status_code == 200
        assert r.headers["x-router-cascade"] == "escalation_failed"
        assert r.headers["x-router-backend"] == "small"
        assert r.headers["content-type"].startswith("text/event-stream")
        assert LONG[:40] in r.text and r.text.endswith("data: [DONE]\n\n")
        assert len(run.large.requests) == 3  # one try and the default two retries
    finally:
        serving.close()


def test_calibrations_in_the_wrong_place_are_refused(
    tiny_probe: SparsityProbe,
    tmp_path: Path,
    answer_calibration: tuple[Path, SupervisedModel],
) -> None:
    path, _ = answer_calibration
    urls = ("http://127.0.0.1:9/v1", "http://127.0.0.1:9/v1")  # never reached
    probe = SparsityProbe(
        tiny_probe.settings.model_copy(update={"layers": (1,)}), loaded=tiny_probe.loaded
    )
    as_prompt = settings_for(probe, path, urls, tmp_path, prompt=str(path))
    with pytest.raises(CalibrationError, match=r"cannot route prompts.*calibration\.answer_path"):
        build_state(as_prompt, probe=probe)
    plain = tmp_path / "plain.json"
    calibration = Calibration.load(path)
    assert calibration.supervised is not None
    calibration.model_copy(
        update={"supervised": calibration.supervised.model_copy(update={"reads": "prompt"})}
    ).save(plain)
    as_answer = settings_for(probe, plain, urls, tmp_path)
    with pytest.raises(CalibrationError, match=r"answer_path .* not fitted on the small model"):
        build_state(as_answer, probe=probe)
