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
- **short prompts with long ones in flight** (``--only-inflight`` runs just this): L clients
  send distinct long prompts (over ``max_tokens``: 512 tokens probed) back to back while short
  prompts arrive every I ms; the short prompts' probe latency p50/p99 and how many missed the
  probe deadline (2 s, as in config/default.yaml), with the length-aware scheduling
  (``long_tokens``, ``max_batch_tokens``) and without it (one first-come-first-served queue,
  batches padded to their longest input), alternating in rounds. Then one conversation of
  20,000 short messages (about 1 MB) followed by short prompts at +0.3, +2.4 and +4.4 s, with
  the probe's input caps (``max_messages``, ``max_chars``: their defaults) and without them.
  ``--code PATH`` runs these scenarios on the packages of another checkout (e.g. an older
  commit's), with that code's own scheduling: the "before" figure, from the same script.
- **the vLLM probe** (``--vllm`` adds it, ``--only-vllm`` runs just it; bench/_vllm_probe.py):
  the default score on a stock vLLM and the supervised prompt recipe on vLLM with the
  project's plugin, each next to the local probe with the same settings at 1, 4, 16 and 64
  concurrent clients (real vLLM CPU servers started and stopped here), then a paper estimate of
  decisions/s per GPU with its arithmetic.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":
    # bench/signal.py would shadow the standard library's `signal` module: use the repo root,
    # or the checkout that --code names (its packages are the ones measured).
    sys.path[0] = str(
        Path(sys.argv[sys.argv.index("--code") + 1]).resolve()
        if "--code" in sys.argv[:-1]
        else Path(__file__).resolve().parents[1]
    )

import argparse
import asyncio
import dataclasses
import itertools
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any

import torch

from policies.engine import PolicyEngine, RequestContext
from policies.loader import load_settings
from probes.calibration import Calibration
from probes.probe import SparsityProbe
from router.cache import MemoryCache, RedisCache, TieredCache
from router.probing import BatchingConfig, ProbeService

try:
    from probes.types import ProbeSettings
except ImportError:  # an older checkout (--code) has it in probes.probe
    from probes.probe import ProbeSettings  # type: ignore[attr-defined,no-redef]

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


def long_prompts(seed: int) -> Iterator[str]:
    """Endless distinct prompts of ~900 tokens (the probe reads their last 512)."""
    for i in itertools.count(seed * 100_000):
        words = (f"{SUBJECTS[j % len(SUBJECTS)]} fact {i}.{j} is noted" for j in range(150))
        yield f"Document {i}. Read it and summarise: " + "; ".join(words)


def conversation(n: int) -> list[dict[str, str]]:
    """One chat of ``n`` short messages (20,000 of them: about 1 MB of JSON)."""
    roles = ("user", "assistant")
    return [{"role": roles[i % 2], "content": f"message {i}: ok, go on"} for i in range(n)]


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


MakeService = Callable[[str], ProbeService]


async def drain(svc: ProbeService) -> None:
    """Wait until the probe's worker is free (a pass for callers that timed out may still be
    running), so the next service does not share the CPU with it."""
    for i in range(30):
        if (await svc.measure(f"Is the probe free yet ({i})?")).error is None:
            return


async def long_in_flight(
    make: MakeService, modes: Sequence[str], args: argparse.Namespace
) -> dict[str, dict[str, Any]]:
    """Short prompts arriving every ``args.short_interval_ms`` while ``args.long_clients``
    clients keep long prompts in flight; per mode, alternating in rounds: the short prompts'
    latencies and deadline misses, and the long prompts probed."""
    stats: dict[str, dict[str, Any]] = {
        m: {"lat": [], "timeouts": 0, "long_ok": 0, "seconds": 0.0, "passes": 0} for m in modes
    }
    seeds = itertools.count(1)
    for _ in range(args.inflight_rounds):
        for mode in modes:
            svc = make(mode)
            await drain(svc)  # warm: the thread's OpenMP team and the prefix cache
            passes = svc.passes
            await one_round(svc, stats[mode], seeds, args)
            stats[mode]["passes"] += svc.passes - passes
            await drain(svc)
            await svc.aclose()
    return stats


async def one_round(
    svc: ProbeService, stats: dict[str, Any], seeds: Iterator[int], args: argparse.Namespace
) -> None:
    """One round of :func:`long_in_flight` on ``svc``, added to ``stats``."""
    stop = asyncio.Event()

    async def long_client(seed: int) -> None:
        for prompt in long_prompts(seed):
            if stop.is_set():
                return
            if (await svc.measure(prompt)).error is None:
                stats["long_ok"] += 1

    async def short(prompt: str) -> None:
        start = time.perf_counter()
        outcome = await svc.measure(prompt)
        stats["lat"].append(time.perf_counter() - start)
        if outcome.error is not None:
            stats["timeouts"] += 1

    start = time.perf_counter()
    longs = [asyncio.create_task(long_client(next(seeds))) for _ in range(args.long_clients)]
    await asyncio.sleep(0.5)  # long prompts in flight before the first short one
    shorts = []
    for prompt in prompts(args.short_requests, next(seeds)):
        shorts.append(asyncio.create_task(short(prompt)))
        await asyncio.sleep(args.short_interval_ms / 1000)
    await asyncio.gather(*shorts)
    stop.set()
    await asyncio.gather(*longs)
    stats["seconds"] += time.perf_counter() - start


def long_in_flight_rows(stats: dict[str, dict[str, Any]], baseline: str | None) -> list[str]:
    """Table rows for :func:`long_in_flight`; the p99 ratio against ``baseline``."""
    rows = []
    for mode, st in stats.items():
        lat = st["lat"]
        p50, p99 = pct(lat, 0.5) * 1000, pct(lat, 0.99) * 1000
        ratio = ""
        if baseline is not None and mode != baseline and stats[baseline]["lat"]:
            ratio = f"**{pct(stats[baseline]['lat'], 0.99) * 1000 / p99:.2f}x**"
        rows.append(
            f"| {mode} | {len(lat)} | {p50:.0f} | {p99:.0f} | {st['timeouts']} | "
            f"{st['long_ok'] / st['seconds']:.2f} | {st['passes']} | {ratio} |"
        )
    return rows


async def huge_conversation(
    make: MakeService, modes: Sequence[str], args: argparse.Namespace
) -> list[str]:
    """One 20,000-message conversation, then short prompts at +0.3, +2.4 and +4.4 s: table rows
    with each mode's probe times (ms, and the error when there was one)."""
    rows = []
    big = conversation(20_000)
    shorts = list(zip(prompts(3, 5), (0.3, 2.4, 4.4), strict=True))
    for mode in modes:
        svc = make(mode)
        await drain(svc)
        start = time.perf_counter()
        cells = await asyncio.gather(
            timed(svc, big, start), *(timed(svc, p, start + at) for p, at in shorts)
        )
        await drain(svc)
        await svc.aclose()
        rows.append(f"| {mode} | " + " | ".join(cells) + " |")
        print(rows[-1], flush=True)
    return rows


async def timed(svc: ProbeService, item: Any, at: float) -> str:
    """Probe ``item`` at ``time.perf_counter()`` ``at``: its probe time in ms (and error)."""
    await asyncio.sleep(max(0.0, at - time.perf_counter()))
    began = time.perf_counter()
    outcome = await svc.measure(item)
    took = (time.perf_counter() - began) * 1000
    return f"{took:.0f}" + (f" ({outcome.error})" if outcome.error else "")


INFLIGHT_HEADER = [
    "| scheduling | short prompts | short p50 ms | short p99 ms | short deadline misses "
    "| long probed/s | passes | p99 vs one queue |",
    "|---|---:|---:|---:|---:|---:|---:|---:|",
]
HUGE_HEADER = [
    "| probe input caps | 20,000 messages ms | short +0.3 s ms | short +2.4 s ms "
    "| short +4.4 s ms |",
    "|---|---:|---:|---:|---:|",
]


async def inflight_tables(probe: SparsityProbe, args: argparse.Namespace) -> list[str]:
    """Both "long ones in flight" scenarios, new scheduling against the old, in one process;
    code that predates the lanes or the caps (``--code``) runs with what it has."""
    has_lanes = "long_tokens" in {f.name for f in dataclasses.fields(BatchingConfig)}
    has_caps = "max_messages" in ProbeSettings.model_fields

    def make(mode: str) -> ProbeService:
        if not has_lanes:
            return ProbeService(
                probe,
                calibration=None,
                cache=None,
                timeout_s=args.probe_timeout_s,
                batching=BatchingConfig(args.max_batch, args.window_ms / 1000),
            )
        lanes = mode == "lanes"
        batching = BatchingConfig(
            args.max_batch,
            args.window_ms / 1000,
            long_tokens=args.long_tokens if lanes else None,
            max_batch_tokens=args.max_batch_tokens if lanes else None,
        )
        return ProbeService(
            probe, calibration=None, cache=None, timeout_s=args.probe_timeout_s, batching=batching
        )

    uncapped = SparsityProbe(
        probe.settings.model_copy(update={"max_messages": 10**9, "max_chars": 10**12})
        if has_caps
        else probe.settings,
        loaded=probe.loaded,
    )

    def make_capped(mode: str) -> ProbeService:
        return ProbeService(
            probe if mode == "caps (defaults)" else uncapped,
            calibration=None,
            cache=None,
            timeout_s=args.probe_timeout_s,
            batching=BatchingConfig(args.max_batch, args.window_ms / 1000),
        )

    lines = [
        "",
        "## Short prompts with long ones in flight",
        "",
        f"{args.long_clients} clients send distinct long prompts (512 tokens probed) back to "
        f"back; a short prompt (35-60 tokens) arrives every {args.short_interval_ms:.0f} ms, "
        f"{args.short_requests} per round, {args.inflight_rounds} rounds per mode, modes "
        f"alternating; probe deadline {args.probe_timeout_s} s (a miss counts its waiting "
        f"time). "
        + (
            f"lanes: long_tokens {args.long_tokens}, max_batch_tokens {args.max_batch_tokens}; "
            "one queue: both null (the scheduling before them)."
            if has_lanes
            else "The checked-out code's own scheduling."
        ),
        "",
        *INFLIGHT_HEADER,
    ]
    modes = ["one queue", "lanes"] if has_lanes else ["that code's scheduling"]
    stats = await long_in_flight(make, modes, args)
    rows = long_in_flight_rows(stats, "one queue" if has_lanes else None)
    for row in rows:
        print(row, flush=True)
    lines += rows
    lines += [
        "",
        "## One 20,000-message conversation, then short prompts",
        "",
        "Probe time of each request (ms), the conversation sent at 0 s.",
        "",
        *HUGE_HEADER,
    ]
    caps = ["caps (defaults)", "no caps"] if has_caps else ["none (that code)"]
    lines += await huge_conversation(make_capped, caps, args)
    return lines


def heading(title: str, details: str) -> list[str]:
    """A report's title and its line on the command and the machine, then ``details``."""
    command = " ".join(["bench/probe_throughput.py", *sys.argv[1:]])
    return [
        f"# {title}",
        "",
        f"`{command}`: {platform.machine()}, {os.cpu_count()} CPUs visible, "
        f"torch {torch.__version__}, {torch.get_num_threads()} intra-op threads; {details}",
        "",
    ]


async def vllm_section(args: argparse.Namespace) -> list[str]:
    from bench._vllm_probe import vllm_tables

    return await vllm_tables(args, prompts, closed_loop, Decider)


async def run(args: argparse.Namespace) -> list[str]:
    if args.only_vllm:
        details = (
            f"batching window {args.window_ms} ms, max batch {args.max_batch}; {args.rounds} "
            "rounds per concurrency, local and vLLM alternating."
        )
        return heading("Probe throughput: the vLLM probe next to the local one", details) + (
            await vllm_section(args)
        )
    if args.only_inflight:
        # the embedded default's probe: the code's defaults, prefix cache on as in
        # config/default.yaml (not read here, so that --code may name an older checkout)
        probe = SparsityProbe(ProbeSettings(prefix_cache=not args.no_prefix_cache, device="cpu"))
        code = Path(sys.modules[ProbeService.__module__].__file__ or ".").parents[1]
        details = (
            f"code {code}; probe {probe.fingerprint()['model']!s} layers "
            f"{list(probe.settings.layers)}, prefix cache "
            f"{'on' if probe.settings.prefix_cache else 'off'}; batching window "
            f"{args.window_ms} ms, max batch {args.max_batch}."
        )
        return heading("Probe latency with long prompts in flight", details) + (
            await inflight_tables(probe, args)
        )
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
    lines = heading(
        "Probe throughput and decision latency",
        f"probe {probe.fingerprint()['model']!s} layers {list(probe.settings.layers)}, "
        f"prefix cache {'on' if probe.settings.prefix_cache else 'off'}; "
        f"batching window {args.window_ms} ms, max batch {args.max_batch}; "
        f"{args.rounds} rounds per mode, off and on alternating.",
    )
    lines += [
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
    lines += await inflight_tables(probe, args)
    if args.vllm:
        lines += ["", *await vllm_section(args)]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=48, help="per round (at least c)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per concurrency and mode")
    parser.add_argument("--window-ms", type=float, default=5.0)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--hits", type=int, default=2000, help="cache-hit decisions timed")
    parser.add_argument(
        "--only-inflight", action="store_true", help="only the long-ones-in-flight scenarios"
    )
    parser.add_argument("--long-clients", type=int, default=3, help="long prompts in flight")
    parser.add_argument("--short-requests", type=int, default=60, help="per round and mode")
    parser.add_argument("--short-interval-ms", type=float, default=150.0)
    parser.add_argument("--inflight-rounds", type=int, default=2)
    parser.add_argument("--probe-timeout-s", type=float, default=2.0)
    parser.add_argument("--long-tokens", type=int, default=128)
    parser.add_argument("--max-batch-tokens", type=int, default=512)
    parser.add_argument(
        "--code",
        type=Path,
        help="measure the packages of this checkout instead (implies --only-inflight): the "
        "before figure against older code",
    )
    parser.add_argument("--markdown", type=Path, help="also write the tables here")
    parser.add_argument("--vllm", action="store_true", help="add the vLLM probe's tables")
    parser.add_argument("--only-vllm", action="store_true", help="only the vLLM probe's tables")
    parser.add_argument(
        "--no-prefix-cache",
        action="store_true",
        help="run the whole chat template per prompt (the embedded default caches its opening)",
    )
    args = parser.parse_args()
    args.only_inflight = args.only_inflight or args.code is not None
    lines = asyncio.run(run(args))
    if args.markdown is not None:
        args.markdown.write_text("\n".join(lines) + "\n")
        print(f"wrote {args.markdown}")


if __name__ == "__main__":
    main()
