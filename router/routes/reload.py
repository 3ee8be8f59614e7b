"""``POST /admin/reload`` (admin scope) and the ``SIGHUP`` handler: re-read the config file and
the calibration files it names (200 with the calibration ids serving; 422 ``config_invalid`` or
``calibration_invalid`` with the reason when the previous ones keep serving)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anyio
from starlette.requests import Request
from starlette.responses import Response

from router.errors import HTTPError, NotFound, Unprocessable
from router.guard import admit
from router.reload import ReloadOutcome, reload_state

__all__ = ["reload_app", "reload_endpoint"]


async def reload_app(app: Any) -> ReloadOutcome | None:
    """Reload ``app``'s config file, one reload at a time; None when it has no file."""
    path: Path | None = getattr(app.state, "config_path", None)
    if path is None:
        return None
    lock: anyio.Lock = app.state.reload_lock
    async with lock:
        outcome = await reload_state(app.state.gateway, path)
        app.state.gateway = outcome.state
    return outcome


def _error(exc: HTTPError) -> Response:
    return Response(exc.body(), status_code=exc.status, media_type="application/json")


async def reload_endpoint(request: Request) -> Response:
    try:
        await admit(request.app.state.gateway, request.scope, "admin")
        outcome = await reload_app(request.app)
        if outcome is None:
            raise NotFound(
                "this gateway was not started from a config file; nothing to reload",
                code="no_config_file",
            )
        if not outcome.ok:
            raise Unprocessable(outcome.message, code=outcome.code)
    except HTTPError as exc:
        return _error(exc)
    return Response(
        json.dumps(
            {
                "status": "reloaded",
                "message": outcome.message,
                "calibration": outcome.state.calibration_ids(),
            }
        ),
        media_type="application/json",
    )
