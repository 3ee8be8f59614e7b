"""``create_app(settings)``: the gateway as an ASGI app. Nothing happens at import time.

The lifespan loads the probe, the calibration and the backends into ``app.state.gateway`` and
closes them on shutdown. Every error leaves as an OpenAI error envelope, unknown paths and
methods included; an unexpected exception is logged with its traceback and answered with a
generic 500 envelope.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import anyio.to_thread
from starlette.applications import Starlette
from starlette.datastructures import State
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from policies.schema import Settings
from probes.probe import SparsityProbe
from router.escalations.routes import escalation_routes
from router.labelling import Labeller
from router.openapi import openapi_endpoint
from router.routes import admin
from router.routes.feedback import FeedbackEndpoint
from router.routes.openai import CompletionsEndpoint, RouteEndpoint
from router.routes.reload import reload_app, reload_endpoint
from router.state import GatewayState, build_state
from router.tracing import build_tracing
from router.wire import envelope

if TYPE_CHECKING:
    from opentelemetry.sdk.trace.export import SpanExporter

__all__ = ["GatewayApp", "create_app"]

logger = logging.getLogger(__name__)

_STATUS_TYPES = {404: "not_found_error", 405: "invalid_request_error"}


async def _http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        message = f"no such endpoint: {request.method} {request.url.path}"
    elif exc.status_code == 405:
        message = f"method {request.method} is not allowed on {request.url.path}"
    else:
        message = str(exc.detail)
    return Response(
        envelope(message, _STATUS_TYPES.get(exc.status_code, "invalid_request_error")),
        status_code=exc.status_code,
        media_type="application/json",
        headers=dict(exc.headers or {}),
    )


def _internal_error() -> bytes:
    return envelope("internal error in the gateway; see its log", "server_error")


async def _server_error(request: Request, exc: Exception) -> Response:
    logger.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return Response(
        _internal_error(),
        status_code=500,
        media_type="application/json",
    )


class GatewayApp:
    """The Starlette app, with the two hot paths dispatched straight to their endpoints.

    ``POST /v1/chat/completions`` and ``POST /v1/completions`` skip Starlette's router and its
    exception middlewares (about a tenth of the gateway's CPU per request in
    bench/proxy_overhead.py); the endpoints answer every error themselves, and anything
    unexpected still becomes the logged, generic 500 envelope. Everything else, lifespan
    included, goes through Starlette.
    """

    def __init__(self, app: Starlette, hot: dict[str, ASGIApp]) -> None:
        self.app = app
        self._hot = hot

    @property
    def state(self) -> State:
        return self.app.state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            endpoint = self._hot.get(scope["path"])
            if endpoint is not None:
                scope["app"] = self.app
                started = False

                async def tracking_send(message: Message) -> None:
                    nonlocal started
                    started = True
                    await send(message)

                try:
                    await endpoint(scope, receive, tracking_send)
                except Exception as exc:
                    logger.error("unhandled error on POST %s", scope["path"], exc_info=exc)
                    if not started:
                        body = envelope(
                            "internal error in the gateway; see its log", "server_error"
                        )
                        await send(
                            {
                                "type": "http.response.start",
                                "status": 500,
                                "headers": [
                                    (b"content-type", b"application/json"),
                                    (b"content-length", str(len(body)).encode()),
                                ],
                            }
                        )
                        await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


def _install_sighup(app: Starlette) -> bool:
    """Reload the config file on SIGHUP (main thread of a Unix process only)."""
    loop = asyncio.get_running_loop()
    pending: set[asyncio.Task[object]] = set()

    def on_sighup() -> None:
        logger.info("SIGHUP: reloading the config file")
        task: asyncio.Task[object] = loop.create_task(reload_app(app))
        pending.add(task)
        task.add_done_callback(pending.discard)

    try:
        loop.add_signal_handler(signal.SIGHUP, on_sighup)
    except (ValueError, RuntimeError, NotImplementedError, AttributeError):
        return False  # not the main thread (tests' server threads), or no SIGHUP (Windows)
    return True


def _build_state(
    settings: Settings, probe: SparsityProbe | None, span_exporter: SpanExporter | None
) -> GatewayState:
    """The gateway's state with its tracer (router/tracing.py), which it shuts down on close."""
    tracing = build_tracing(settings.tracing, span_exporter=span_exporter)
    try:
        state = build_state(settings, probe=probe)
    except BaseException:
        tracing.shutdown()
        raise
    state.tracing = tracing
    return state


def create_app(
    settings: Settings,
    *,
    probe: SparsityProbe | None = None,
    config_path: str | Path | None = None,
    freeze_gc: bool = False,
    span_exporter: SpanExporter | None = None,
    labelling_seed: int | None = None,
) -> GatewayApp:
    """Build the gateway. ``probe`` lets a caller share an already loaded probe (tests, CLI);
    ``config_path`` is the file ``SIGHUP`` and ``POST /admin/reload`` re-read;
    ``span_exporter`` (an OpenTelemetry ``SpanExporter``) receives every span as it ends in
    place of the configured exporter when ``tracing.enabled`` (tests: ``InMemorySpanExporter``);
    ``labelling_seed`` seeds the labeller's sampling (``labelling.sample``; tests).

    ``freeze_gc`` (for the process that owns the gateway: ``run_server``, the benchmarks): once
    started, collect and then ``gc.freeze()`` everything loaded so far, so that the cyclic
    GC's full collections no longer walk the ~440,000 start-up objects (the probe model, torch,
    transformers). Without it, every full collection under load stopped the event loop for
    0.2-0.5 s on a 2-core machine: at 32 clients about one every 8,000 requests, the p99 tail
    of bench/proxy_overhead.py. After the freeze a full collection takes 2-15 ms."""

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        state = await anyio.to_thread.run_sync(lambda: _build_state(settings, probe, span_exporter))
        app.state.gateway = state
        app.state.config_path = Path(config_path) if config_path is not None else None
        app.state.reload_lock = anyio.Lock()
        if state.probe is not None and settings.probe.warm_up:
            seconds = await state.probe.warm_up()
            if seconds is not None:
                logger.info("probe warmed up in %.2f s", seconds)
        sighup = config_path is not None and _install_sighup(app)
        if state.escalations is not None:
            await state.escalations.start()
        if settings.labelling.enabled:  # router/labelling: shadow calls and the judge
            state.labeller = Labeller(
                settings.labelling,
                backends=state.backends,
                events=state.events,
                metrics=state.metrics,
                seed=labelling_seed,
            )
            await state.labeller.start()
        if freeze_gc:
            gc.collect()
            gc.freeze()
        logger.info(
            "gateway ready: backends %s, virtual models %s",
            ", ".join(state.backends),
            ", ".join(settings.virtual_models),
        )
        try:
            yield
        finally:
            if sighup:
                asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
            if state.labeller is not None:  # before the backends it calls are closed
                await state.labeller.aclose()
            await app.state.gateway.aclose()

    chat, completions = CompletionsEndpoint("chat/completions"), CompletionsEndpoint("completions")
    more = {  # the same path: auth, limits, probe (not for embeddings), fallbacks, events
        "responses": CompletionsEndpoint("responses"),
        "messages": CompletionsEndpoint("messages"),
        "embeddings": CompletionsEndpoint("embeddings"),
    }
    routes = [
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        *(Route(f"/v1/{name}", endpoint, methods=["POST"]) for name, endpoint in more.items()),
        Route("/v1/route", RouteEndpoint(), methods=["POST"]),
        Route("/v1/feedback", FeedbackEndpoint(), methods=["POST"]),
        Route("/v1/models", admin.models, methods=["GET"]),
        Route("/healthz", admin.healthz, methods=["GET"]),
        Route("/readyz", admin.readyz, methods=["GET"]),
        Route("/metrics", admin.metrics, methods=["GET"]),
        Route("/admin/reload", reload_endpoint, methods=["POST"]),
        Route("/openapi.json", openapi_endpoint, methods=["GET"]),
        *escalation_routes(),
    ]
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={HTTPException: _http_exception, Exception: _server_error},
    )
    hot: dict[str, ASGIApp] = {"/v1/chat/completions": chat, "/v1/completions": completions}
    hot.update((f"/v1/{name}", endpoint) for name, endpoint in more.items())
    return GatewayApp(app, hot)
