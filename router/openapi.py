"""The gateway's OpenAPI 3.1 document, served at ``GET /openapi.json``.

Written by hand, and as lenient as the gateway: a request schema names only the fields routing
reads (``model``, ``messages`` / ``prompt`` / ``input`` / ``system`` / ``instructions``,
``stream``, ``user``, ``metadata``) and allows any other field, because the body is forwarded to
the backend unchanged (docs/api.md). ``/v1/messages`` errors carry Anthropic's
``{"type": "error", "error": {...}}``, whose ``error`` has the same keys as OpenAI's.

With authentication on, the document is served to client (and admin) keys only
(docs/security.md).
"""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from router.errors import HTTPError
from router.guard import admit

__all__ = ["openapi_document", "openapi_endpoint"]

_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}

_MESSAGE = {
    "type": "object",
    "required": ["role"],
    "properties": {
        "role": {"type": "string", "minLength": 1},
        "content": {"type": ["string", "array", "null"]},
    },
    "additionalProperties": True,
}

_COMMON = {
    "model": {"type": "string", "minLength": 1, "description": "a virtual or direct model"},
    "stream": {"type": ["boolean", "null"]},
    "user": {"type": "string"},
    "metadata": {"type": "object", "additionalProperties": {"type": "string"}},
}

_CHAT = {
    "type": "object",
    "required": ["model", "messages"],
    "properties": {**_COMMON, "messages": {"type": "array", "minItems": 1, "items": _MESSAGE}},
    "additionalProperties": True,
}

_COMPLETION = {
    "type": "object",
    "required": ["model", "prompt"],
    "properties": {
        **_COMMON,
        "prompt": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]},
    },
    "additionalProperties": True,
}


_RESPONSES = {
    "type": "object",
    "required": ["model", "input"],
    "properties": {
        **_COMMON,
        "instructions": {"type": ["string", "null"]},
        "input": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "object"}}]},
    },
    "additionalProperties": True,
}

_BLOCKS = {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "object"}}]}

_MESSAGES = {
    "type": "object",
    "required": ["model", "messages", "max_tokens"],
    "properties": {
        "model": _COMMON["model"],
        "stream": _COMMON["stream"],
        "max_tokens": {"type": "integer"},
        "system": _BLOCKS,
        "metadata": {"type": "object"},
        "messages": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["role", "content"],
                "properties": {"role": {"enum": ["user", "assistant"]}, "content": _BLOCKS},
            },
        },
    },
    "additionalProperties": True,
}

_EMBEDDINGS = {
    "type": "object",
    "required": ["model", "input"],
    "properties": {
        "model": {"type": "string", "minLength": 1, "description": "a model a backend lists"},
        "input": {"oneOf": [{"type": "string"}, {"type": "array"}]},
    },
    "additionalProperties": True,
}


def _errors(*statuses: int) -> dict[str, Any]:
    return {
        str(s): {
            "description": "an OpenAI error envelope",
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
        }
        for s in statuses
    }


_CLIENT_ERRORS = (400, 401, 403, 404, 413, 422, 429)
_UPSTREAM_ERRORS = (502, 503, 504)


def _post(summary: str, schema: str, *, stream: bool) -> dict[str, Any]:
    content: dict[str, Any] = {"application/json": {"schema": {"type": "object"}}}
    if stream:
        content["text/event-stream"] = {"schema": {"type": "string"}}
    return {
        "post": {
            "summary": summary,
            "security": [{"bearer": []}, {}],
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}
                },
            },
            "responses": {
                "200": {"description": "the backend's answer, untouched", "content": content},
                **_errors(*_CLIENT_ERRORS, *_UPSTREAM_ERRORS),
            },
        }
    }


def _get(summary: str, *statuses: int) -> dict[str, Any]:
    return {
        "get": {
            "summary": summary,
            "responses": {
                "200": {
                    "description": "OK",
                    "content": {"application/json": {"schema": {"type": "object"}}},
                },
                **_errors(*statuses),
            },
        }
    }


def _metrics() -> dict[str, Any]:
    return {
        "get": {
            "summary": "Prometheus metrics (metrics or admin scope, unless auth.public_metrics)",
            "security": [{"bearer": []}, {}],
            "responses": {
                "200": {
                    "description": "the Prometheus text format",
                    "content": {"text/plain": {"schema": {"type": "string"}}},
                },
                **_errors(401, 403, 429),
            },
        }
    }


def _escalation_paths() -> dict[str, Any]:
    """The human-escalation API (router/escalations/routes.py); 404 when it is not configured."""

    def action(summary: str, field: str | None) -> dict[str, Any]:
        op: dict[str, Any] = {
            "summary": summary,
            "security": [{"bearer": []}],
            "parameters": [
                {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}
            ],
            "responses": {
                "200": {"description": "the escalation"},
                **_errors(400, 401, 403, 404, 409, 422, 429),
            },
        }
        if field is not None:
            op["requestBody"] = {
                "content": {
                    "application/json": {
                        "schema": {
                            "type": "object",
                            "properties": {field: {"type": "string"}},
                            "additionalProperties": False,
                        }
                    }
                }
            }
        return {"post": op}

    listing = _get("The escalation queue (reviewer scope)", 400, 401, 403, 404, 429)
    listing["get"]["parameters"] = [
        {"name": "status", "in": "query", "schema": {"type": "string"}},
        {"name": "limit", "in": "query", "schema": {"type": "integer"}},
    ]
    one = _get("One escalation (its client, or a reviewer)", 401, 403, 404, 429)
    one["get"]["parameters"] = [
        {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}
    ]
    return {
        "/v1/escalations": listing,
        "/v1/escalations/{id}": one,
        "/v1/escalations/{id}/claim": action("Claim for lease_s (reviewer scope)", None),
        "/v1/escalations/{id}/answer": action("Answer (reviewer scope)", "content"),
        "/v1/escalations/{id}/reject": action("Reject (reviewer scope)", "reason"),
    }


def openapi_document() -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "sparsity-router",
            "version": "1",
            "description": "An OpenAI-compatible gateway that routes by activation sparsity.",
        },
        "paths": {
            "/v1/chat/completions": _post("Chat completion, routed", "ChatRequest", stream=True),
            "/v1/completions": _post("Text completion, routed", "CompletionRequest", stream=True),
            "/v1/responses": _post(
                "OpenAI Responses, routed (instructions + input probed)",
                "ResponsesRequest",
                stream=True,
            ),
            "/v1/messages": _post(
                "Anthropic Messages, routed (system + messages probed); translated to chat for "
                "OpenAI backends; errors in Anthropic's shape (error.type, error.message)",
                "MessagesRequest",
                stream=True,
            ),
            "/v1/embeddings": _post(
                "Embeddings, by model name (never probed)", "EmbeddingsRequest", stream=False
            ),
            "/v1/route": _post(
                "The routing decision, without dispatch", "ChatRequest", stream=False
            ),
            "/v1/models": _get("Virtual and direct models", 401, 403),
            "/healthz": _get("Liveness"),
            "/readyz": _get("Readiness", 503),
            "/metrics": _metrics(),
            "/openapi.json": _get("This document (client scope)", 401, 403, 429),
            "/admin/reload": {
                "post": {
                    "summary": "Re-read the config file (admin scope; loopback only when "
                    "authentication is off)",
                    "security": [{"bearer": []}],
                    "responses": {
                        "200": {"description": "reloaded"},
                        **_errors(401, 403, 404, 422, 429),
                    },
                }
            },
            **_escalation_paths(),
        },
        "components": {
            "schemas": {
                "Error": _ERROR,
                "ChatRequest": _CHAT,
                "CompletionRequest": _COMPLETION,
                "ResponsesRequest": _RESPONSES,
                "MessagesRequest": _MESSAGES,
                "EmbeddingsRequest": _EMBEDDINGS,
            },
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }


async def openapi_endpoint(request: Request) -> Response:
    """``GET /openapi.json``: client scope (any caller with authentication off)."""
    try:
        await admit(request.app.state.gateway, request.scope, "client")
    except HTTPError as exc:
        return Response(
            exc.body(), status_code=exc.status, media_type="application/json", headers=exc.headers
        )
    return Response(json.dumps(openapi_document()), media_type="application/json")
