"""The gateway labels its own traffic (router/labelling): a real gateway on a loopback port with
fake small, large and judge upstreams (real HTTP servers) and the official openai client.

Each sampled request gets one shadow call to the other backend of the pair, made after the
client has its whole answer, and two judge calls with the answers swapped; bursts, the rate,
the token budget and a broken judge drop labels (counted), never a client request."""

from __future__ import annotations

import asyncio
import json
import re
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from policies.engine import Decision
from policies.loader import parse_settings
from policies.schema import LabellingSettings
from probes.probe import SparsityProbe
from probes.supervised import SupervisedModel
from router.app import create_app
from router.labelling import Labeller
from router.metrics import GatewayMetrics
from router.requests import parse_request
from tests.router.conftest import LONG_ANSWER, SHORT_ANSWER, fit_answer_calibration
from tests.servers import FakeUpstream, Receive, Scope, Send, ServerThread, wait_for

CONFIG = """
backends:
  small: {{type: openai, base_urls: ["{small}"], model: small-served, models: [small-direct],
          retries: 0}}
  large: {{type: openai, base_urls: ["{large}"], model: large-served, retries: 0}}
  judge: {{type: openai, base_urls: ["{judge}"], model: judge-served, retries: 0}}
  people: {{type: human, mode: ticket}}
policies:
  default:
    rules:
      - {{name: premium, when: {{header: {{x-tier: premium}}}}, route: large}}
      - {{name: human, when: {{header: {{x-tier: human}}}}, route: people}}
    default: small
    on_probe_error: small
events: {{sink: sqlite, path: "{events}"}}
escalation: {{path: "{escalations}"}}
labelling:
  enabled: true
  sample: 1.0
  judge: judge
  judge_max_tokens: 64
  max_shadow_per_s: {rate}
{labelling}
"""

_ANSWER = re.compile(r"\[The Start of Assistant ([AB])'s Answer\]\n(.*?)\n\[The End", re.S)


@dataclass
class Timed(FakeUpstream):
    """A fake upstream that notes when each POST arrives (``time.monotonic``) and may wait
    ``delay_s`` before answering."""

    arrivals: list[float] = field(default_factory=list)
    delay_s: float = 0.0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            self.arrivals.append(time.monotonic())
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
        await super().__call__(scope, receive, send)


@dataclass
class Judge:
    """What the fake judge answers: its preference (large, small, A: position-biased) or a
    fixed text."""

    prefer: str = "large"
    text: str | None = None

    def __call__(self, body: dict[str, Any]) -> str:
        if self.text is not None:
            return self.text
        answers = dict(_ANSWER.findall(body["messages"][-1]["content"]))
        small = "A" if "answer from small" in answers["A"] else "B"
        pick = {"large": "B" if small == "A" else "A", "small": small, "A": "A"}[self.prefer]
        return f"Both answers try; weighing them, the better one is clear. [[{pick}]]"


@dataclass
class Gateway:
    url: str
    small: Timed
    large: Timed
    judge: Timed
    verdicts: Judge
    events: Path
    labeller: Labeller

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key="unused", timeout=10)

    def metric(self, name: str, **labels: str) -> float:
        """A counter's value on /metrics (0 when absent)."""
        text = httpx.get(self.url + "/metrics", timeout=5).text
        want = ",".join(f'{k}="{v}"' for k, v in labels.items())
        pattern = re.escape(f"{name}{{{want}}}" if want else name) + r" ([0-9.e+]+)"
        found = re.search("^" + pattern + "$", text, re.M)
        return float(found.group(1)) if found else 0.0

    def labels(self) -> list[dict[str, Any]]:
        if not self.events.exists():
            return []
        with sqlite3.connect(self.events) as db:
            db.row_factory = sqlite3.Row
            try:
                return [dict(r) for r in db.execute("SELECT * FROM labels ORDER BY id")]
            except sqlite3.OperationalError:
                return []

    def settle(self, jobs: int, timeout: float = 10.0) -> None:
        """Wait until ``jobs`` labelling jobs ended (sent, dropped or failed) and the worker
        and the event writer are done with them."""

        def ended() -> bool:
            total = sum(
                self.metric("sparsity_router_shadow_calls_total", outcome=o)
                for o in ("sent", "dropped", "failed")
            )
            if total < jobs or not self.labeller.idle:
                return False
            return len(self.labels()) >= self.metric("sparsity_router_labels_stored_total")

        assert wait_for(ended, timeout), "the labeller did not finish its jobs"


@contextmanager
def _start(
    tmp_path: Path, labelling: str = "", rate: float = 100.0, **delays: float
) -> Iterator[Gateway]:
    """A gateway with fake small, large and judge upstreams (``labelling`` lines added to its
    section; ``delays``: seconds an upstream waits before answering), all stopped after."""
    verdicts = Judge()
    fakes = {
        "small": Timed(name="small"),
        "large": Timed(name="large"),
        "judge": Timed(name="judge", reply=verdicts),
    }
    for name, delay in delays.items():
        fakes[name].delay_s = delay
    servers = {name: ServerThread(fake).start() for name, fake in fakes.items()}
    try:
        text = CONFIG.format(
            **{name: server.url + "/v1" for name, server in servers.items()},
            events=tmp_path / "events.sqlite",
            escalations=tmp_path / "escalations.sqlite",
            labelling="".join(f"  {line}\n" for line in labelling.splitlines()),
            rate=rate,
        )
        settings = parse_settings(text, source_name="gateway.yaml", base_dir=tmp_path)
        app = create_app(settings, labelling_seed=7)
        gateway = ServerThread(app).start()
        try:
            labeller = app.state.gateway.labeller
            assert isinstance(labeller, Labeller)
            yield Gateway(
                gateway.url,
                fakes["small"],
                fakes["large"],
                fakes["judge"],
                verdicts,
                tmp_path / "events.sqlite",
                labeller,
            )
        finally:
            gateway.stop()
    finally:
        for server in servers.values():
            server.stop()


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[Gateway]:
    with _start(tmp_path) as running:
        yield running


def _messages(text: str) -> Any:
    return [{"role": "user", "content": text}]


def test_one_shadow_call_and_two_judge_calls_after_the_answer(gateway: Gateway) -> None:
    client = gateway.client()
    answer = client.chat.completions.create(model="auto", messages=_messages("What is 2+2?"))
    done = time.monotonic()
    assert answer.choices[0].message.content == "answer from small"
    gateway.settle(1)
    assert len(gateway.large.requests) == 1 and len(gateway.judge.requests) == 2
    assert gateway.large.arrivals[0] > done  # the shadow call began after the client's answer
    shadow = gateway.large.requests[0]["body"]
    assert shadow["stream"] is False and shadow["model"] == "large-served"
    assert shadow["messages"] == _messages("What is 2+2?")
    first, second = (r["body"] for r in gateway.judge.requests)
    assert first["max_tokens"] == 64 and first["temperature"] == 0 and not first["stream"]
    assert first["model"] == "judge-served"
    a_first = dict(_ANSWER.findall(first["messages"][-1]["content"]))
    a_second = dict(_ANSWER.findall(second["messages"][-1]["content"]))
    assert a_first == {"A": "answer from small", "B": "answer from large"}
    assert a_second == {"A": "answer from large", "B": "answer from small"}  # swapped
    assert "What is 2+2?" in first["messages"][-1]["content"]
    [label] = gateway.labels()
    assert label["answered_by"] == "small" and label["large_better"] == 1.0
    assert label["source"] == "judge" and label["judge"] == "judge"
    assert label["model"] == "auto" and label["policy"] == "default"
    assert (label["small_backend"], label["large_backend"]) == ("small", "large")
    assert json.loads(label["verdicts"]) == ["[[B]]", "[[A]]"]  # markers only: no store_text
    assert label["input"] is None and label["small_answer"] is None
    assert label["large_answer"] is None

    # A stream answered by large: the shadow goes to small once [DONE] is out.
    stream = client.chat.completions.create(
        model="auto",
        messages=_messages("A premium question"),
        stream=True,
        extra_headers={"x-tier": "premium"},
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    done = time.monotonic()
    assert text == "tok0 tok1 tok2 "
    gateway.settle(2)
    assert len(gateway.small.requests) == 2 and len(gateway.judge.requests) == 4
    assert gateway.small.arrivals[1] > done
    shadow = gateway.small.requests[1]["body"]
    assert shadow["stream"] is False and "stream_options" not in shadow
    streamed = gateway.judge.requests[2]["body"]["messages"][-1]["content"]
    assert dict(_ANSWER.findall(streamed)) == {"A": "answer from small", "B": "tok0 tok1 tok2 "}
    second_label = gateway.labels()[1]
    assert second_label["answered_by"] == "large" and second_label["large_better"] == 1.0
    assert gateway.metric("sparsity_router_shadow_calls_total", outcome="sent") == 2
    assert gateway.metric("sparsity_router_judge_verdicts_total", verdict="large") == 4
    assert gateway.metric("sparsity_router_labels_stored_total") == 2
    assert gateway.metric("sparsity_router_shadow_cost_tokens_total") == 2 * 9 + 4 * 9


def test_verdicts_combine_across_the_swap(gateway: Gateway) -> None:
    client = gateway.client()
    gateway.verdicts.prefer = "small"
    client.chat.completions.create(model="auto", messages=_messages("one"))
    gateway.settle(1)
    gateway.verdicts.prefer = "A"  # always the first position: the swap cancels it
    client.chat.completions.create(model="auto", messages=_messages("two"))
    gateway.settle(2)
    assert [label["large_better"] for label in gateway.labels()] == [0.0, 0.5]
    assert gateway.metric("sparsity_router_judge_verdicts_total", verdict="small") == 3
    assert gateway.metric("sparsity_router_judge_verdicts_total", verdict="large") == 1


def test_a_failing_judge_drops_the_label_and_nothing_else(gateway: Gateway) -> None:
    client = gateway.client()
    gateway.judge.mode = "error500"
    answer = client.chat.completions.create(model="auto", messages=_messages("one"))
    assert answer.choices[0].message.content == "answer from small"
    gateway.settle(1)
    assert gateway.metric("sparsity_router_judge_verdicts_total", verdict="failed") == 1
    assert len(gateway.judge.requests) == 1  # the second call is not made
    gateway.judge.mode = "ok"
    gateway.verdicts.text = "Both answers have merit and I cannot decide between them."
    client.chat.completions.create(model="auto", messages=_messages("two"))
    gateway.settle(2)
    assert gateway.metric("sparsity_router_judge_verdicts_total", verdict="unparsed") == 1
    gateway.large.mode = "error500"  # the shadow call fails
    client.chat.completions.create(model="auto", messages=_messages("three"))
    gateway.settle(3)
    assert gateway.metric("sparsity_router_shadow_calls_total", outcome="failed") == 1
    assert gateway.metric("sparsity_router_shadow_calls_total", outcome="sent") == 2
    assert gateway.labels() == [] and gateway.metric("sparsity_router_labels_stored_total") == 0
    assert (
        gateway.metric(
            "sparsity_router_requests_total", backend="small", rule="default", status="200"
        )
        == 3
    )


def test_human_tier_and_direct_requests_are_never_shadowed(gateway: Gateway) -> None:
    ticket = httpx.post(
        gateway.url + "/v1/chat/completions",
        json={"model": "auto", "messages": _messages("a person, please")},
        headers={"x-tier": "human"},
        timeout=10,
    )
    assert ticket.status_code in (200, 202), ticket.text
    direct = gateway.client().chat.completions.create(
        model="small-direct", messages=_messages("straight to small")
    )
    assert direct.choices[0].message.content == "answer from small"
    time.sleep(0.5)
    assert gateway.large.requests == [] and gateway.judge.requests == []
    assert gateway.metric("sparsity_router_shadow_calls_total", outcome="sent") == 0
    assert gateway.metric("sparsity_router_shadow_calls_total", outcome="dropped") == 0


def test_a_burst_drops_past_the_queue_and_the_rate(tmp_path: Path) -> None:
    # The shadow call takes 0.5 s: the burst's other jobs fill the queue (2) or are dropped.
    with _start(tmp_path, "queue: 2", rate=0.5, large=0.5) as gateway:
        client = openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key="unused", timeout=10)

        async def burst(client: openai.AsyncOpenAI) -> list[Any]:
            calls = [
                client.chat.completions.create(model="auto", messages=_messages(f"q{i}"))
                for i in range(10)
            ]
            try:
                return await asyncio.gather(*calls)
            finally:
                await client.close()

        answers = asyncio.run(burst(client))
        assert [a.choices[0].message.content for a in answers] == ["answer from small"] * 10
        gateway.settle(10)
        dropped = {
            reason: gateway.metric("sparsity_router_shadow_dropped_total", reason=reason)
            for reason in ("queue_full", "rate", "budget")
        }
        # The worker takes the first job and holds it through its 0.5 s shadow call: the queue
        # keeps 2 (1 when both reached it before the worker woke), the rest find it full; the
        # queued ones then find the bucket empty.
        assert dropped["queue_full"] in (7, 8) and dropped["budget"] == 0
        assert dropped["queue_full"] + dropped["rate"] == 9
        assert gateway.metric("sparsity_router_shadow_calls_total", outcome="dropped") == 9
        assert gateway.metric("sparsity_router_shadow_calls_total", outcome="sent") == 1
        assert len(gateway.large.requests) == 1 and len(gateway.labels()) == 1


def test_a_spent_daily_budget_drops(tmp_path: Path) -> None:
    with _start(tmp_path, "daily_token_budget: 20") as gateway:
        client = gateway.client()
        for i in range(3):  # 9 tokens per call: the first job spends 27
            client.chat.completions.create(model="auto", messages=_messages(f"q{i}"))
            gateway.settle(i + 1)
        assert gateway.metric("sparsity_router_shadow_dropped_total", reason="budget") == 2
        assert gateway.metric("sparsity_router_shadow_cost_tokens_total") == 27
        assert len(gateway.labels()) == 1


def test_text_is_stored_only_with_store_text_and_redacted(tmp_path: Path) -> None:
    config = "store_text: true\nredact: ['\\d{3}-\\d{4}', 'secret\\w*']"
    with _start(tmp_path, config) as gateway:
        gateway.small.reply = lambda body: "call 555-0100 for the secretword"
        gateway.verdicts.text = "Small says 555-0100. [[B]]"
        gateway.client().chat.completions.create(
            model="auto", messages=_messages("my number is 555-1234, secretly")
        )
        gateway.settle(1)
        [label] = gateway.labels()
        assert json.loads(label["input"]) == _messages("my number is [REDACTED], [REDACTED]")
        assert label["small_answer"] == "call [REDACTED] for the [REDACTED]"
        assert label["large_answer"] == "answer from large"
        assert json.loads(label["verdicts"]) == ["Small says [REDACTED]. [[B]]"] * 2
        assert label["large_better"] == 0.5  # "B" both times: position bias, a tie


def test_a_reference_answer_labels_without_the_judge(tmp_path: Path) -> None:
    config = "reference: {field: metadata.reference, extract: last_number}"
    with _start(tmp_path, config) as gateway:
        gateway.small.reply = lambda body: "I get 41."
        gateway.large.reply = lambda body: "The total is 42."
        gateway.client().chat.completions.create(
            model="auto", messages=_messages("6 * 7?"), metadata={"reference": "42"}
        )
        gateway.settle(1)
        [label] = gateway.labels()
        assert label["source"] == "reference" and label["large_better"] == 1.0
        assert label["judge"] is None and gateway.judge.requests == []
        assert json.loads(label["verdicts"]) == ["small: wrong", "large: right"]


def test_sampling_is_seeded_and_filtered() -> None:
    raw = json.dumps({"model": "auto", "messages": _messages("hi")}).encode()
    parsed = parse_request("chat/completions", raw)
    decision = Decision(
        backend="small",
        fallbacks=(),
        rule="default",
        policy="default",
        reason="",
        probe_error=False,
    )

    def sampled(seed: int, **settings: Any) -> list[bool]:
        labeller = Labeller(
            LabellingSettings(enabled=True, judge="judge", sample=0.3, **settings),
            backends={"small": None, "large": None},  # type: ignore[dict-item]
            events=None,
            metrics=GatewayMetrics.create(),
            seed=seed,
        )
        return [
            labeller.capture("chat/completions", f"r{i}", decision, parsed, None, "cal") is not None
            for i in range(200)
        ]

    first = sampled(1)
    assert first == sampled(1) and first != sampled(2)
    assert 30 <= sum(first) <= 90
    assert not any(sampled(1, policies=("other",))) and not any(sampled(1, models=("m",)))
    assert any(sampled(1, policies=("default",), models=("auto",)))


# -- a cascade: its escalations are never shadowed, its kept answers are ------------------------

CASCADE = """
probe: {{model: "{model}", layers: [1], timeout_s: 10}}
calibration: {{answer_path: "{answer}"}}
backends:
  small: {{type: openai, base_urls: ["{small}"], model: small-served}}
  large: {{type: openai, base_urls: ["{large}"], model: large-served}}
policies:
  default:
    default: small
    on_probe_error: small
    cascade: {{backend: small, escalate_to: large, when: {{p_large: {{min: 0.5}}}}}}
events: {{sink: sqlite, path: "{events}"}}
labelling: {{enabled: true, sample: 1.0, judge: large}}
"""


def test_cascade_escalations_are_not_shadowed(tiny_probe: SparsityProbe, tmp_path: Path) -> None:
    answer = tmp_path / "answers.json"
    model: SupervisedModel = fit_answer_calibration(tiny_probe, answer)
    assert model.reads == "answer"

    def ramble(body: dict[str, Any]) -> str:
        return LONG_ANSWER if "hard" in json.dumps(body.get("messages")) else SHORT_ANSWER

    def large_or_judge(body: dict[str, Any]) -> str:  # large is the judge too
        return "[[B]]" if "[User Question]" in json.dumps(body["messages"]) else "from large"

    small = Timed(name="small", reply=ramble)
    large = Timed(name="large", reply=large_or_judge)
    servers = [ServerThread(small).start(), ServerThread(large).start()]
    try:
        text = CASCADE.format(
            model=tiny_probe.settings.model,
            answer=answer,
            small=servers[0].url + "/v1",
            large=servers[1].url + "/v1",
            events=tmp_path / "events.sqlite",
        )
        settings = parse_settings(text, source_name="gateway.yaml", base_dir=tmp_path)
        served = SparsityProbe(settings.probe.probe_settings(), loaded=tiny_probe.loaded)
        with ServerThread(create_app(settings, probe=served)) as gateway:
            body = {"model": "auto", "messages": _messages("A hard question about tax law?")}
            hard = httpx.post(gateway.url + "/v1/chat/completions", json=body, timeout=30)
            assert hard.headers["x-router-cascade"] == "escalated"
            body = {"model": "auto", "messages": _messages("What is 2 + 2?")}
            easy = httpx.post(gateway.url + "/v1/chat/completions", json=body, timeout=30)
            assert easy.headers["x-router-cascade"] == "kept"

            def shadowed() -> bool:
                return len(large.requests) >= 4  # escalation, shadow, two judge calls

            assert wait_for(shadowed, 10)
            time.sleep(0.3)
            metrics = httpx.get(gateway.url + "/metrics", timeout=5).text
        assert 'sparsity_router_shadow_calls_total{outcome="sent"} 1.0' in metrics
        assert len(large.requests) == 4  # nothing for the escalated request
        assert len(small.requests) == 2  # the two checked answers; no shadow on small
    finally:
        for server in servers:
            server.stop()
