"""A backend that speaks the OpenAI HTTP API: vLLM, or any compatible server.

Several replica URLs are balanced by least outstanding requests (ties rotate). A connect error,
a timeout or a status of ``retry_on`` (429, 5xx) before the first byte is retried: on another
replica at once, or on the same one after a jittered backoff or the upstream's ``retry-after``
(:mod:`router.retry`); when the tries run out the backend fails and the dispatcher moves down the
fallback chain. Any other error status (400, 404, ...) is the client's answer. A replica that
failed to connect, or asked to wait, is tried last for a while; each replica has a circuit
breaker (:mod:`router.breaker`): open after consecutive failures, it is skipped without a
connection until its half-open trial succeeds, and a backend whose every replica is open fails
at once. Timeouts: ``connect_s``; ``read_s`` is the longest gap allowed between two chunks;
``total_s`` bounds the whole exchange, streamed or not, waits between retries included; each
timeout's error names the one that ran out. A stream that a replica breaks off (a gap past
``read_s``, a reset, a truncated body) counts as a failure of that replica: it is tried last for
a while and its breaker counts the failure, so the next request goes to another replica.

Requests go through one ``aiohttp.ClientSession`` per backend (created lazily on the event loop,
closed with the app): measured by ``bench/proxy_overhead.py`` it costs the gateway ~1.1 ms of CPU
per request against ~2.4 ms through ``httpx.AsyncClient``, whose per-request layers (request
building, cookies, repeated timeouts) dominated the profile. ``httpx`` is kept for ``ping``.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Literal

import aiohttp
import httpx

from router.anthropic import StreamTranslator, message_from_chat, to_chat
from router.backends.base import Endpoint, UpstreamResult
from router.breaker import CircuitBreaker
from router.errors import (
    CircuitOpen,
    UpstreamError,
    UpstreamRateLimited,
    UpstreamStatus,
    UpstreamTimeout,
)
from router.retry import RetryPolicy, UpstreamObserver, parse_retry_after, request_time_left
from router.tracing import UpstreamSpan, current
from router.wire import envelope

__all__ = ["ANTHROPIC_VERSION", "OpenAIBackend"]

#: The ``anthropic-version`` header sent to a backend with ``api: anthropic``.
ANTHROPIC_VERSION = "2023-06-01"

logger = logging.getLogger(__name__)


class _RetryableStatus(UpstreamError):
    """A replica answered a status of ``retry_on`` before the first byte."""

    def __init__(self, status: int, retry_after: float | None) -> None:
        super().__init__(f"answered {status}")
        self.answered = status
        self.retry_after = retry_after


class _ConnectFailed(UpstreamError):
    """The replica refused the connection or could not be reached."""


def _reason(exc: UpstreamError) -> str:
    """A failed attempt's metrics label: its status, connect, timeout or error."""
    if isinstance(exc, _RetryableStatus):
        return str(exc.answered)
    if isinstance(exc, UpstreamTimeout):
        return "timeout"
    if isinstance(exc, _ConnectFailed):
        return "connect"
    return "error"


@dataclass(slots=True)
class _Replica:
    url: str
    breaker: CircuitBreaker | None = None
    outstanding: int = 0
    down_until: float = 0.0  # tried last until then (refused a connection, asked to wait)


class OpenAIBackend:
    """Forward OpenAI calls to one of several replicas of an OpenAI-compatible server."""

    def __init__(
        self,
        name: str,
        base_urls: list[str],
        *,
        model: str | None = None,
        api_key: str | None = None,
        api: Literal["openai", "anthropic"] = "openai",
        models: tuple[str, ...] = (),
        connect_s: float = 5.0,
        read_s: float = 120.0,
        total_s: float = 600.0,
        max_connections: int = 256,
        cooldown_s: float = 2.0,
        retry: RetryPolicy | None = None,
        breaker_failures: int | None = 5,
        breaker_cooldown_s: float = 10.0,
        observer: UpstreamObserver | None = None,
    ) -> None:
        """``cooldown_s``: how long a replica that refused a connection is tried last;
        ``breaker_failures``: consecutive failures that open a replica's breaker (None: no
        breaker) for ``breaker_cooldown_s``; ``observer`` hears of retries, failed attempts
        and breaker changes (the gateway's metrics); ``api``: ``anthropic`` for a server of the
        Anthropic Messages API (it answers ``messages`` only, with ``x-api-key`` and
        ``anthropic-version``); an ``openai`` one gets ``messages`` translated to chat
        (:mod:`router.anthropic`)."""
        if not base_urls:
            raise ValueError(f"backend {name!r} needs at least one base URL")
        self.name = name
        self.model = model
        self._served = tuple(models) or ((model,) if model else ())
        self._observer = observer
        self._retry = retry or RetryPolicy()
        self._replicas = [
            _Replica(url, self._breaker(url, breaker_failures, breaker_cooldown_s))
            for url in (u.rstrip("/") for u in base_urls)
        ]
        self._rotation = itertools.count()
        self._connect_s = connect_s
        self._read_s = read_s
        self._total_s = total_s
        self._cooldown_s = cooldown_s
        self.api = api
        headers = {"accept-encoding": "identity", "content-type": "application/json"}
        if api == "anthropic":
            headers["anthropic-version"] = ANTHROPIC_VERSION
            if api_key:
                headers["x-api-key"] = api_key
        elif api_key:
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

    def _breaker(self, url: str, failures: int | None, cooldown_s: float) -> CircuitBreaker | None:
        if failures is None:
            return None
        on_change = None
        if self._observer is not None:
            on_change = functools.partial(self._observer.record_breaker, self.name, url)
            self._observer.record_breaker(self.name, url, "closed")
        return CircuitBreaker(failures, cooldown_s, name=f"{self.name} {url}", on_change=on_change)

    def _pick(self, ready_at: dict[int, float], dropped: set[int]) -> int | None:
        """The replica to try next: ready ones before those this request waits for, then ones
        not recently refusing or throttling, then least outstanding (ties rotate); skipping
        ``dropped`` ones and those whose breaker refuses. None when none is left."""
        now = time.monotonic()
        n = len(self._replicas)
        start = next(self._rotation) % n
        best: int | None = None
        best_key: tuple[float, bool, int] | None = None
        for k in range(n):
            i = (start + k) % n
            replica = self._replicas[i]
            if i in dropped or (replica.breaker is not None and not replica.breaker.allows()):
                continue
            key = (max(ready_at.get(i, now), now), replica.down_until > now, replica.outstanding)
            if best_key is None or key < best_key:
                best, best_key = i, key
        return best

    async def send(
        self, endpoint: Endpoint, body: dict[str, Any], *, stream: bool
    ) -> UpstreamResult:
        """Try the replicas (and retry them) until one commits an answer; see the module
        docstring. Raises :class:`UpstreamStatus` for a status outside ``retry_on``,
        :class:`UpstreamRateLimited` when every try was answered 429, :class:`UpstreamTimeout`
        when the last failure was a timeout, else :class:`UpstreamError`.

        ``messages`` goes to an ``openai`` server as chat, translated both ways; an
        ``anthropic`` server answers ``messages`` only (anything else is a 400). An
        ``embeddings`` body keeps its model (the client names the upstream's own model)."""
        if self.api == "anthropic" and endpoint != "messages":
            raise UpstreamStatus(
                400,
                envelope(
                    f"backend {self.name!r} speaks the Anthropic API and answers /v1/messages "
                    f"only, not /v1/{endpoint}",
                    "invalid_request_error",
                    code="unsupported_endpoint",
                ),
                "application/json",
            )
        if self.api == "openai" and endpoint == "messages":
            return await self._messages_as_chat(body, stream=stream)
        keep = self.model is None or endpoint == "embeddings"
        payload = body if keep else {**body, "model": self.model}
        content = json.dumps(payload, ensure_ascii=False).encode()
        deadline = time.monotonic() + self._total_s
        policy = self._retry
        tries_left = len(self._replicas) + policy.retries
        ready_at: dict[int, float] = {}  # replica -> earliest retry, for this request
        failed_on: dict[int, int] = {}  # replica -> failed tries, for this request
        dropped: set[int] = set()  # replicas this request no longer tries
        failures: list[str] = []
        errors: list[UpstreamError] = []
        throttled_until: list[float] = []  # when each 429's retry-after ends
        pending: str | None = None  # the last failure, counted as a retry when one follows
        while tries_left > 0:
            index = self._pick(ready_at, dropped)
            if index is None:
                break
            replica = self._replicas[index]
            wait = ready_at.get(index, 0.0) - time.monotonic()
            if wait > 0:
                left = request_time_left()
                budget = deadline - time.monotonic()
                if left is not None:
                    budget = min(budget, left)  # the request's own deadline, when bound
                if wait >= budget:
                    failures.append(f"no time left for a retry in {wait:.2g} s")
                    break
                await asyncio.sleep(wait)
            breaker = replica.breaker
            if breaker is not None and not breaker.acquire():
                dropped.add(index)  # it opened, or another request took its trial, meanwhile
                continue
            trial = breaker is not None and breaker.holds_trial()
            tries_left -= 1
            if pending is not None and self._observer is not None:
                self._observer.record_retry(self.name, pending)
            verdict: bool | None = None  # None: cancelled, no verdict on the replica
            try:
                result = await self._send_one(replica, endpoint, content, stream, deadline)
                verdict = True
                return result
            except UpstreamStatus:
                verdict = True  # the replica answered; its 4xx is the client's business
                raise
            except UpstreamError as exc:
                verdict = False
                pending = _reason(exc)
                if self._observer is not None:
                    self._observer.record_upstream_failure(self.name, pending)
                failures.append(f"{replica.url}: {exc.message}")
                errors.append(exc)
                logger.warning("backend %s replica %s failed: %s", self.name, replica.url, exc)
                now = time.monotonic()
                if now >= deadline:
                    break
                failed_on[index] = failed_on.get(index, 0) + 1
                after = exc.retry_after if isinstance(exc, _RetryableStatus) else None
                if after is not None:
                    replica.down_until = max(replica.down_until, now + after)
                    if isinstance(exc, _RetryableStatus) and exc.answered == 429:
                        throttled_until.append(now + after)
                    if after > policy.retry_after_max_s:
                        dropped.add(index)  # fail over rather than wait that long
                        continue
                    ready_at[index] = now + after
                else:
                    ready_at[index] = now + policy.backoff(failed_on[index] - 1)
            finally:
                if breaker is not None:
                    if verdict is None:
                        breaker.abandoned(trial)
                    elif verdict:
                        breaker.succeeded()
                    else:
                        breaker.failed()
        raise self._gave_up(errors, failures, throttled_until)

    async def _messages_as_chat(self, body: dict[str, Any], *, stream: bool) -> UpstreamResult:
        """An Anthropic Messages call answered by this server's chat completions."""
        model = str(body.get("model", ""))
        result = await self.send("chat/completions", to_chat(body), stream=stream)
        if result.stream is None:
            try:
                translated = message_from_chat(result.body or b"", model)
            except (ValueError, AttributeError, TypeError, IndexError) as exc:
                raise UpstreamError(f"backend {self.name!r}: unreadable chat answer") from exc
            result.body = translated
            result.content_type = "application/json"
        else:
            result.stream = StreamTranslator(model).translate(result.stream)
        return result

    def _gave_up(
        self, errors: list[UpstreamError], failures: list[str], throttled_until: list[float]
    ) -> UpstreamError:
        """The error of a backend that could not answer (see :meth:`send`)."""
        if not errors:  # no replica was tried: every breaker is open (or its trial taken)
            if self._observer is not None:
                self._observer.record_upstream_failure(self.name, "breaker_open")
            wait = min(
                (r.breaker.retry_in() for r in self._replicas if r.breaker is not None),
                default=0.0,
            )
            return CircuitOpen(
                f"backend {self.name!r}: every replica's circuit breaker is open "
                f"(next trial in {wait:.1f} s)",
                retry_after=wait,
            )
        detail = "; ".join(failures)
        if all(isinstance(e, _RetryableStatus) and e.answered == 429 for e in errors):
            retry_after = None
            if throttled_until:
                retry_after = max(0.0, min(throttled_until) - time.monotonic())
            return UpstreamRateLimited(
                f"backend {self.name!r}: every replica tried is rate limited ({detail})",
                retry_after=retry_after,
            )
        kind = UpstreamTimeout if isinstance(errors[-1], UpstreamTimeout) else UpstreamError
        return kind(f"backend {self.name!r}: every replica failed ({detail})")

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
        span = current().upstream(self.name, url)  # router/tracing.py; a no-op when off
        replica.outstanding += 1
        response: aiohttp.ClientResponse | None = None
        handed_over = False
        try:
            async with asyncio.timeout_at(self._loop_deadline(deadline)):
                headers = span.headers(self._headers)  # + traceparent when traced
                response = await self._aio().post(url, data=content, headers=headers)
                span.status(response.status)
                if response.status >= 400:
                    error_body = await response.read()
                    response.release()
                    if response.status in self._retry.retry_on:
                        raise _RetryableStatus(response.status, parse_retry_after(response.headers))
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
                span.end()

            return UpstreamResult(
                upstream.status,
                content_type,
                stream=self._chunks(upstream, replica, deadline, span),
                close=close,
                replica=replica.url,
            )
        except TimeoutError as exc:  # the deadline, or aiohttp's connect_s / read_s
            span.fail(exc)
            if isinstance(exc, aiohttp.ConnectionTimeoutError):  # failed to connect
                replica.down_until = time.monotonic() + self._cooldown_s
            raise UpstreamTimeout(self._timeout_message(exc)) from None
        except aiohttp.ClientConnectorError as exc:
            span.fail(exc)
            replica.down_until = time.monotonic() + self._cooldown_s
            raise _ConnectFailed(f"cannot connect ({exc})") from exc
        except aiohttp.ClientError as exc:
            span.fail(exc)
            raise UpstreamError(f"{type(exc).__name__}: {exc}") from exc
        finally:
            if not handed_over:
                span.end()
                replica.outstanding -= 1
                if response is not None and not response.closed:
                    response.close()

    def _timeout_message(self, exc: TimeoutError) -> str:
        """Which deadline ran out: ``connect_s``, ``read_s`` (aiohttp's) or ``total_s``."""
        if isinstance(exc, aiohttp.ConnectionTimeoutError):
            return f"no connection within {self._connect_s:g} s (timeouts.connect_s)"
        if isinstance(exc, aiohttp.ServerTimeoutError):
            return f"no data for {self._read_s:g} s (timeouts.read_s)"
        return f"no answer within {self._total_s:g} s (timeouts.total_s)"

    async def _chunks(
        self,
        response: aiohttp.ClientResponse,
        replica: _Replica,
        deadline: float,
        span: UpstreamSpan,
    ) -> AsyncIterator[bytes]:
        iterator = response.content.iter_any().__aiter__()
        while True:
            try:
                async with asyncio.timeout_at(self._loop_deadline(deadline)):
                    chunk = await iterator.__anext__()
            except StopAsyncIteration:
                return
            except aiohttp.ClientError as exc:  # the replica: a gap past read_s, a reset, ...
                span.fail(exc)
                self._broke_off(replica, exc)
                if isinstance(exc, TimeoutError):
                    raise UpstreamTimeout(f"stream stalled: {self._timeout_message(exc)}") from None
                raise UpstreamError(f"stream broke: {type(exc).__name__}: {exc}") from exc
            except TimeoutError as exc:  # the request's own total_s: no fault of the replica
                span.fail(exc)
                raise UpstreamTimeout(f"stream exceeded {self._total_s:g} s") from None
            yield chunk

    def _broke_off(self, replica: _Replica, exc: BaseException) -> None:
        """A replica broke a stream it had begun: try it last for a while, count the failure
        on its breaker (its attempt had counted as a success when the stream began)."""
        logger.warning(
            "backend %s replica %s broke a stream off: %s: %s",
            self.name,
            replica.url,
            type(exc).__name__,
            exc,
        )
        replica.down_until = max(replica.down_until, time.monotonic() + self._cooldown_s)
        if replica.breaker is not None:
            replica.breaker.failed()

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
