"""Soak: a fixed rate of mixed streaming / non-streaming requests through the gateway for a while.

The gateway runs as a real ``sparsity-router serve`` subprocess in front of a fake OpenAI upstream
(this process, on a loopback port); the load is open-loop (a request starts every 1/rate s
whatever the previous ones do). Printed: requests and errors, p50/p99 latency per window, the
gateway's RSS at the start (after warm-up) and at the end, and the growth in percent.

    python bench/soak.py                      # 5 minutes at 40 req/s, half streaming
    python bench/soak.py --duration 30 --rate 20
    python bench/soak.py --full --labelling   # labelling off vs on (sample 0.02), same run

With ``--labelling`` two gateways run the ``--full`` path side by side, one with labelling off
and one with ``labelling: {sample: 0.02}`` (shadow calls and a judge on the same fake upstream,
whose judge answers carry a verdict); the load alternates between them in four phases (off, on,
off, on) so that drift on the machine falls on both, and the p50/p99 of each and the ratio
on/off are printed with the labelling counters of /metrics.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":
    # `python bench/soak.py` puts bench/ first on sys.path, where bench/signal.py would shadow
    # the standard library's `signal` module (imported by asyncio): use the repo root.
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse
import asyncio
import json
import os
import socket
import subprocess
import tempfile
import threading
import time
from typing import Any

import httpx
import numpy as np
import psutil
import uvicorn

from bench.proxy_overhead import prompts
from tests.servers import receive_body, serve_lifespan

ROOT = Path(__file__).resolve().parent.parent
GATEWAY = [sys.executable, "-m", "cli.main", "serve"]
PROMPTS = prompts()


async def fake_upstream(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """A minimal OpenAI upstream: a JSON completion, or five SSE chunks then [DONE]."""
    if scope["type"] == "lifespan":
        await serve_lifespan(receive, send)
        return
    body = await receive_body(receive)
    request = json.loads(body or b"{}")
    judged = "[The Start of Assistant" in json.dumps(request.get("messages", ""))
    answer = "Both are fine; A is a little clearer. [[A]]" if judged else "soak answer " * 8
    if not request.get("stream"):
        payload = {
            "id": "cmpl-soak",
            "object": "chat.completion",
            "created": 0,
            "model": request.get("model"),
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": answer},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 8, "completion_tokens": 16, "total_tokens": 24},
        }
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": json.dumps(payload).encode()})
        return
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"text/event-stream")],
        }
    )
    for i in range(5):
        chunk = {
            "id": "cmpl-soak",
            "object": "chat.completion.chunk",
            "created": 0,
            "model": request.get("model"),
            "choices": [{"index": 0, "delta": {"content": f"tok{i} "}, "finish_reason": None}],
        }
        await send(
            {
                "type": "http.response.body",
                "body": b"data: " + json.dumps(chunk).encode() + b"\n\n",
                "more_body": True,
            }
        )
        await asyncio.sleep(0.01)
    await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_upstream() -> tuple[uvicorn.Server, threading.Thread, str]:
    port = free_port()
    config = uvicorn.Config(fake_upstream, host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("the fake upstream did not start")
        time.sleep(0.05)
    return server, thread, f"http://127.0.0.1:{port}/v1"


CONFIG = """
auth:
  keys: [{{key: soak-key, name: soak}}]
  rate_limit: {{requests_per_s: 10000, burst: 10000}}
backends:
  small: {{type: openai, base_urls: ["{url}"], model: small-served}}
  large: {{type: openai, base_urls: ["{url}"], model: large-served, fallback: [small]}}
policies:
  default:
    rules: []
    default: small
    on_probe_error: small
"""


# --full: the whole request path. The bundled probe with the embedded default's calibration and
# prefix cache, micro-batching, the memory probe cache, a share rule, an A/B experiment keyed by
# `user`, and every request recorded to SQLite (checked against the requests sent at the end).
FULL_CONFIG = """
auth:
  keys: [{{key: soak-key, name: soak}}, {{key: soak-metrics, name: metrics, scope: metrics}}]
  rate_limit: {{requests_per_s: 10000, burst: 10000}}
probe: {{prefix_cache: true, timeout_s: 5}}
calibration: {{path: "{calibration}"}}
cache: {{memory: {{max_entries: 10000, ttl_s: 3600}}}}
backends:
  small: {{type: openai, base_urls: ["{url}"], model: small-served}}
  large: {{type: openai, base_urls: ["{url}"], model: large-served, fallback: [small]}}
policies:
  large-30:
    rules: [{{name: sparse, when: {{share: 0.3}}, route: large}}]
    default: small
    on_probe_error: large
  large-10:
    rules: [{{name: sparse, when: {{share: 0.1}}, route: large}}]
    default: small
    on_probe_error: large
virtual_models:
  auto: {{policy: large-30}}
experiments:
  - name: soak-share
    model: auto
    key: user
    control: large-30
    arms:
      - {{name: large-30, policy: large-30, weight: 0.5}}
      - {{name: large-10, policy: large-10, weight: 0.5}}
events: {{sink: sqlite, path: "{events}"}}
"""

# --labelling: the full path plus the gateway labelling 2% of its traffic (the judge is the
# large backend, here the same fake upstream)
LABELLING = """
labelling:
  enabled: true
  sample: 0.02
  small: small
  large: large
  judge: large
  max_shadow_per_s: 5
  queue: 100
  store_text: true
"""


def start_gateway(
    upstream_url: str, workdir: Path, full: bool = False, labelling: bool = False
) -> tuple[subprocess.Popen[bytes], str]:
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "soak.yaml"
    if full:
        config.write_text(
            FULL_CONFIG.format(
                url=upstream_url,
                calibration=ROOT / "config" / "calibration" / "default.json",
                events=workdir / "events.sqlite",
            )
            + (LABELLING if labelling else "")
        )
    else:
        config.write_text(CONFIG.format(url=upstream_url))
    port = free_port()
    log = open(workdir / "gateway.log", "wb")
    proc = subprocess.Popen(
        [*GATEWAY, "--config", str(config), "--port", str(port), "--log-level", "warning"],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                "the gateway exited:\n" + (workdir / "gateway.log").read_text(errors="replace")
            )
        try:
            if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("the gateway did not become ready in 120 s")


async def one_request(client: httpx.AsyncClient, stream: bool, i: int) -> tuple[bool, float]:
    # 64 varied recurring prompts (probe-cache hits once seen); every 10th one is new (a pass)
    text = PROMPTS[i % len(PROMPTS)]
    if i % 10 == 0:
        text = f"{text} (variant {i})"
    body = {
        "model": "auto",
        "messages": [{"role": "user", "content": text}],
        "stream": stream,
        "user": f"user-{i % 97}",
    }
    start = time.perf_counter()
    try:
        if stream:
            async with client.stream("POST", "/v1/chat/completions", json=body) as r:
                text = b"".join([c async for c in r.aiter_bytes()])
                ok = r.status_code == 200 and text.rstrip().endswith(b"data: [DONE]")
                ok = ok and b'"error"' not in text
        else:
            r = await client.post("/v1/chat/completions", json=body)
            ok = r.status_code == 200 and r.json()["choices"][0]["message"]["content"] != ""
    except (httpx.HTTPError, ValueError, KeyError):
        ok = False
    return ok, time.perf_counter() - start


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def load(url: str, rate: float, duration: float, window: float) -> list[dict[str, Any]]:
    windows: list[dict[str, Any]] = []
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=64)
    headers = {"authorization": "Bearer soak-key"}
    timeout = httpx.Timeout(30.0)
    async with httpx.AsyncClient(
        base_url=url, headers=headers, limits=limits, timeout=timeout
    ) as client:
        results: list[tuple[float, bool, float]] = []  # start offset, ok, latency

        async def run(i: int, offset: float) -> None:
            ok, latency = await one_request(client, i % 2 == 0, i)
            results.append((offset, ok, latency))

        t0 = time.perf_counter()
        tasks: set[asyncio.Task[None]] = set()
        i = 0
        while True:
            offset = i / rate
            if offset >= duration:
                break
            delay = t0 + offset - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(run(i, offset))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            i += 1
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=60)
    n_windows = max(1, int(duration // window))
    for w in range(n_windows):
        lo, hi = w * window, (w + 1) * window
        rows = [r for r in results if lo <= r[0] < hi]
        latencies = [r[2] for r in rows]
        windows.append(
            {
                "window": f"{lo:.0f}-{hi:.0f} s",
                "requests": len(rows),
                "errors": sum(1 for r in rows if not r[1]),
                "p50_ms": 1000 * percentile(latencies, 0.5),
                "p99_ms": 1000 * percentile(latencies, 0.99),
            }
        )
    return windows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=300.0, help="seconds (default 300)")
    parser.add_argument("--rate", type=float, default=40.0, help="requests per second")
    parser.add_argument("--window", type=float, default=30.0, help="report window, seconds")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds before RSS at start")
    parser.add_argument(
        "--full",
        action="store_true",
        help="the whole path: probe, calibration, share rules, an A/B experiment, SQLite events",
    )
    parser.add_argument(
        "--labelling",
        action="store_true",
        help="the full path with labelling off vs on (sample 0.02), alternating phases",
    )
    args = parser.parse_args(argv)
    if args.labelling:
        return labelling_ab(args)

    upstream, thread, upstream_url = start_upstream()
    events_summary = ""
    with tempfile.TemporaryDirectory() as tmp:
        proc, url = start_gateway(upstream_url, Path(tmp), full=args.full)
        try:
            gateway = psutil.Process(proc.pid)
            asyncio.run(load(url, args.rate, args.warmup, args.warmup))
            rss_start = gateway.memory_info().rss
            windows = asyncio.run(load(url, args.rate, args.duration, args.window))
            rss_end = gateway.memory_info().rss
        finally:
            stop([proc], upstream, thread)
        if args.full:  # after a clean shutdown every request has its event
            sent = len(range(int(args.warmup * args.rate))) + total_sent(windows)
            events_summary = summarise_events(Path(tmp) / "events.sqlite", sent)

    total = sum(w["requests"] for w in windows)
    errors = sum(w["errors"] for w in windows)
    print(
        f"soak: {args.duration:.0f} s at {args.rate:g} req/s, half streaming, one gateway process"
        + (" (full path: probe, experiment, SQLite events)" if args.full else "")
    )
    print(f"{'window':>12} {'requests':>9} {'errors':>7} {'p50 ms':>8} {'p99 ms':>8}")
    for w in windows:
        print(
            f"{w['window']:>12} {w['requests']:>9} {w['errors']:>7} "
            f"{w['p50_ms']:>8.1f} {w['p99_ms']:>8.1f}"
        )
    growth = 100.0 * (rss_end - rss_start) / rss_start
    print(f"requests {total}, errors {errors} ({100.0 * errors / max(total, 1):.3f} %)")
    print(
        f"gateway RSS: start {rss_start / 2**20:.1f} MiB, end {rss_end / 2**20:.1f} MiB, "
        f"growth {growth:+.2f} % (ratio end/start {rss_end / rss_start:.3f}; target < 10 %)"
    )
    if events_summary:
        print(events_summary)
    return 0 if errors == 0 and "MISSING" not in events_summary else 1


def stop(
    procs: list[subprocess.Popen[bytes]], upstream: uvicorn.Server, thread: threading.Thread
) -> None:
    """Stop the gateway processes (SIGTERM, then SIGKILL after 15 s) and the fake upstream."""
    for proc in procs:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
    upstream.should_exit = True
    thread.join(timeout=10)


def labelling_ab(args: argparse.Namespace) -> int:
    """Labelling off vs on: two full-path gateways, the load alternating between them."""
    upstream, thread, upstream_url = start_upstream()
    latencies: dict[str, list[dict[str, Any]]] = {"off": [], "on": []}
    with tempfile.TemporaryDirectory() as tmp:
        gateways = {
            name: start_gateway(upstream_url, Path(tmp) / name, full=True, labelling=name == "on")
            for name in ("off", "on")
        }
        try:
            for _, url in gateways.values():
                asyncio.run(load(url, args.rate, args.warmup, args.warmup))
            phase = args.duration / 4
            for name in ("off", "on", "off", "on"):
                url = gateways[name][1]
                latencies[name] += asyncio.run(load(url, args.rate, phase, phase))
            metrics = httpx.get(
                gateways["on"][1] + "/metrics",
                headers={"authorization": "Bearer soak-metrics"},
                timeout=5,
            ).text
        finally:
            stop([proc for proc, _ in gateways.values()], upstream, thread)
    print(
        f"soak, labelling off vs on: {args.duration:.0f} s at {args.rate:g} req/s in four "
        "alternating phases (off, on, off, on), full path, half streaming"
    )
    summary = {}
    for name, windows in latencies.items():
        n = sum(w["requests"] for w in windows)
        errors = sum(w["errors"] for w in windows)
        p50 = float(np.mean([w["p50_ms"] for w in windows]))
        p99 = float(np.mean([w["p99_ms"] for w in windows]))
        summary[name] = (n, errors, p50, p99)
        print(
            f"labelling {name:>3}: {n} requests, {errors} errors, "
            f"p50 {p50:.1f} ms, p99 {p99:.1f} ms"
        )
    ratio = summary["on"][2] / summary["off"][2]
    p99_ratio = summary["on"][3] / summary["off"][3]
    print(f"p50 on/off {ratio:.3f} (target <= 1.01), p99 on/off {p99_ratio:.3f}")
    for line in metrics.splitlines():
        if (
            line.startswith(
                ("sparsity_router_shadow", "sparsity_router_judge", "sparsity_router_labels")
            )
            and "_created" not in line
        ):
            print("  " + line)
    return 0 if summary["on"][1] == 0 and summary["off"][1] == 0 else 1


def total_sent(windows: list[dict[str, Any]]) -> int:
    return sum(int(w["requests"]) for w in windows)


def summarise_events(path: Path, sent: int) -> str:
    import sqlite3

    with sqlite3.connect(path) as db:
        total = db.execute("SELECT COUNT(*) FROM requests").fetchone()[0]
        rows = db.execute(
            "SELECT arm, backend, COUNT(*) FROM requests GROUP BY arm, backend "
            "ORDER BY arm, backend"
        ).fetchall()
        cache = db.execute("SELECT cache, COUNT(*) FROM requests GROUP BY cache").fetchall()
    split = ", ".join(f"{arm}/{backend} {n}" for arm, backend, n in rows)
    hits = ", ".join(f"{c} {n}" for c, n in cache)
    lost = "none lost" if total == sent else f"{sent - total} MISSING"
    return (
        f"events recorded {total} of {sent} requests sent, warm-up included ({lost}); "
        f"arm/backend: {split}; probe cache: {hits}"
    )


if __name__ == "__main__":
    raise SystemExit(main())
