"""SQLite escalation store: the embedded default.

WAL journal, ``synchronous=FULL`` (a committed transition survives a power cut), one connection
per store guarded by a lock and used from worker threads (the event loop never blocks on disk).
Transitions run in ``BEGIN IMMEDIATE`` transactions, so several stores on one file (several
gateway processes) serialize: exactly one of concurrent answers applies.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import anyio.to_thread

from router.escalations.model import (
    Escalation,
    NewEscalation,
    Op,
    StoreConflict,
    StoreMissing,
    decide,
)

__all__ = ["SQLiteEscalationStore"]

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS escalations (
    id TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    data TEXT NOT NULL,
    owner TEXT,
    claimed_by TEXT,
    lease_until REAL,
    answer TEXT,
    answered_by TEXT,
    reason TEXT
);
CREATE INDEX IF NOT EXISTS escalations_status_created ON escalations (status, created);
"""
_COLUMNS = (
    "id, status, created, updated, data, owner, claimed_by, lease_until, answer, answered_by, "
    "reason"
)
_STATUS_OF: dict[Op, str] = {
    "claim": "claimed",
    "answer": "answered",
    "reject": "rejected",
    "expire": "expired",
}


def _record(row: tuple[Any, ...], now: float) -> Escalation:
    names = [c.strip() for c in _COLUMNS.split(",")]
    return Escalation.from_parts(**dict(zip(names, row, strict=True)), now=now)


class SQLiteEscalationStore:
    kind = "sqlite"

    def __init__(self, path: Path, *, busy_timeout_s: float = 10.0) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(
            str(path), timeout=busy_timeout_s, isolation_level=None, check_same_thread=False
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        def locked() -> T:
            with self._lock:
                return fn(self._db)

        return await anyio.to_thread.run_sync(locked)

    async def create(self, new: NewEscalation, now: float) -> Escalation:
        def insert(db: sqlite3.Connection) -> None:
            db.execute(
                "INSERT INTO escalations (id, status, created, updated, data, owner) "
                "VALUES (?, 'pending', ?, ?, ?, ?)",
                (new.id, now, now, new.data_json(), new.owner),
            )

        await self._run(insert)
        found = await self.get(new.id, now)
        assert found is not None
        return found

    async def get(self, id: str, now: float) -> Escalation | None:
        def select(db: sqlite3.Connection) -> tuple[Any, ...] | None:
            row: tuple[Any, ...] | None = db.execute(
                f"SELECT {_COLUMNS} FROM escalations WHERE id = ?", (id,)
            ).fetchone()
            return row

        row = await self._run(select)
        return None if row is None else _record(row, now)

    async def query(
        self, statuses: Iterable[str], now: float, limit: int = 200
    ) -> list[Escalation]:
        wanted = set(statuses)
        stored = set(wanted)
        if "pending" in wanted:
            stored.add("claimed")  # a claim past its lease reads as pending

        def select(db: sqlite3.Connection) -> list[tuple[Any, ...]]:
            marks = ",".join("?" * len(stored))
            return db.execute(
                f"SELECT {_COLUMNS} FROM escalations WHERE status IN ({marks}) "
                "ORDER BY created, id LIMIT ?",
                (*sorted(stored), limit * 2),
            ).fetchall()

        rows = await self._run(select) if stored else []
        out = [r for r in (_record(row, now) for row in rows) if r.status in wanted]
        return out[:limit]

    async def transition(
        self, id: str, op: Op, who: str, text: str, now: float, lease_until: float | None = None
    ) -> Escalation:
        def apply(db: sqlite3.Connection) -> tuple[Any, ...] | StoreConflict | None:
            db.execute("BEGIN IMMEDIATE")
            try:
                row = db.execute(
                    f"SELECT {_COLUMNS} FROM escalations WHERE id = ?", (id,)
                ).fetchone()
                if row is None:
                    db.execute("ROLLBACK")
                    return None
                verdict = decide(_record(row, now), op, who, text)
                if verdict != "apply":
                    db.execute("ROLLBACK")
                    return verdict if isinstance(verdict, StoreConflict) else tuple(row)
                status = _STATUS_OF[op]
                if op == "claim":
                    db.execute(
                        "UPDATE escalations SET status = ?, updated = ?, claimed_by = ?, "
                        "lease_until = ? WHERE id = ?",
                        (status, now, who, lease_until, id),
                    )
                elif op == "answer":
                    db.execute(
                        "UPDATE escalations SET status = ?, updated = ?, answer = ?, "
                        "answered_by = ?, lease_until = NULL WHERE id = ?",
                        (status, now, text, who, id),
                    )
                else:
                    db.execute(
                        "UPDATE escalations SET status = ?, updated = ?, reason = ?, "
                        "answered_by = ?, lease_until = NULL WHERE id = ?",
                        (status, now, text, who or None, id),
                    )
                new_row = db.execute(
                    f"SELECT {_COLUMNS} FROM escalations WHERE id = ?", (id,)
                ).fetchone()
                db.execute("COMMIT")
                return tuple(new_row)
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise

        result = await self._run(apply)
        if result is None:
            raise StoreMissing(id)
        if isinstance(result, StoreConflict):
            raise result
        return _record(result, now)

    async def due_for_expiry(self, before: float, now: float) -> list[str]:
        def select(db: sqlite3.Connection) -> list[str]:
            rows = db.execute(
                "SELECT id FROM escalations WHERE status IN ('pending', 'claimed') "
                "AND created < ? ORDER BY created",
                (before,),
            ).fetchall()
            return [str(r[0]) for r in rows]

        return await self._run(select)

    async def purge(self, before: float, now: float) -> int:
        def delete(db: sqlite3.Connection) -> int:
            with db:
                cursor = db.execute(
                    "DELETE FROM escalations WHERE status IN ('answered', 'rejected', 'expired') "
                    "AND created < ?",
                    (before,),
                )
            return int(cursor.rowcount)

        return await self._run(delete)

    async def count_open(self, now: float) -> int:
        def count(db: sqlite3.Connection) -> int:
            row = db.execute(
                "SELECT COUNT(*) FROM escalations WHERE status IN ('pending', 'claimed')"
            ).fetchone()
            return int(row[0])

        return await self._run(count)

    async def aclose(self) -> None:
        await self._run(lambda db: db.close())
