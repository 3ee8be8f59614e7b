"""The OpenAI-compatible endpoints, as plain ASGI apps (no buffering of streams).

``POST /v1/chat/completions`` and ``POST /v1/completions``: read the body (413 past the limit),
check the key, parse what routing needs, probe when the policy needs it, decide, dispatch down
the backend chain, and answer with the backend's body untouched plus ``x-router-*`` headers.
``POST /v1/route`` does everything but the dispatch and returns the decision.

A client that disconnects cancels the upstream request, streaming or not; once a stream's
``data: [DONE]`` is out, the request is complete whatever the client does next.

Deadlines: the body must arrive within ``server.body_timeout_s`` (else a 408); the whole request
must finish within ``server.request_timeout_s`` from its arrival (probe, cascade and stream
included; a human backend in hold mode adds its ``wait_s``), else the work is cancelled and the
client gets a 504 ``timeout`` envelope, or an error event and ``[DONE]`` once a stream has begun.

Upstream failures reach the client as a generic message with the request id
(:meth:`~router.errors.HTTPError.client_message`); their detail is logged at WARNING.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from dataclasses import dataclass, replace
from typing import Any

from policies.engine import Decision, MissingCapability, RequestContext
from policies.schema import Cascade, HumanBackend
from probes.answers import answer_input
from router.asgi import (
    Disconnected,
    DisconnectWatcher,
    Receive,
    Scope,
    Send,
    SentTracker,
    read_body,
    request_id_headers,
    request_id_of,
    send_error,
    send_json,
)
from router.backends.base import Endpoint
from router.cascade import Verdict, answer_text, as_sse, without_stream
from router.dispatch import Dispatched, dispatch
from router.errors import (
    BadRequest,
    DeadlineExceeded,
    HTTPError,
    NotFound,
    UpstreamError,
    UpstreamStatus,
)
from router.escalations.handler import answer_by_human, is_human
from router.events import RequestEvent
from router.guard import admit
from router.labelling import LabelCapture
from router.logs import bind_request_id
from router.probing import ProbeOutcome
from router.requests import ParsedRequest, parse_request
from router.retry import bind_request_limit
from router.routes.surface import (
    CHAT_ENDPOINTS,
    human_refusal,
    send_endpoint_error,
    stream_error_tail,
)
from router.state import GatewayState
from router.tracing import NO_SPAN, RequestSpan, current
from router.usage import Usage, UsageTap, client_wants_usage, request_usage, usage_of_body
from router.wire import SSE_HEADERS, sse_data

__all__ = ["CompletionsEndpoint", "RouteEndpoint"]

logger = logging.getLogger(__name__)


def _context(scope: Scope, parsed: ParsedRequest) -> RequestContext:
    headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
    return RequestContext(
        model=parsed.model,
        user=parsed.user,
        headers=headers,
        metadata=parsed.metadata,
        has_text=parsed.has_text,
        has_tools=parsed.has_tools,
        has_images=parsed.has_images,
        response_format=parsed.response_format,
        n_messages=parsed.n_messages,
    )


#: How the 400 for a capability no backend of the chain has describes it.
_CAPABILITY_HINT = {
    "tools": "tool calling",
    "vision": "image input",
    "json": "JSON output (response_format)",
}


def _capable(state: GatewayState, parsed: ParsedRequest, decision: Decision) -> Decision:
    """The decision cut to the backends having every capability the request needs (the first
    capable one of its chain answers when its backend lacks one); 400 naming the capability
    and its field when none has them, never a silent drop (docs/routing.md, Capabilities)."""
    try:
        return state.engine.select(decision, parsed.needs)
    except MissingCapability as exc:
        first = exc.missing[0]
        wanted = ", ".join(
            f"{c} ({_CAPABILITY_HINT[c]}, for {parsed.needs[c]})" for c in exc.missing
        )
        raise BadRequest(
            f"no backend for this request can serve {wanted}: {', '.join(exc.chain)} "
            "lack it (backends' capabilities); remove the field or use another model",
            param=parsed.needs[first],
            code="unsupported_capability",
        ) from None


@dataclass(slots=True)
class _Routed:
    parsed: ParsedRequest
    decision: Decision
    outcome: ProbeOutcome | None
    request_id: str = ""
    calibration: str | None = None  # the id of the prompt calibration this request applied

    def headers(self, backend: str, fallback_from: tuple[str, ...]) -> list[tuple[bytes, bytes]]:
        d = self.decision
        out = [
            (b"x-router-backend", backend.encode()),
            (b"x-router-rule", d.rule.encode()),
            (b"x-router-policy", d.policy.encode()),
        ]
        if self.request_id:
            out += request_id_headers(self.request_id)
        if d.arm is not None and d.experiment is not None:
            out.append((b"x-router-experiment", d.experiment.encode()))
            out.append((b"x-router-arm", d.arm.encode()))
        result = self.outcome.result if self.outcome is not None else None
        if result is not None:
            out.append((b"x-router-score", f"{result.score:.6f}".encode()))
            if result.percentile is not None:
                out.append((b"x-router-percentile", f"{result.percentile:.4f}".encode()))
            if result.p_large is not None:
                out.append((b"x-router-p-large", f"{result.p_large:.4f}".encode()))
        if d.predicted_quality is not None:  # a best_of rule's choice
            out.append((b"x-router-predicted-quality", f"{d.predicted_quality:.4f}".encode()))
        out.append((b"x-router-cache", (self.outcome.cache if self.outcome else "off").encode()))
        if self.calibration is not None:
            out.append((b"x-router-calibration", self.calibration.encode()))
        if fallback_from:
            out.append((b"x-router-fallback", ",".join(fallback_from).encode()))
        if d.probe_error:
            out.append((b"x-router-probe-error", b"1"))
        if d.capability_fallback is not None:
            out.append((b"x-router-capability-fallback", d.capability_fallback.encode()))
        return out


async def _route(state: GatewayState, scope: Scope, parsed: ParsedRequest) -> _Routed:
    """Probe (when needed) and decide; direct model names (and embeddings) skip both."""
    policy = state.engine.policy_for_model(parsed.model)
    context: RequestContext | None = None
    assignment = None
    if parsed.endpoint == "embeddings":
        policy = None  # routed by model name only: the backend that lists it under models
    elif state.engine.experiments.for_model(parsed.model) is not None:
        context = _context(scope, parsed)
        assignment = state.engine.experiments.assign(
            parsed.model, user=parsed.user, headers=context.headers
        )
        policy = assignment.policy if assignment is not None else policy
    if policy is None:
        backend = state.direct_models.get(parsed.model)
        if backend is None:
            known = sorted({*state.settings.virtual_models, *state.direct_models})
            raise NotFound(
                f"model {parsed.model!r} not found; available: {', '.join(known)}",
                param="model",
                code="model_not_found",
            )
        decision = Decision(
            backend=backend,
            fallbacks=state.engine.fallback_chain(backend),
            rule="direct",
            policy="-",
            reason=f"model {parsed.model!r} is served by backend {backend!r}",
            probe_error=False,
        )
        return _Routed(parsed, _capable(state, parsed, decision), None)
    outcome: ProbeOutcome | None = None
    # The arm is known before the probe runs: its own calibration (if any) reads the result.
    calibration = state.calibration
    if assignment is not None:
        calibration = state.prompt_calibration(assignment.experiment, assignment.arm)
    if state.probe is not None and parsed.has_text and state.engine.needs_probe(policy):
        with current().probe() as probe_span:
            outcome = await state.probe.measure(parsed.probe_input, calibration=calibration)
            probe_span.outcome(outcome)
    decision = state.engine.decide(
        policy,
        outcome.result if outcome is not None else None,
        context or _context(scope, parsed),
        probe_failed=outcome is not None and outcome.error is not None,
    )
    if assignment is not None:
        decision = replace(decision, experiment=assignment.experiment, arm=assignment.arm)
    serving = calibration or state.answer_calibration
    routed = _Routed(parsed, _capable(state, parsed, decision), outcome)
    routed.calibration = serving.id if serving is not None else None
    return routed


def _count_capability_fallback(state: GatewayState, routed: _Routed) -> None:
    """``router_capability_fallbacks``: the chosen backend lacked a needed capability."""
    d = routed.decision
    if d.capability_fallback is not None:
        skipped, missing = d.capability_fallback.split(":", 1)
        for capability in missing.split(","):
            state.metrics.capability_fallbacks.labels(skipped, capability, d.backend).inc()


async def _authorize_and_parse(
    state: GatewayState, scope: Scope, receive: Receive, endpoint: Endpoint
) -> ParsedRequest:
    await admit(state, scope, "client")
    server = state.settings.server
    if server.body_timeout_s <= server.request_timeout_s:
        timeout_s, setting = server.body_timeout_s, "server.body_timeout_s"
    else:
        timeout_s, setting = server.request_timeout_s, "server.request_timeout_s"
    raw = await read_body(
        receive, server.max_body_bytes, timeout_s=timeout_s, timeout_setting=setting
    )
    return parse_request(endpoint, raw)


def _hold_s(state: GatewayState, backend: str) -> float:
    """How long a human backend in hold mode may keep the request open (0 for the others)."""
    spec = state.settings.backends.get(backend)
    return spec.wait_s if isinstance(spec, HumanBackend) and spec.mode == "hold" else 0.0


class CompletionsEndpoint:
    """``/v1/chat/completions``, ``/v1/completions``, ``/v1/responses``, ``/v1/messages`` or
    ``/v1/embeddings`` (embeddings: routed by model name, never probed; see
    :mod:`router.routes.surface` for what else differs)."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        state: GatewayState = scope["app"].state.gateway
        start = time.perf_counter()
        timeout_s = state.settings.server.request_timeout_s
        limit = asyncio.timeout_at(asyncio.get_running_loop().time() + timeout_s)
        bind_request_limit(limit)  # waits between upstream retries stay inside it
        rule, backend_name, status = "-", "-", 500
        trace = _Trace(request_id_of(scope))
        # Each ASGI request runs in its own task (a copy of the context): no reset needed.
        bind_request_id(trace.request_id)
        trace.span = state.tracing.start(scope, self.endpoint, trace.request_id)
        sent = SentTracker(send, scope)
        routed: _Routed | None = None
        try:
            parsed = await _authorize_and_parse(state, scope, receive, self.endpoint)
            trace.span.request(parsed.model)
            async with limit:
                routed = await _route(state, scope, parsed)
                routed.request_id = trace.request_id
                _count_capability_fallback(state, routed)
                rule, backend_name = routed.decision.rule, routed.decision.backend
                if state.escalations is not None and is_human(
                    state.settings.backends, backend_name
                ):
                    if self.endpoint not in CHAT_ENDPOINTS:
                        raise human_refusal(self.endpoint, backend_name)
                    if (hold_s := _hold_s(state, backend_name)) and (when := limit.when()):
                        limit.reschedule(when + hold_s)  # the hold does not eat the deadline
                    status, backend_name = await answer_by_human(
                        state,
                        scope,
                        self.endpoint,
                        parsed,
                        routed.decision,
                        routed.outcome,
                        routed.headers(backend_name, ()),
                        receive,
                        sent,
                    )
                    return
                status, backend_name = await self._answer(
                    state, routed, receive, sent, start, trace
                )
        except Disconnected:
            status = 499
        except HTTPError as exc:
            status = exc.upstream_status if isinstance(exc, UpstreamStatus) else exc.status
            if not exc.public and not isinstance(exc, UpstreamStatus):
                logger.warning(
                    "request %s failed with %d (%s): %s",
                    trace.request_id,
                    status,
                    type(exc).__name__,
                    exc.message,
                )
            await send_endpoint_error(sent, self.endpoint, exc, trace.request_id)
        except TimeoutError:
            if not limit.expired():
                raise
            status = await _past_deadline(self.endpoint, routed, sent, trace, timeout_s)
        finally:
            state.metrics.requests.labels(backend_name, rule, str(status)).inc()
            if state.events is not None:
                try:
                    state.events.record(
                        trace.event(state, self.endpoint, routed, backend_name, status, start)
                    )
                except Exception:  # an event is never worth a failed request
                    logger.exception("building the event record failed")
            if trace.label is not None and state.labeller is not None:
                # The response is complete: queue the shadow call and the judge (never waits).
                state.labeller.finish(
                    trace.label,
                    answered_by=backend_name,
                    complete=status == 200 and (sent.complete or sent.stream_done),
                    cascade=trace.cascade,
                )
            trace.span.finish(
                status,
                backend_name,
                routed.decision if routed is not None else None,
                routed.outcome if routed is not None else None,
                trace.usage,
                trace.cascade,
            )

    async def _answer(
        self,
        state: GatewayState,
        routed: _Routed,
        receive: Receive,
        send: SentTracker,
        start: float,
        trace: _Trace,
    ) -> tuple[int, str]:
        d = routed.decision
        chain = (d.backend, *d.fallbacks)
        status, answered = 499, d.backend  # stays 499 when the client goes away first
        # A plain asyncio task watches for the client going away and cancels this one; an anyio
        # task group per request cost ~0.15 ms of CPU (bench/proxy_overhead.py).
        task = asyncio.current_task()
        assert task is not None
        watcher = DisconnectWatcher(receive, task)
        body = routed.parsed.body
        chat = self.endpoint in CHAT_ENDPOINTS  # the others pass through as they are
        reads_usage = chat or self.endpoint == "responses"  # response.completed carries it
        if (
            reads_usage
            and routed.parsed.stream
            and (state.events is not None or trace.span.recording)
        ):
            trace.tap = UsageTap(strip=False)
            inject = state.settings.events is not None and state.settings.events.usage == "inject"
            if chat and inject:  # stream_options exists on chat and completions only
                if not client_wants_usage(body) and (asked := request_usage(body)) is not None:
                    body, trace.tap = asked, UsageTap(strip=True)
        if state.labeller is not None:  # router/labelling: a sampled request keeps its answer
            trace.label = state.labeller.capture(
                self.endpoint,
                trace.request_id,
                d,
                routed.parsed,
                routed.outcome,
                routed.calibration,
            )
        try:
            cascade = _cascade_of(state, d) if chat else None
            if cascade is not None:
                dispatched = await self._cascade(state, routed, cascade, body, trace)
            else:
                dispatched = await dispatch(
                    state.backends,
                    chain,
                    self.endpoint,
                    body,
                    stream=routed.parsed.stream,
                )
            answered = dispatched.backend
            state.metrics.upstream_seconds.labels(answered).observe(time.perf_counter() - start)
            for failed in dispatched.fallback_from:
                state.metrics.fallbacks.labels(failed, answered).inc()
            headers = [*routed.headers(answered, dispatched.fallback_from), *trace.headers()]
            status = 200
            if dispatched.result.stream is None:
                if trace.label is not None:
                    trace.label.answered(dispatched.result.body)
                if state.events is not None or trace.span.recording:
                    trace.usage = usage_of_body(dispatched.result.body)
                trace.span.answer(dispatched.result.body)
                if routed.parsed.stream:  # a cascade's kept answer: replayed as a stream
                    sse = as_sse(self.endpoint, dispatched.result.body or b"", routed.parsed.body)
                    await send(
                        {
                            "type": "http.response.start",
                            "status": 200,
                            "headers": [*SSE_HEADERS, *headers],
                        }
                    )
                    trace.first_chunk(state, dispatched.backend, start)
                    await send({"type": "http.response.body", "body": sse, "more_body": False})
                else:
                    await send_json(send, 200, dispatched.result.body or b"", headers)
            else:
                status = await self._stream(state, dispatched, headers, send, watcher, start, trace)
        except asyncio.CancelledError:
            if not watcher.fired:
                raise
            task.uncancel()
            # Gone after the whole answer (a stream's [DONE]) is no failure.
            return (trace.status if send.stream_done or send.complete else 499), answered
        finally:
            watcher.stop()
        return status, answered

    async def _cascade(
        self,
        state: GatewayState,
        routed: _Routed,
        cascade: Cascade,
        body: dict[str, Any],
        trace: _Trace,
    ) -> Dispatched:
        """Ask the checked backend for one JSON answer, read it with the probe, and return it
        or the escalation's answer (streamed when the client asked); see router/cascade.py."""
        d = routed.decision
        first = await dispatch(
            state.backends,
            (d.backend, *d.fallbacks),
            self.endpoint,
            without_stream(routed.parsed.body),
            stream=False,
        )
        text = answer_text(self.endpoint, first.result.body)
        if first.backend != cascade.backend or text is None:  # a fallback answered, or no text
            return trace.verdict(state, "skipped", first)
        assert state.probe is not None  # build_state loads it for cascades
        endpoint = self.endpoint
        assert endpoint == "chat/completions" or endpoint == "completions"  # CHAT_ENDPOINTS
        checked = answer_input(endpoint, routed.parsed.probe_input, text)
        with current().probe("answer") as probe_span:
            outcome = await state.probe.measure(checked, calibration=state.answer_calibration)
            probe_span.outcome(outcome)
        p = outcome.result.p_large if outcome.result is not None else None
        trace.answer_p_large = p
        if p is None:
            escalate = cascade.on_probe_error == "escalate"
        else:
            escalate = cascade.when.p_large.contains(p)
        if not escalate:
            return trace.verdict(state, "kept", first)
        chain = (cascade.escalate_to, *state.engine.fallback_chain(cascade.escalate_to))
        needs = routed.parsed.needs
        chain = tuple(b for b in chain if not state.engine.lacking(b, needs))
        if not chain:  # no escalation can serve the request's tools, images or JSON
            logger.warning(
                "cascade escalation to %s skipped: it lacks %s",
                cascade.escalate_to,
                ",".join(state.engine.lacking(cascade.escalate_to, needs)),
            )
            return trace.verdict(state, "escalation_failed", first)
        try:
            second = await dispatch(
                state.backends, chain, self.endpoint, body, stream=routed.parsed.stream
            )
        except UpstreamError as exc:  # the checked answer is better than no answer
            logger.warning("cascade escalation to %s failed: %s", chain[0], exc.message)
            return trace.verdict(state, "escalation_failed", first)
        trace.checked_cost = _cost(state, first.backend, usage_of_body(first.result.body))
        return trace.verdict(state, "escalated", second)

    async def _stream(
        self,
        state: GatewayState,
        dispatched: Dispatched,
        headers: list[tuple[bytes, bytes]],
        send: SentTracker,
        watcher: DisconnectWatcher,
        start: float,
        trace: _Trace,
    ) -> int:
        """Pass the stream on; its status: 200, or the status of the error that broke it (the
        client then gets a generic error event and ``[DONE]``; the detail goes to the log)."""
        result = dispatched.result
        tap = trace.tap
        assert result.stream is not None
        await send(
            {"type": "http.response.start", "status": 200, "headers": [*SSE_HEADERS, *headers]}
        )
        first = True
        try:
            async for chunk in result.stream:
                if first:
                    trace.first_chunk(state, dispatched.backend, start)
                    trace.span.answer(chunk)
                    first = False
                if trace.label is not None:
                    trace.label.feed(chunk)
                if tap is not None:
                    chunk = tap.feed(chunk)
                if chunk:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                    if send.stream_done:
                        # The client has the whole stream: closing its socket now (SDKs do)
                        # cancels nothing and is no 499; the backend's clean-up still runs.
                        watcher.stop()
            if tap is not None and (rest := tap.flush()):
                await send({"type": "http.response.body", "body": rest, "more_body": True})
        except UpstreamError as exc:
            trace.status = exc.status
            logger.warning(
                "request %s: the stream from %s broke mid-way: %s",
                trace.request_id,
                dispatched.backend,
                exc.message,
            )
            sep = b"" if send.at_event_boundary else b"\n\n"
            message = f"{exc.stream_message} (request id {trace.request_id})"
            tail = stream_error_tail(
                self.endpoint, exc.status, message, exc.stream_event(trace.request_id)
            )
            await send({"type": "http.response.body", "body": sep + tail, "more_body": True})
            watcher.stop()
        finally:
            # Runs once, also when a disconnect cancelled the task: the cancellation has been
            # delivered, so this await completes and the upstream connection is released.
            await result.close()
            if tap is not None:
                trace.usage = tap.usage
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        return trace.status


async def _past_deadline(
    endpoint: Endpoint, routed: _Routed | None, sent: SentTracker, trace: _Trace, timeout_s: float
) -> int:
    """The request ran past ``server.request_timeout_s`` and its work has been cancelled (the
    upstream request closed): tell the client and return the status to record."""
    if sent.complete or sent.stream_done:  # the client has its answer; the clean-up ran late
        if not sent.complete:
            await sent({"type": "http.response.body", "body": b"", "more_body": False})
        return trace.status
    logger.warning(
        "request %s: no complete answer within server.request_timeout_s (%g s)",
        trace.request_id,
        timeout_s,
    )
    error = DeadlineExceeded(timeout_s)
    if not sent.started:
        await send_endpoint_error(sent, endpoint, error, trace.request_id)
    elif routed is not None and routed.parsed.stream:
        sep = b"" if sent.at_event_boundary else b"\n\n"
        message = error.client_message(trace.request_id)
        tail = stream_error_tail(endpoint, 504, message, sse_data(error.body(trace.request_id)))
        await sent({"type": "http.response.body", "body": sep + tail})
    # else: a JSON answer cut after its headers; the server drops the connection.
    return 504


def _cascade_of(state: GatewayState, decision: Decision) -> Cascade | None:
    """The cascade that checks this decision's answer, if its policy has one for its backend
    (build_state loads the probe and the answer calibration whenever a policy has one)."""
    policy = state.settings.policies.get(decision.policy)
    cascade = policy.cascade if policy is not None else None
    if cascade is None or cascade.backend != decision.backend:
        return None
    if state.probe is None or state.answer_calibration is None:
        return None  # never with build_state's state: the answer would be read without its model
    return cascade


def _cost(state: GatewayState, backend: str, usage: Usage | None) -> float | None:
    price = getattr(state.settings.backends.get(backend), "price", None)
    if price is None or usage is None:
        return None
    cost: float | None = price.cost(usage.prompt_tokens, usage.completion_tokens)
    return cost


@dataclass(slots=True)
class _Trace:
    """What one request's event record needs beyond the routing decision."""

    request_id: str
    status: int = 200  # of the answer being sent; a broken stream's is its error's
    ttft_s: float | None = None
    usage: Usage | None = None
    tap: UsageTap | None = None
    cascade: Verdict | None = None
    answer_p_large: float | None = None
    checked_cost: float | None = None  # an escalated request's first (checked) answer
    label: LabelCapture | None = None  # sampled for labelling: its answer is kept
    span: RequestSpan = NO_SPAN  # router/tracing.py: the request's server span

    def first_chunk(self, state: GatewayState, backend: str, start: float) -> None:
        """The first chunk of a stream is going out: time to first token."""
        self.ttft_s = time.perf_counter() - start
        state.metrics.ttft_seconds.labels(backend).observe(self.ttft_s)

    def verdict(self, state: GatewayState, verdict: Verdict, answer: Dispatched) -> Dispatched:
        self.cascade = verdict
        state.metrics.cascades.labels(verdict).inc()
        return answer

    def headers(self) -> list[tuple[bytes, bytes]]:
        if self.cascade is None:
            return []
        out = [(b"x-router-cascade", self.cascade.encode())]
        if self.answer_p_large is not None:
            out.append((b"x-router-answer-p-large", f"{self.answer_p_large:.4f}".encode()))
        return out

    def event(
        self,
        state: GatewayState,
        endpoint: Endpoint,
        routed: _Routed | None,
        backend: str,
        status: int,
        start: float,
    ) -> RequestEvent:
        """The request's event record (``routed`` is None when it failed before a decision)."""
        d = routed.decision if routed is not None else None
        outcome = routed.outcome if routed is not None else None
        result = outcome.result if outcome is not None else None
        usage = self.usage or Usage(None, None)
        cost = _cost(state, backend, usage)
        if cost is not None and self.checked_cost is not None:
            cost += self.checked_cost
        return RequestEvent(
            request_id=self.request_id,
            time=time.time(),
            endpoint=endpoint,
            model=routed.parsed.model if routed is not None else None,
            stream=routed.parsed.stream if routed is not None else None,
            experiment=d.experiment if d is not None else None,
            arm=d.arm if d is not None else None,
            policy=d.policy if d is not None else None,
            rule=d.rule if d is not None else None,
            backend=backend if d is not None else None,
            score=result.score if result is not None else None,
            percentile=result.percentile if result is not None else None,
            cache=outcome.cache if outcome is not None else None,
            latency_s=time.perf_counter() - start,
            ttft_s=self.ttft_s,
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            status=status,
            cost=cost,
            cascade=self.cascade,
            answer_p_large=self.answer_p_large,
            calibration=routed.calibration if routed is not None else None,
        )


class RouteEndpoint:
    """``POST /v1/route``: the probe result and the decision, without dispatching."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        state: GatewayState = scope["app"].state.gateway
        try:
            endpoint: Endpoint = "completions" if _is_completion_body(scope) else "chat/completions"
            parsed = await _authorize_and_parse(state, scope, receive, endpoint)
            routed = await _route(state, scope, parsed)
        except Disconnected:
            return
        except HTTPError as exc:
            await send_error(send, exc)
            return
        d = routed.decision
        outcome = routed.outcome
        cascade = _cascade_of(state, d)  # the answer will be checked before it is returned
        payload = {
            "id": f"route-{uuid.uuid4().hex[:16]}",
            "object": "router.decision",
            "model": parsed.model,
            "decision": {
                "backend": d.backend,
                "fallbacks": list(d.fallbacks),
                "rule": d.rule,
                "policy": d.policy,
                "reason": d.reason,
                "probe_error": d.probe_error,
                "experiment": d.experiment,
                "arm": d.arm,
                "capability_fallback": d.capability_fallback,
                "cascade": None if cascade is None else cascade.model_dump(),
            },
            "probe": None
            if outcome is None
            else {
                "cache": outcome.cache,
                "seconds": outcome.seconds,
                "error": outcome.error,
                "result": outcome.result.to_dict() if outcome.result is not None else None,
            },
        }
        await send_json(send, 200, json.dumps(payload).encode(), routed.headers(d.backend, ()))


def _is_completion_body(scope: Scope) -> bool:
    query = scope.get("query_string", b"")
    return b"endpoint=completions" in query
