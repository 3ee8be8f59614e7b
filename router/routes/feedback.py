"""``POST /v1/feedback``: attach an outcome to an earlier request.

Body: ``{"request_id": "<x-router-request-id of the answer>", "score": 0.8}`` and/or
``"label": "thumbs_up"``. ``score`` is a finite number, ``label`` a non-empty string of at most
200 characters; at least one of them. The record goes to the events sink as a ``feedback``
record. An unknown ``request_id`` is a 404 when the gateway can tell (it recorded the request
itself lately, or the sink is SQLite); with a JSONL or Redis sink and a request older than the
gateway's memory, the feedback is accepted as is.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import replace

import anyio.to_thread

from router.asgi import Disconnected, Receive, Scope, Send, read_body, send_error, send_json
from router.errors import BadRequest, HTTPError, NotFound, Unauthorized, Unprocessable
from router.events import FeedbackEvent
from router.requests import check_unicode
from router.state import GatewayState

__all__ = ["FeedbackEndpoint", "parse_feedback"]

MAX_LABEL = 200
MAX_BODY = 16 * 1024


class _QueueFull(HTTPError):
    status = 503
    type = "service_unavailable"


def parse_feedback(raw: bytes) -> FeedbackEvent:
    """Validate a feedback body; the feedback event without ``time``."""
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        raise BadRequest("the request body is not valid JSON: send a JSON object") from None
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    check_unicode(body)
    unknown = sorted(set(body) - {"request_id", "score", "label"})
    if unknown:
        raise BadRequest(
            f"unknown field {unknown[0]!r}; allowed: request_id, score, label", param=unknown[0]
        )
    request_id = body.get("request_id")
    if request_id is None:
        raise BadRequest(
            "'request_id' is required: the x-router-request-id header of the answer",
            param="request_id",
        )
    if not isinstance(request_id, str) or not request_id or len(request_id) > 200:
        raise Unprocessable("'request_id' must be a non-empty string", param="request_id")
    score, label = body.get("score"), body.get("label")
    if score is None and label is None:
        raise BadRequest("give 'score' (a number), 'label' (a string) or both", param="score")
    if score is not None:
        if (
            isinstance(score, bool)
            or not isinstance(score, int | float)
            or not math.isfinite(score)
        ):
            raise Unprocessable("'score' must be a finite number", param="score")
        score = float(score)
    if label is not None and (not isinstance(label, str) or not label or len(label) > MAX_LABEL):
        raise Unprocessable(
            f"'label' must be a non-empty string of at most {MAX_LABEL} characters",
            param="label",
        )
    return FeedbackEvent(request_id=request_id, score=score, label=label)


class FeedbackEndpoint:
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        state: GatewayState = scope["app"].state.gateway
        try:
            await self._handle(state, scope, receive, send)
        except Disconnected:
            return
        except HTTPError as exc:
            await send_error(send, exc)

    async def _handle(
        self, state: GatewayState, scope: Scope, receive: Receive, send: Send
    ) -> None:
        auth = next((bytes(v) for k, v in scope["headers"] if k == b"authorization"), None)
        if not state.authorized(auth):
            raise Unauthorized(
                "missing or invalid API key: send 'Authorization: Bearer KEY' with a key from "
                "auth.api_keys",
                code="invalid_api_key",
            )
        raw = await read_body(receive, MAX_BODY)
        events = state.events
        if events is None:
            raise NotFound(
                "feedback needs event records, and this gateway keeps none: set events.sink "
                "to sqlite, jsonl or redis in the config",
                code="events_disabled",
            )
        feedback = parse_feedback(raw)
        request_id = feedback.request_id
        known = await anyio.to_thread.run_sync(events.knows, request_id)
        if known is False:
            raise NotFound(
                f"no request with id {request_id!r}: send the x-router-request-id header of "
                "an answer from this gateway",
                param="request_id",
                code="request_not_found",
            )
        if not events.record(replace(feedback, time=time.time())):
            raise _QueueFull("the event queue is full; try again in a moment")
        payload = {"object": "router.feedback", "request_id": request_id, "recorded": True}
        await send_json(send, 200, json.dumps(payload).encode())
