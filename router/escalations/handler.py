"""The human tier on the request path: escalate, then answer per the backend's ``mode``.

* ``ticket``: an immediate ``chat.completion`` whose text is ``ticket_message`` with the id;
  the client polls ``GET /v1/escalations/{id}``.
* ``hold``: the request stays open up to ``wait_s``. Streaming clients get the SSE headers at
  once and a ``: waiting`` comment every ``keepalive_s``; the reviewer's answer comes back as a
  normal completion (SSE chunks when streaming). Past ``wait_s`` the ``on_timeout`` backend
  answers (a normal dispatch; the escalation is closed as expired) or a ticket is returned.

Every answer carries ``x-router-escalation-id``. When the queue itself fails (store down), the
decision's fallback backends answer; without any, a 503.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from typing import TYPE_CHECKING, Any

from policies.engine import Decision
from policies.schema import HumanBackend
from router.asgi import DisconnectWatcher, Receive, Scope, Send, send_json
from router.backends.base import Endpoint
from router.dispatch import dispatch
from router.errors import Forbidden, HTTPError, NoBackendAvailable, UpstreamError
from router.escalations.completion import completion_body, sse_chunks
from router.escalations.model import Escalation, NewEscalation, StoreConflict
from router.escalations.service import EscalationService
from router.probing import ProbeOutcome
from router.requests import ParsedRequest
from router.wire import SSE_DONE, SSE_HEADERS, sse_data

if TYPE_CHECKING:
    from router.state import GatewayState

__all__ = ["answer_by_human", "is_human", "owner_of"]

logger = logging.getLogger(__name__)

Headers = list[tuple[bytes, bytes]]

_SSE_HEADERS: Headers = list(SSE_HEADERS)


def is_human(settings_backends: dict[str, Any], name: str) -> bool:
    return isinstance(settings_backends.get(name), HumanBackend)


def owner_of(scope: Scope, auth_enabled: bool) -> str | None:
    """SHA-256 (hex) of the client's bearer key; None with authentication off."""
    if not auth_enabled:
        return None
    for key, value in scope.get("headers", ()):
        if key == b"authorization" and bytes(value[:7]).lower() == b"bearer ":
            return hashlib.sha256(bytes(value[7:]).strip()).hexdigest()
    return None


async def _chunk(send: Send, body: bytes, more: bool = True) -> None:
    await send({"type": "http.response.body", "body": body, "more_body": more})


def _with_backend(headers: Headers, backend: str, fallback_from: tuple[str, ...]) -> Headers:
    out = [(k, v) for k, v in headers if k not in (b"x-router-backend", b"x-router-fallback")]
    out.append((b"x-router-backend", backend.encode()))
    if fallback_from:
        out.append((b"x-router-fallback", ",".join(fallback_from).encode()))
    return out


def _new_escalation(
    endpoint: Endpoint,
    parsed: ParsedRequest,
    decision: Decision,
    outcome: ProbeOutcome | None,
    mode: str,
    owner: str | None,
) -> NewEscalation:
    body = parsed.body
    request: dict[str, Any] = {
        "model": parsed.model,
        "user": parsed.user,
        "metadata": dict(parsed.metadata),
        "stream": parsed.stream,
    }
    if endpoint == "chat/completions":
        request["messages"] = body.get("messages")
    else:
        request["prompt"] = body.get("prompt")
    result = outcome.result if outcome is not None else None
    probe = (
        None
        if result is None
        else {"score": result.score, "percentile": result.percentile, "n_tokens": result.n_tokens}
    )
    return NewEscalation(
        endpoint=endpoint,
        request=request,
        probe=probe,
        rule=decision.rule,
        policy=decision.policy,
        backend=decision.backend,
        mode=mode,
        owner=owner,
    )


async def answer_by_human(
    state: GatewayState,
    scope: Scope,
    endpoint: Endpoint,
    parsed: ParsedRequest,
    decision: Decision,
    outcome: ProbeOutcome | None,
    headers: Headers,
    receive: Receive,
    send: Send,
) -> tuple[int, str]:
    """Answer a request whose decision is a human backend; (HTTP status, answering backend)."""
    human = state.settings.backends[decision.backend]
    assert isinstance(human, HumanBackend)
    service: EscalationService | None = state.escalations
    new = _new_escalation(
        endpoint, parsed, decision, outcome, human.mode, owner_of(scope, state.keys.enabled)
    )
    task = asyncio.current_task()
    assert task is not None
    watcher = DisconnectWatcher(receive, task)
    try:
        try:
            if service is None:
                raise RuntimeError("no escalation store is configured")
            record = await service.create(new)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if service is not None:
                service.metrics.store_errors.inc()
            logger.warning("escalation store failed (%s: %s)", type(exc).__name__, exc)
            if not decision.fallbacks:
                raise NoBackendAvailable(
                    "the escalation queue is unavailable and the rule has no fallback backend "
                    "(add fallback: [...] to the rule or the human backend)",
                    public=True,
                ) from None
            return await _dispatch_and_send(
                state, endpoint, parsed, decision.fallbacks, headers, send, (decision.backend,)
            )
        headers = [*headers, (b"x-router-escalation-id", record.id.encode())]
        if human.mode == "ticket":
            await _send_text(send, endpoint, parsed, record, _ticket(human, record), headers)
            return 200, decision.backend
        return await _hold(state, service, human, endpoint, parsed, record, headers, send)
    except asyncio.CancelledError:
        if not watcher.fired:
            raise
        task = asyncio.current_task()
        if task is not None:
            task.uncancel()
        return 499, decision.backend
    finally:
        watcher.stop()


def _ticket(human: HumanBackend, record: Escalation) -> str:
    return human.ticket_message.format(id=record.id)


async def _send_text(
    send: Send,
    endpoint: Endpoint,
    parsed: ParsedRequest,
    record: Escalation,
    text: str,
    headers: Headers,
) -> None:
    if parsed.stream:
        await send(
            {"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS + headers}
        )
        await _chunk(send, sse_chunks(endpoint, record.id, parsed.model, text), more=False)
    else:
        await send_json(
            send, 200, completion_body(endpoint, record.id, parsed.model, text), headers
        )


def _rejected(record: Escalation) -> Forbidden:
    return Forbidden(
        f"a reviewer declined to answer this request (escalation {record.id}): "
        f"{record.reason or 'no reason given'}",
        code="escalation_rejected",
    )


async def _hold(
    state: GatewayState,
    service: EscalationService,
    human: HumanBackend,
    endpoint: Endpoint,
    parsed: ParsedRequest,
    record: Escalation,
    headers: Headers,
    send: Send,
) -> tuple[int, str]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + human.wait_s
    streaming = parsed.stream
    if streaming:
        await send(
            {"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS + headers}
        )
    closed: Escalation | None = None
    while closed is None:
        left = deadline - loop.time()
        if left <= 0:
            break
        closed = await service.wait(record.id, min(left, human.keepalive_s) if streaming else left)
        if closed is None and streaming and deadline - loop.time() > 0:
            await _chunk(send, b": waiting\n\n")
    if closed is None:
        if human.on_timeout == "ticket":
            text = _ticket(human, record)
            if streaming:
                await _chunk(send, sse_chunks(endpoint, record.id, parsed.model, text), more=False)
            else:
                body = completion_body(endpoint, record.id, parsed.model, text)
                await send_json(send, 200, body, headers)
            return 200, record.backend
        try:
            await service.expire(
                record.id,
                f"the client's hold ended after {human.wait_s:g} s; "
                f"backend {human.on_timeout!r} answered",
            )
        except StoreConflict:
            closed = await service.get(record.id)  # answered at the last moment
        if closed is None or closed.status == "expired":
            chain = (human.on_timeout, *state.engine.fallback_chain(human.on_timeout))
            return await _dispatch_and_send(
                state, endpoint, parsed, chain, headers, send, (record.backend,), started=streaming
            )
    if closed.status == "answered":
        text = closed.answer or ""
        if streaming:
            await _chunk(send, sse_chunks(endpoint, record.id, parsed.model, text), more=False)
        else:
            await send_json(
                send, 200, completion_body(endpoint, record.id, parsed.model, text), headers
            )
        return 200, record.backend
    error = (
        _rejected(closed)
        if closed.status == "rejected"
        else NoBackendAvailable(
            f"escalation {record.id} expired before anyone answered", public=True
        )
    )
    if streaming:
        await _chunk(send, sse_data(error.body()) + SSE_DONE, more=False)
        return 200, record.backend
    await send_json(send, error.status, error.body(), [])
    return error.status, record.backend


async def _dispatch_and_send(
    state: GatewayState,
    endpoint: Endpoint,
    parsed: ParsedRequest,
    chain: tuple[str, ...],
    headers: Headers,
    send: Send,
    fallback_from: tuple[str, ...],
    *,
    started: bool = False,
) -> tuple[int, str]:
    """A normal dispatch down ``chain``; ``started``: the SSE headers are already sent."""
    try:
        dispatched = await dispatch(
            state.backends, chain, endpoint, parsed.body, stream=parsed.stream
        )
    except HTTPError as exc:
        if not started:
            raise
        await _chunk(send, sse_data(exc.body()) + SSE_DONE, more=False)
        return 200, chain[0]
    answered = dispatched.backend
    result = dispatched.result
    out = _with_backend(headers, answered, (*fallback_from, *dispatched.fallback_from))
    if result.stream is None:
        body = result.body or b""
        if started:  # the client streams; the backend answered in one piece
            await _chunk(send, body, more=False)
        else:
            await send_json(send, result.status, body, out)
        return 200, answered
    if not started:
        await send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS + out})
    try:
        async for piece in result.stream:
            if piece:
                await _chunk(send, piece)
    except UpstreamError as exc:  # a generic event for the client, the detail for the log
        logger.warning("the stream from %s broke mid-way: %s", answered, exc.message)
        await _chunk(send, b"\n\n" + exc.stream_event() + SSE_DONE)
        status = exc.status
    else:
        status = 200
    finally:
        await result.close()
    await _chunk(send, b"", more=False)
    return status, answered
