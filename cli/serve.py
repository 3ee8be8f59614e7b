"""``sparsity-router serve``: run the gateway (:func:`router.serve.run_server`)."""

from __future__ import annotations

import argparse
from typing import Any

from router.serve import run_server

__all__ = ["register", "run"]


def register(subparsers: Any) -> None:
    """Add ``serve`` to the CLI's subparsers."""
    parser = subparsers.add_parser(
        "serve",
        help="run the gateway",
        description="Run the OpenAI-compatible gateway (default config: config/default.yaml).",
    )
    parser.add_argument("--config", metavar="FILE", help="YAML config (default: the embedded one)")
    parser.add_argument("--host", help="listen address (default: server.host)")
    parser.add_argument("--port", type=int, help="listen port (default: server.port)")
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Run the gateway until it is stopped."""
    return run_server(args.config, args.host, args.port, args.log_level)
