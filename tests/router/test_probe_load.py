"""The probe path under load: requests that waited for an identical request's probe say so
(``shared``), a huge conversation costs a bounded probe, a pass nobody waits for stops, and a
short prompt is not batched with or queued behind long ones. Clients are the official openai
SDK against the gateway on a real port (tiny probe, fake upstreams)."""

from __future__ import annotations

import asyncio
import dataclasses
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import openai
import pytest

from policies.loader import parse_settings
from probes.probe import SparsityProbe
from router.app import create_app
from router.probing import BatchingConfig, ProbeService
from router.state import build_state
from tests.probes.test_encoding import SpyTokenizer, conversation
from tests.router.conftest import REFERENCE, SPARSE_POLICY, closed_port_url, probe_yaml
from tests.servers import FakeUpstream, ServerPool, ServerThread

Upstreams = dict[str, tuple[FakeUpstream, ServerThread]]


def config(
    tiny_model_dir: Path, calibration: Path, small: str, large: str, *, batching: str = "{}"
) -> str:
    return f"""
server: {{max_body_bytes: 4000000}}
auth: {{api_keys: []}}
{probe_yaml(tiny_model_dir, calibration, f"batching: {batching}")}
cache: {{memory: {{max_entries: 1000}}}}
backends:
  small: {{type: openai, base_urls: ["{small}"], model: small-served}}
  large: {{type: openai, base_urls: ["{large}"], model: large-served}}
{SPARSE_POLICY}
"""


@pytest.fixture
def gateway(
    tiny_model_dir: Path, tiny_calibration: Path, upstreams: Upstreams, tmp_path: Path
) -> Iterator[Callable[..., ServerThread]]:
    """Start gateways (``probe=`` one, ``batching=`` YAML); each is stopped after the test."""
    with ServerPool() as pool:

        def start(probe: SparsityProbe, batching: str = "{}") -> ServerThread:
            small, large = (upstreams[name][1].url + "/v1" for name in ("small", "large"))
            text = config(tiny_model_dir, tiny_calibration, small, large, batching=batching)
            settings = parse_settings(text, source_name="gateway.yaml", base_dir=tmp_path)
            return pool.start(ServerThread(create_app(settings, probe=probe)))

        yield start


def metric(text: str, name: str, label: str) -> float:
    found = re.search(rf"^{name}\{{[^}}]*\"{label}\"[^}}]*\}} (\S+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


# -- item 7: coalesced requests -------------------------------------------------------------


def test_requests_that_waited_for_an_identical_probe_say_shared(
    gateway: Callable[..., ServerThread], tiny_probe: SparsityProbe
) -> None:
    # a long batching window keeps the first request's probe open while the others arrive
    gw = gateway(tiny_probe, batching="{window_ms: 300}")

    async def ask_50() -> list[str]:
        client = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0, timeout=30)
        try:
            raws = await asyncio.gather(
                *(
                    client.chat.completions.with_raw_response.create(
                        model="auto",
                        messages=[{"role": "user", "content": "Fifty of us ask this at once."}],
                    )
                    for _ in range(50)
                )
            )
        finally:
            await client.close()
        return [raw.headers["x-router-cache"] for raw in raws]

    states = asyncio.run(ask_50())
    # one request probed (miss); those that waited for it are shared, later ones hits
    assert states.count("miss") == 1
    assert states.count("shared") >= 1
    assert states.count("shared") + states.count("hit") == 49
    text = httpx.get(gw.url + "/metrics", timeout=10).text
    for state in ("miss", "shared", "hit"):
        assert metric(text, "sparsity_router_probe_cache_total", state) == states.count(state), (
            state
        )
        assert metric(text, "sparsity_router_probe_seconds_count", state) == states.count(state), (
            state
        )


# -- item 8: bounded probe cost, deadlines, short prompts among long ones -------------------


def test_a_20000_message_conversation_costs_a_bounded_probe(
    gateway: Callable[..., ServerThread], tiny_probe: SparsityProbe
) -> None:
    """The template and the tokenizer see the conversation's last max_messages messages (the
    default: max_tokens); the request and the short prompts after it are routed by the probe."""
    spy = SpyTokenizer(tiny_probe.loaded.tokenizer)
    probe = SparsityProbe(
        tiny_probe.settings, loaded=dataclasses.replace(tiny_probe.loaded, tokenizer=spy)
    )
    gw = gateway(probe)
    big = conversation(20_000)

    async def run() -> list[httpx.Headers]:
        client = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0, timeout=60)

        async def ask(messages: Any, after: float) -> httpx.Headers:
            await asyncio.sleep(after)
            raw = await client.chat.completions.with_raw_response.create(
                model="auto", messages=messages
            )
            return raw.headers

        try:
            return await asyncio.gather(
                ask(big, 0.0),
                *(ask([{"role": "user", "content": REFERENCE[i]}], 0.1 * i) for i in range(1, 4)),
            )
        finally:
            await client.close()

    for headers in asyncio.run(run()):
        assert "x-router-probe-error" not in headers
        assert headers["x-router-rule"] in ("sparse", "default")
    assert max(spy.templated) <= tiny_probe.settings.max_tokens  # not 20,000
    assert max(spy.tokenised) <= 64 * tiny_probe.settings.max_tokens + 64 * 512


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class SlowLayers:
    """Every decoder layer of the tiny model takes ``seconds`` longer; records the batch shape
    (rows, width) each pass enters its first layer with, and how many layers ran."""

    def __init__(self, probe: SparsityProbe, seconds: float) -> None:
        self.seconds = seconds
        self.shapes: list[tuple[int, int]] = []
        self.layers_run = 0
        layers = probe.loaded.model.model.layers
        self.handles = [
            layer.register_forward_hook(self._hook(first=i == 0)) for i, layer in enumerate(layers)
        ]

    def _hook(self, *, first: bool) -> Callable[..., None]:
        def hook(_module: Any, args: Any, _output: Any) -> None:
            if first:
                self.shapes.append(tuple(args[0].shape[:2]))
            self.layers_run += 1
            time.sleep(self.seconds)

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


async def wait_until(predicate: Callable[[], bool]) -> None:
    """Poll ``predicate`` (set from the probe's thread) for up to 20 s."""
    for _ in range(2000):
        if predicate():
            return
        await anyio.sleep(0.01)
    raise AssertionError("still waiting after 20 s")


@pytest.mark.anyio
async def test_a_pass_stops_once_every_caller_has_timed_out(tiny_probe: SparsityProbe) -> None:
    """The probe does not keep working past its deadline: the pass ends at its next layer."""
    n_layers = len(tiny_probe.loaded.model.model.layers)
    slow = SlowLayers(tiny_probe, 0.25)  # a pass takes over a second; the deadline is 0.3 s
    svc = ProbeService(tiny_probe, calibration=None, cache=None, timeout_s=0.3)
    try:
        outcome = await svc.measure("Nobody will wait for this one.")
        assert outcome.error == "timeout"

        # the pass ends by itself: at most the layers that started before the deadline ran
        def settled() -> bool:  # stopped, never started (expired in the queue), or done
            stopped = getattr(svc, "abandoned", 0) + getattr(svc.batcher, "expired", 0)
            return stopped == 1 or slow.layers_run == n_layers

        await wait_until(settled)
        assert slow.layers_run < n_layers
    finally:
        slow.remove()
        await svc.aclose()


@pytest.mark.anyio
async def test_a_short_prompt_is_not_batched_with_or_queued_behind_long_ones(
    tiny_probe: SparsityProbe,
) -> None:
    slow = SlowLayers(tiny_probe, 0.1)
    svc = ProbeService(
        tiny_probe,
        calibration=None,
        cache=None,
        timeout_s=60,
        # the default lanes: over 128 tokens is long, 512 padded tokens per pass at most
        batching=BatchingConfig(max_batch=16, window_s=0.0),
    )
    long_text = "The quick brown fox jumps over the lazy dog; " * 12  # ~150 tokens
    outcomes: dict[str, Any] = {}

    async def measure(name: str, item: str) -> None:
        outcomes[name] = await svc.measure(item)

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(measure, "A", "first " + long_text)
            await wait_until(lambda: len(slow.shapes) == 1)  # A's pass is running
            tg.start_soon(measure, "B", "second " + long_text)
            tg.start_soon(measure, "C", "third " + long_text)
            await anyio.sleep(0.05)
            tg.start_soon(measure, "S", "What is two plus two?")
        assert all(o.error is None for o in outcomes.values())
        short_width = len(tiny_probe.encode("What is two plus two?")[0])
        # A alone; then the short prompt alone (not padded to the long ones, not after them);
        # then B and C together (2 x ~150 tokens fit max_batch_tokens)
        assert slow.shapes[:2] == [(1, outcomes["A"].result.n_tokens), (1, short_width)]
        assert len(slow.shapes) == 3 and slow.shapes[2][0] == 2 and slow.shapes[2][1] > 128
        assert svc.batcher.lane_batches == [1, 2]
    finally:
        slow.remove()
        await svc.aclose()


@pytest.mark.anyio
async def test_the_scheduling_keys_reach_the_probe_service(
    tiny_probe: SparsityProbe, tiny_model_dir: Path, tiny_calibration: Path
) -> None:
    url = closed_port_url()
    for batching, want in [
        ("{}", (16, 128, 512)),
        ("{long_tokens: 200, max_batch_tokens: 4000}", (16, 200, 4000)),
        ("{enabled: false, long_tokens: null, max_batch_tokens: null}", (1, None, None)),
    ]:
        text = config(tiny_model_dir, tiny_calibration, url, url, batching=batching)
        state = build_state(parse_settings(text, source_name="c.yaml"), probe=tiny_probe)
        try:
            assert state.probe is not None
            batcher = state.probe.batcher
            assert (batcher.max_batch, batcher.long_cost, batcher.max_batch_cost) == want
        finally:
            await state.aclose()
