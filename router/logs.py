"""The gateway's logs: text or JSON lines, each carrying the id of the request being handled.

The completions route binds the request id to :data:`REQUEST_ID` (a context variable, so every
log call made while that request is handled sees it, in the same task and the tasks it starts);
:class:`RequestIdFilter` copies it onto each record as ``record.request_id`` and
:class:`JsonFormatter` writes it. :func:`configure_logging` installs both on the root logger
(uvicorn's own loggers propagate to it). Prompts are never logged at INFO.
"""

from __future__ import annotations

import json
import logging
import sys
from contextvars import ContextVar, Token
from datetime import UTC, datetime
from typing import Final, TextIO

__all__ = [
    "LOG_FORMATS",
    "LOG_FORMAT_ENV",
    "REQUEST_ID",
    "JsonFormatter",
    "RequestIdFilter",
    "bind_request_id",
    "configure_logging",
    "reset_request_id",
]

#: The variable that sets ``serve --log-format``.
LOG_FORMAT_ENV: Final = "SPARSITY_ROUTER_LOG_FORMAT"

#: The formats ``--log-format`` accepts.
LOG_FORMATS: Final = ("text", "json")

#: The id of the request being handled (None outside a request).
REQUEST_ID: ContextVar[str | None] = ContextVar("sparsity_router_request_id", default=None)

_TEXT_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def bind_request_id(request_id: str) -> Token[str | None]:
    """Make ``request_id`` the current request's id; give the token to
    :func:`reset_request_id` when the request is done."""
    return REQUEST_ID.set(request_id)


def reset_request_id(token: Token[str | None]) -> None:
    """Undo :func:`bind_request_id`."""
    REQUEST_ID.reset(token)


class RequestIdFilter(logging.Filter):
    """Sets ``record.request_id`` (None outside a request); drops nothing."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = REQUEST_ID.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ``time`` (ISO 8601, UTC), ``level``, ``logger``,
    ``message``, ``request_id`` when there is one, ``exception`` when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None)
        if request_id is None:
            request_id = REQUEST_ID.get()
        if request_id is not None:
            entry["request_id"] = request_id
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def configure_logging(level: str, log_format: str, *, stream: TextIO | None = None) -> None:
    """Send every log record to ``stream`` (stderr) as ``text`` or ``json`` lines at ``level``
    and above, replacing the root logger's handlers."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"unknown log format {log_format!r}; use one of {LOG_FORMATS}")
    handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(
        JsonFormatter() if log_format == "json" else logging.Formatter(_TEXT_FORMAT)
    )
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
