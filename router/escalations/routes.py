"""``/v1/escalations``: client polling and the reviewer API; ``/review``: the reviewer page.

=======================================  ===============  =====================================
route                                    key scope        answer
=======================================  ===============  =====================================
GET  /v1/escalations?status=open         reviewer, admin  {"object": "list", "data": [...]}
GET  /v1/escalations/{id}                the creating     client: status + completion once
                                         client key;      answered; reviewer: the whole record
                                         reviewer, admin
POST /v1/escalations/{id}/claim          reviewer, admin  the record (409 if someone holds it)
POST /v1/escalations/{id}/answer         reviewer, admin  {"content": "..."}; idempotent
POST /v1/escalations/{id}/reject         reviewer, admin  {"reason": "..."}; idempotent
GET  /review                             none (the page asks for a reviewer key)
=======================================  ===============  =====================================

A client key that did not create the escalation gets the same 404 as an unknown id. With
authentication off everyone may do everything. Every error is an OpenAI error envelope.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from typing import Any, ClassVar

from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route

from router.errors import BadRequest, HTTPError, NotFound, Unprocessable
from router.escalations.completion import completion_dict
from router.escalations.model import Escalation, StoreConflict, StoreMissing
from router.escalations.page import render_review_page
from router.escalations.service import EscalationService
from router.guard import admit
from router.requests import check_unicode
from router.state import GatewayState

__all__ = ["Conflict", "escalation_routes"]

_STATUSES = ("pending", "claimed", "answered", "rejected", "expired")
_ALIASES = {"open": ("pending", "claimed"), "all": _STATUSES}


class Conflict(HTTPError):
    status: ClassVar[int] = 409
    type: ClassVar[str] = "invalid_request_error"


def _json(payload: Any, status: int = 200) -> Response:
    return Response(json.dumps(payload), status_code=status, media_type="application/json")


def _error(exc: HTTPError) -> Response:
    headers = dict(exc.headers)
    return Response(
        exc.body(), status_code=exc.status, media_type="application/json", headers=headers
    )


def _service(state: GatewayState) -> EscalationService:
    service: EscalationService | None = getattr(state, "escalations", None)
    if service is None:
        raise NotFound(
            "human escalation is not configured on this gateway (add a backend of type 'human')",
            code="escalations_disabled",
        )
    return service


def _state(request: Request) -> GatewayState:
    state: GatewayState = request.app.state.gateway
    return state


def _missing(id: str) -> NotFound:
    return NotFound(f"no escalation {id!r} for this API key", param="id", code="not_found")


def _client_view(record: Escalation) -> dict[str, Any]:
    completion = None
    if record.status == "answered":
        completion = completion_dict(
            record.endpoint,
            record.id,
            str(record.request.get("model") or ""),
            record.answer or "",
            int(record.updated),
        )
    return {
        "id": record.id,
        "object": "escalation",
        "status": record.status,
        "created": record.created,
        "updated": record.updated,
        "completion": completion,
        "reason": record.reason if record.status in ("rejected", "expired") else None,
    }


def _reviewer_view(record: Escalation) -> dict[str, Any]:
    return {**record.reviewer_view(), "completion": _client_view(record)["completion"]}


async def _body_field(request: Request, field: str, *, required: bool) -> str:
    state = _state(request)
    raw = await request.body()
    if len(raw) > state.settings.server.max_body_bytes:
        raise BadRequest("the request body is too large (server.max_body_bytes)")
    if not raw.strip():
        if required:
            raise BadRequest(f"send a JSON object with {field!r}", param=field)
        return ""
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise BadRequest("could not parse the JSON body") from None
    if not isinstance(body, dict):
        raise BadRequest(f"the body must be a JSON object with {field!r}")
    check_unicode(body)
    unknown = sorted(set(body) - {field})
    if unknown:
        raise BadRequest(
            f"unknown field(s) {', '.join(map(repr, unknown))}; expected {field!r}",
            param=unknown[0],
        )
    value = body.get(field, "")
    if not isinstance(value, str):
        raise Unprocessable(f"{field!r} must be a string", param=field)
    if required and not value.strip():
        raise BadRequest(f"{field!r} must not be empty", param=field)
    return value


async def list_escalations(request: Request) -> Response:
    try:
        state = _state(request)
        await admit(state, request.scope, "reviewer")
        service = _service(state)
        wanted: list[str] = []
        for part in (request.query_params.get("status") or "open").split(","):
            part = part.strip()
            if part in _ALIASES:
                wanted.extend(_ALIASES[part])
            elif part in _STATUSES:
                wanted.append(part)
            else:
                raise BadRequest(
                    f"unknown status {part!r}; use {', '.join(_STATUSES)}, open or all "
                    "(comma-separated)",
                    param="status",
                )
        limit_raw = request.query_params.get("limit", "200")
        if not limit_raw.isdigit() or not 1 <= int(limit_raw) <= 1000:
            raise BadRequest("limit must be an integer from 1 to 1000", param="limit")
        records = await service.query(wanted, int(limit_raw))
    except HTTPError as exc:
        return _error(exc)
    return _json({"object": "list", "data": [_reviewer_view(r) for r in records]})


async def get_escalation(request: Request) -> Response:
    id = request.path_params["id"]
    try:
        state = _state(request)
        service = _service(state)
        header = request.headers.get("authorization", "").encode() or None
        entry = state.keys.identify(header)
        reviewer = not state.keys.enabled or (
            entry is not None and entry.scope in ("reviewer", "admin")
        )
        if reviewer:
            await admit(state, request.scope, "reviewer")
        else:
            await admit(state, request.scope, "client")
        record = await service.get(id)
        if record is None:
            raise _missing(id)
        if reviewer:
            return _json(_reviewer_view(record))
        assert header is not None
        given = hashlib.sha256(header[7:].strip()).hexdigest()
        if record.owner is None or not hmac.compare_digest(given, record.owner):
            raise _missing(id)
    except HTTPError as exc:
        return _error(exc)
    return _json(_client_view(record))


async def _act(request: Request, op: str) -> Response:
    id = request.path_params["id"]
    try:
        state = _state(request)
        caller = await admit(state, request.scope, "reviewer")
        service = _service(state)
        try:
            if op == "claim":
                await _body_field(request, "note", required=False)
                record = await service.claim(id, caller.name)
            elif op == "answer":
                content = await _body_field(request, "content", required=True)
                record = await service.answer(id, caller.name, content)
            else:
                reason = await _body_field(request, "reason", required=False)
                record = await service.reject(id, caller.name, reason or "rejected by a reviewer")
        except StoreMissing:
            raise _missing(id) from None
        except StoreConflict as exc:
            raise Conflict(
                f"cannot {op} escalation {id}: {exc}", code="escalation_conflict"
            ) from None
    except HTTPError as exc:
        return _error(exc)
    return _json(_reviewer_view(record))


async def claim(request: Request) -> Response:
    return await _act(request, "claim")


async def answer(request: Request) -> Response:
    return await _act(request, "answer")


async def reject(request: Request) -> Response:
    return await _act(request, "reject")


async def review_page(request: Request) -> Response:
    nonce = secrets.token_urlsafe(16)
    return HTMLResponse(
        render_review_page(nonce),
        headers={
            "content-security-policy": (
                f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; "
                "connect-src 'self'; img-src 'self'; "
                "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
            ),
            "x-content-type-options": "nosniff",
            "referrer-policy": "no-referrer",
            "cache-control": "no-store",
        },
    )


def escalation_routes() -> list[Route]:
    return [
        Route("/v1/escalations", list_escalations, methods=["GET"]),
        Route("/v1/escalations/{id}", get_escalation, methods=["GET"]),
        Route("/v1/escalations/{id}/claim", claim, methods=["POST"]),
        Route("/v1/escalations/{id}/answer", answer, methods=["POST"]),
        Route("/v1/escalations/{id}/reject", reject, methods=["POST"]),
        Route("/review", review_page, methods=["GET"]),
    ]
