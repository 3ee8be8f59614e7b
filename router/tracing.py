"""OpenTelemetry traces of every request, behind a facade the request path calls.

The request path never imports OpenTelemetry: it calls :class:`Tracing` (one per gateway, on
:class:`~router.state.GatewayState`) and the span objects it hands out. With ``tracing:``
disabled every call lands on a shared no-op object (no allocation, no import); enabled
(:func:`build_tracing`, the ``otel`` extra), a request gets:

- a SERVER span ``chat {model}`` (``text_completion {model}`` on ``/v1/completions``) named and
  attributed per the GenAI semantic conventions (``gen_ai.operation.name``,
  ``gen_ai.request.model``, ``gen_ai.response.model``, ``gen_ai.usage.input_tokens`` /
  ``output_tokens``), plus the router's own ``sparsity_router.*`` attributes (score,
  percentile, p_large, rule, policy, experiment, arm, backend, cache, cascade). An incoming
  W3C ``traceparent`` is continued;
- a child span ``probe`` per probe measurement (cache state, tokens, seconds);
- a CLIENT child span ``upstream {backend}`` per attempt on an OpenAI-compatible upstream
  (``server.address``, ``server.port``, ``http.response.status_code``), whose context goes to
  the upstream in a ``traceparent`` header. A streamed answer's span ends with the stream.

Spans are found through a context variable set for the request (:func:`current`), so the
probe service and the backends need no tracing argument. The ``TracerProvider`` belongs to the
gateway (built in the app's lifespan, shut down with it); no global provider is set.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Mapping
from contextvars import ContextVar, Token
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import urlsplit

from policies.schema import TracingSettings
from probes.errors import RouterError

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.propagators.textmap import TextMapPropagator
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer

    from policies.engine import Decision
    from router.probing import ProbeOutcome
    from router.usage import Usage

__all__ = [
    "DISABLED",
    "NO_SPAN",
    "OTEL_EXTRA",
    "OTLP_PACKAGE",
    "ProbeSpan",
    "RequestSpan",
    "Tracing",
    "TracingError",
    "UpstreamSpan",
    "build_tracing",
    "current",
]

#: How to install what tracing needs (named in the error when it is missing).
OTEL_EXTRA: Final = "pip install 'sparsity-router[otel]'"
#: The package ``exporter: otlp`` needs (not a dependency of the gateway).
OTLP_PACKAGE: Final = "opentelemetry-exporter-otlp-proto-http"
_OTLP_MODULE: Final = "opentelemetry.exporter.otlp.proto.http.trace_exporter"

#: The GenAI operation of each endpoint.
_OPERATIONS: Final = {
    "chat/completions": "chat",
    "completions": "text_completion",
    "responses": "chat",
    "messages": "chat",
    "embeddings": "embeddings",
}
#: The first ``"model": "..."`` of a JSON answer or SSE chunk (the top-level key comes first in
#: OpenAI-compatible answers; one inside a string would be escaped and is not matched).
_MODEL: Final = re.compile(rb'"model"\s*:\s*"((?:[^"\\]|\\.){1,256})"')


class TracingError(RouterError):
    """Tracing is enabled but cannot start (a package it needs is missing)."""


class ProbeSpan:
    """The span of one probe measurement; this base is the no-op one."""

    __slots__ = ()

    def __enter__(self) -> ProbeSpan:
        return self

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        return None

    def outcome(self, outcome: ProbeOutcome) -> None:
        """Record where the result came from, its size and how long it took."""


class UpstreamSpan:
    """The span of one attempt on an upstream; this base is the no-op one."""

    __slots__ = ()

    def headers(self, headers: dict[str, str]) -> dict[str, str]:
        """``headers`` plus ``traceparent`` (a copy; the no-op returns ``headers`` itself)."""
        return headers

    def status(self, status: int) -> None:
        """The upstream answered ``status`` (an error from 400 on)."""

    def fail(self, exc: BaseException) -> None:
        """The attempt failed without an answer (connect error, timeout, broken stream)."""

    def end(self) -> None:
        """The attempt is over (for a stream: the stream is closed)."""


class RequestSpan:
    """The server span of one request; this base is the no-op one (:data:`NO_SPAN`)."""

    __slots__ = ()

    @property
    def recording(self) -> bool:
        """Whether the span records attributes (the route then reads usage for it)."""
        return False

    def request(self, model: str) -> None:
        """The request is parsed: it asks for ``model``."""

    def probe(self, reads: str = "prompt") -> ProbeSpan:
        """A child span around one probe measurement (``reads``: prompt or answer)."""
        return _NO_PROBE

    def upstream(self, backend: str, url: str) -> UpstreamSpan:
        """A child span for one attempt on ``backend`` at ``url``."""
        return _NO_UPSTREAM

    def answer(self, data: bytes | None) -> None:
        """The upstream's answer (a JSON body, or a stream's first chunk): its ``model``."""

    def finish(
        self,
        status: int,
        backend: str,
        decision: Decision | None,
        outcome: ProbeOutcome | None,
        usage: Usage | None,
        cascade: str | None,
    ) -> None:
        """The request is over with ``status``; record the decision and end the span."""


_NO_PROBE: Final = ProbeSpan()
_NO_UPSTREAM: Final = UpstreamSpan()
#: The span of a request that is not traced.
NO_SPAN: Final = RequestSpan()
_CURRENT: ContextVar[RequestSpan] = ContextVar("sparsity_router_span", default=NO_SPAN)


def current() -> RequestSpan:
    """The span of the request being served (:data:`NO_SPAN` when it is not traced)."""
    return _CURRENT.get()


class Tracing:
    """A gateway's tracer; this base is the disabled one (:data:`DISABLED`)."""

    __slots__ = ()

    @property
    def enabled(self) -> bool:
        return False

    def start(self, scope: Mapping[str, Any], endpoint: str, request_id: str) -> RequestSpan:
        """The server span of a request arriving on ``endpoint`` (an ASGI ``scope``), made
        the :func:`current` one until its :meth:`RequestSpan.finish`."""
        return NO_SPAN

    def shutdown(self) -> None:
        """Flush and close the exporter (blocking: call it from a worker thread)."""


#: Tracing switched off.
DISABLED: Final = Tracing()


@dataclass(frozen=True, slots=True)
class _Kit:
    """The OpenTelemetry pieces the live spans use, imported by :func:`build_tracing`."""

    tracer: Tracer
    propagator: TextMapPropagator
    server: SpanKind
    client: SpanKind
    error: StatusCode
    status: type[Status]
    in_context: Callable[[Span], Context]


def _fail(kit: _Kit, span: Span, error_type: str, message: str) -> None:
    span.set_attribute("error.type", error_type)
    span.set_status(kit.status(kit.error, message))


class _LiveProbe(ProbeSpan):
    __slots__ = ("_kit", "_span")

    def __init__(self, kit: _Kit, span: Span) -> None:
        self._kit = kit
        self._span = span

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        if exc is not None:
            _fail(self._kit, self._span, type(exc).__name__, str(exc))
        self._span.end()

    def outcome(self, outcome: ProbeOutcome) -> None:
        span = self._span
        span.set_attribute("sparsity_router.cache", outcome.cache)
        span.set_attribute("sparsity_router.probe.seconds", outcome.seconds)
        if outcome.result is not None:
            span.set_attribute("sparsity_router.probe.n_tokens", outcome.result.n_tokens)
            span.set_attribute("sparsity_router.score", outcome.result.score)
        if outcome.error is not None:
            span.set_attribute("sparsity_router.probe.error", outcome.error)
            _fail(self._kit, span, "probe_" + outcome.error, f"probe failed: {outcome.error}")


class _LiveUpstream(UpstreamSpan):
    __slots__ = ("_ended", "_kit", "_span")

    def __init__(self, kit: _Kit, span: Span) -> None:
        self._kit = kit
        self._span = span
        self._ended = False

    def headers(self, headers: dict[str, str]) -> dict[str, str]:
        out = dict(headers)
        self._kit.propagator.inject(out, context=self._kit.in_context(self._span))
        return out

    def status(self, status: int) -> None:
        self._span.set_attribute("http.response.status_code", status)
        if status >= 400:
            _fail(self._kit, self._span, str(status), f"upstream answered {status}")

    def fail(self, exc: BaseException) -> None:
        _fail(self._kit, self._span, type(exc).__name__, str(exc))

    def end(self) -> None:
        if not self._ended:
            self._ended = True
            self._span.end()


class _LiveRequest(RequestSpan):
    __slots__ = ("_context", "_kit", "_model_seen", "_operation", "_recording", "_span", "_token")

    def __init__(self, kit: _Kit, span: Span, context: Context, operation: str) -> None:
        self._kit = kit
        self._span = span
        self._context = context  # the span's context: the parent of its children
        self._operation = operation
        self._recording = span.is_recording()
        self._model_seen = False
        self._token: Token[RequestSpan] = _CURRENT.set(self)

    @property
    def recording(self) -> bool:
        return self._recording

    def request(self, model: str) -> None:
        self._span.update_name(f"{self._operation} {model}")
        self._span.set_attribute("gen_ai.request.model", model)

    def probe(self, reads: str = "prompt") -> ProbeSpan:
        span = self._kit.tracer.start_span(
            "probe", context=self._context, attributes={"sparsity_router.probe.reads": reads}
        )
        return _LiveProbe(self._kit, span)

    def upstream(self, backend: str, url: str) -> UpstreamSpan:
        parts = urlsplit(url)
        attributes: dict[str, str | int] = {
            "sparsity_router.backend": backend,
            "http.request.method": "POST",
            "url.full": url,
            "server.address": parts.hostname or "",
        }
        try:
            port = parts.port
        except ValueError:
            port = None
        if port is None:
            port = 443 if parts.scheme == "https" else 80
        attributes["server.port"] = port
        span = self._kit.tracer.start_span(
            f"upstream {backend}",
            context=self._context,
            kind=self._kit.client,
            attributes=attributes,
        )
        return _LiveUpstream(self._kit, span)

    def answer(self, data: bytes | None) -> None:
        if self._model_seen or not data or not self._recording:
            return
        found = _MODEL.search(data)
        if found is not None:
            self._model_seen = True
            model = found.group(1).decode("utf-8", "replace")
            self._span.set_attribute("gen_ai.response.model", model)

    def finish(
        self,
        status: int,
        backend: str,
        decision: Decision | None,
        outcome: ProbeOutcome | None,
        usage: Usage | None,
        cascade: str | None,
    ) -> None:
        try:
            _CURRENT.reset(self._token)
        except ValueError:  # finished in another context than it started in
            _CURRENT.set(NO_SPAN)
        span = self._span
        if self._recording:
            attrs: dict[str, str | int | float | bool] = {"http.response.status_code": status}
            if decision is not None:
                attrs["sparsity_router.backend"] = backend
                attrs["sparsity_router.rule"] = decision.rule
                attrs["sparsity_router.policy"] = decision.policy
                attrs["sparsity_router.cache"] = outcome.cache if outcome is not None else "off"
                if decision.probe_error:
                    attrs["sparsity_router.probe_error"] = True
                if decision.experiment is not None and decision.arm is not None:
                    attrs["sparsity_router.experiment"] = decision.experiment
                    attrs["sparsity_router.arm"] = decision.arm
            result = outcome.result if outcome is not None else None
            if result is not None:
                attrs["sparsity_router.score"] = result.score
                if result.percentile is not None:
                    attrs["sparsity_router.percentile"] = result.percentile
                if result.p_large is not None:
                    attrs["sparsity_router.p_large"] = result.p_large
            if cascade is not None:
                attrs["sparsity_router.cascade"] = cascade
            if usage is not None:
                if usage.prompt_tokens is not None:
                    attrs["gen_ai.usage.input_tokens"] = usage.prompt_tokens
                if usage.completion_tokens is not None:
                    attrs["gen_ai.usage.output_tokens"] = usage.completion_tokens
            span.set_attributes(attrs)
            if status >= 500:
                _fail(self._kit, span, str(status), f"answered {status}")
        span.end()


class _LiveTracing(Tracing):
    __slots__ = ("_kit", "_provider")

    def __init__(self, kit: _Kit, provider: TracerProvider) -> None:
        self._kit = kit
        self._provider = provider

    @property
    def enabled(self) -> bool:
        return True

    def start(self, scope: Mapping[str, Any], endpoint: str, request_id: str) -> RequestSpan:
        kit = self._kit
        carrier: dict[str, str] = {}
        for key, value in scope["headers"]:
            if key == b"traceparent" or key == b"tracestate":
                carrier[key.decode("latin-1")] = value.decode("latin-1")
        parent = kit.propagator.extract(carrier) if carrier else None
        operation = _OPERATIONS.get(endpoint, endpoint)
        span = kit.tracer.start_span(
            operation,
            context=parent,
            kind=kit.server,
            attributes={
                "gen_ai.operation.name": operation,
                "http.request.method": str(scope.get("method", "POST")),
                "url.path": str(scope.get("path", "")),
                "sparsity_router.request_id": request_id,
            },
        )
        return _LiveRequest(kit, span, kit.in_context(span), operation)

    def shutdown(self) -> None:
        self._provider.shutdown()


def build_tracing(
    settings: TracingSettings, *, span_exporter: SpanExporter | None = None
) -> Tracing:
    """The gateway's tracer per ``settings``: :data:`DISABLED` when tracing is off (nothing
    imported). ``span_exporter`` replaces the configured exporter and exports each span as it
    ends (tests pass the SDK's ``InMemorySpanExporter``). Raises :class:`TracingError` when a
    package tracing needs is missing."""
    if not settings.enabled:
        return DISABLED
    try:  # the otel extra is optional: imported only when tracing is on
        from opentelemetry import trace
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import (
            BatchSpanProcessor,
            ConsoleSpanExporter,
            SimpleSpanProcessor,
        )
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
    except ImportError as exc:
        raise TracingError(
            f"tracing.enabled is true but OpenTelemetry is not installed ({exc.name} is "
            f"missing). Fix: {OTEL_EXTRA}, or set tracing.enabled: false"
        ) from exc
    exporter = span_exporter
    if exporter is None and settings.exporter == "otlp":
        try:
            otlp = importlib.import_module(_OTLP_MODULE)
        except ImportError as exc:
            raise TracingError(
                f"tracing.exporter: otlp needs the package {OTLP_PACKAGE}, which is not "
                f"installed. Fix: pip install {OTLP_PACKAGE}, or set tracing.exporter to "
                "console or none"
            ) from exc
        exporter = (
            otlp.OTLPSpanExporter(endpoint=settings.endpoint)
            if settings.endpoint is not None
            else otlp.OTLPSpanExporter()
        )
    elif exporter is None and settings.exporter == "console":
        exporter = ConsoleSpanExporter(service_name=settings.service_name)
    provider = TracerProvider(
        sampler=ParentBased(TraceIdRatioBased(settings.sample_ratio)),
        resource=Resource.create({"service.name": settings.service_name}),
        shutdown_on_exit=False,  # the gateway's lifespan shuts it down
    )
    if exporter is not None:
        processor = (
            SimpleSpanProcessor(exporter)
            if span_exporter is not None
            else BatchSpanProcessor(exporter)
        )
        provider.add_span_processor(processor)
    kit = _Kit(
        tracer=provider.get_tracer("sparsity_router"),
        propagator=TraceContextTextMapPropagator(),
        server=trace.SpanKind.SERVER,
        client=trace.SpanKind.CLIENT,
        error=trace.StatusCode.ERROR,
        status=trace.Status,
        in_context=trace.set_span_in_context,
    )
    return _LiveTracing(kit, provider)
