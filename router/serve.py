"""Run the gateway: :func:`run_server` (``sparsity-router serve``, see :mod:`cli.serve`)."""

from __future__ import annotations

import logging

from policies.loader import load_settings, resolve_config_path
from router.logs import configure_logging

__all__ = ["run_server"]

logger = logging.getLogger(__name__)


def run_server(
    config: str | None,
    host: str | None,
    port: int | None,
    log_level: str,
    log_format: str = "text",
) -> int:
    """Start the gateway with uvicorn and block until it is stopped (Ctrl-C / SIGTERM).

    ``config`` None: ``$SPARSITY_ROUTER_CONFIG``, else the embedded default. Every log line,
    uvicorn's included, goes to stderr in ``log_format`` (``text`` or ``json``,
    :mod:`router.logs`)."""
    import uvicorn

    from router.app import create_app

    configure_logging(log_level, log_format)
    path = resolve_config_path(config)
    settings = load_settings(path)
    app = create_app(settings, config_path=path, freeze_gc=True)
    uvicorn.run(
        app,
        host=host or settings.server.host,
        port=settings.server.port if port is None else port,
        log_level=log_level.lower(),
        log_config=None,  # uvicorn's loggers propagate to the root handler configure_logging set
        access_log=False,
        timeout_graceful_shutdown=10,
    )
    return 0
