"""OpenTelemetry tracing (``tracing:``, router/tracing.py): a real gateway on loopback with the
SDK's in-memory exporter, driven by the official openai SDK; fake upstreams on real ports."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from policies.errors import ConfigError
from policies.loader import parse_settings
from policies.schema import TracingSettings
from probes.probe import SparsityProbe
from router.app import create_app
from router.tracing import DISABLED, OTEL_EXTRA, OTLP_PACKAGE, TracingError, build_tracing
from tests.router.conftest import REFERENCE, gateway_yaml
from tests.servers import FakeUpstream, ServerThread

Upstreams = dict[str, tuple[FakeUpstream, ServerThread]]
Traced = Callable[..., tuple[openai.OpenAI, InMemorySpanExporter]]
ROOT = Path(__file__).resolve().parents[2]
ON = "{enabled: true, exporter: none}"
OTLP_MODULE = "opentelemetry.exporter.otlp.proto.http.trace_exporter"


@pytest.fixture
def traced(
    tiny_probe: SparsityProbe,
    tiny_model_dir: Path,
    tiny_calibration: Path,
    upstreams: Upstreams,
    tmp_path: Path,
) -> Iterator[Traced]:
    """Start a gateway with ``tracing: TEXT`` exporting to an in-memory exporter: an openai
    client of it and the exporter. Every gateway started is stopped after the test, and its
    client closed."""
    running: list[ServerThread] = []
    clients: list[openai.OpenAI] = []

    def start(tracing: str = ON) -> tuple[openai.OpenAI, InMemorySpanExporter]:
        text = gateway_yaml(
            tiny_model_dir, tiny_calibration, upstreams, extra=f"tracing: {tracing}"
        )
        settings = parse_settings(text, source_name="gateway.yaml", base_dir=tmp_path)
        exporter = InMemorySpanExporter()
        app = create_app(settings, probe=tiny_probe, span_exporter=exporter)
        server = ServerThread(app).start()
        running.append(server)
        clients.append(client(server))
        return clients[-1], exporter

    try:
        yield start
    finally:
        for c in clients:
            c.close()
        for server in running:
            server.stop()


def client(gw: ServerThread) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key="none", max_retries=0, timeout=20)


def finished(exporter: InMemorySpanExporter, servers: int = 1) -> list[ReadableSpan]:
    """The spans once ``servers`` server spans have ended (they end last, after the answer)."""
    deadline = time.monotonic() + 10
    while True:
        spans = list(exporter.get_finished_spans())
        if sum(s.kind == SpanKind.SERVER for s in spans) >= servers:
            return spans
        assert time.monotonic() < deadline, f"only {spans} after 10 s"
        time.sleep(0.01)


def one(spans: list[ReadableSpan], name: str) -> ReadableSpan:
    found = [s for s in spans if s.name == name]
    assert len(found) == 1, [s.name for s in spans]
    return found[0]


def attrs(span: ReadableSpan) -> dict[str, object]:
    return dict(span.attributes or {})


def parent_id(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


def test_a_chat_request_gets_a_server_span_with_probe_and_upstream_children(
    traced: Traced, upstreams: Upstreams
) -> None:
    c, exporter = traced()
    raw = c.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": REFERENCE[3]}]
    )
    raw.parse()
    backend = raw.headers["x-router-backend"]
    spans = finished(exporter)
    server = one(spans, "chat auto")
    assert server.kind == SpanKind.SERVER and server.parent is None
    a = attrs(server)
    assert a["gen_ai.operation.name"] == "chat"
    assert a["gen_ai.request.model"] == "auto"
    assert a["gen_ai.response.model"] == f"{backend}-served"  # what the upstream answered
    assert a["gen_ai.usage.input_tokens"] == 5 and a["gen_ai.usage.output_tokens"] == 4
    assert a["sparsity_router.backend"] == backend
    assert a["sparsity_router.rule"] == raw.headers["x-router-rule"]
    assert a["sparsity_router.policy"] == "default"
    assert a["sparsity_router.cache"] == raw.headers["x-router-cache"]
    assert a["sparsity_router.score"] == pytest.approx(float(raw.headers["x-router-score"]), 1e-5)
    assert a["sparsity_router.percentile"] == pytest.approx(
        float(raw.headers["x-router-percentile"]), abs=1e-4
    )
    assert a["sparsity_router.request_id"] == raw.headers["x-router-request-id"]
    assert a["http.response.status_code"] == 200
    assert server.status.status_code == StatusCode.UNSET

    probe = one(spans, "probe")
    assert parent_id(probe) == server.context.span_id
    assert probe.context.trace_id == server.context.trace_id
    p = attrs(probe)
    assert p["sparsity_router.cache"] == raw.headers["x-router-cache"]
    n_tokens = p["sparsity_router.probe.n_tokens"]
    seconds = p["sparsity_router.probe.seconds"]
    assert isinstance(n_tokens, int) and n_tokens > 0
    assert isinstance(seconds, float) and seconds >= 0

    upstream = one(spans, f"upstream {backend}")
    assert upstream.kind == SpanKind.CLIENT
    assert parent_id(upstream) == server.context.span_id
    u = attrs(upstream)
    assert u["server.address"] == "127.0.0.1" and u["http.response.status_code"] == 200
    fakes = [fake for fake, _ in upstreams.values() if fake.requests]
    assert len(fakes) == 1
    assert u["server.port"] in {thread.port for _, thread in upstreams.values()}
    # the upstream received the upstream span's context
    version, trace_id, span_id, flags = fakes[0].requests[-1]["headers"]["traceparent"].split("-")
    assert version == "00" and int(flags, 16) & 1  # sampled
    assert int(trace_id, 16) == server.context.trace_id
    assert int(span_id, 16) == upstream.context.span_id


def test_a_stream_is_traced_to_its_end_with_its_usage(traced: Traced) -> None:
    c, exporter = traced()
    stream = c.chat.completions.create(
        model="auto",
        messages=[{"role": "user", "content": REFERENCE[7]}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[-1].usage is not None
    spans = finished(exporter)
    server = one(spans, "chat auto")
    a = attrs(server)
    backend = a["sparsity_router.backend"]
    assert a["gen_ai.response.model"] == f"{backend}-served"
    assert a["gen_ai.usage.input_tokens"] == 5 and a["gen_ai.usage.output_tokens"] == 3
    upstream = one(spans, f"upstream {backend}")
    assert parent_id(upstream) == server.context.span_id
    # the upstream span covers the stream: it ends after the first chunk reached the client
    assert upstream.end_time is not None and server.end_time is not None
    assert upstream.end_time <= server.end_time


def test_completions_and_an_incoming_traceparent_are_continued(
    traced: Traced, upstreams: Upstreams
) -> None:
    c, exporter = traced()
    caller_trace, caller_span = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    c.completions.create(
        model="small-direct",
        prompt="hello",
        extra_headers={"traceparent": f"00-{caller_trace}-{caller_span}-01"},
    )
    spans = finished(exporter)
    server = one(spans, "text_completion small-direct")
    assert server.context.trace_id == int(caller_trace, 16)
    assert parent_id(server) == int(caller_span, 16)
    assert attrs(server)["gen_ai.operation.name"] == "text_completion"
    assert attrs(server)["sparsity_router.rule"] == "direct"
    assert not [s for s in spans if s.name == "probe"]  # direct models are not probed
    sent = upstreams["small"][0].requests[-1]["headers"]["traceparent"]
    assert sent.split("-")[1] == caller_trace


def test_a_failing_upstream_marks_its_spans_as_errors(traced: Traced, upstreams: Upstreams) -> None:
    upstreams["small"][0].mode = "error500"
    c, exporter = traced()
    body = {"model": "small-direct", "messages": [{"role": "user", "content": "hi"}]}
    with httpx.Client(base_url=str(c.base_url), timeout=20) as h:
        status = h.post("chat/completions", json=body).status_code
    assert status >= 500
    spans = finished(exporter)
    server = one(spans, "chat small-direct")
    assert attrs(server)["http.response.status_code"] == status
    assert server.status.status_code == StatusCode.ERROR
    assert attrs(server)["http.response.status_code"] >= 500  # type: ignore[operator]
    tries = [s for s in spans if s.name == "upstream small"]
    assert tries and all(s.status.status_code == StatusCode.ERROR for s in tries)
    assert all(attrs(s)["http.response.status_code"] == 500 for s in tries)


def test_unsampled_requests_record_nothing_but_still_propagate(
    traced: Traced, upstreams: Upstreams
) -> None:
    c, exporter = traced("{enabled: true, exporter: none, sample_ratio: 0}")
    c.chat.completions.create(model="small-direct", messages=[{"role": "user", "content": "hi"}])
    time.sleep(0.2)
    assert exporter.get_finished_spans() == ()
    flags = upstreams["small"][0].requests[-1]["headers"]["traceparent"].split("-")[3]
    assert not int(flags, 16) & 1  # not sampled: the upstream need not record it either


def test_tracing_off_makes_no_spans_and_sends_no_traceparent(
    traced: Traced, upstreams: Upstreams
) -> None:
    c, exporter = traced("{enabled: false}")
    c.chat.completions.create(model="auto", messages=[{"role": "user", "content": REFERENCE[1]}])
    time.sleep(0.2)
    assert exporter.get_finished_spans() == ()
    sent = [r for fake, _ in upstreams.values() for r in fake.requests]
    assert len(sent) == 1 and "traceparent" not in sent[0]["headers"]


def test_tracing_off_never_imports_opentelemetry() -> None:
    """With opentelemetry made unimportable (as when the otel extra is not installed), a gateway
    without tracing starts and serves, and none of the project's modules tried to import it
    (redis-py tries on its own, for its optional metrics)."""
    script = textwrap.dedent(
        """
        import importlib.abc
        import sys

        tried = []

        class NoOpenTelemetry(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] != "opentelemetry":
                    return None
                frame = sys._getframe(1)
                while frame is not None and frame.f_globals.get("__name__", "").startswith(
                    ("importlib", "_frozen_importlib")
                ):
                    frame = frame.f_back
                tried.append(frame.f_globals.get("__name__", "?") if frame else "?")
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)

        sys.meta_path.insert(0, NoOpenTelemetry())

        import httpx
        from policies.loader import parse_settings
        from router.app import create_app
        from tests.servers import FakeUpstream, ServerThread

        with ServerThread(FakeUpstream(name="small")) as upstream:
            text = f'''
        backends:
          small: {{type: openai, base_urls: ["{upstream.url}/v1"]}}
        policies:
          default: {{default: small, on_probe_error: small}}
        '''
            settings = parse_settings(text, source_name="gateway.yaml")
            with ServerThread(create_app(settings)) as gateway:
                body = {"model": "auto", "messages": [{"role": "user", "content": "hi"}]}
                response = httpx.post(gateway.url + "/v1/chat/completions", json=body, timeout=20)
                assert response.status_code == 200, response.text
        ours = [m for m in tried if m.split(".")[0] in ("router", "policies", "probes", "cli")]
        print("TRIED", sorted(set(tried)), "OURS", ours)
        assert not ours, ours
        assert not [m for m in sys.modules if m.split(".")[0] == "opentelemetry"]
        """
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "OURS []" in done.stdout


def test_config_errors_name_the_yaml_path(
    tiny_model_dir: Path, tiny_calibration: Path, upstreams: Upstreams
) -> None:
    for tracing, where, what in (
        ("{exporter: console, endpoint: 'http://c:4318/v1/traces'}", "tracing.endpoint", "otlp"),
        ("{enabled: true, sample_ratio: 2}", "tracing.sample_ratio", "1"),
        ("{enabled: true, exporter: zipkin}", "tracing.exporter", "otlp"),
        ("{enabled: true, endpoint: 'collector:4318'}", "tracing.endpoint", "http"),
        ("{enabled: true, sampling: 1}", "tracing: unknown key", "sampling"),
    ):
        text = gateway_yaml(
            tiny_model_dir, tiny_calibration, upstreams, extra=f"tracing: {tracing}"
        )
        with pytest.raises(ConfigError) as info:
            parse_settings(text, source_name="gateway.yaml")
        message = str(info.value)
        assert where in message and what in message, message


def test_missing_packages_are_named() -> None:
    otlp = TracingSettings(enabled=True, exporter="otlp")
    try:
        installed = importlib.util.find_spec(OTLP_MODULE) is not None
    except ModuleNotFoundError:  # a parent package is missing
        installed = False
    if installed:
        build_tracing(otlp).shutdown()
    else:
        with pytest.raises(TracingError, match=OTLP_PACKAGE):
            build_tracing(otlp)
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, "opentelemetry.sdk.trace", None)
        with pytest.raises(TracingError) as info:
            build_tracing(TracingSettings(enabled=True, exporter="none"))
    assert OTEL_EXTRA in str(info.value)
    assert build_tracing(TracingSettings()) is DISABLED


def test_a_missing_package_stops_the_gateway_from_starting(
    tiny_probe: SparsityProbe, tmp_path: Path, upstreams: Upstreams
) -> None:
    text = f"""
backends:
  small: {{type: openai, base_urls: ["{upstreams["small"][1].url}/v1"]}}
policies:
  default: {{default: small, on_probe_error: small}}
tracing: {{enabled: true, exporter: none}}
"""
    settings = parse_settings(text, source_name="gateway.yaml", base_dir=tmp_path)
    app = create_app(settings, probe=tiny_probe)
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "lifespan.startup"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, "opentelemetry.sdk.resources", None)
        with pytest.raises(TracingError):
            asyncio.run(app({"type": "lifespan", "asgi": {"version": "3.0"}}, receive, send))
    assert [m["type"] for m in sent] == ["lifespan.startup.failed"]
    assert OTEL_EXTRA in sent[0]["message"]
