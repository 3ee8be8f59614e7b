"""POST a JSON summary of each new escalation to ``escalation.webhook.url``.

Delivery runs in a background task (the request never waits for it), retried with exponential
backoff (0.5 s, 1 s, 2 s, ...) on connection errors, timeouts and non-2xx answers. A delivery that
fails every try is logged at WARNING and counted in
``sparsity_router_escalation_webhook_total{result="failed"}``. The summary carries ids, rule
and scores, never the conversation (reviewers read it on /review).

With ``secret`` set, every delivery carries ``x-router-timestamp`` (Unix seconds) and
``x-router-signature: sha256=<hex>``, the HMAC-SHA256 of ``timestamp + "." + body`` under the
secret, so a receiver can reject forged or replayed calls (see :func:`signature`).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp

from policies.schema import WebhookSettings

__all__ = ["Webhook", "signature"]

logger = logging.getLogger(__name__)


def signature(secret: str, timestamp: str, body: bytes) -> str:
    """The ``x-router-signature`` value for ``body`` sent at ``timestamp``."""
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


class Webhook:
    def __init__(
        self,
        settings: WebhookSettings,
        *,
        on_delivered: Callable[[], None],
        on_failed: Callable[[], None],
        backoff_s: float = 0.5,
    ) -> None:
        self.settings = settings
        self._on_delivered = on_delivered
        self._on_failed = on_failed
        self._backoff_s = backoff_s
        self._session: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def notify(
        self, payload: dict[str, Any], after: Callable[[], Awaitable[None]] | None = None
    ) -> None:
        """Deliver ``payload`` in the background (then run ``after``); returns at once."""

        async def run() -> None:
            try:
                await self.deliver(payload)
            finally:
                if after is not None:
                    await after()

        task = asyncio.get_running_loop().create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def deliver(self, payload: dict[str, Any]) -> None:
        """Try, and retry with backoff, until delivered or out of tries (never raises)."""
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.settings.timeout_s)
            )
        tries = self.settings.retries + 1
        problem = ""
        body = json.dumps(payload, separators=(",", ":")).encode()
        for attempt in range(tries):
            headers = {"content-type": "application/json"}
            if self.settings.secret is not None:
                timestamp = str(int(time.time()))
                headers["x-router-timestamp"] = timestamp
                headers["x-router-signature"] = signature(self.settings.secret, timestamp, body)
            try:
                async with self._session.post(
                    self.settings.url, data=body, headers=headers
                ) as response:
                    if 200 <= response.status < 300:
                        self._on_delivered()
                        return
                    problem = f"HTTP {response.status}"
            except (aiohttp.ClientError, TimeoutError) as exc:
                problem = f"{type(exc).__name__}: {exc}"
            if attempt + 1 < tries:
                await asyncio.sleep(self._backoff_s * 2**attempt)
        self._on_failed()
        logger.warning(
            "escalation webhook for %s failed after %d tries: %s",
            payload.get("id"),
            tries,
            problem,
        )

    async def aclose(self, grace_s: float = 2.0) -> None:
        if self._tasks:
            _done, pending = await asyncio.wait(set(self._tasks), timeout=grace_s)
            for task in pending:
                task.cancel()
        if self._session is not None:
            await self._session.close()
