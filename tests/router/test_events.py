"""Event records: the sinks (SQLite, JSONL, a real Redis stream) and the writer in front of them."""

from __future__ import annotations

import dataclasses
import json
import logging
import sqlite3
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from router.events import (
    FEEDBACK_FIELDS,
    LABEL_FIELDS,
    REQUEST_FIELDS,
    EventLog,
    FeedbackEvent,
    JSONLSink,
    LabelEvent,
    RedisStreamSink,
    RequestEvent,
    SQLiteSink,
    event_from_record,
    open_sink,
    read_events,
)


def request(i: int, **extra: Any) -> RequestEvent:
    return RequestEvent(
        request_id=f"r{i}",
        time=1000.0 + i,
        arm="a" if i % 2 else "b",
        backend="small",
        latency_s=0.01 * i,
        prompt_tokens=5,
        completion_tokens=i,
        status=200,
        **extra,
    )


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
    log.record(FeedbackEvent(request_id="r7", time=5.0, score=0.5))
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
        sink.write([request(i).to_record() for i in range(start, start + 200)])
    length = redis.Redis.from_url(redis_server.url).xlen("trim:events")
    assert 100 <= length < 400  # MAXLEN ~ trims whole macro nodes
    records = list(sink.read())
    assert len(records) == length and records[-1]["request_id"] == "r1999"
    sink.close()


def test_event_fields_are_the_stored_columns() -> None:
    assert [f.name for f in dataclasses.fields(RequestEvent)] == list(REQUEST_FIELDS)
    assert [f.name for f in dataclasses.fields(FeedbackEvent)] == list(FEEDBACK_FIELDS)
    record = request(3, stream=True, cascade="kept").to_record()
    assert list(record) == ["kind", *REQUEST_FIELDS] and record["kind"] == "request"
    assert record["stream"] is True and record["experiment"] is None
    feedback = FeedbackEvent(request_id="r3", time=2.0, label="thumbs_up").to_record()
    assert feedback == {
        "kind": "feedback",
        "request_id": "r3",
        "time": 2.0,
        "score": None,
        "label": "thumbs_up",
    }


def test_events_read_back_from_records_old_and_new() -> None:
    event = request(4, stream=False, score=0.25, cost=0.5, cascade="escalated")
    assert RequestEvent.from_record(event.to_record()) == event
    assert RequestEvent.from_record(json.loads(json.dumps(event.to_record()))) == event
    # A row written before most columns existed: what it lacks is None; unknown keys ignored.
    old = RequestEvent.from_record({"kind": "request", "request_id": "x", "time": 1, "new": 3})
    assert old == RequestEvent(request_id="x", time=1.0)
    assert old.time == 1.0 and isinstance(old.time, float) and old.answer_p_large is None
    assert RequestEvent.from_record({"request_id": "s", "stream": 1}).stream is True  # SQLite
    with pytest.raises(ValueError, match="request_id"):
        RequestEvent.from_record({"kind": "request", "time": 1.0})
    with pytest.raises(ValueError, match="latency_s"):
        RequestEvent.from_record({"request_id": "x", "latency_s": "slow"})
    feedback = FeedbackEvent(request_id="r1", time=3.0, score=1.0)
    assert event_from_record(feedback.to_record()) == feedback
    assert event_from_record(event.to_record()) == event
    assert event_from_record({"kind": "future", "request_id": "r1"}) is None


@pytest.mark.parametrize("kind", ["sqlite", "jsonl"])
def test_read_events_of_a_sink(kind: str, tmp_path: Path) -> None:
    sink = open_sink(kind, path=tmp_path / f"e.{kind}", redis_url=None, stream="s", max_len=10)
    written = [request(1, stream=True), request(2, score=0.5, percentile=0.9)]
    feedback = FeedbackEvent(request_id="r1", time=2000.0, score=0.5, label="ok")
    sink.write([e.to_record() for e in [*written, feedback]])
    assert list(read_events(sink)) == [*written, feedback]
    sink.close()


def test_events_settings_defaults() -> None:
    from policies.schema import EventsSettings

    assert EventsSettings().path == "events.sqlite"
    assert EventsSettings(sink="jsonl").path == "events.jsonl"
    assert EventsSettings.model_validate({"sink": "jsonl", "path": "x.log"}).path == "x.log"


def label(i: int, **extra: Any) -> LabelEvent:
    fields: dict[str, Any] = {
        "request_id": f"r{i}",
        "time": 2000.0 + i,
        "model": "auto",
        "policy": "default",
        "answered_by": "small",
        "small_backend": "small",
        "large_backend": "large",
        "judge": "judge",
        "source": "judge",
        "large_better": 0.5,
        "verdicts": ("[[A]]", "[[B]]"),
        "calibration": "abc123",
        "score": 0.25,
        "p_large": 0.75,
    }
    return LabelEvent(**{**fields, **extra})


def test_label_fields_are_the_stored_columns_and_read_back() -> None:
    assert [f.name for f in dataclasses.fields(LabelEvent)] == list(LABEL_FIELDS)
    event = label(
        1,
        input=[{"role": "user", "content": "hi"}],
        small_answer="a",
        large_answer="b",
    )
    record = event.to_record()
    assert record["kind"] == "label" and record["verdicts"] == ["[[A]]", "[[B]]"]
    assert LabelEvent.from_record(json.loads(json.dumps(record))) == event
    assert event_from_record(record) == event
    # A row from before a field existed: optional fields read as None, verdicts as ().
    old = LabelEvent.from_record({"kind": "label", "request_id": "x", "time": 1, "large_better": 1})
    assert old == LabelEvent(request_id="x", time=1.0, large_better=1.0)
    assert old.p_large is None and old.verdicts == () and old.source == "judge"
    assert LabelEvent.from_record({**record, "verdicts": '["x"]'}).verdicts == ("x",)
    with pytest.raises(ValueError, match="large_better"):
        LabelEvent.from_record({"request_id": "x", "time": 1.0})
    with pytest.raises(ValueError, match="input"):
        LabelEvent.from_record({**record, "input": 3})


@pytest.mark.parametrize("kind", ["sqlite", "jsonl"])
def test_labels_round_trip_through_the_file_sinks(kind: str, tmp_path: Path) -> None:
    path = tmp_path / f"e.{kind}"
    sink = open_sink(kind, path=path, redis_url=None, stream="s", max_len=10)
    labels = [
        label(1, input="plain prompt", small_answer="4", large_answer="four"),
        label(2, input=[{"role": "user", "content": [{"type": "text", "text": "x"}]}]),
        label(3, source="reference", judge=None, large_better=1.0, verdicts=()),
    ]
    log = EventLog(sink)
    for event in [request(1), *labels, FeedbackEvent(request_id="r1", time=1.0, score=1.0)]:
        assert log.record(event)
    log.close()
    reader = SQLiteSink(path) if kind == "sqlite" else JSONLSink(path)
    got = [e for e in read_events(reader) if isinstance(e, LabelEvent)]
    reader.close()
    assert got == labels
    if kind == "sqlite":  # verdicts and input are JSON text in their columns
        with sqlite3.connect(tmp_path / "e.sqlite") as db:
            row = db.execute(
                "SELECT verdicts, input FROM labels WHERE request_id = 'r1'"
            ).fetchone()
        assert row == ('["[[A]]", "[[B]]"]', '"plain prompt"')


def test_sqlite_deletes_labels_past_their_retention(tmp_path: Path) -> None:
    path = tmp_path / "e.sqlite"
    now = time.time()
    sink = SQLiteSink(path, label_retention_s=3600)
    sink.write([label(1, time=now - 7200).to_record(), label(2, time=now).to_record()])
    # The DELETE runs in the batch's transaction after its inserts: a stale label of this
    # very batch is gone too.
    ids = [e.request_id for e in read_events(sink) if isinstance(e, LabelEvent)]
    assert ids == ["r2"]
    sink.write([label(3, time=now - 7200).to_record()])  # within the minute: no DELETE yet
    ids = [e.request_id for e in read_events(sink) if isinstance(e, LabelEvent)]
    assert ids == ["r2", "r3"]
    sink.close()
    keep = SQLiteSink(path)  # no retention: nothing deleted
    keep.write([label(4, time=0.0).to_record()])
    assert len([e for e in read_events(keep) if isinstance(e, LabelEvent)]) == 3
    keep.close()
