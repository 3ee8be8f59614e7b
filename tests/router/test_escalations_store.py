"""The escalation stores against real backends (a SQLite file, a real redis-server): lifecycle,
lease expiry, idempotent answers, concurrent answers from two store instances, expiry, and the
service's sweeper and waiting."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from policies.schema import EscalationSettings
from router.escalations.metrics import EscalationMetrics
from router.escalations.model import NewEscalation, StoreConflict, StoreMissing
from router.escalations.redis_store import RedisEscalationStore
from router.escalations.service import EscalationService
from router.escalations.sqlite_store import SQLiteEscalationStore
from router.escalations.store import EscalationStore
from tests.redis_server import RedisServer

pytestmark = pytest.mark.anyio

T0 = 1_700_000_000.0


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def new(text: str = "hello?", owner: str | None = "ab" * 32) -> NewEscalation:
    return NewEscalation(
        endpoint="chat/completions",
        request={"model": "auto", "messages": [{"role": "user", "content": text}], "user": "u1"},
        probe={"score": 0.91, "percentile": 0.995, "n_tokens": 7},
        rule="review",
        policy="default",
        backend="human",
        mode="ticket",
        owner=owner,
    )


@pytest.fixture(params=["sqlite", "redis"])
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[], EscalationStore]:
    """A factory of store instances sharing one backing store (a file, or one Redis)."""
    if request.param == "sqlite":
        path = tmp_path / "esc.sqlite"
        return lambda: SQLiteEscalationStore(path)
    redis: RedisServer = request.getfixturevalue("redis_server")
    return lambda: RedisEscalationStore(redis.url, prefix="test:esc:")


@pytest.fixture
async def store(make_store: Callable[[], EscalationStore]) -> AsyncIterator[EscalationStore]:
    s = make_store()
    try:
        yield s
    finally:
        await s.aclose()


async def test_lifecycle_claim_answer_and_idempotence(store: EscalationStore) -> None:
    created = await store.create(new("what now?"), T0)
    assert created.status == "pending" and created.created == T0
    assert created.request["messages"][0]["content"] == "what now?"
    assert created.probe == {"score": 0.91, "percentile": 0.995, "n_tokens": 7}
    assert created.owner == "ab" * 32 and created.rule == "review"
    assert [e.id for e in await store.query(["pending"], T0)] == [created.id]
    assert await store.count_open(T0) == 1

    claimed = await store.transition(created.id, "claim", "alice", "", T0 + 1, T0 + 61)
    assert (claimed.status, claimed.claimed_by, claimed.lease_until) == (
        "claimed",
        "alice",
        T0 + 61,
    )
    assert await store.query(["pending"], T0 + 2) == []
    with pytest.raises(StoreConflict, match="claimed by alice"):
        await store.transition(created.id, "claim", "bob", "", T0 + 2, T0 + 62)
    with pytest.raises(StoreConflict, match="claimed by alice"):
        await store.transition(created.id, "answer", "bob", "mine", T0 + 2)

    answered = await store.transition(created.id, "answer", "alice", "Forty-two.", T0 + 3)
    assert (answered.status, answered.answer, answered.answered_by) == (
        "answered",
        "Forty-two.",
        "alice",
    )
    # the same answer again (a retried POST) is the same record, unchanged
    again = await store.transition(created.id, "answer", "alice", "Forty-two.", T0 + 9)
    assert again == answered and again.updated == T0 + 3
    for op, who, text in (
        ("answer", "alice", "other"),
        ("reject", "alice", "no"),
        ("claim", "bob", ""),
    ):
        with pytest.raises(StoreConflict, match="already answered"):
            await store.transition(created.id, op, who, text, T0 + 10, T0 + 70)  # type: ignore[arg-type]
    assert await store.count_open(T0 + 10) == 0
    assert [e.id for e in await store.query(["answered"], T0 + 10)] == [created.id]
    with pytest.raises(StoreMissing):
        await store.transition("esc_nope", "claim", "alice", "", T0, T0 + 1)
    assert await store.get("esc_nope", T0) is None


async def test_reject_is_idempotent_and_final(store: EscalationStore) -> None:
    e = await store.create(new(), T0)
    rejected = await store.transition(e.id, "reject", "bob", "abusive", T0 + 1)
    assert (rejected.status, rejected.reason) == ("rejected", "abusive")
    assert await store.transition(e.id, "reject", "bob", "abusive", T0 + 2) == rejected
    with pytest.raises(StoreConflict):
        await store.transition(e.id, "answer", "bob", "ok then", T0 + 3)


async def test_a_lapsed_lease_frees_the_escalation_for_another_reviewer(
    store: EscalationStore,
) -> None:
    e = await store.create(new(), T0)
    await store.transition(e.id, "claim", "alice", "", T0, T0 + 0.5)
    during = await store.get(e.id, T0 + 0.4)
    assert during is not None and during.status == "claimed"
    after = await store.get(e.id, T0 + 0.6)
    assert after is not None and (after.status, after.claimed_by) == ("pending", None)
    assert [x.id for x in await store.query(["pending"], T0 + 0.6)] == [e.id]
    bob = await store.transition(e.id, "claim", "bob", "", T0 + 0.6, T0 + 60)
    assert bob.claimed_by == "bob"
    with pytest.raises(StoreConflict):
        await store.transition(e.id, "answer", "alice", "late", T0 + 1)
    assert (await store.transition(e.id, "answer", "bob", "done", T0 + 1)).answered_by == "bob"


async def test_concurrent_answers_from_two_instances_exactly_one_wins(
    make_store: Callable[[], EscalationStore],
) -> None:
    stores = [make_store(), make_store()]
    try:
        ids = [(await stores[0].create(new(f"q{i}"), T0 + i)).id for i in range(3)]
        for id in ids:
            now = time.time()

            async def answer(i: int, id: str = id, now: float = now) -> Any:
                try:
                    return await stores[i % 2].transition(id, "answer", f"r{i}", f"a{i}", now)
                except StoreConflict as exc:
                    return exc

            results = await asyncio.gather(*(answer(i) for i in range(20)))
            winners = [r for r in results if not isinstance(r, StoreConflict)]
            assert len(winners) == 1, results
            final = await stores[1].get(id, now)
            assert final is not None and final.status == "answered"
            assert (final.answered_by, final.answer) == (winners[0].answered_by, winners[0].answer)
    finally:
        for s in stores:
            await s.aclose()


async def test_expiry_closes_only_open_escalations_older_than_the_cut(
    store: EscalationStore,
) -> None:
    old = await store.create(new("old"), T0)
    answered = await store.create(new("answered"), T0 + 1)
    fresh = await store.create(new("fresh"), T0 + 100)
    await store.transition(answered.id, "answer", "a", "x", T0 + 2)
    due = await store.due_for_expiry(T0 + 50, T0 + 150)
    assert due == [old.id]
    expired = await store.transition(old.id, "expire", "", "too old", T0 + 150)
    assert (expired.status, expired.reason) == ("expired", "too old")
    with pytest.raises(StoreConflict, match="already expired"):
        await store.transition(old.id, "answer", "a", "late", T0 + 151)
    assert [e.id for e in await store.query(["pending", "claimed"], T0 + 151)] == [fresh.id]
    everything = await store.query(["pending", "answered", "expired"], T0 + 151)
    assert [e.id for e in everything] == [old.id, answered.id, fresh.id]


def service_for(store: EscalationStore, clock: Callable[[], float], **kw: Any) -> EscalationService:
    metrics = EscalationMetrics.create(CollectorRegistry())
    return EscalationService(EscalationSettings(**kw), store, metrics, clock=clock)


def sample(svc: EscalationService, name: str, **labels: str) -> float | None:
    for metric in (svc.metrics.open, svc.metrics.closed):
        for family in metric.collect():
            for s in family.samples:
                if s.name == name and s.labels == labels:
                    return float(s.value)
    return None


async def test_service_sweeper_expires_and_counts(store: EscalationStore) -> None:
    now = [T0]
    svc = service_for(store, lambda: now[0], expire_s=60, lease_s=30)
    a = await svc.create(new("a"))
    now[0] = T0 + 30
    b = await svc.create(new("b"))
    assert sample(svc, "sparsity_router_escalations_pending") == 2
    now[0] = T0 + 61
    assert await svc.sweep() == 1
    got_a, got_b = await svc.get(a.id), await svc.get(b.id)
    assert got_a is not None and got_a.status == "expired"
    assert got_b is not None and got_b.status == "pending"
    assert sample(svc, "sparsity_router_escalations_pending") == 1
    assert sample(svc, "sparsity_router_escalations_closed_total", status="expired") == 1


async def test_closed_escalations_are_deleted_after_retention(store: EscalationStore) -> None:
    now = [T0]
    svc = service_for(store, lambda: now[0], expire_s=7200, retention_s=3600)
    answered = await svc.create(new("answered"))
    await svc.answer(answered.id, "alice", "done")
    open_one = await svc.create(new("still open"))
    await store.transition(open_one.id, "claim", "bob", "", T0 + 1, T0 + 60)
    rejected = await svc.create(new("rejected"))
    await svc.reject(rejected.id, "alice", "spam")
    now[0] = T0 + 1800
    recent = await svc.create(new("recent"))
    await svc.answer(recent.id, "alice", "done too")
    await svc.sweep()
    assert await svc.get(answered.id) is not None  # not old enough yet
    now[0] = T0 + 3601
    await svc.sweep()
    assert await svc.get(answered.id) is None and await svc.get(rejected.id) is None
    kept = await store.query(["pending", "claimed", "answered", "rejected", "expired"], now[0])
    assert {e.id for e in kept} == {open_one.id, recent.id}  # open or recent: kept
    assert await store.purge(now[0], now[0]) == 1  # only the closed one (recent) goes


async def test_service_wait_wakes_on_an_answer_from_another_instance(
    make_store: Callable[[], EscalationStore],
) -> None:
    """A waiter in one 'process' (store instance) sees an answer given through another."""
    waiting = service_for(make_store(), time.time)
    other = service_for(make_store(), time.time)
    await waiting.start()
    try:
        e = await waiting.create(new())
        assert await waiting.wait(e.id, 0.2) is None
        task = asyncio.ensure_future(waiting.wait(e.id, 10))
        await asyncio.sleep(0.1)
        t = time.perf_counter()
        await other.answer(e.id, "carol", "from elsewhere")
        done = await asyncio.wait_for(task, 10)
        assert done is not None and done.answer == "from elsewhere"
        assert time.perf_counter() - t < 5
    finally:
        await waiting.aclose()
        await other.aclose()


async def test_a_short_real_lease_runs_out(store: EscalationStore) -> None:
    svc = service_for(store, time.time, lease_s=0.3)
    e = await svc.create(new())
    await svc.claim(e.id, "alice")
    with pytest.raises(StoreConflict):
        await svc.claim(e.id, "bob")
    await asyncio.sleep(0.4)
    assert (await svc.claim(e.id, "bob")).claimed_by == "bob"
    assert (await svc.answer(e.id, "bob", "ok")).status == "answered"
    assert sample(svc, "sparsity_router_escalations_closed_total", status="answered") == 1
