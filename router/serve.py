"""Run the gateway: :func:`run_server` (``sparsity-router serve``, see :mod:`cli.serve`)."""

from __future__ import annotations

import logging
from pathlib import Path

from policies.loader import default_config_path, load_settings

__all__ = ["run_server"]

logger = logging.getLogger(__name__)


def run_server(config: str | None, host: str | None, port: int | None, log_level: str) -> int:
    """Start the gateway with uvicorn and block until it is stopped (Ctrl-C / SIGTERM)."""
    import uvicorn

    from router.app import create_app

    path = Path(config) if config else default_config_path()
    settings = load_settings(path)
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    app = create_app(settings, config_path=path, freeze_gc=True)
    uvicorn.run(
        app,
        host=host or settings.server.host,
        port=settings.server.port if port is None else port,
        log_level=log_level.lower(),
        access_log=False,
        timeout_graceful_shutdown=10,
    )
    return 0
