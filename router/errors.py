"""Gateway errors and their OpenAI error envelope.

The tree (root in :mod:`probes.errors`)::

    RouterError
    ├── ProbeError ...                     (probes: model load, input, calibration)
    ├── ConfigError, PolicyError           (policies)
    └── HTTPError                          an error with an HTTP status and OpenAI error type
        ├── BadRequest          400  invalid_request_error
        ├── Unauthorized        401  authentication_error
        ├── Forbidden           403  permission_error
        ├── NotFound            404  not_found_error
        ├── PayloadTooLarge     413  invalid_request_error
        ├── Unprocessable       422  invalid_request_error
        ├── RateLimited         429  rate_limit_error
        └── UpstreamError       502  upstream_error     a backend failed
            ├── UpstreamTimeout         504  timeout
            ├── UpstreamStatus          (the upstream's own status, body passed through)
            └── NoBackendAvailable      503  every backend in the chain failed

One handler renders every :class:`HTTPError` as ``{"error": {"message", "type", "param",
"code"}}``; anything else becomes a 500 with a generic message (the traceback goes to the log,
never into a response).
"""

from __future__ import annotations

import json
from typing import ClassVar

from probes.errors import RouterError

__all__ = [
    "BadRequest",
    "Forbidden",
    "HTTPError",
    "NoBackendAvailable",
    "NotFound",
    "PayloadTooLarge",
    "RateLimited",
    "Unauthorized",
    "Unprocessable",
    "UpstreamError",
    "UpstreamStatus",
    "UpstreamTimeout",
    "envelope",
]


class HTTPError(RouterError):
    status: ClassVar[int] = 500
    type: ClassVar[str] = "server_error"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> bytes:
        return envelope(self.message, self.type, self.param, self.code)


class BadRequest(HTTPError):
    status = 400
    type = "invalid_request_error"


class Unauthorized(HTTPError):
    status = 401
    type = "authentication_error"


class Forbidden(HTTPError):
    status = 403
    type = "permission_error"


class NotFound(HTTPError):
    status = 404
    type = "not_found_error"


class PayloadTooLarge(HTTPError):
    status = 413
    type = "invalid_request_error"


class Unprocessable(HTTPError):
    status = 422
    type = "invalid_request_error"


class RateLimited(HTTPError):
    status = 429
    type = "rate_limit_error"


class UpstreamError(HTTPError):
    """A backend could not answer (connection refused, reset, protocol error)."""

    status = 502
    type = "upstream_error"


class UpstreamTimeout(UpstreamError):
    status = 504
    type = "timeout"


class UpstreamStatus(UpstreamError):
    """The backend answered with an error status; its body is passed through as is."""

    def __init__(self, status: int, content: bytes, content_type: str | None) -> None:
        super().__init__(f"upstream answered {status}")
        self.upstream_status = status
        self.content = content
        self.content_type = content_type or "application/json"


class NoBackendAvailable(UpstreamError):
    status = 503
    type = "service_unavailable"


def envelope(message: str, type_: str, param: str | None = None, code: str | None = None) -> bytes:
    return json.dumps(
        {"error": {"message": message, "type": type_, "param": param, "code": code}}
    ).encode()
