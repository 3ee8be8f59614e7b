"""Per-request event records and user feedback, written to a sink off the request path.

Two kinds of event, frozen dataclasses:

- :class:`RequestEvent` (kind ``request``): one per completions request: ``request_id, time,
  endpoint, model, stream, experiment, arm, policy, rule, backend, score, percentile, cache,
  latency_s, ttft_s, prompt_tokens, completion_tokens, status, cost, cascade, answer_p_large,
  calibration`` (unknown values are None; ``cascade``: kept / escalated / skipped /
  escalation_failed when a policy's cascade checked the answer, whose P is ``answer_p_large``;
  an escalated request's cost includes the checked answer's; ``calibration``: the id of the
  calibration that routed it, an experiment arm's own when it has one);
- :class:`FeedbackEvent` (kind ``feedback``): ``request_id, time, score, label`` (from
  ``POST /v1/feedback``);
- :class:`LabelEvent` (kind ``label``): a label the gateway collected for one of its own
  requests (router/labelling/): ``request_id, time, model, policy, answered_by, small_backend,
  large_backend, judge, source, large_better, verdicts, calibration, score, p_large, input,
  small_answer, large_answer``. ``source`` is ``judge`` (a judge backend compared both answers),
  ``reference`` (both answers checked against the request's known answer) or ``feedback``;
  ``large_better`` is 1.0 (the large answer is better), 0.5 (a tie) or 0.0; ``verdicts`` are
  the judge's raw outputs; ``input`` (what the probe read: the prompt text or the chat
  messages) and the answers are None unless ``labelling.store_text`` is on.

Sinks store *records*, the events as plain JSON-able dicts with a ``kind``
(:meth:`RequestEvent.to_record`). Reading goes the other way: :meth:`RequestEvent.from_record`
(or :func:`event_from_record` for either kind, :func:`read_events` for a whole sink) accepts
rows written by older versions, a missing field reading as None.

The request path calls :meth:`EventLog.record` with an event, a non-blocking ``put_nowait`` on
a bounded queue; one writer thread takes batches off it (waiting ``linger_s`` after the first
event of a batch so that a batch can gather) and hands their records to the sink:

- :class:`SQLiteSink`: tables ``requests``, ``feedback`` and ``labels`` in a WAL-mode file
  (a label's ``verdicts`` and ``input`` are stored as JSON text and decoded on reading); with
  ``label_retention_s`` set, labels older than that are deleted on a write, at most once a
  minute;
- :class:`JSONLSink`: one JSON object per line, appended (append-only: label retention is not
  applied; rotate or trim the file yourself);
- :class:`RedisStreamSink`: ``XADD stream MAXLEN ~ max_len * kind <kind> data <json>`` (the
  stream's ``MAXLEN`` is its only retention).

A full queue or a failing sink drops records: they are counted in ``sparsity_router_events_dropped``
(by reason) and logged once per outage, never raised into a request. ``close()`` drains the
queue, so nothing is lost on a clean shutdown.
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol

import redis

__all__ = [
    "FEEDBACK_FIELDS",
    "LABEL_FIELDS",
    "REQUEST_FIELDS",
    "Event",
    "EventLog",
    "EventSink",
    "FeedbackEvent",
    "JSONLSink",
    "LabelEvent",
    "Record",
    "RedisStreamSink",
    "RequestEvent",
    "SQLiteSink",
    "event_from_record",
    "open_sink",
    "read_events",
]

logger = logging.getLogger(__name__)

Record = dict[str, Any]

#: Column -> SQLite type of a ``request`` record.
REQUEST_FIELDS: dict[str, str] = {
    "request_id": "TEXT PRIMARY KEY",
    "time": "REAL",
    "endpoint": "TEXT",
    "model": "TEXT",
    "stream": "INTEGER",
    "experiment": "TEXT",
    "arm": "TEXT",
    "policy": "TEXT",
    "rule": "TEXT",
    "backend": "TEXT",
    "score": "REAL",
    "percentile": "REAL",
    "cache": "TEXT",
    "latency_s": "REAL",
    "ttft_s": "REAL",
    "prompt_tokens": "INTEGER",
    "completion_tokens": "INTEGER",
    "status": "INTEGER",
    "cost": "REAL",
    "cascade": "TEXT",
    "answer_p_large": "REAL",
    "calibration": "TEXT",
}
FEEDBACK_FIELDS: tuple[str, ...] = ("request_id", "time", "score", "label")
#: Column -> SQLite type of a ``label`` record (``verdicts`` and ``input`` hold JSON text).
LABEL_FIELDS: dict[str, str] = {
    "request_id": "TEXT",
    "time": "REAL",
    "model": "TEXT",
    "policy": "TEXT",
    "answered_by": "TEXT",
    "small_backend": "TEXT",
    "large_backend": "TEXT",
    "judge": "TEXT",
    "source": "TEXT",
    "large_better": "REAL",
    "verdicts": "TEXT",
    "calibration": "TEXT",
    "score": "REAL",
    "p_large": "REAL",
    "input": "TEXT",
    "small_answer": "TEXT",
    "large_answer": "TEXT",
}
_LABEL_JSON = ("verdicts", "input")  # stored as JSON text in SQLite
_RETENTION_EVERY_S = 60.0  # the SQLite sink deletes expired labels at most this often


def _text(record: Mapping[str, Any], name: str) -> str | None:
    value = record.get(name)
    return None if value is None else str(value)


def _real(record: Mapping[str, Any], name: str) -> float | None:
    value = record.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"event field {name!r} is not a number: {value!r}")
    return float(value)


def _integer(record: Mapping[str, Any], name: str) -> int | None:
    value = record.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"event field {name!r} is not an integer: {value!r}")
    return value


def _flag(record: Mapping[str, Any], name: str) -> bool | None:
    value = record.get(name)
    return None if value is None else bool(value)  # SQLite keeps booleans as 0 / 1


def _request_id(record: Mapping[str, Any]) -> str:
    value = record.get("request_id")
    if value is None:
        raise ValueError(f"an event record without a request_id: {dict(record)!r}")
    return str(value)


@dataclass(frozen=True, slots=True, kw_only=True)
class RequestEvent:
    """One completions request: its routing decision, probe reading, usage and outcome."""

    kind: ClassVar[Literal["request"]] = "request"

    request_id: str
    time: float | None = None
    endpoint: str | None = None
    model: str | None = None
    stream: bool | None = None
    experiment: str | None = None
    arm: str | None = None
    policy: str | None = None
    rule: str | None = None
    backend: str | None = None
    score: float | None = None
    percentile: float | None = None
    cache: str | None = None
    latency_s: float | None = None
    ttft_s: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    status: int | None = None
    cost: float | None = None
    cascade: str | None = None
    answer_p_large: float | None = None
    calibration: str | None = None  # the id of the prompt calibration that routed it

    def to_record(self) -> Record:
        """The record the sinks store: ``kind`` then every field of :data:`REQUEST_FIELDS`."""
        return {"kind": self.kind, **{name: getattr(self, name) for name in REQUEST_FIELDS}}

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> RequestEvent:
        """A ``request`` record read back from a sink (fields it lacks are None; ``kind`` and
        unknown keys are ignored). ValueError when it has no ``request_id`` or a number field
        holds something else."""
        return cls(
            request_id=_request_id(record),
            time=_real(record, "time"),
            endpoint=_text(record, "endpoint"),
            model=_text(record, "model"),
            stream=_flag(record, "stream"),
            experiment=_text(record, "experiment"),
            arm=_text(record, "arm"),
            policy=_text(record, "policy"),
            rule=_text(record, "rule"),
            backend=_text(record, "backend"),
            score=_real(record, "score"),
            percentile=_real(record, "percentile"),
            cache=_text(record, "cache"),
            latency_s=_real(record, "latency_s"),
            ttft_s=_real(record, "ttft_s"),
            prompt_tokens=_integer(record, "prompt_tokens"),
            completion_tokens=_integer(record, "completion_tokens"),
            status=_integer(record, "status"),
            cost=_real(record, "cost"),
            cascade=_text(record, "cascade"),
            answer_p_large=_real(record, "answer_p_large"),
            calibration=_text(record, "calibration"),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class FeedbackEvent:
    """An outcome attached to an earlier request (``POST /v1/feedback``)."""

    kind: ClassVar[Literal["feedback"]] = "feedback"

    request_id: str
    time: float | None = None
    score: float | None = None
    label: str | None = None

    def to_record(self) -> Record:
        """The record the sinks store: ``kind`` then every field of :data:`FEEDBACK_FIELDS`."""
        return {"kind": self.kind, **{name: getattr(self, name) for name in FEEDBACK_FIELDS}}

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> FeedbackEvent:
        """A ``feedback`` record read back from a sink (see :meth:`RequestEvent.from_record`)."""
        return cls(
            request_id=_request_id(record),
            time=_real(record, "time"),
            score=_real(record, "score"),
            label=_text(record, "label"),
        )


def _required_real(record: Mapping[str, Any], name: str) -> float:
    value = _real(record, name)
    if value is None:
        raise ValueError(f"a label record without {name}: {dict(record)!r}")
    return value


def _verdicts(record: Mapping[str, Any]) -> tuple[str, ...]:
    value = record.get("verdicts")
    if value is None:
        return ()
    if isinstance(value, str):  # JSON text (a SQLite column read without decoding)
        value = json.loads(value)
    if not isinstance(value, list | tuple):
        raise ValueError(f"event field 'verdicts' is not a list: {value!r}")
    return tuple(str(v) for v in value)


def _input(record: Mapping[str, Any]) -> str | list[dict[str, Any]] | None:
    value = record.get("input")
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(m, dict) for m in value):
        return [dict(m) for m in value]
    raise ValueError(f"event field 'input' is neither text nor a list of messages: {value!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class LabelEvent:
    """A label for one of the gateway's own requests: is the large backend's answer better?

    ``large_better`` is 1.0 (large better), 0.5 (tie or the judge's two verdicts disagree) or
    0.0 (small better); ``source`` says where it came from (``judge``, ``reference`` or
    ``feedback``). ``input``, ``small_answer`` and ``large_answer`` are kept only with
    ``labelling.store_text`` (after ``labelling.redact``).
    """

    kind: ClassVar[Literal["label"]] = "label"

    request_id: str
    time: float
    model: str | None = None
    policy: str | None = None
    answered_by: str | None = None
    small_backend: str | None = None
    large_backend: str | None = None
    judge: str | None = None
    source: str = "judge"
    large_better: float
    verdicts: tuple[str, ...] = ()
    calibration: str | None = None
    score: float | None = None
    p_large: float | None = None
    input: str | list[dict[str, Any]] | None = None
    small_answer: str | None = None
    large_answer: str | None = None

    def to_record(self) -> Record:
        """The record the sinks store: ``kind`` then every field of :data:`LABEL_FIELDS`
        (``verdicts`` as a list, JSON-able)."""
        record: Record = {"kind": self.kind}
        for name in LABEL_FIELDS:
            value = getattr(self, name)
            record[name] = list(value) if name == "verdicts" else value
        return record

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> LabelEvent:
        """A ``label`` record read back from a sink (optional fields it lacks are None).
        ValueError without ``request_id``, ``time`` or ``large_better``, or with a field of
        the wrong type."""
        return cls(**{name: read(record, name) for name, read in _LABEL_READERS.items()})


#: How each field of a ``label`` record is read back (see :meth:`LabelEvent.from_record`).
_LABEL_READERS: dict[str, Callable[[Mapping[str, Any], str], Any]] = {
    "request_id": lambda record, _name: _request_id(record),
    "time": _required_real,
    **dict.fromkeys(("model", "policy", "answered_by", "small_backend"), _text),
    **dict.fromkeys(("large_backend", "judge", "calibration"), _text),
    "source": lambda record, name: _text(record, name) or "judge",
    "large_better": _required_real,
    "verdicts": lambda record, _name: _verdicts(record),
    "score": _real,
    "p_large": _real,
    "input": lambda record, _name: _input(record),
    "small_answer": _text,
    "large_answer": _text,
}


Event = RequestEvent | FeedbackEvent | LabelEvent


def event_from_record(record: Mapping[str, Any]) -> Event | None:
    """The event a record holds, by its ``kind`` (None for a kind this version does not know)."""
    kind = record.get("kind")
    if kind == RequestEvent.kind:
        return RequestEvent.from_record(record)
    if kind == FeedbackEvent.kind:
        return FeedbackEvent.from_record(record)
    if kind == LabelEvent.kind:
        return LabelEvent.from_record(record)
    return None


def read_events(sink: EventSink) -> Iterator[Event]:
    """Every event of ``sink``, oldest first (records of unknown kinds skipped)."""
    for record in sink.read():
        event = event_from_record(record)
        if event is not None:
            yield event


class EventSink(Protocol):
    """Where records end up. ``write`` runs in the writer thread only and may raise."""

    def write(self, records: Sequence[Record]) -> None: ...

    def has_request(self, request_id: str) -> bool | None:
        """Whether a request record exists (None: this sink cannot tell cheaply)."""
        ...

    def read(self) -> Iterator[Record]:
        """Every record, oldest first (for reports)."""
        ...

    def close(self) -> None: ...


class SQLiteSink:
    """Tables ``requests`` (one row per request), ``feedback`` and ``labels`` in one SQLite
    file (WAL). With ``label_retention_s``, labels older than that many seconds are deleted
    by a write, at most once a minute."""

    def __init__(self, path: str | Path, *, label_retention_s: float | None = None) -> None:
        self.path = Path(path)
        self.label_retention_s = label_retention_s
        self._purged_at = float("-inf")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Used by the writer thread only (created here so a bad path fails at start-up).
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        columns = ", ".join(f"{name} {kind}" for name, kind in REQUEST_FIELDS.items())
        self._db.execute(f"CREATE TABLE IF NOT EXISTS requests ({columns})")
        have = {row[1] for row in self._db.execute("PRAGMA table_info(requests)")}
        for name, kind in REQUEST_FIELDS.items():  # a file written by an older version
            if name not in have:
                self._db.execute(f"ALTER TABLE requests ADD COLUMN {name} {kind}")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS feedback (id INTEGER PRIMARY KEY AUTOINCREMENT, "
            "request_id TEXT, time REAL, score REAL, label TEXT)"
        )
        self._db.execute("CREATE INDEX IF NOT EXISTS feedback_request ON feedback(request_id)")
        columns = ", ".join(f"{name} {kind}" for name, kind in LABEL_FIELDS.items())
        self._db.execute(
            f"CREATE TABLE IF NOT EXISTS labels (id INTEGER PRIMARY KEY AUTOINCREMENT, {columns})"
        )
        have = {row[1] for row in self._db.execute("PRAGMA table_info(labels)")}
        for name, kind in LABEL_FIELDS.items():
            if name not in have:
                self._db.execute(f"ALTER TABLE labels ADD COLUMN {name} {kind}")
        self._db.execute("CREATE INDEX IF NOT EXISTS labels_time ON labels(time)")
        self._insert_label = (
            f"INSERT INTO labels ({', '.join(LABEL_FIELDS)}) "
            f"VALUES ({', '.join('?' for _ in LABEL_FIELDS)})"
        )
        self._insert_request = (
            f"INSERT OR REPLACE INTO requests ({', '.join(REQUEST_FIELDS)}) "
            f"VALUES ({', '.join('?' for _ in REQUEST_FIELDS)})"
        )

    def write(self, records: Sequence[Record]) -> None:
        requests = [
            tuple(r.get(name) for name in REQUEST_FIELDS) for r in records if r["kind"] == "request"
        ]
        feedback = [
            tuple(r.get(name) for name in FEEDBACK_FIELDS)
            for r in records
            if r["kind"] == "feedback"
        ]
        labels = [
            tuple(
                json.dumps(r.get(name))
                if name in _LABEL_JSON and r.get(name) is not None
                else r.get(name)
                for name in LABEL_FIELDS
            )
            for r in records
            if r["kind"] == "label"
        ]
        now = time.time()
        purge = self.label_retention_s is not None and now - self._purged_at >= _RETENTION_EVERY_S
        with self._db:  # one transaction per batch
            self._db.execute("BEGIN")
            if requests:
                self._db.executemany(self._insert_request, requests)
            if feedback:
                self._db.executemany(
                    "INSERT INTO feedback (request_id, time, score, label) VALUES (?, ?, ?, ?)",
                    feedback,
                )
            if labels:
                self._db.executemany(self._insert_label, labels)
            if purge:
                assert self.label_retention_s is not None
                self._db.execute(
                    "DELETE FROM labels WHERE time < ?", (now - self.label_retention_s,)
                )
        if purge:
            self._purged_at = now

    def _reader(self) -> sqlite3.Connection:
        db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=5)
        db.row_factory = sqlite3.Row
        return db

    def has_request(self, request_id: str) -> bool | None:
        with contextlib.closing(self._reader()) as db:
            row = db.execute("SELECT 1 FROM requests WHERE request_id = ?", (request_id,))
            return row.fetchone() is not None

    def read(self) -> Iterator[Record]:
        with contextlib.closing(self._reader()) as db:
            for row in db.execute("SELECT * FROM requests ORDER BY time"):
                yield {"kind": "request", **dict(row)}
            for row in db.execute("SELECT * FROM feedback ORDER BY id"):
                out = {k: row[k] for k in FEEDBACK_FIELDS}
                yield {"kind": "feedback", **out}
            for row in db.execute("SELECT * FROM labels ORDER BY id"):
                label = {k: row[k] for k in LABEL_FIELDS}
                for name in _LABEL_JSON:
                    if label[name] is not None:
                        label[name] = json.loads(label[name])
                yield {"kind": "label", **label}

    def close(self) -> None:
        self._db.close()


class JSONLSink:
    """One JSON object per line, appended to ``path``."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", encoding="utf-8")

    def write(self, records: Sequence[Record]) -> None:
        self._file.write("".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records))
        self._file.flush()

    def has_request(self, request_id: str) -> bool | None:
        return None

    def read(self) -> Iterator[Record]:
        with self.path.open(encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    yield json.loads(line)

    def close(self) -> None:
        self._file.close()


class RedisStreamSink:
    """A Redis Stream: ``XADD stream MAXLEN ~ max_len * kind <kind> data <json>``."""

    def __init__(
        self, url: str, stream: str, *, max_len: int = 100_000, timeout_s: float = 2.0
    ) -> None:
        self.stream = stream
        self.max_len = max_len
        self._redis = redis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s
        )

    def write(self, records: Sequence[Record]) -> None:
        pipe = self._redis.pipeline(transaction=False)
        for r in records:
            fields = {"kind": r["kind"], "data": json.dumps(r, separators=(",", ":"))}
            pipe.xadd(self.stream, fields, maxlen=self.max_len, approximate=True)  # type: ignore[arg-type]
        pipe.execute()

    def has_request(self, request_id: str) -> bool | None:
        return None

    def read(self) -> Iterator[Record]:
        start = "-"
        while True:
            page: Any = self._redis.xrange(self.stream, min=start, count=1000)
            if not page:
                return
            for _entry_id, fields in page:
                yield json.loads(fields[b"data"])
            last = page[-1][0]
            start = "(" + (last.decode() if isinstance(last, bytes) else str(last))

    def close(self) -> None:
        self._redis.close()


def open_sink(
    kind: str,
    *,
    path: Path,
    redis_url: str | None,
    stream: str,
    max_len: int,
    label_retention_s: float | None = None,
) -> EventSink:
    """The sink named by ``events.sink`` (``path`` already resolved). ``label_retention_s``
    applies to the SQLite sink only (see :class:`SQLiteSink`)."""
    if kind == "sqlite":
        return SQLiteSink(path, label_retention_s=label_retention_s)
    if kind == "jsonl":
        return JSONLSink(path)
    if kind == "redis":
        assert redis_url is not None  # the schema requires it
        return RedisStreamSink(redis_url, stream, max_len=max_len)
    raise ValueError(f"unknown events sink {kind!r}")


OnDrop = Callable[[str, int], None]


def _ignore(_reason: str, _n: int) -> None:
    return None


class EventLog:
    """A bounded queue in front of a sink, emptied by one writer thread.

    ``on_drop(reason, n)`` is called for dropped records (``queue_full`` from the request path,
    ``sink_error`` from the writer thread); ``on_written(n)`` after each successful batch.
    """

    def __init__(
        self,
        sink: EventSink,
        *,
        queue_size: int = 10_000,
        batch_size: int = 256,
        on_drop: OnDrop = _ignore,
        on_written: Callable[[int], None] | None = None,
        remember: int = 100_000,
        linger_s: float = 0.05,
    ) -> None:
        self.sink = sink
        self.batch_size = batch_size
        self.linger_s = linger_s
        self._queue: queue.Queue[Event] = queue.Queue(maxsize=queue_size)
        self._on_drop = on_drop
        self._on_written = on_written
        self._closing = threading.Event()
        self._queue_full = False
        self._sink_failing = False
        self._recent: dict[str, None] = {}  # request ids recorded lately (insertion-ordered)
        self._remember = remember
        self._thread = threading.Thread(target=self._run, name="event-writer", daemon=True)
        self._thread.start()

    # -- request path (event loop thread) -------------------------------------------------

    def record(self, event: Event) -> bool:
        """Queue an event without blocking; False (counted, logged once) when the queue is full.
        The writer thread turns it into its record (:meth:`RequestEvent.to_record`)."""
        if isinstance(event, RequestEvent):
            self._recent[event.request_id] = None
            if len(self._recent) > self._remember:
                del self._recent[next(iter(self._recent))]
        try:
            self._queue.put_nowait(event)
        except queue.Full:
            if not self._queue_full:
                self._queue_full = True
                logger.warning(
                    "event queue full (%d records): dropping events until the writer catches up",
                    self._queue.maxsize,
                )
            self._on_drop("queue_full", 1)
            return False
        if self._queue_full:
            self._queue_full = False
            logger.info("event queue has room again")
        return True

    def knows(self, request_id: str) -> bool | None:
        """Whether ``request_id`` was recorded (None: unknown to this process and the sink
        cannot tell). May block on the sink: call it off the event loop."""
        if request_id in self._recent:
            return True
        try:
            return self.sink.has_request(request_id)
        except Exception:
            logger.warning("event sink lookup failed", exc_info=True)
            return None

    # -- writer thread -----------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            try:
                first = self._queue.get(timeout=0.2)
            except queue.Empty:
                if self._closing.is_set():
                    return
                continue
            if self.linger_s > 0 and self._queue.qsize() < self.batch_size:
                # Let a batch gather: one transaction per batch, not per request.
                self._closing.wait(self.linger_s)
            batch = [first]
            while len(batch) < self.batch_size:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            self._write(batch)

    def _write(self, batch: list[Event]) -> None:
        try:
            self.sink.write([event.to_record() for event in batch])
        except Exception as exc:
            if not self._sink_failing:
                self._sink_failing = True
                logger.warning(
                    "event sink %s failed (%s: %s): dropping events until it recovers",
                    type(self.sink).__name__,
                    type(exc).__name__,
                    exc,
                )
            self._on_drop("sink_error", len(batch))
            return
        if self._sink_failing:
            self._sink_failing = False
            logger.warning("event sink %s recovered", type(self.sink).__name__)
        if self._on_written is not None:
            self._on_written(len(batch))

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued (up to ``timeout``), stop the writer and close the sink."""
        self._closing.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            logger.warning("event writer did not finish within %.0f s; closing anyway", timeout)
            return
        try:
            self.sink.close()
        except Exception:
            logger.warning("closing the event sink failed", exc_info=True)
