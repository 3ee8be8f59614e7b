"""Health, readiness, models and Prometheus metrics.

``/healthz`` and ``/readyz`` are open to anyone (load balancers, orchestrators); ``/metrics``
needs a key with scope ``metrics`` or ``admin`` when authentication is on, unless
``auth.public_metrics`` (docs/security.md).

``/v1/models`` lists every model with ``created`` = :data:`MODELS_CREATED`, a fixed epoch: the
same across calls, restarts and replicas (the gateway has no real creation date to give).
"""

from __future__ import annotations

import json
from typing import Final

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from router.errors import HTTPError, Unauthorized
from router.guard import admit
from router.state import GatewayState

__all__ = ["MODELS_CREATED", "healthz", "metrics", "models", "readyz"]

#: The ``created`` of every model in ``/v1/models``: 2024-01-01T00:00:00Z.
MODELS_CREATED: Final = 1_704_067_200


def _state(request: Request) -> GatewayState:
    state: GatewayState = request.app.state.gateway
    return state


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    state = _state(request)
    probe_ready = state.probe is not None or not any(
        state.engine.needs_probe(p) for p in state.settings.policies
    )
    body = {
        "status": "ready" if probe_ready and state.backends else "not ready",
        "probe": "loaded" if state.probe is not None else "not needed",
        "calibration": (
            "loaded" if state.probe is not None and state.probe.calibration is not None else "none"
        ),
        "backends": sorted(state.backends),
    }
    return JSONResponse(body, status_code=200 if body["status"] == "ready" else 503)


async def models(request: Request) -> Response:
    state = _state(request)
    if not state.authorized(request.headers.get("authorization", "").encode() or None):
        exc = Unauthorized("missing or invalid API key", code="invalid_api_key")
        return Response(exc.body(), status_code=401, media_type="application/json")
    created = MODELS_CREATED
    data = [
        {
            "id": name,
            "object": "model",
            "created": created,
            "owned_by": "sparsity-router",
            "router": {"type": "virtual", "policy": vm.policy},
        }
        for name, vm in state.settings.virtual_models.items()
    ]
    seen = {d["id"] for d in data}
    for model, backend in state.direct_models.items():
        if model not in seen:
            seen.add(model)
            data.append(
                {
                    "id": model,
                    "object": "model",
                    "created": created,
                    "owned_by": "sparsity-router",
                    "router": {"type": "direct", "backend": backend},
                }
            )
    return Response(json.dumps({"object": "list", "data": data}), media_type="application/json")


async def metrics(request: Request) -> Response:
    state = _state(request)
    if state.keys.enabled and not state.settings.auth.public_metrics:
        try:
            await admit(state, request.scope, "metrics")
        except HTTPError as exc:
            return Response(
                exc.body(),
                status_code=exc.status,
                media_type="application/json",
                headers=exc.headers,
            )
    return Response(
        _state(request).metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8"
    )
