"""A backend that speaks the OpenAI HTTP API: vLLM, or any compatible server.

Several replica URLs are balanced by least outstanding requests (ties rotate). A connect error,
a timeout or a 5xx before the first byte moves on to the next replica; a replica that failed to
connect sits out ``cooldown_s`` unless every replica is down. Timeouts: ``connect_s``; ``read_s``
is the longest gap allowed between two chunks; ``total_s`` bounds the whole exchange, streamed or
not.

Requests go through one ``aiohttp.ClientSession`` per backend (created lazily on the event loop,
closed with the app): measured by ``bench/proxy_overhead.py`` it costs the gateway ~1.1 ms of CPU
per request against ~2.4 ms through ``httpx.AsyncClient``, whose per-request layers (request
building, cookies, repeated timeouts) dominated the profile. ``httpx`` is kept for ``ping``.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import httpx

from router.backends.base import Endpoint, UpstreamResult
from router.errors import UpstreamError, UpstreamStatus, UpstreamTimeout

__all__ = ["OpenAIBackend"]

logger = logging.getLogger(__name__)

_RETRYABLE_STATUS = frozenset({500, 502, 503, 504})


@dataclass(slots=True)
class _Replica:
    url: str
    outstanding: int = 0
    down_until: float = 0.0


class OpenAIBackend:
    """Forward OpenAI calls to one of several replicas of an OpenAI-compatible server."""

    def __init__(
        self,
        name: str,
        base_urls: list[str],
        *,
        model: str | None = None,
        api_key: str | None = None,
        models: tuple[str, ...] = (),
        connect_s: float = 5.0,
        read_s: float = 120.0,
        total_s: float = 600.0,
        max_connections: int = 256,
        cooldown_s: float = 2.0,
    ) -> None:
        if not base_urls:
            raise ValueError(f"backend {name!r} needs at least one base URL")
        self.name = name
        self.model = model
        self._served = tuple(models) or ((model,) if model else ())
        self._replicas = [_Replica(u.rstrip("/")) for u in base_urls]
        self._rotation = itertools.count()
        self._total_s = total_s
        self._cooldown_s = cooldown_s
        headers = {"accept-encoding": "identity", "content-type": "application/json"}
        if api_key:
            headers["authorization"] = f"Bearer {api_key}"
        self._headers = headers
        self._max_connections = max_connections
        self._aio_timeout = aiohttp.ClientTimeout(total=None, connect=connect_s, sock_read=read_s)
        self._session: aiohttp.ClientSession | None = None
        self._client = httpx.AsyncClient(
            headers=headers,
            timeout=httpx.Timeout(connect=connect_s, read=read_s, write=read_s, pool=connect_s),
            limits=httpx.Limits(
                max_connections=max_connections, max_keepalive_connections=max_connections
            ),
        )

    def model_names(self) -> list[str]:
        return list(self._served)

    def _order(self) -> list[_Replica]:
        """Replicas to try, least outstanding first; cooled-down ones last."""
        now = time.monotonic()
        start = next(self._rotation) % len(self._replicas)
        rotated = self._replicas[start:] + self._replicas[:start]
        return sorted(rotated, key=lambda r: (r.down_until > now, r.outstanding))

    async def send(
        self, endpoint: Endpoint, body: dict[str, Any], *, stream: bool
    ) -> UpstreamResult:
        payload = body if self.model is None else {**body, "model": self.model}
        content = json.dumps(payload, ensure_ascii=False).encode()
        deadline = time.monotonic() + self._total_s
        failures: list[str] = []
        last: UpstreamError | None = None
        for replica in self._order():
            try:
                return await self._send_one(replica, endpoint, content, stream, deadline)
            except UpstreamStatus:
                raise  # a 4xx is the client's business, not the replica's
            except UpstreamError as exc:
                failures.append(f"{replica.url}: {exc.message}")
                last = exc
                logger.warning("backend %s replica %s failed: %s", self.name, replica.url, exc)
                if time.monotonic() >= deadline:
                    break
        kind = UpstreamTimeout if isinstance(last, UpstreamTimeout) else UpstreamError
        raise kind(f"backend {self.name!r}: every replica failed ({'; '.join(failures)})")

    def _aio(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._max_connections, ttl_dns_cache=None),
                timeout=self._aio_timeout,
                cookie_jar=aiohttp.DummyCookieJar(),
                auto_decompress=False,
                skip_auto_headers=("User-Agent",),
            )
        return self._session

    async def _send_one(
        self, replica: _Replica, endpoint: Endpoint, content: bytes, stream: bool, deadline: float
    ) -> UpstreamResult:
        url = f"{replica.url}/{endpoint}"
        replica.outstanding += 1
        response: aiohttp.ClientResponse | None = None
        handed_over = False
        try:
            async with asyncio.timeout_at(self._loop_deadline(deadline)):
                response = await self._aio().post(url, data=content, headers=self._headers)
                if response.status >= 400:
                    error_body = await response.read()
                    response.release()
                    if response.status in _RETRYABLE_STATUS:
                        raise UpstreamError(f"answered {response.status}")
                    raise UpstreamStatus(
                        response.status, error_body, response.headers.get("content-type")
                    )
                content_type = response.headers.get("content-type", "application/json")
                if not stream:
                    data = await response.read()
                    response.release()
                    return UpstreamResult(200, content_type, body=data, replica=replica.url)
            handed_over = True
            upstream = response

            async def close() -> None:
                upstream.release()
                replica.outstanding -= 1

            return UpstreamResult(
                upstream.status,
                content_type,
                stream=self._chunks(upstream, deadline),
                close=close,
                replica=replica.url,
            )
        except TimeoutError:
            raise UpstreamTimeout(f"no answer within {self._total_s:g} s") from None
        except aiohttp.ClientConnectorError as exc:
            replica.down_until = time.monotonic() + self._cooldown_s
            raise UpstreamError(f"cannot connect ({exc})") from exc
        except aiohttp.ClientError as exc:
            raise UpstreamError(f"{type(exc).__name__}: {exc}") from exc
        finally:
            if not handed_over:
                replica.outstanding -= 1
                if response is not None and not response.closed:
                    response.close()

    async def _chunks(
        self, response: aiohttp.ClientResponse, deadline: float
    ) -> AsyncIterator[bytes]:
        iterator = response.content.iter_any().__aiter__()
        while True:
            try:
                async with asyncio.timeout_at(self._loop_deadline(deadline)):
                    chunk = await iterator.__anext__()
            except StopAsyncIteration:
                return
            except TimeoutError:
                raise UpstreamTimeout(f"stream exceeded {self._total_s:g} s") from None
            except aiohttp.ClientError as exc:
                raise UpstreamError(f"stream broke: {type(exc).__name__}: {exc}") from exc
            yield chunk

    @staticmethod
    def _loop_deadline(deadline: float) -> float:
        """``deadline`` (time.monotonic) on the event loop's clock, for ``asyncio.timeout_at``."""
        return asyncio.get_running_loop().time() + (deadline - time.monotonic())

    async def ping(self) -> str:
        statuses = []
        for replica in self._replicas:
            try:
                response = await self._client.get(f"{replica.url}/models")
            except httpx.HTTPError as exc:
                raise UpstreamError(f"{replica.url}/models: {type(exc).__name__}: {exc}") from exc
            if response.status_code != 200:
                raise UpstreamError(f"{replica.url}/models answered {response.status_code}")
            try:
                ids = [m["id"] for m in response.json().get("data", [])]
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                raise UpstreamError(f"{replica.url}/models: not an OpenAI model list") from exc
            statuses.append(f"{replica.url} ok ({', '.join(map(str, ids)) or 'no models'})")
        return "; ".join(statuses)

    async def aclose(self) -> None:
        await self._client.aclose()
        if self._session is not None:
            await self._session.close()
