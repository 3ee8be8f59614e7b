"""``sparsity-router serve [CONFIG]``: run the gateway (:func:`router.serve.run_server`).

The config is ``CONFIG`` or ``--config CONFIG``, else ``$SPARSITY_ROUTER_CONFIG``, else the
embedded default. ``--log-format json`` (or ``SPARSITY_ROUTER_LOG_FORMAT=json``) writes JSON
lines (:mod:`router.logs`).
"""

from __future__ import annotations

import argparse
from typing import Any

from cli.options import add_config_argument
from policies.loader import env_value
from probes.errors import RouterError
from router.logs import LOG_FORMAT_ENV, LOG_FORMATS
from router.serve import run_server

__all__ = ["log_format", "register", "run"]


def register(subparsers: Any) -> None:
    """Add ``serve`` to the CLI's subparsers."""
    parser = subparsers.add_parser(
        "serve",
        help="run the gateway",
        description="Run the OpenAI-compatible gateway (default config: $SPARSITY_ROUTER_CONFIG, "
        "else config/default.yaml).",
    )
    add_config_argument(parser)
    parser.add_argument("--host", help="listen address (default: server.host)")
    parser.add_argument("--port", type=int, help="listen port (default: server.port)")
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    parser.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        help=f"text, or json: one JSON object per line with time, level, logger, message and "
        f"the request id (default: ${LOG_FORMAT_ENV}, else text)",
    )
    parser.set_defaults(handler=run)


def log_format(args: argparse.Namespace) -> str:
    """``--log-format``, else ``$SPARSITY_ROUTER_LOG_FORMAT``, else ``text``."""
    if args.log_format:
        return str(args.log_format)
    value = (env_value(LOG_FORMAT_ENV) or "").strip().lower() or "text"
    if value not in LOG_FORMATS:
        raise RouterError(
            f"{LOG_FORMAT_ENV}={value!r} is not a log format; use one of {', '.join(LOG_FORMATS)}"
        )
    return value


def run(args: argparse.Namespace) -> int:
    """Run the gateway until it is stopped."""
    return run_server(args.config, args.host, args.port, args.log_level, log_format(args))
