"""``create_app(settings)``: the gateway as an ASGI app. Nothing happens at import time.

The lifespan loads the probe, the calibration and the backends into ``app.state.gateway`` and
closes them on shutdown. Every error leaves as an OpenAI error envelope, unknown paths and
methods included; an unexpected exception is logged with its traceback and answered with a
generic 500 envelope.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio.to_thread
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from policies.schema import Settings
from probes.probe import SparsityProbe
from router.errors import envelope
from router.routes import admin
from router.routes.openai import CompletionsEndpoint, RouteEndpoint
from router.state import build_state

__all__ = ["create_app"]

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


async def _server_error(request: Request, exc: Exception) -> Response:
    logger.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return Response(
        envelope("internal error in the gateway; see its log", "server_error"),
        status_code=500,
        media_type="application/json",
    )


def create_app(settings: Settings, *, probe: SparsityProbe | None = None) -> Starlette:
    """Build the gateway. ``probe`` lets a caller share an already loaded probe (tests, CLI)."""

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        state = await anyio.to_thread.run_sync(lambda: build_state(settings, probe=probe))
        app.state.gateway = state
        logger.info(
            "gateway ready: backends %s, virtual models %s",
            ", ".join(state.backends),
            ", ".join(settings.virtual_models),
        )
        try:
            yield
        finally:
            await state.aclose()

    routes = [
        Route("/v1/chat/completions", CompletionsEndpoint("chat/completions"), methods=["POST"]),
        Route("/v1/completions", CompletionsEndpoint("completions"), methods=["POST"]),
        Route("/v1/route", RouteEndpoint(), methods=["POST"]),
        Route("/v1/models", admin.models, methods=["GET"]),
        Route("/healthz", admin.healthz, methods=["GET"]),
        Route("/readyz", admin.readyz, methods=["GET"]),
        Route("/metrics", admin.metrics, methods=["GET"]),
    ]
    return Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={HTTPException: _http_exception, Exception: _server_error},
    )
