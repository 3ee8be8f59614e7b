"""MicroBatcher: shared passes, full batches, deadlines, failures confined to their batch; and the
probe service measuring distinct prompts in shared forward passes with the tiny Llama."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any

import anyio
import pytest

from probes.batching import MicroBatcher
from probes.probe import SparsityProbe

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
