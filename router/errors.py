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
        ├── RequestTimeout      408  invalid_request_error  the body stalled (body_timeout_s)
        ├── PayloadTooLarge     413  invalid_request_error
        ├── Unprocessable       422  invalid_request_error
        ├── RateLimited         429  rate_limit_error
        ├── DeadlineExceeded    504  timeout    past server.request_timeout_s
        └── UpstreamError       502  upstream_error     a backend failed
            ├── UpstreamTimeout         504  timeout
            ├── UpstreamStatus          (the upstream's own status, body passed through)
            ├── UpstreamRateLimited     429  rate_limit_error   every try was answered 429
            └── NoBackendAvailable      503  every backend in the chain failed
                └── CircuitOpen         503  every replica of a backend is skipped (breakers open)

One handler renders every :class:`HTTPError` as ``{"error": {"message", "type", "param",
"code"}}`` (:func:`router.wire.envelope`); anything else becomes a 500 with a generic message
(the traceback goes to the log, never into a response). An :class:`UpstreamError`'s message
stays in the log too: the client gets a generic one with the request id (:meth:`HTTPError.
client_message`), since upstream failures carry replica URLs and library text.
"""

from __future__ import annotations

from typing import ClassVar

from probes.errors import RouterError
from router.retry import retry_after_header
from router.wire import envelope, sse_error

__all__ = [
    "BadRequest",
    "CircuitOpen",
    "DeadlineExceeded",
    "Forbidden",
    "HTTPError",
    "NoBackendAvailable",
    "NotFound",
    "PayloadTooLarge",
    "RateLimited",
    "RequestTimeout",
    "Unauthorized",
    "Unprocessable",
    "UpstreamError",
    "UpstreamRateLimited",
    "UpstreamStatus",
    "UpstreamTimeout",
]


class HTTPError(RouterError):
    """An error with an HTTP status, rendered as the OpenAI error envelope.

    ``public``: whether ``message`` may reach the client. Errors the client caused say exactly
    what is wrong; an upstream failure's message carries internals (replica URLs, library text),
    so the client gets the class's ``public_message`` instead and the detail goes to the log
    (``public`` defaults to the class's ``detail_is_public``; a raise site whose message the
    gateway composed itself may pass ``public=True``). Server-side errors (5xx) and hidden ones
    name the request id when :meth:`client_message` is given one.
    """

    status: ClassVar[int] = 500
    type: ClassVar[str] = "server_error"
    detail_is_public: ClassVar[bool] = True
    public_message: ClassVar[str] = "the gateway could not answer this request"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        public: bool | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}
        self.public = self.detail_is_public if public is None else public

    def client_message(self, request_id: str | None = None) -> str:
        """What the client is told: the message, or the generic one, plus the request id."""
        message = self.message if self.public else self.public_message
        if request_id and (not self.public or self.status >= 500):
            message = f"{message} (request id {request_id})"
        return message

    def body(self, request_id: str | None = None) -> bytes:
        """The error envelope the client gets (see :meth:`client_message`)."""
        return envelope(self.client_message(request_id), self.type, self.param, self.code)


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


class RequestTimeout(HTTPError):
    """The request body did not arrive in time (``server.body_timeout_s``); the connection is
    closed after the answer, since the rest of the body may still come."""

    status = 408
    type = "invalid_request_error"

    def __init__(self, message: str) -> None:
        super().__init__(message, code="request_body_timeout", headers={"connection": "close"})


class DeadlineExceeded(HTTPError):
    """The whole request ran past ``server.request_timeout_s``."""

    status = 504
    type = "timeout"

    def __init__(self, timeout_s: float) -> None:
        super().__init__(
            f"the request did not complete within {timeout_s:g} s (server.request_timeout_s)",
            code="request_timeout",
        )


class UpstreamError(HTTPError):
    """A backend could not answer (connection refused, reset, protocol error). The message is
    for the log; the client gets ``public_message`` (see :class:`HTTPError`)."""

    status = 502
    type = "upstream_error"
    detail_is_public = False
    public_message = "the upstream backend failed"
    stream_message: ClassVar[str] = "the upstream stream broke off before it finished"

    def stream_event(self, request_id: str | None = None) -> bytes:
        """The error event that ends a stream this error broke (then ``data: [DONE]``)."""
        message = self.stream_message
        if request_id:
            message = f"{message} (request id {request_id})"
        return sse_error(message, self.type, code="upstream_stream_error")


class UpstreamTimeout(UpstreamError):
    status = 504
    type = "timeout"
    public_message = "the upstream backend did not answer in time"


class UpstreamStatus(UpstreamError):
    """The backend answered with an error status; its body is passed through as is."""

    def __init__(self, status: int, content: bytes, content_type: str | None) -> None:
        super().__init__(f"upstream answered {status}")
        self.upstream_status = status
        self.content = content
        self.content_type = content_type or "application/json"


class UpstreamRateLimited(UpstreamError):
    """Every replica tried (and every backend of the chain, once dispatch gives up) answered
    429; ``retry_after``: the shortest wait an upstream asked for, passed on to the client."""

    status = 429
    type = "rate_limit_error"
    public_message = "every backend that could answer is rate limited; retry later"

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(
            message, code="upstream_rate_limited", headers=retry_after_header(retry_after)
        )
        self.retry_after = retry_after


class NoBackendAvailable(UpstreamError):
    status = 503
    type = "service_unavailable"
    public_message = "no backend could answer this request"


class CircuitOpen(NoBackendAvailable):
    """Every replica of a backend is skipped by its open circuit breaker: nothing was tried;
    ``retry_after``: seconds until the first breaker lets a trial through."""

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message, headers=retry_after_header(retry_after))
        self.retry_after = retry_after
