"""MicroBatcher: shared passes, full batches, deadlines, failures confined to their batch; and the
probe service measuring distinct prompts in shared forward passes with the tiny Llama."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from functools import partial
from typing import Any

import anyio
import pytest

from probes.batching import MicroBatcher
from probes.probe import ProbeAbandoned, SparsityProbe

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Squares:
    """A batch function that records its batches and the thread it ran on."""

    def __init__(self, delay: float = 0.0, fail_on: int | None = None) -> None:
        self.batches: list[list[int]] = []
        self.threads: set[str] = set()
        self.delay = delay
        self.fail_on = fail_on

    def __call__(self, items: Sequence[int]) -> list[int | BaseException]:
        self.batches.append(list(items))
        self.threads.add(threading.current_thread().name)
        time.sleep(self.delay)
        if self.fail_on is not None and self.fail_on in items:
            raise RuntimeError(f"batch with {self.fail_on} broke")
        return [ValueError("negative") if i < 0 else i * i for i in items]


async def gather(batcher: MicroBatcher[int, int], items: list[int]) -> dict[int, Any]:
    out: dict[int, Any] = {}

    async def one(i: int) -> None:
        try:
            out[i] = await batcher.submit(i)
        except Exception as exc:
            out[i] = exc

    async with anyio.create_task_group() as tg:
        for i in items:
            tg.start_soon(one, i)
    return out


async def test_requests_within_the_window_share_one_call() -> None:
    fn = Squares()
    batcher = MicroBatcher(fn, max_batch=64, window_s=0.05)
    try:
        out = await gather(batcher, list(range(10)))
        assert out == {i: i * i for i in range(10)}
        assert len(fn.batches) == 1 and sorted(fn.batches[0]) == list(range(10))
        assert fn.threads != {threading.current_thread().name}  # a worker thread, not the loop
    finally:
        await batcher.aclose()


async def test_max_batch_starts_a_batch_without_waiting_and_queues_the_rest() -> None:
    fn = Squares(delay=0.05)
    batcher = MicroBatcher(fn, max_batch=4, window_s=10.0)  # the window never runs out here
    try:
        with anyio.fail_after(5):
            out = await gather(batcher, list(range(10)))
        assert out == {i: i * i for i in range(10)}
        assert [len(b) for b in fn.batches] == [4, 4, 2]
        assert batcher.largest == 4
    finally:
        await batcher.aclose()


async def test_a_failing_batch_fails_only_its_own_requests() -> None:
    fn = Squares(delay=0.05, fail_on=3)
    batcher = MicroBatcher(fn, max_batch=4, window_s=0.01)
    try:
        out = await gather(batcher, [0, 1, 2, 3, 4, 5, -1])
        failed = next(b for b in fn.batches if 3 in b)
        for i, value in out.items():
            if i in failed:
                assert isinstance(value, RuntimeError) and "broke" in str(value)
            elif i < 0:
                assert isinstance(value, ValueError)  # an error for one item only
            else:
                assert value == i * i
        assert len(failed) < 7
    finally:
        await batcher.aclose()


async def test_a_caller_past_its_deadline_leaves_and_the_others_get_answers() -> None:
    fn = Squares(delay=0.3)
    batcher = MicroBatcher(fn, max_batch=1, window_s=0.0)
    try:
        running = anyio.Event()

        async def first() -> None:
            running.set()
            assert await batcher.submit(1) == 1

        async with anyio.create_task_group() as tg:
            tg.start_soon(first)
            await running.wait()
            await anyio.sleep(0.01)
            with pytest.raises(TimeoutError), anyio.fail_after(0.05):
                await batcher.submit(2)  # queued behind the first: gives up
            assert await batcher.submit(3) == 9
        assert [2] not in fn.batches  # dropped before its batch started
    finally:
        await batcher.aclose()


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="max_batch"):
        MicroBatcher(Squares(), max_batch=0)
    with pytest.raises(ValueError, match="window_s"):
        MicroBatcher(Squares(), window_s=-1)
    with pytest.raises(ValueError, match="long_cost"):
        MicroBatcher(Squares(), long_cost=0)
    with pytest.raises(ValueError, match="max_batch_cost"):
        MicroBatcher(Squares(), max_batch_cost=0)


async def test_a_request_whose_deadline_passed_in_the_queue_is_not_run() -> None:
    """Its caller still waits (nothing cancelled it): the batcher itself refuses to start it."""
    fn = Squares(delay=0.3)
    batcher = MicroBatcher(fn, max_batch=4, window_s=0.0)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(batcher.submit, 1)
            await anyio.sleep(0.05)  # 1 is running
            with pytest.raises(TimeoutError):
                await batcher.submit(2, deadline=time.monotonic() + 0.05)
            assert await batcher.submit(3, deadline=time.monotonic() + 30) == 9
        assert fn.batches == [[1], [3]] and batcher.expired == 1
        with pytest.raises(TimeoutError):
            await batcher.submit(4, deadline=time.monotonic() - 1)  # already past: not queued
    finally:
        await batcher.aclose()


async def test_cheap_requests_are_not_padded_to_or_queued_behind_costly_ones() -> None:
    """Two lanes: while both wait, batches alternate; a batch holds max_batch_cost at most."""
    fn = Squares(delay=0.2)
    batcher = MicroBatcher(fn, max_batch=8, window_s=0.0, long_cost=100, max_batch_cost=400)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(partial(batcher.submit, 1, cost=300))
            await anyio.sleep(0.05)  # 1 is running; the rest queue
            for i in (2, 3, 4):
                tg.start_soon(partial(batcher.submit, i, cost=300))
                await anyio.sleep(0.01)
            for i in (10, 11, 12):
                tg.start_soon(partial(batcher.submit, i, cost=20))
                await anyio.sleep(0.01)
        # the short ones went next, together, then the long ones one at a time (2 x 300 > 400)
        assert fn.batches == [[1], [10, 11, 12], [2], [3], [4]]
        assert batcher.lane_batches == [1, 4]
    finally:
        await batcher.aclose()


async def test_lanes_take_turns_so_costly_requests_are_not_starved() -> None:
    fn = Squares(delay=0.1)
    batcher = MicroBatcher(fn, max_batch=1, window_s=0.0, long_cost=100)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(partial(batcher.submit, 0, cost=1))
            await anyio.sleep(0.03)
            for i in (1, 2, 3):
                tg.start_soon(partial(batcher.submit, i, cost=1))
                tg.start_soon(partial(batcher.submit, 100 + i, cost=500))
                await anyio.sleep(0.01)
        assert fn.batches == [[0], [101], [1], [102], [2], [103], [3]]
    finally:
        await batcher.aclose()


async def test_max_batch_cost_splits_one_lane() -> None:
    fn = Squares(delay=0.1)
    batcher = MicroBatcher(fn, max_batch=16, window_s=0.05, max_batch_cost=250)
    try:
        out = await gather(batcher, list(range(5)))  # cost 1 each: one batch
        assert out == {i: i * i for i in range(5)} and len(fn.batches) == 1
        fn.batches.clear()
        async with anyio.create_task_group() as tg:
            for i in range(5):
                tg.start_soon(partial(batcher.submit, i, cost=100))
        assert [len(b) for b in fn.batches] == [2, 2, 1]
    finally:
        await batcher.aclose()


def test_measure_encoded_gives_the_numbers_of_measure(tiny_probe: SparsityProbe) -> None:
    texts = ["What is two plus two?", "Janet has 16 eggs and bakes with 4 of them."]
    want = tiny_probe.measure(texts, batch_size=2)
    got = tiny_probe.measure_encoded([tiny_probe.encode(t) for t in texts])
    for g, w in zip(got, want, strict=True):
        assert g.n_tokens == w.n_tokens and g.truncated == w.truncated
        assert g.score == pytest.approx(w.score, rel=1e-4, abs=1e-5)


def test_a_pass_told_to_stop_ends_before_its_next_layer(tiny_probe: SparsityProbe) -> None:
    layers = tiny_probe.loaded.model.model.layers
    ran: list[int] = []
    handles = [
        layer.register_forward_hook(lambda *_a, i=i: ran.append(i))
        for i, layer in enumerate(layers)
    ]
    try:
        asked: list[int] = []

        def stop() -> bool:  # nobody waits any more once two layers have run
            asked.append(len(ran))
            return len(ran) >= 2

        with pytest.raises(ProbeAbandoned):
            tiny_probe.measure_encoded([tiny_probe.encode("hello there")], stop=stop)
        assert ran == [0, 1] and asked[-1] == 2
        with pytest.raises(ProbeAbandoned):  # asked before the pass too
            tiny_probe.measure_encoded([tiny_probe.encode("hello")], stop=lambda: True)
        assert ran == [0, 1]
    finally:
        for handle in handles:
            handle.remove()
    assert tiny_probe.measure_one("hello there").score > 0  # no hook left behind


async def test_the_probe_service_batches_distinct_prompts(tiny_probe: SparsityProbe) -> None:
    from router.probing import BatchingConfig, ProbeService

    prompts = [f"Question {i}: what is {i} plus {i}?" for i in range(12)] + [{"messages": []}]
    expected = tiny_probe.measure(prompts[:-1])
    svc = ProbeService(
        tiny_probe,
        calibration=None,
        cache=None,
        timeout_s=30,
        batching=BatchingConfig(max_batch=16, window_s=0.05),
    )
    outcomes: dict[int, Any] = {}

    async def one(i: int) -> None:
        outcomes[i] = await svc.measure(prompts[i])

    try:
        async with anyio.create_task_group() as tg:
            for i in range(len(prompts)):
                tg.start_soon(one, i)
        assert svc.batcher.batches == 1
        for i, want in enumerate(expected):
            got = outcomes[i].result
            assert got is not None and outcomes[i].cache == "off"
            assert got.n_tokens == want.n_tokens
            assert got.score == pytest.approx(want.score, rel=1e-4, abs=1e-5)
        bad = outcomes[len(prompts) - 1]  # an unreadable input fails alone
        assert bad.result is None and bad.error == "input"
    finally:
        await svc.aclose()
