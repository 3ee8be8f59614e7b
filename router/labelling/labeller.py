"""The labeller: sampling on the request path, then shadow and judge calls in one worker task.

The request path does two cheap things. Before dispatching, :meth:`Labeller.capture` decides
whether the request is eligible (a chat or completions request of a virtual model, its policy
and model passing ``labelling.policies`` / ``labelling.models``) and sampled (``sample``, a
seeded RNG); a sampled request gets a :class:`LabelCapture` that keeps the answer as it goes
out (a JSON body, or a stream's raw bytes, parsed later by the worker). Once the response is
complete, :meth:`Labeller.finish` checks that it was answered by ``small`` or ``large`` (not a
human, not a cascade's escalation), with a 200 and the whole body (a stream's ``[DONE]``), and
queues a :class:`LabelJob` without waiting (``put_nowait``; a full queue drops it, counted).
An answer that is not one plain text (tool calls, several choices) is dropped as ``no_text``.

One worker task (started and stopped by the app's lifespan) takes the jobs one at a time: the
rate limit (``max_shadow_per_s``, a token bucket) and the day's token budget
(``daily_token_budget``, reset at UTC midnight) may drop it; a job younger than
:data:`SETTLE_S` waits that long after its response completed; then the shadow call (the same
request body, ``stream: false``, to the other backend of the pair through its usual client,
retries and timeouts); then either the reference check (``labelling.reference``, when the
request carries its expected answer) or two judge calls with the answers' positions swapped
(:mod:`router.labelling.judge`). A :class:`~router.events.LabelEvent` goes to the event log.

Tokens are counted from the upstreams' ``usage``; an answer without one is counted as a
quarter of its characters (request and answer). Prompts and answers are logged at DEBUG at most.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import random
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from policies.engine import Decision
from policies.schema import LabellingSettings
from router.backends.base import Backend, Endpoint
from router.cascade import answer_text, without_stream
from router.events import EventLog, LabelEvent
from router.labelling.judge import Side, combine, judge_messages, parse_verdict, question_text, side
from router.labelling.reference import check, expected_answer
from router.metrics import GatewayMetrics
from router.probing import ProbeOutcome
from router.requests import ParsedRequest
from router.usage import usage_of_body

__all__ = [
    "REDACTED",
    "SETTLE_S",
    "LabelCapture",
    "LabelJob",
    "Labeller",
    "TokenBucket",
    "TokenBudget",
    "streamed_text",
]

logger = logging.getLogger(__name__)

REDACTED = "[REDACTED]"
_LABELLED_ENDPOINTS = frozenset({"chat/completions", "completions"})
_MAX_CAPTURE_BYTES = 4 * 1024 * 1024  # a longer stream is not labelled
_NOT_ELIGIBLE = frozenset({"escalated", "escalation_failed"})  # the cascade's escalation
#: A job's shadow call waits until its response completed this long ago: the last bytes sent
#: have reached the client and been read before the upstreams see more load (no wait for
#: jobs that queued longer).
SETTLE_S = 0.05


@dataclass(slots=True)
class LabelCapture:
    """A sampled request on its way out: what routing knew, and the answer as it is sent."""

    endpoint: Endpoint
    request_id: str
    body: dict[str, Any]
    model: str
    policy: str
    prompt: str | list[dict[str, Any]]
    score: float | None
    p_large: float | None
    calibration: str | None
    answer: bytes | None = None  # a JSON answer's body
    chunks: list[bytes] = field(default_factory=list)  # a stream's raw SSE bytes
    size: int = 0

    def answered(self, body: bytes | None) -> None:
        """The JSON answer sent to the client."""
        self.answer = body

    def feed(self, chunk: bytes) -> None:
        """A chunk of the stream sent to the client (kept up to 4 MiB; parsed later)."""
        self.size += len(chunk)
        if self.size <= _MAX_CAPTURE_BYTES:
            self.chunks.append(chunk)

    def text(self) -> str | None:
        """The answer's text (None: not one plain text, or a stream past 4 MiB)."""
        if self.answer is not None:
            return answer_text(self.endpoint, self.answer)
        if not self.chunks or self.size > _MAX_CAPTURE_BYTES:
            return None
        return streamed_text(self.endpoint, b"".join(self.chunks))


@dataclass(frozen=True, slots=True)
class LabelJob:
    """A complete request waiting for its shadow call and verdicts."""

    capture: LabelCapture
    answered_by: str
    time: float  # when the response completed (time.time)
    done_at: float  # the same on the labeller's monotonic clock


def streamed_text(endpoint: Endpoint, raw: bytes) -> str | None:
    """The text of a streamed chat or completions answer: its content deltas joined (None
    with several choices, tool calls, an unreadable event or no text)."""
    parts: list[str] = []
    for line in raw.splitlines():
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            break
        try:
            chunk = json.loads(data)
        except ValueError:
            return None
        for choice in chunk.get("choices") or () if isinstance(chunk, dict) else ():
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                return None
            if endpoint == "completions":
                text = choice.get("text")
            else:
                delta = choice.get("delta") or {}
                if delta.get("tool_calls") or delta.get("function_call"):
                    return None
                text = delta.get("content")
            if isinstance(text, str):
                parts.append(text)
    joined = "".join(parts)
    return joined if joined.strip() else None


class TokenBucket:
    """``rate`` tokens a second, up to ``burst``; :meth:`take` never waits."""

    def __init__(
        self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate, self.burst, self._clock = rate, burst, clock
        self._tokens, self._at = burst, clock()

    def take(self) -> bool:
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


class TokenBudget:
    """Tokens spent today (UTC); ``limit`` None: no limit."""

    def __init__(self, limit: int | None, wall: Callable[[], float] = time.time) -> None:
        self.limit, self._wall = limit, wall
        self.spent = 0
        self._day = self._today()

    def _today(self) -> dt.date:
        return dt.datetime.fromtimestamp(self._wall(), dt.UTC).date()

    def exhausted(self) -> bool:
        today = self._today()
        if today != self._day:
            self._day, self.spent = today, 0
        return self.limit is not None and self.spent >= self.limit

    def spend(self, tokens: int) -> None:
        self.spent += tokens


def _tokens(request: Mapping[str, Any], body: bytes | None, text: str | None) -> int:
    """Prompt + completion tokens of a call (its usage, else a quarter of its characters)."""
    usage = usage_of_body(body)
    if usage is not None and (usage.prompt_tokens is not None or usage.completion_tokens):
        return (usage.prompt_tokens or 0) + (usage.completion_tokens or 0)
    return (len(json.dumps(request, ensure_ascii=False)) + len(text or "")) // 4 + 1


def _plain_input(prompt: str | Sequence[Mapping[str, Any]]) -> str | list[dict[str, Any]]:
    return prompt if isinstance(prompt, str) else [dict(m) for m in prompt]


class Labeller:
    """Samples requests, queues their jobs, and labels them in one worker task."""

    def __init__(
        self,
        settings: LabellingSettings,
        *,
        backends: Mapping[str, Backend],
        events: EventLog | None,
        metrics: GatewayMetrics,
        seed: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self._backends = backends
        self._events = events
        self._metrics = metrics
        self._random = random.Random(seed)
        self._wall, self._clock = wall, clock
        self._queue: asyncio.Queue[LabelJob] = asyncio.Queue(maxsize=settings.queue)
        self._bucket = TokenBucket(
            settings.max_shadow_per_s, max(1.0, settings.max_shadow_per_s), clock
        )
        self.budget = TokenBudget(settings.daily_token_budget, wall)
        self._redact = [re.compile(p) for p in settings.redact]
        self._task: asyncio.Task[None] | None = None
        self._busy = False

    # -- request path ------------------------------------------------------------------------

    def capture(
        self,
        endpoint: Endpoint,
        request_id: str,
        decision: Decision,
        parsed: ParsedRequest,
        outcome: ProbeOutcome | None,
        calibration: str | None,
    ) -> LabelCapture | None:
        """A capture for an eligible, sampled request (None otherwise); see the module doc.
        ``calibration``: the id of the calibration the request's routing applied."""
        s = self.settings
        if (
            endpoint not in _LABELLED_ENDPOINTS
            or decision.policy == "-"  # a direct model: the client chose the backend
            or decision.backend not in self._backends  # a human backend
            or (s.policies and decision.policy not in s.policies)
            or (s.models and parsed.model not in s.models)
            or self._random.random() >= s.sample
        ):
            return None
        result = outcome.result if outcome is not None else None
        return LabelCapture(
            endpoint=endpoint,
            request_id=request_id,
            body=parsed.body,
            model=parsed.model,
            policy=decision.policy,
            prompt=_plain_input(parsed.probe_input),
            score=result.score if result is not None else None,
            p_large=result.p_large if result is not None else None,
            calibration=calibration,
        )

    def finish(
        self, capture: LabelCapture, *, answered_by: str, complete: bool, cascade: str | None
    ) -> bool:
        """Queue the job of a request whose response is complete, when it is still eligible
        (answered whole by the pair, not by a cascade's escalation). Never blocks or raises."""
        s = self.settings
        if not complete or answered_by not in (s.small, s.large) or cascade in _NOT_ELIGIBLE:
            return False
        return self.offer(LabelJob(capture, answered_by, self._wall(), self._clock()))

    def offer(self, job: LabelJob) -> bool:
        """``put_nowait``; a full queue drops the job (counted as ``queue_full``)."""
        try:
            self._queue.put_nowait(job)
        except asyncio.QueueFull:
            self._drop("queue_full")
            return False
        return True

    # -- the worker --------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the worker task (the app's lifespan)."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="labeller")

    async def aclose(self) -> None:
        """Stop the worker; queued jobs are dropped (a label in progress is abandoned)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    @property
    def idle(self) -> bool:
        """No job queued or in progress (tests wait for it)."""
        return self._queue.empty() and not self._busy

    async def _run(self) -> None:
        while True:
            job = await self._queue.get()
            self._busy = True
            try:
                await self.label(job)
            except Exception:
                logger.exception("labelling request %s failed", job.capture.request_id)
            finally:
                self._busy = False

    def _drop(self, reason: str) -> None:
        self._metrics.shadow_calls.labels("dropped").inc()
        self._metrics.shadow_dropped.labels(reason).inc()

    def _spend(self, request: Mapping[str, Any], body: bytes | None, text: str | None) -> None:
        tokens = _tokens(request, body, text)
        self.budget.spend(tokens)
        self._metrics.shadow_cost_tokens.inc(tokens)

    async def label(self, job: LabelJob) -> None:
        """One job: limits, the shadow call, the reference check or the judge, the record."""
        c, s = job.capture, self.settings
        answer = c.text()
        if answer is None:  # tool calls, several choices, no text: nothing to compare
            self._drop("no_text")
            return
        if not self._bucket.take():
            self._drop("rate")
            return
        if self.budget.exhausted():
            self._drop("budget")
            return
        other = s.large if job.answered_by == s.small else s.small
        if (wait := job.done_at + SETTLE_S - self._clock()) > 0:
            await asyncio.sleep(wait)
        shadow = await self._shadow(c, other)
        if shadow is None:
            return
        small, large = (answer, shadow) if job.answered_by == s.small else (shadow, answer)
        reference = s.reference
        expected = expected_answer(c.body, reference.field) if reference is not None else None
        if reference is not None and expected is not None:
            checked = check(expected, small, large, reference.extract)
            notes = tuple(self._scrub(n) for n in checked.notes)
            verdicts = notes if s.store_text else checked.short
            self._record(job, "reference", checked.large_better, verdicts, small, large)
            return
        judged = await self._judge(question_text(c.prompt), small, large)
        if judged is not None:
            large_better, raw, markers = judged
            verdicts = tuple(self._scrub(v) for v in raw) if s.store_text else markers
            self._record(job, "judge", large_better, verdicts, small, large)

    async def _shadow(self, c: LabelCapture, backend: str) -> str | None:
        body = without_stream(c.body)
        try:
            result = await self._backends[backend].send(c.endpoint, body, stream=False)
        except Exception as exc:
            self._metrics.shadow_calls.labels("failed").inc()
            logger.warning(
                "shadow call to %s for request %s failed: %s", backend, c.request_id, exc
            )
            return None
        text = answer_text(c.endpoint, result.body)
        self._spend(body, result.body, text)
        if text is None:
            self._metrics.shadow_calls.labels("failed").inc()
            logger.warning(
                "shadow call to %s for request %s: no plain-text answer", backend, c.request_id
            )
            return None
        self._metrics.shadow_calls.labels("sent").inc()
        logger.debug("shadow answer from %s for request %s: %r", backend, c.request_id, text)
        return text

    async def _judge(
        self, question: str, small: str, large: str
    ) -> tuple[float, tuple[str, str], tuple[str, str]] | None:
        """Two judge calls, small as A then large as A: (large_better, raw verdict texts,
        their markers), or None when a call failed or its verdict could not be read (the
        second call is then not made)."""
        sides: list[Side] = []
        raw: list[str] = []
        markers: list[str] = []
        order: tuple[tuple[str, str, Literal["A", "B"]], ...] = (
            (small, large, "B"),
            (large, small, "A"),
        )
        for a, b, large_is in order:
            text = await self._ask_judge(question, a, b)
            if text is None:
                self._metrics.judge_verdicts.labels("failed").inc()
                return None
            verdict = parse_verdict(text)
            if verdict is None:
                self._metrics.judge_verdicts.labels("unparsed").inc()
                logger.info("the judge's answer has no verdict; label dropped")
                logger.debug("unparsed judge answer: %r", text)
                return None
            sides.append(side(verdict, large_is))
            self._metrics.judge_verdicts.labels(sides[-1]).inc()
            raw.append(text)
            markers.append(f"[[{verdict}]]")
        return combine(sides[0], sides[1]), (raw[0], raw[1]), (markers[0], markers[1])

    async def _ask_judge(self, question: str, answer_a: str, answer_b: str) -> str | None:
        name = self.settings.judge
        assert name is not None  # the cross-check requires it when labelling is enabled
        backend = self._backends[name]
        served = backend.model_names()
        body: dict[str, Any] = {
            "model": served[0] if served else name,
            "messages": judge_messages(question, answer_a, answer_b),
            "max_tokens": self.settings.judge_max_tokens,
            "temperature": 0.0,
            "stream": False,
        }
        try:
            result = await backend.send("chat/completions", body, stream=False)
        except Exception as exc:
            logger.warning("judge call to %s failed: %s", name, exc)
            return None
        text = answer_text("chat/completions", result.body)
        self._spend(body, result.body, text)
        return text or ""

    def _scrub(self, text: str) -> str:
        for pattern in self._redact:
            text = pattern.sub(REDACTED, text)
        return text

    def _scrub_input(self, prompt: str | list[dict[str, Any]]) -> str | list[dict[str, Any]]:
        if isinstance(prompt, str):
            return self._scrub(prompt)
        out: list[dict[str, Any]] = []
        for message in prompt:
            content = message.get("content")
            if isinstance(content, str):
                content = self._scrub(content)
            elif isinstance(content, list):
                content = [
                    {**p, "text": self._scrub(p["text"])}
                    if isinstance(p, dict) and isinstance(p.get("text"), str)
                    else p
                    for p in content
                ]
            out.append({**message, "content": content})
        return out

    def _record(
        self,
        job: LabelJob,
        source: str,
        large_better: float,
        verdicts: tuple[str, ...],
        small: str,
        large: str,
    ) -> None:
        c, s = job.capture, self.settings
        keep = s.store_text
        event = LabelEvent(
            request_id=c.request_id,
            time=job.time,
            model=c.model,
            policy=c.policy,
            answered_by=job.answered_by,
            small_backend=s.small,
            large_backend=s.large,
            judge=s.judge if source == "judge" else None,
            source=source,
            large_better=large_better,
            verdicts=verdicts,
            calibration=c.calibration,
            score=c.score,
            p_large=c.p_large,
            input=self._scrub_input(c.prompt) if keep else None,
            small_answer=self._scrub(small) if keep else None,
            large_answer=self._scrub(large) if keep else None,
        )
        if self._events is not None and self._events.record(event):
            self._metrics.labels_stored.inc()
        logger.debug("label for request %s: large_better %s", c.request_id, large_better)
