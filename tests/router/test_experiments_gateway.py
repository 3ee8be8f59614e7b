"""A/B arms, event records and feedback through the real gateway (uvicorn, openai SDK, fake
upstreams on real ports)."""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from cli.main import main
from policies.experiments import assign
from tests.router.conftest import REFERENCE
from tests.servers import FakeUpstream, ServerThread

Upstreams = dict[str, tuple[FakeUpstream, ServerThread]]
Start = Callable[..., ServerThread]


def config(
    tiny_model_dir: Path,
    calibration: Path,
    upstreams: Upstreams,
    *,
    enabled: bool = True,
    events: str = "{sink: sqlite, path: events.sqlite}",
) -> str:
    small = upstreams["small"][1].url + "/v1"
    large = upstreams["large"][1].url + "/v1"
    return f"""
probe: {{model: "{tiny_model_dir}", layers: [1, 2, -1], token_mean: true, timeout_s: 10}}
calibration: {{path: "{calibration}"}}
backends:
  small:
    type: openai
    base_urls: ["{small}"]
    model: small-served
    price: {{input_per_mtok: 1.0, output_per_mtok: 2.0}}
  large:
    type: openai
    base_urls: ["{large}"]
    model: large-served
    price: {{input_per_mtok: 10.0, output_per_mtok: 30.0}}
policies:
  default:
    rules: [{{name: sparse, when: {{share: 0.5}}, route: large}}]
    default: small
    on_probe_error: large
  all-small: {{default: small, on_probe_error: small}}
experiments:
  - name: ab
    model: auto
    key: user
    enabled: {str(enabled).lower()}
    arms:
      - {{name: control, policy: default, weight: 0.5}}
      - {{name: cheap, policy: all-small, weight: 0.5}}
events: {events}
"""


@pytest.fixture
def start(
    tiny_model_dir: Path,
    tiny_calibration: Path,
    upstreams: Upstreams,
    serve_yaml: Callable[[str], ServerThread],
    tmp_path: Path,
) -> Start:
    def make(**kwargs: Any) -> ServerThread:
        text = config(tiny_model_dir, tiny_calibration, upstreams, **kwargs)
        (tmp_path / "gateway.yaml").write_text(text)
        return serve_yaml(text)

    return make


def client(gw: ServerThread) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key="none", max_retries=0, timeout=20)


def rows(path: Path) -> list[dict[str, Any]]:
    with sqlite3.connect(path) as db:
        db.row_factory = sqlite3.Row
        return [dict(r) for r in db.execute("SELECT * FROM requests ORDER BY time")]


def test_events_for_streamed_and_non_streamed_requests(
    start: Start, upstreams: Upstreams, tmp_path: Path
) -> None:
    gw = start()
    c = client(gw)
    messages: Any = [{"role": "user", "content": REFERENCE[0]}]
    plain = c.chat.completions.with_raw_response.create(
        model="auto", messages=messages, user="alice"
    )
    h = plain.headers
    assert h["x-router-arm"] == assign_arm("alice") and h["x-router-experiment"] == "ab"
    ids = {"plain": h["x-router-request-id"]}

    # streamed, no usage asked: the gateway asks upstream for it and strips the usage chunk
    with c.chat.completions.with_streaming_response.create(
        model="auto", messages=messages, user="bob", stream=True
    ) as raw:
        ids["stream"] = raw.headers["x-router-request-id"]
        chunks = list(raw.parse())
    assert all(ch.usage is None for ch in chunks) and all(ch.choices for ch in chunks)
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == "tok0 tok1 tok2 "
    backend = raw.headers["x-router-backend"]
    sent = upstreams[backend][0].requests[-1]["body"]
    assert sent["stream_options"] == {"include_usage": True}

    # streamed, client asked: bytes pass through, usage chunk included
    with c.chat.completions.with_streaming_response.create(
        model="auto",
        messages=messages,
        user="carol",
        stream=True,
        stream_options={"include_usage": True},
    ) as raw2:
        ids["usage"] = raw2.headers["x-router-request-id"]
        chunks2 = list(raw2.parse())
    assert chunks2[-1].usage is not None and chunks2[-1].usage.completion_tokens == 3
    gw.stop()  # drains the event queue

    by_id = {r["request_id"]: r for r in rows(tmp_path / "events.sqlite")}
    assert set(by_id) == set(ids.values())
    first = by_id[ids["plain"]]
    assert (first["prompt_tokens"], first["completion_tokens"]) == (5, 4)
    assert first["stream"] == 0 and first["ttft_s"] is None and first["status"] == 200
    assert first["backend"] == h["x-router-backend"] and first["rule"] == h["x-router-rule"]
    assert first["arm"] == assign_arm("alice") and first["experiment"] == "ab"
    assert first["latency_s"] > 0 and first["model"] == "auto"
    price = {"small": (1.0, 2.0), "large": (10.0, 30.0)}[first["backend"]]
    assert first["cost"] == pytest.approx((5 * price[0] + 4 * price[1]) / 1e6)
    if first["arm"] == "control":
        assert first["score"] == pytest.approx(float(h["x-router-score"]), abs=1e-6)
        assert first["percentile"] is not None and first["cache"] in ("hit", "miss")
    for key in ("stream", "usage"):
        r = by_id[ids[key]]
        assert (r["prompt_tokens"], r["completion_tokens"]) == (5, 3), key
        assert r["stream"] == 1 and 0 < r["ttft_s"] <= r["latency_s"] and r["cost"] > 0


def assign_arm(user: str) -> str:
    from policies.schema import Experiment

    exp = Experiment.model_validate(
        {
            "name": "ab",
            "arms": [
                {"name": "control", "policy": "default", "weight": 0.5},
                {"name": "cheap", "policy": "all-small", "weight": 0.5},
            ],
        }
    )
    return assign(exp, user).arm


def test_passive_usage_leaves_the_request_alone(
    start: Start, upstreams: Upstreams, tmp_path: Path
) -> None:
    gw = start(events="{sink: jsonl, path: ev.jsonl, usage: passive}")
    with client(gw).chat.completions.with_streaming_response.create(
        model="auto", messages=[{"role": "user", "content": "hi"}], user="dan", stream=True
    ) as raw:
        list(raw.parse())
        backend = raw.headers["x-router-backend"]
    assert "stream_options" not in upstreams[backend][0].requests[-1]["body"]
    gw.stop()
    (record,) = [json.loads(line) for line in (tmp_path / "ev.jsonl").read_text().splitlines()]
    assert record["prompt_tokens"] is None and record["cost"] is None and record["stream"] is True


def test_arms_are_sticky_and_identical_on_two_gateways(start: Start) -> None:
    a, b = start(), start()
    users = [f"user-{i}" for i in range(40)]
    arms_a, arms_b = [], []
    for gw, out in ((a, arms_a), (b, arms_b)):
        for user in users:
            raw = httpx.post(
                gw.url + "/v1/route",
                json={
                    "model": "auto",
                    "user": user,
                    "messages": [{"role": "user", "content": "x"}],
                },
                timeout=20,
            )
            decision = raw.json()["decision"]
            assert decision["experiment"] == "ab" and raw.headers["x-router-arm"] == decision["arm"]
            out.append(decision["arm"])
    assert arms_a == arms_b == [assign_arm(u) for u in users]
    assert set(arms_a) == {"control", "cheap"}
    # cheap-arm requests follow the all-small policy
    raw = client(a).chat.completions.with_raw_response.create(
        model="auto",
        messages=[{"role": "user", "content": "x"}],
        user=users[arms_a.index("cheap")],
    )
    assert raw.headers["x-router-policy"] == "all-small" and raw.headers["x-router-arm"] == "cheap"
    # no user: control arm
    raw = client(a).chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": "x"}]
    )
    assert raw.headers["x-router-arm"] == "control" and raw.headers["x-router-policy"] == "default"


def test_kill_switch_sends_everyone_to_control(start: Start) -> None:
    gw = start(enabled=False)
    c = client(gw)
    arms = {
        c.chat.completions.with_raw_response.create(
            model="auto", messages=[{"role": "user", "content": "x"}], user=f"u{i}"
        ).headers["x-router-arm"]
        for i in range(20)
    }
    assert arms == {"control"}


def test_feedback_endpoint_and_report_from_sqlite(start: Start, tmp_path: Path) -> None:
    gw = start()
    c = client(gw)
    ids = []
    for i in range(12):
        raw = c.chat.completions.with_raw_response.create(
            model="auto", messages=[{"role": "user", "content": REFERENCE[i]}], user=f"u{i}"
        )
        ids.append(raw.headers["x-router-request-id"])
    url = gw.url + "/v1/feedback"
    for i, rid in enumerate(ids):
        r = httpx.post(url, json={"request_id": rid, "score": i / 10, "label": "ok"}, timeout=10)
        assert r.status_code == 200 and r.json()["recorded"] is True
    cases: list[tuple[Any, int, str | None]] = [
        ({"request_id": "nope", "score": 1}, 404, "request_id"),
        ({"request_id": ids[0]}, 400, "score"),
        ({"request_id": ids[0], "score": "high"}, 422, "score"),
        ({"request_id": ids[0], "label": ""}, 422, "label"),
        ({"score": 1}, 400, "request_id"),
        ({"request_id": ids[0], "score": 1, "extra": 1}, 400, "extra"),
        ([1, 2], 400, None),
    ]
    for body, status, param in cases:
        r = httpx.post(url, json=body, timeout=10)
        assert r.status_code == status, (body, r.text)
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["param"] == param
    bad_json = httpx.post(url, content=b"{oops", timeout=10)
    assert bad_json.status_code == 400 and "JSON" in bad_json.json()["error"]["message"]
    gw.stop()

    with sqlite3.connect(tmp_path / "events.sqlite") as db:
        feedback = db.execute("SELECT request_id, score, label FROM feedback").fetchall()
    assert sorted(feedback) == sorted((rid, i / 10, "ok") for i, rid in enumerate(ids))

    out = tmp_path / "report"
    rc = main(
        [
            *("experiments", "report", "ab", "--config", str(tmp_path / "gateway.yaml")),
            *("--out", str(out), "--resamples", "200"),
        ]
    )
    assert rc == 0
    text = (out / "ab.md").read_text()
    arms = Counter(r["arm"] for r in rows(tmp_path / "events.sqlite"))
    for arm, n in arms.items():
        assert f"| {arm} | {n} | 0 |" in text
    assert (out / "ab.png").stat().st_size > 10_000


def test_feedback_without_events_is_a_404(start: Start) -> None:
    gw = start(events="{sink: none}")
    r = httpx.post(gw.url + "/v1/feedback", json={"request_id": "x", "score": 1}, timeout=10)
    assert r.status_code == 404 and r.json()["error"]["code"] == "events_disabled"
    assert (
        "x-router-request-id"
        in httpx.post(
            gw.url + "/v1/chat/completions",
            json={"model": "auto", "messages": [{"role": "user", "content": "x"}]},
            timeout=20,
        ).headers
    )


def test_a_failing_sink_does_not_fail_requests(
    start: Start, redis_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    gw = start(events=f'{{sink: redis, redis_url: "{redis_server.url}", stream: "gw:events"}}')
    c = client(gw)
    redis_server.kill()
    with caplog.at_level(logging.WARNING, logger="router.events"):
        for i in range(5):
            raw = c.chat.completions.with_raw_response.create(
                model="auto", messages=[{"role": "user", "content": "x"}], user=f"u{i}"
            )
            assert raw.http_response.status_code == 200
            with c.chat.completions.with_streaming_response.create(
                model="auto", messages=[{"role": "user", "content": "x"}], stream=True
            ) as s:
                assert len(list(s.parse())) == 4
        metrics = ""
        for _ in range(200):
            metrics = httpx.get(gw.url + "/metrics", timeout=10).text
            if 'sparsity_router_events_dropped_total{reason="sink_error"} 10.0' in metrics:
                break
            time.sleep(0.05)
    assert 'sparsity_router_events_dropped_total{reason="sink_error"} 10.0' in metrics
    failed = [r for r in caplog.records if "dropping events until it recovers" in r.getMessage()]
    assert len(failed) == 1


def test_stream_cut_mid_way_with_usage_injected(
    start: Start, upstreams: Upstreams, tmp_path: Path
) -> None:
    for fake, _server in upstreams.values():
        fake.mode = "cut"
    gw = start()
    body = {
        "model": "auto",
        "user": "erin",
        "stream": True,
        "messages": [{"role": "user", "content": "x"}],
    }
    with httpx.stream("POST", gw.url + "/v1/chat/completions", json=body, timeout=20) as r:
        assert r.status_code == 200
        rid = r.headers["x-router-request-id"]
        events = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2][len("data: ") :])["error"]["code"] == "upstream_stream_error"
    assert len(events) == 4  # two content chunks, the error, [DONE]
    gw.stop()
    (record,) = rows(tmp_path / "events.sqlite")
    assert record["request_id"] == rid and record["prompt_tokens"] is None
    assert record["stream"] == 1 and record["ttft_s"] is not None
