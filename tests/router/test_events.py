"""Event records: the sinks (SQLite, JSONL, a real Redis stream) and the writer in front of them."""

from __future__ import annotations

import logging
import sqlite3
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from router.events import EventLog, JSONLSink, RedisStreamSink, SQLiteSink, open_sink


def request(i: int, **extra: Any) -> dict[str, Any]:
    return {
        "kind": "request",
        "request_id": f"r{i}",
        "time": 1000.0 + i,
        "arm": "a" if i % 2 else "b",
        "backend": "small",
        "latency_s": 0.01 * i,
        "prompt_tokens": 5,
        "completion_tokens": i,
        "status": 200,
        **extra,
    }


class Drops:
    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.written = 0

    def drop(self, reason: str, n: int) -> None:
        self.counts[reason] += n

    def wrote(self, n: int) -> None:
        self.written += n


@pytest.mark.parametrize("kind", ["sqlite", "jsonl"])
def test_file_sinks_keep_every_record_and_drain_on_close(kind: str, tmp_path: Path) -> None:
    path = tmp_path / f"events.{kind}"
    sink = open_sink(kind, path=path, redis_url=None, stream="s", max_len=10)
    drops = Drops()
    log = EventLog(sink, queue_size=5000, batch_size=64, on_drop=drops.drop, on_written=drops.wrote)
    for i in range(2000):
        assert log.record(request(i))
    log.record({"kind": "feedback", "request_id": "r7", "time": 5.0, "score": 0.5, "label": None})
    log.close()  # drains the queue before closing the sink
    assert drops.written == 2001 and not drops.counts
    reader = SQLiteSink(path) if kind == "sqlite" else JSONLSink(path)
    records = list(reader.read())
    reader.close()
    requests = [r for r in records if r["kind"] == "request"]
    assert [r["request_id"] for r in requests] == [f"r{i}" for i in range(2000)]
    assert requests[9]["completion_tokens"] == 9 and requests[9]["arm"] == "a"
    feedback = [r for r in records if r["kind"] == "feedback"]
    assert feedback == [
        {"kind": "feedback", "request_id": "r7", "time": 5.0, "score": 0.5, "label": None}
    ]


def test_sqlite_lookup_and_wal(tmp_path: Path) -> None:
    sink = SQLiteSink(tmp_path / "e.sqlite")
    log = EventLog(sink, remember=10)
    for i in range(50):
        log.record(request(i))
    log.close()
    sink2 = SQLiteSink(tmp_path / "e.sqlite")
    log2 = EventLog(sink2, remember=10)
    assert log2.knows("r3") is True  # not in memory: found in the file
    assert log2.knows("nope") is False
    log2.close()
    with sqlite3.connect(tmp_path / "e.sqlite") as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    jsonl = EventLog(JSONLSink(tmp_path / "e.jsonl"))
    jsonl.record(request(1))
    assert jsonl.knows("r1") is True and jsonl.knows("other") is None  # cannot tell
    jsonl.close()


def test_sqlite_file_of_an_older_version_gains_the_new_columns(tmp_path: Path) -> None:
    """A requests table written before the cascade columns existed keeps its rows and takes
    records with them."""
    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE requests (request_id TEXT PRIMARY KEY, time REAL, cost REAL)")
        db.execute("INSERT INTO requests VALUES ('old', 1.0, 0.5)")
    log = EventLog(SQLiteSink(path))
    log.record(request(1, cascade="escalated", answer_p_large=0.75, cost=0.25))
    log.close()
    reader = SQLiteSink(path)
    rows = {r["request_id"]: r for r in reader.read() if r["kind"] == "request"}
    reader.close()
    assert rows["old"]["cost"] == 0.5 and rows["old"]["cascade"] is None
    assert rows["r1"]["cascade"] == "escalated" and rows["r1"]["answer_p_large"] == 0.75
    assert rows["r1"]["backend"] == "small"


def test_full_queue_drops_and_counts_without_blocking(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "locked.sqlite"
    sink = SQLiteSink(path)
    # Another connection holds the write lock: the writer thread waits on it (sqlite busy
    # timeout), so the small queue fills up.
    blocker = sqlite3.connect(path, timeout=5, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    drops = Drops()
    log = EventLog(sink, queue_size=10, batch_size=5, on_drop=drops.drop, on_written=drops.wrote)
    with caplog.at_level(logging.WARNING, logger="router.events"):
        t0 = time.perf_counter()
        accepted = sum(log.record(request(i)) for i in range(200))
        elapsed = time.perf_counter() - t0
        blocker.execute("COMMIT")
        blocker.close()
        log.close()
    assert elapsed < 1.0  # never waited for the sink (it was blocked for seconds)
    assert drops.counts["queue_full"] == 200 - accepted and 10 <= accepted <= 20
    assert drops.written == accepted  # every queued record was written after the lock went
    full = [r for r in caplog.records if "event queue full" in r.getMessage()]
    assert len(full) == 1  # logged once per outage, not per record
    reader = SQLiteSink(path)
    assert len([r for r in reader.read() if r["kind"] == "request"]) == accepted
    reader.close()


def test_redis_stream_sink_outage_is_counted_logged_once_and_recovers(
    redis_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    sink = RedisStreamSink(redis_server.url, "test:events", max_len=1000, timeout_s=0.5)
    drops = Drops()
    log = EventLog(sink, batch_size=4, on_drop=drops.drop, on_written=drops.wrote)
    for i in range(10):
        log.record(request(i))
    deadline = time.monotonic() + 10
    while drops.written < 10 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert drops.written == 10
    redis_server.kill()
    with caplog.at_level(logging.WARNING, logger="router.events"):
        for i in range(10, 30):
            assert log.record(request(i))  # the request path never notices
            time.sleep(0.01)
        deadline = time.monotonic() + 15
        while drops.counts["sink_error"] + drops.written < 30 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert drops.counts["sink_error"] >= 1
        assert drops.counts["sink_error"] + drops.written == 30
        redis_server.restart()
        written_before = drops.written
        log.record(request(99))
        deadline = time.monotonic() + 10
        while drops.written == written_before and time.monotonic() < deadline:
            time.sleep(0.02)
        log.close()
    failed = [r for r in caplog.records if "failed" in r.getMessage() and "sink" in r.getMessage()]
    assert len(failed) == 1
    assert any("recovered" in r.getMessage() for r in caplog.records)
    reader = RedisStreamSink(redis_server.url, "test:events")
    ids = [r["request_id"] for r in reader.read()]
    reader.close()
    assert "r99" in ids  # written after the restart (the data before the kill was not saved)


def test_redis_stream_is_trimmed(redis_server: Any) -> None:
    import redis

    sink = RedisStreamSink(redis_server.url, "trim:events", max_len=100)
    for start in range(0, 2000, 200):
        sink.write([request(i) for i in range(start, start + 200)])
    length = redis.Redis.from_url(redis_server.url).xlen("trim:events")
    assert 100 <= length < 400  # MAXLEN ~ trims whole macro nodes
    records = list(sink.read())
    assert len(records) == length and records[-1]["request_id"] == "r1999"
    sink.close()


def test_events_settings_defaults() -> None:
    from policies.schema import EventsSettings

    assert EventsSettings().path == "events.sqlite"
    assert EventsSettings(sink="jsonl").path == "events.jsonl"
    assert EventsSettings.model_validate({"sink": "jsonl", "path": "x.log"}).path == "x.log"
