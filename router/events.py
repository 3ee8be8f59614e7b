"""Per-request event records and user feedback, written to a sink off the request path.

Records are plain JSON-able dicts with a ``kind``:

- ``request``: one per completions request: ``request_id, time, endpoint, model, stream,
  experiment, arm, policy, rule, backend, score, percentile, cache, latency_s, ttft_s,
  prompt_tokens, completion_tokens, status, cost, cascade, answer_p_large`` (unknown values are
  None; ``cascade``: kept / escalated / skipped when a policy's cascade checked the answer, whose
  P is ``answer_p_large``; an escalated request's cost includes the checked answer's);
- ``feedback``: ``request_id, time, score, label`` (from ``POST /v1/feedback``).

The request path calls :meth:`EventLog.record`, a non-blocking ``put_nowait`` on a bounded
queue; one writer thread takes batches off it (waiting ``linger_s`` after the first record of a
batch so that a batch can gather) and hands them to the sink:

- :class:`SQLiteSink`: tables ``requests`` and ``feedback`` in a WAL-mode file;
- :class:`JSONLSink`: one JSON object per line, appended;
- :class:`RedisStreamSink`: ``XADD stream MAXLEN ~ max_len * kind <kind> data <json>``.

A full queue or a failing sink drops records: they are counted in ``router_events_dropped``
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
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

__all__ = [
    "REQUEST_FIELDS",
    "EventLog",
    "EventSink",
    "JSONLSink",
    "Record",
    "RedisStreamSink",
    "SQLiteSink",
    "open_sink",
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
}
FEEDBACK_FIELDS: tuple[str, ...] = ("request_id", "time", "score", "label")


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
    """Tables ``requests`` (one row per request) and ``feedback`` in one SQLite file (WAL)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
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
        with self._db:  # one transaction per batch
            self._db.execute("BEGIN")
            if requests:
                self._db.executemany(self._insert_request, requests)
            if feedback:
                self._db.executemany(
                    "INSERT INTO feedback (request_id, time, score, label) VALUES (?, ?, ?, ?)",
                    feedback,
                )

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
        import redis

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
    kind: str, *, path: Path, redis_url: str | None, stream: str, max_len: int
) -> EventSink:
    """The sink named by ``events.sink`` (``path`` already resolved)."""
    if kind == "sqlite":
        return SQLiteSink(path)
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
        self._queue: queue.Queue[Record] = queue.Queue(maxsize=queue_size)
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

    def record(self, record: Record) -> bool:
        """Queue a record without blocking; False (counted, logged once) when the queue is full."""
        if record["kind"] == "request":
            self._recent[record["request_id"]] = None
            if len(self._recent) > self._remember:
                del self._recent[next(iter(self._recent))]
        try:
            self._queue.put_nowait(record)
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

    def _write(self, batch: list[Record]) -> None:
        try:
            self.sink.write(batch)
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
