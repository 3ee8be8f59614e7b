"""Gateway-side probe throughput and decision latency: micro-batching on vs off, cache hits.

Run::

    flock /tmp/sparsity-cpu.lock .venv/bin/python bench/probe_throughput.py [--requests N]
        [--window-ms W] [--max-batch B] [--markdown bench/results/probe_throughput.md]

One process, one loaded probe (the real bundled SmolLM2-135M-Instruct at the default layer 10),
the embedded default's policy and calibration. A *decision* is what the gateway does before
dispatching: ``ProbeService.measure`` (cache, single flight, worker thread / micro-batcher,
calibration) then ``PolicyEngine.decide``.

- **throughput**: 1, 4, 16 and 64 concurrent clients, each sending distinct prompts back to
  back (no cache), micro-batching off (one forward pass per request, on the probe's dedicated
  worker thread) and on (requests arriving within W ms, up to B, share a pass); requests/s and
  p50/p99 latency per decision, and the on/off throughput ratio. Off and on alternate in
  several rounds per concurrency level, so load from elsewhere on the machine hits both alike.
- **cache hits**: decision latency p50/p99 when the result comes from the memory LRU, and from
  Redis on loopback (a redis-server started here; memory tier off), against the miss latency
  at concurrency 1 measured above.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":
    # bench/signal.py would shadow the standard library's `signal` module: use the repo root.
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse
import asyncio
import itertools
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import torch

from policies.engine import PolicyEngine, RequestContext
from policies.loader import load_settings
from probes.calibration import Calibration
from probes.probe import SparsityProbe
from router.cache import MemoryCache, RedisCache, TieredCache
from router.probing import BatchingConfig, ProbeService

ROOT = Path(__file__).resolve().parents[1]
SUBJECTS = ["the fox", "sixteen eggs", "a train", "the Roman empire", "photosynthesis", "tax law"]
ASKS = [
    "Explain in two sentences what happens to {s} in case {i}.",
    "Write a short poem about {s}, number {i}.",
    "How many minutes does {s} need if the task {i} takes twice as long?",
    "Traduisez en anglais : la question {i} porte sur {s}.",
    "Summarize the key facts about {s} for a ten-year-old (variant {i}).",
]


def prompts(n: int, seed: int) -> list[str]:
    """``n`` distinct prompts of 15 to 40 tokens."""
    combos = itertools.product(range(seed * 100_000, seed * 100_000 + n), SUBJECTS, ASKS)
    out = []
    for i, s, ask in combos:
        out.append(ask.format(s=s, i=i))
        if len(out) == n:
            break
    return out


def pct(xs: Sequence[float], q: float) -> float:
    ordered = sorted(xs)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class Decider:
    def __init__(self, service: ProbeService, engine: PolicyEngine) -> None:
        self.service = service
        self.engine = engine
        self.context = RequestContext(model="auto")

    async def __call__(self, prompt: str) -> float:
        start = time.perf_counter()
        outcome = await self.service.measure(prompt)
        if outcome.error is not None:
            raise RuntimeError(f"probe failed: {outcome.error}")
        self.engine.decide("default", outcome.result, self.context)
        return time.perf_counter() - start


async def closed_loop(
    decide: Callable[[str], Awaitable[float]], items: list[str], concurrency: int
) -> tuple[float, list[float]]:
    """``concurrency`` clients sending ``items`` back to back: (seconds, latencies)."""
    queue = iter(items)
    latencies: list[float] = []

    async def client() -> None:
        for prompt in queue:
            latencies.append(await decide(prompt))

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return time.perf_counter() - start, latencies


def service(probe: SparsityProbe, calibration: Calibration | None, **kwargs: Any) -> ProbeService:
    return ProbeService(probe, calibration=calibration, timeout_s=120, **kwargs)


async def run(args: argparse.Namespace) -> list[str]:
    settings = load_settings(ROOT / "config/default.yaml")
    # the embedded default's probe (config/default.yaml), prefix cache as configured there
    # unless --no-prefix-cache
    probe_settings = settings.probe.probe_settings().model_copy(update={"device": "cpu"})
    if args.no_prefix_cache:
        probe_settings = probe_settings.model_copy(update={"prefix_cache": False})
    probe = SparsityProbe(probe_settings)
    calib_path = settings.calibration_path()
    calibration = (
        Calibration.load(calib_path, expect_fingerprint=probe.fingerprint())
        if calib_path is not None
        else None
    )
    engine = PolicyEngine(settings, n_layers=probe.n_layers)
    batching = BatchingConfig(max_batch=args.max_batch, window_s=args.window_ms / 1000)
    command = " ".join(["bench/probe_throughput.py", *sys.argv[1:]])
    lines = [
        "# Probe throughput and decision latency",
        "",
        f"`{command}`: {platform.machine()}, {os.cpu_count()} CPUs visible, "
        f"torch {torch.__version__}, {torch.get_num_threads()} intra-op threads; "
        f"probe {probe.fingerprint()['model']!s} layers {list(probe.settings.layers)}, "
        f"prefix cache {'on' if probe.settings.prefix_cache else 'off'}; "
        f"batching window {args.window_ms} ms, max batch {args.max_batch}; "
        f"{args.rounds} rounds per mode, off and on alternating.",
        "",
        "## Distinct prompts (no cache)",
        "",
        "| concurrency | batching | requests | req/s | p50 ms | p99 ms | p99/p50 | passes "
        "| on/off req/s |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    warm = service(probe, calibration, cache=None)
    for p in prompts(8, 99):  # load, warm up the kernels and the prefix cache
        await Decider(warm, engine)(p)
    miss_p50 = float("nan")
    fresh = itertools.count(1)
    for concurrency in (1, 4, 16, 64):
        n = max(args.requests, concurrency)
        seconds: dict[str, float] = {"off": 0.0, "on": 0.0}
        latencies: dict[str, list[float]] = {"off": [], "on": []}
        passes: dict[str, int] = {"off": 0, "on": 0}
        for _ in range(args.rounds):  # alternate, so outside load hits both alike
            for mode in ("off", "on"):
                svc = service(
                    probe, calibration, cache=None, batching=batching if mode == "on" else None
                )
                took, lat = await closed_loop(
                    Decider(svc, engine), prompts(n, next(fresh)), concurrency
                )
                await svc.aclose()
                seconds[mode] += took
                latencies[mode] += lat
                passes[mode] += svc.passes
        rates = {mode: len(latencies[mode]) / seconds[mode] for mode in seconds}
        for mode in ("off", "on"):
            lat = latencies[mode]
            p50, p99 = pct(lat, 0.5) * 1000, pct(lat, 0.99) * 1000
            if concurrency == 1 and mode == "off":
                miss_p50 = p50
            ratio = f"**{rates['on'] / rates['off']:.2f}x**" if mode == "on" else ""
            row = (
                f"| {concurrency} | {mode} | {len(lat)} | {rates[mode]:.1f} | {p50:.1f} | "
                f"{p99:.1f} | {p99 / p50:.2f} | {passes[mode]} | {ratio} |"
            )
            lines.append(row)
            print(row, flush=True)

    lines += [
        "",
        "## Cache hits (decision latency, one client)",
        "",
        "| cache | lookups | p50 ms | p99 ms | miss p50 / hit p50 |",
        "|---|---:|---:|---:|---:|",
    ]
    hot = prompts(50, 7)

    async def hits(svc: ProbeService, label: str) -> None:
        decide = Decider(svc, engine)
        for p in hot:  # fill the cache
            await decide(p)
        lat = [await decide(p) for p in hot * (args.hits // len(hot))]
        p50, p99 = statistics.median(lat) * 1000, pct(lat, 0.99) * 1000
        row = f"| {label} | {len(lat)} | {p50:.3f} | {p99:.3f} | {miss_p50 / p50:.0f}x |"
        lines.append(row)
        print(row, flush=True)

    memory = service(probe, calibration, cache=TieredCache(MemoryCache(10_000), None))
    await hits(memory, "memory")
    await memory.aclose()

    from tests.redis_server import RedisServer  # a throwaway redis-server, as in the tests

    with tempfile.TemporaryDirectory() as tmp:
        server = RedisServer(Path(tmp)).start()
        try:
            fp = ProbeService(probe, calibration=None, cache=None, timeout_s=1).fingerprint_digest
            redis_cache = RedisCache(server.url, fingerprint=fp, timeout_s=0.05)
            remote = service(probe, calibration, cache=TieredCache(None, redis_cache))
            await hits(remote, "redis (loopback)")
            await remote.aclose()
        finally:
            server.stop()
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=48, help="per round (at least c)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per concurrency and mode")
    parser.add_argument("--window-ms", type=float, default=5.0)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--hits", type=int, default=2000, help="cache-hit decisions timed")
    parser.add_argument("--markdown", type=Path, help="also write the tables here")
    parser.add_argument(
        "--no-prefix-cache",
        action="store_true",
        help="run the whole chat template per prompt (the embedded default caches its opening)",
    )
    args = parser.parse_args()
    lines = asyncio.run(run(args))
    if args.markdown is not None:
        args.markdown.write_text("\n".join(lines) + "\n")
        print(f"wrote {args.markdown}")


if __name__ == "__main__":
    main()
