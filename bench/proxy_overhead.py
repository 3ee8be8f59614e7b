"""What does the gateway add on top of the upstream? Latency and throughput vs LiteLLM's proxy.

Run::

    .venv/bin/python bench/proxy_overhead.py [--requests N] [--litellm] [--out FILE]

One fast fake OpenAI upstream (raw ASGI on uvicorn: a fixed ``chat.completion`` JSON, or 20 SSE
chunks when ``stream`` is true) listens on a loopback port. The same requests go

- **direct** to the upstream,
- through **sparsity-router** (``model: "auto"``: the real bundled SmolLM2 probe, a calibration
  fitted on 64 prompts at start-up, a share rule of the policy engine choosing between two
  backends on that upstream; every benchmark prompt is sent once before timing so the probe
  result comes from the cache, and every timed answer must say ``x-router-cache: hit``),
- through sparsity-router with a **direct model name** (no probe, no policy: the bare proxy path),
- with ``--litellm``, through **LiteLLM's proxy** (``litellm[proxy]`` in its own cached venv made
  by ``bench/litellm_venv.sh``, one worker, a ``model_list`` entry ``openai/<name>`` pointing at
  the upstream, ``LITELLM_MASTER_KEY`` set and sent).

Each server runs in its own process (uvicorn, uvloop and httptools where installed, access log
off), started with a deadline and stopped in a ``finally`` (SIGTERM included). The load
generator is this process on uvloop: 1 and 32 closed-loop clients, each its own
``httpx.AsyncClient`` with one keep-alive connection, non-streaming (latency of the whole answer)
and streaming (time to the first body byte, the first SSE event; the rest of the stream is read
too). Targets alternate in rounds so drift hits all alike. The "added" latency is
p50(via the proxy) - p50(direct) measured in the same run. Each server's own CPU time per request
(/proc, user + system) is reported too: it is far less disturbed by other load than latency.

Caveat: client, proxy and upstream share one machine (``os.cpu_count()`` cores, 2 where this was
written), so at 32 clients the figures are CPU-bound for all three processes together: req/s is
the throughput of the whole system, and the ratios between proxies are the meaningful part.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":
    # `python bench/proxy_overhead.py` puts bench/ first on sys.path, where bench/signal.py would
    # shadow the standard library's `signal` module (imported by asyncio): use the repo root.
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse
import asyncio
import contextlib
import dataclasses
import itertools
import json
import os
import platform
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, MutableMapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TextIO

import httpx

from tests.servers import serve_lifespan

REPO = Path(__file__).resolve().parents[1]
LITELLM_VENV = Path.home() / ".cache" / "sparsity-router" / "venv-litellm"
UPSTREAM_MODEL = "fake-llm"
STREAM_CHUNKS = 20
CONCURRENCIES = (1, 32)
ROUNDS = 4
START_TIMEOUT_S = 120.0
LITELLM_START_TIMEOUT_S = 180.0
INSTALL_TIMEOUT_S = 900.0
REQUEST_TIMEOUT_S = 30.0

# Targets (sparsity-router against direct and against LiteLLM, same run).
TARGET_ADDED_MS = 1.0
TARGET_ADDED_VS_LITELLM = 0.25
TARGET_RPS_VS_LITELLM = 2.0
TARGET_TTFB_ADDED_MS = 2.0

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

_SUBJECTS = (
    "the French Revolution",
    "photosynthesis",
    "a binary search tree",
    "compound interest",
    "the Krebs cycle",
    "TCP congestion control",
    "the Pythagorean theorem",
    "plate tectonics",
)
_TASKS = (
    "Explain {s} in one paragraph.",
    "Write three quiz questions about {s}.",
    "What is the most common misconception about {s}?",
    "Summarise {s} for a ten-year-old, in two sentences.",
    "Give me a step-by-step worked example involving {s}, then check the answer carefully.",
    "qz vx wp {s} kk tt zz ??",
    "Traduis en anglais : « Je voudrais comprendre {s} avant demain matin. »",
    "Janet has 16 eggs and reads about {s} every day. She gives away 3 eggs per hour of reading "
    "and reads for 2 hours. How many eggs are left at the end of the day? Show your reasoning.",
)


def prompts() -> list[str]:
    """64 varied prompts (8 tasks x 8 subjects): the calibration set and the benchmark set."""
    return [task.format(s=subject) for task in _TASKS for subject in _SUBJECTS]


# -- the fake upstream -------------------------------------------------------------------------
def _completion_json() -> bytes:
    return json.dumps(
        {
            "id": "chatcmpl-bench",
            "object": "chat.completion",
            "created": 1_700_000_000,
            "model": UPSTREAM_MODEL,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "A short fixed answer."},
                    "finish_reason": "stop",
                    "logprobs": None,
                }
            ],
            "usage": {"prompt_tokens": 20, "completion_tokens": 5, "total_tokens": 25},
        }
    ).encode()


def _stream_events() -> list[bytes]:
    def chunk(delta: dict[str, str], finish: str | None) -> bytes:
        payload = {
            "id": "chatcmpl-bench",
            "object": "chat.completion.chunk",
            "created": 1_700_000_000,
            "model": UPSTREAM_MODEL,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
        }
        return b"data: " + json.dumps(payload).encode() + b"\n\n"

    events = [chunk({"role": "assistant", "content": ""}, None)]
    events += [chunk({"content": f"tok{i} "}, None) for i in range(1, STREAM_CHUNKS - 1)]
    events.append(chunk({}, "stop"))
    events.append(b"data: [DONE]\n\n")
    return events


def upstream_app() -> Callable[[Scope, Receive, Send], Awaitable[None]]:
    """A raw ASGI fake of an OpenAI server: fixed answers, no validation beyond ``stream``."""
    completion = _completion_json()
    events = _stream_events()
    models = json.dumps(
        {"object": "list", "data": [{"id": UPSTREAM_MODEL, "object": "model", "owned_by": "x"}]}
    ).encode()
    json_headers = [(b"content-type", b"application/json")]
    sse_headers = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await serve_lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        chunks: list[bytes] = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        if scope["method"] == "GET":
            body = models if scope["path"].endswith("/models") else b"{}"
            await send({"type": "http.response.start", "status": 200, "headers": json_headers})
            await send({"type": "http.response.body", "body": body})
            return
        request = json.loads(b"".join(chunks) or b"{}")
        if request.get("stream") is True:
            await send({"type": "http.response.start", "status": 200, "headers": sse_headers})
            for event in events:
                await send({"type": "http.response.body", "body": event, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        else:
            await send({"type": "http.response.start", "status": 200, "headers": json_headers})
            await send({"type": "http.response.body", "body": completion})

    return app


def serve_upstream(port: int) -> None:
    import uvicorn

    uvicorn.run(
        upstream_app(),
        host="127.0.0.1",
        port=port,
        log_level="warning",
        access_log=False,
        lifespan="on",
    )


# -- the gateway under test --------------------------------------------------------------------
def gateway_yaml(
    port: int, upstream: str, key: str, calibration: Path, events: str | None = None
) -> str:
    backend = (
        '{{type: openai, base_urls: ["{url}/v1"], model: {model}, max_connections: 256, '
        "timeouts: {{connect_s: 5, read_s: 30, total_s: 60}}}}"
    )
    return f"""
server: {{host: 127.0.0.1, port: {port}}}
auth: {{api_keys: ["{key}"]}}
probe: {{timeout_s: 30}}
calibration: {{path: "{calibration}"}}
cache: {{memory: {{max_entries: 10000, ttl_s: 86400}}}}
backends:
  small: {backend.format(url=upstream, model=UPSTREAM_MODEL)}
  large: {backend.format(url=upstream, model=UPSTREAM_MODEL)}
virtual_models:
  auto: {{policy: default}}
policies:
  default:
    rules:
      - {{name: sparse, when: {{share: 0.3}}, route: large}}
    default: small
    on_probe_error: large
""" + (f"events: {{sink: {events}, path: events.{events}}}\n" if events else "")


def serve_gateway(
    port: int,
    upstream: str,
    key: str,
    workdir: Path,
    events: str | None = None,
    *,
    freeze_gc: bool = True,
) -> None:
    """Load the real default probe, fit a calibration on ``prompts()``, serve the gateway.

    uvicorn and ``create_app`` options as in ``sparsity-router serve`` (router/serve.py:
    run_server), ``freeze_gc`` included unless ``--no-freeze-gc``.
    """
    import uvicorn

    from policies.loader import parse_settings
    from probes.calibration import Calibration
    from probes.probe import SparsityProbe
    from probes.types import ProbeSettings
    from router.app import create_app

    probe = SparsityProbe(ProbeSettings())
    results = probe.measure(prompts())
    calibration = Calibration.fit(results, probe.fingerprint(), min_per_bucket=20)
    path = calibration.save(workdir / "calibration.json")
    text = gateway_yaml(port, upstream, key, path, events)
    settings = parse_settings(text, source_name="proxy_overhead.yaml", base_dir=workdir)
    uvicorn.run(
        create_app(settings, probe=probe, freeze_gc=freeze_gc),
        host="127.0.0.1",
        port=port,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=5,
    )


# -- LiteLLM -----------------------------------------------------------------------------------
def litellm_config(upstream: str) -> str:
    return f"""
model_list:
  - model_name: {UPSTREAM_MODEL}
    litellm_params:
      model: openai/{UPSTREAM_MODEL}
      api_base: {upstream}/v1
      api_key: sk-upstream-unused
litellm_settings:
  set_verbose: false
  telemetry: false
  drop_params: true
"""


def ensure_litellm(venv: Path) -> tuple[Path | None, str]:
    """The `litellm` executable (installing it with bench/litellm_venv.sh once), or why not."""
    exe = venv / "bin" / "litellm"
    if not (venv / ".installed").is_file():
        print(f"installing litellm[proxy] into {venv} (once) ...", flush=True)
        try:
            subprocess.run(
                ["bash", str(REPO / "bench" / "litellm_venv.sh"), str(venv)],
                check=True,
                timeout=INSTALL_TIMEOUT_S,
                stdout=subprocess.DEVNULL,
            )
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
            return None, f"bench/litellm_venv.sh failed: {exc}"
    if not exe.is_file():
        return None, f"{exe} is missing after the install"
    return exe, ""


def litellm_version(venv: Path) -> str:
    try:
        out = subprocess.run(
            [
                str(venv / "bin" / "python"),
                "-c",
                "import importlib.metadata as m; print(m.version('litellm'))",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
    except (subprocess.SubprocessError, OSError):
        return "?"
    return out.stdout.strip() or "?"


# -- processes ---------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    """A server in its own process group, ready once ``health`` answers 200."""

    name: str
    argv: list[str]
    port: int
    health: str
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None
    _log: TextIO | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float) -> Server:
        self._log = self.log_path.open("w")
        self.process = subprocess.Popen(
            self.argv,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **self.env},
            cwd=REPO,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.process.returncode} during start-up:\n"
                    + self.log_tail()
                )
            try:
                if httpx.get(self.url + self.health, timeout=2.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{self.name} did not become healthy within {timeout:.0f} s:\n"
                    + self.log_tail()
                )
            time.sleep(0.2)

    def log_tail(self, lines: int = 25) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM to the server's own process group, SIGKILL after ``timeout``."""
        process = self.process
        if process is not None and process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout)
        if self._log is not None:
            self._log.close()
            self._log = None


# -- load generation ---------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Target:
    name: str
    url: str  # .../v1/chat/completions
    model: str
    key: str
    router: bool  # check x-router-* headers
    probed: bool  # expect x-router-cache: hit
    pid: int | None = None  # the proxy's (or upstream's) process, for its CPU time


@dataclass
class Cell:
    latencies: list[float] = field(default_factory=list)  # seconds
    seconds: float = 0.0  # wall time of the timed batches
    requests: int = 0
    server_cpu: float = 0.0  # CPU seconds of the target's server process in the timed batches
    client_cpu: float = 0.0  # CPU seconds of this process (the load generator)
    problems: list[str] = field(default_factory=list)

    def p(self, q: float) -> float:
        return percentile(self.latencies, q) * 1000.0

    @property
    def server_us(self) -> float:
        """Server CPU microseconds per request (user + system)."""
        return self.server_cpu / self.requests * 1e6 if self.requests else float("nan")

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


def process_cpu(pid: int | None) -> float:
    """User + system CPU seconds of process ``pid`` and its threads (Linux /proc), or 0."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def load_average() -> str:
    try:
        return "/".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile, ``q`` in [0, 100]."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def payloads(model: str, texts: Sequence[str], stream: bool) -> list[bytes]:
    return [
        json.dumps(
            {
                "model": model,
                "messages": [{"role": "user", "content": text}],
                "stream": stream,
                "max_tokens": 32,
            }
        ).encode()
        for text in texts
    ]


def _check(target: Target, response: httpx.Response, tail: bytes, stream: bool) -> str | None:
    if response.status_code != 200:
        return f"{target.name}: HTTP {response.status_code}: {tail[-300:]!r}"
    if stream and b"[DONE]" not in tail:
        return f"{target.name}: stream did not end with [DONE]: {tail[-200:]!r}"
    if target.router:
        if "x-router-backend" not in response.headers:
            return f"{target.name}: no x-router-backend header"
        cache = response.headers.get("x-router-cache")
        if target.probed and cache != "hit":
            return f"{target.name}: x-router-cache is {cache!r}, not 'hit'"
    return None


async def one_request(
    client: httpx.AsyncClient, target: Target, body: bytes, stream: bool
) -> tuple[float, str | None]:
    """Seconds to the whole answer (non-streaming) or to the first body byte (streaming)."""
    headers = {"authorization": f"Bearer {target.key}", "content-type": "application/json"}
    start = time.perf_counter()
    if not stream:
        response = await client.post(target.url, content=body, headers=headers)
        elapsed = time.perf_counter() - start
        return elapsed, _check(target, response, response.content, stream)
    first: float | None = None
    last = b""
    async with client.stream("POST", target.url, content=body, headers=headers) as response:
        async for chunk in response.aiter_raw():
            if first is None and chunk:
                first = time.perf_counter()
            if chunk:
                last = (last + chunk)[-400:]
    elapsed = (first if first is not None else time.perf_counter()) - start
    return elapsed, _check(target, response, last, stream)


async def run_batch(
    clients: Sequence[httpx.AsyncClient],
    target: Target,
    bodies: Sequence[bytes],
    n: int,
    concurrency: int,
    stream: bool,
    cell: Cell | None,
) -> None:
    """``n`` requests from ``concurrency`` closed-loop clients; recorded into ``cell``.

    Each client has its own ``httpx.AsyncClient`` (one keep-alive connection): one shared pool
    of 32 connections costs httpcore more CPU per request than the servers under test spend.
    """
    counter = itertools.count()
    latencies: list[float] = []
    problems: list[str] = []

    async def worker(client: httpx.AsyncClient) -> None:
        while (i := next(counter)) < n:
            elapsed, problem = await one_request(client, target, bodies[i % len(bodies)], stream)
            latencies.append(elapsed)
            if problem is not None:
                problems.append(problem)

    server_cpu, client_cpu = process_cpu(target.pid), time.process_time()
    start = time.perf_counter()
    await asyncio.gather(*(worker(clients[j]) for j in range(concurrency)))
    seconds = time.perf_counter() - start
    if cell is not None:
        cell.latencies += latencies
        cell.seconds += seconds
        cell.requests += n
        cell.server_cpu += process_cpu(target.pid) - server_cpu
        cell.client_cpu += time.process_time() - client_cpu
        cell.problems += problems[:3]
    elif problems:
        raise RuntimeError(f"warm-up failed: {problems[0]}")


Results = dict[tuple[bool, int, str], Cell]  # (stream, concurrency, target name) -> cell


async def measure(targets: Sequence[Target], texts: Sequence[str], n: int) -> Results:
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    timeout = httpx.Timeout(REQUEST_TIMEOUT_S)
    clients = {
        t.name: [
            httpx.AsyncClient(limits=limits, timeout=timeout) for _ in range(max(CONCURRENCIES))
        ]
        for t in targets
    }
    bodies = {(t.name, s): payloads(t.model, texts, s) for t in targets for s in (False, True)}
    results: Results = {}
    try:
        # Warm-up: every prompt once per target (fills the probe cache: misses allowed), then
        # open the connections.
        for t in targets:
            for stream in (False, True):
                first = dataclasses.replace(t, probed=False) if not stream else t
                await run_batch(
                    clients[t.name], first, bodies[t.name, stream], len(texts), 1, stream, None
                )
            await run_batch(clients[t.name], t, bodies[t.name, False], 256, 32, False, None)
        per_round = max(1, n // ROUNDS)
        for stream in (False, True):
            for concurrency in CONCURRENCIES:
                label = f"{'streaming' if stream else 'non-streaming'}, {concurrency} client(s)"
                print(f"  {label} ...", flush=True)
                for t in targets:
                    results[stream, concurrency, t.name] = Cell()
                for r in range(ROUNDS):
                    order = list(targets[r % len(targets) :]) + list(targets[: r % len(targets)])
                    for t in order:
                        mine = clients[t.name]
                        b = bodies[t.name, stream]
                        await run_batch(mine, t, b, min(64, per_round), concurrency, stream, None)
                        cell = results[stream, concurrency, t.name]
                        await run_batch(mine, t, b, per_round, concurrency, stream, cell)
    finally:
        for group in clients.values():
            for client in group:
                await client.aclose()
    return results


def run_measure(targets: Sequence[Target], texts: Sequence[str], n: int) -> Results:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(measure(targets, texts, n))
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(measure(targets, texts, n))


# -- report ------------------------------------------------------------------------------------
@dataclass
class Verdict:
    name: str
    value: str
    ok: bool | None  # None: not measured


def verdicts(results: Results, names: Sequence[str]) -> list[Verdict]:
    router, litellm = "sparsity-router", "litellm"

    def added(stream: bool, c: int, who: str) -> float:
        return results[stream, c, who].p(50) - results[stream, c, "direct"].p(50)

    out: list[Verdict] = []
    a = added(False, 1, router)
    out.append(Verdict(f"p50 added latency <= {TARGET_ADDED_MS:g} ms", f"{a:.3f} ms", a <= 1.0))
    if litellm in names:
        la = added(False, 1, litellm)
        ratio = a / la if la > 0 else float("inf")
        out.append(
            Verdict(
                f"p50 added latency <= {TARGET_ADDED_VS_LITELLM:g}x LiteLLM's",
                f"{ratio:.3f}x ({a:.3f} vs {la:.3f} ms)",
                ratio <= TARGET_ADDED_VS_LITELLM,
            )
        )
        for stream in (False, True):
            mine = results[stream, 32, router].rps
            theirs = results[stream, 32, litellm].rps
            ratio = mine / theirs if theirs else float("inf")
            kind = "streaming" if stream else "non-streaming"
            out.append(
                Verdict(
                    f"req/s at 32 clients >= {TARGET_RPS_VS_LITELLM:g}x LiteLLM's ({kind})",
                    f"{ratio:.2f}x ({mine:.0f} vs {theirs:.0f} req/s)",
                    ratio >= TARGET_RPS_VS_LITELLM,
                )
            )
    else:
        out.append(Verdict("vs LiteLLM", "not measured", None))
    t = added(True, 1, router)
    out.append(
        Verdict(
            f"streaming TTFB added <= {TARGET_TTFB_ADDED_MS:g} ms",
            f"{t:.3f} ms",
            t <= TARGET_TTFB_ADDED_MS,
        )
    )
    return out


def table(results: Results, names: Sequence[str]) -> list[str]:
    lines = [
        "| mode | clients | path | p50 ms | p99 ms | req/s | added p50 ms | added p99 ms "
        "| server CPU us/req | added p50 / LiteLLM's |",
        "|---|---|---|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for stream in (False, True):
        for c in CONCURRENCIES:
            direct = results[stream, c, "direct"]
            lite = results.get((stream, c, "litellm"))
            lite_added = lite.p(50) - direct.p(50) if lite is not None else None
            for name in names:
                cell = results[stream, c, name]
                added = f"{cell.p(50) - direct.p(50):+.3f}" if name != "direct" else ""
                added99 = f"{cell.p(99) - direct.p(99):+.3f}" if name != "direct" else ""
                ratio = ""
                if name not in ("direct", "litellm") and lite_added and lite_added > 0:
                    ratio = f"{(cell.p(50) - direct.p(50)) / lite_added:.3f}"
                lines.append(
                    f"| {'stream TTFB' if stream else 'non-stream'} | {c} | {name} "
                    f"| {cell.p(50):.3f} | {cell.p(99):.3f} | {cell.rps:.0f} | {added} "
                    f"| {added99} | {cell.server_us:.0f} | {ratio} |"
                )
    return lines


def report(
    results: Results,
    names: Sequence[str],
    *,
    n: int,
    command: str,
    litellm_note: str,
    setup: str,
    load: tuple[str, str],
) -> str:
    lines = [
        "# Proxy overhead: sparsity-router vs direct vs LiteLLM",
        "",
        f"- command: `{command}`",
        f"- date: {datetime.now(UTC).isoformat(timespec='seconds')}; "
        f"{platform.python_implementation()} {platform.python_version()}; "
        f"{os.cpu_count()} CPU cores; {platform.machine()}",
        f"- {n} timed requests per cell and path (in {ROUNDS} alternating rounds), "
        "after a warm-up that sent every benchmark prompt once (probe cache filled)",
        f"- {setup}",
        f"- LiteLLM: {litellm_note}",
        f"- load average (1/5/15 min) before / after the timed part: {load[0]} / {load[1]} "
        "(other work on the machine shows up here)",
        "- server CPU us/req: user+system CPU time of the server process per timed request "
        "(/proc): the upstream's for `direct`, the proxy's own for the others",
        "- latency: non-stream = whole answer; stream TTFB = time to the first body byte "
        f"(first SSE event of {STREAM_CHUNKS}); added = p50(path) - p50(direct), same run",
        "",
        *table(results, names),
        "",
        "## Targets",
        "",
        "| target | measured | met |",
        "|---|---|---|",
    ]
    for v in verdicts(results, names):
        met = "n/a" if v.ok is None else ("yes" if v.ok else "**no**")
        lines.append(f"| {v.name} | {v.value} | {met} |")
    problems = [p for cell in results.values() for p in cell.problems]
    lines += [
        "",
        "Caveat: the load generator (this process, httpx on uvloop), the proxy and the fake "
        f"upstream all run on the same {os.cpu_count()}-core machine. At 1 client the processes "
        "take turns, so p50 differences are the proxy's own work per request; at 32 clients "
        "all three compete for the cores, so req/s is the throughput of the whole system "
        "(client and upstream included) and the proxy-vs-proxy ratio is the meaningful figure.",
    ]
    if problems:
        lines += ["", "Problems seen:", *(f"- {p}" for p in problems[:10])]
    return "\n".join(lines) + "\n"


# -- main --------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--requests", type=int, default=1000, metavar="N", help="timed requests per cell and path"
    )
    parser.add_argument("--litellm", action="store_true", help="also measure LiteLLM's proxy")
    parser.add_argument(
        "--litellm-venv", type=Path, default=LITELLM_VENV, help="LiteLLM's own venv"
    )
    parser.add_argument("--out", type=Path, help="write the markdown report here")
    parser.add_argument("--keep-logs", action="store_true", help="keep the servers' log folder")
    parser.add_argument(
        "--events",
        choices=["sqlite", "jsonl"],
        help="also measure a second gateway (router+events) that records every request to "
        "this event sink",
    )
    parser.add_argument(
        "--no-freeze-gc",
        action="store_true",
        help="start the gateways without create_app(freeze_gc=True) (the start-up heap stays "
        "in the cyclic GC's full collections: the p99 tail at 32 clients before the fix)",
    )
    # internal: run one server (the benchmark starts each in its own process)
    parser.add_argument("--serve", choices=["upstream", "gateway"], help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--upstream", help=argparse.SUPPRESS)
    parser.add_argument("--key", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.requests < ROUNDS:
        parser.error(f"--requests must be at least {ROUNDS}")
    return args


@contextlib.contextmanager
def running(server: Server, timeout: float) -> Iterator[Server]:
    try:
        yield server.start(timeout)
    finally:
        server.stop()


def _pid(server: Server) -> int | None:
    return server.process.pid if server.process is not None else None


def litellm_server(exe: Path, upstream: Server, key: str, workdir: Path) -> Server:
    config = workdir / "litellm.yaml"
    config.write_text(litellm_config(upstream.url))
    port = free_port()
    return Server(
        "litellm",
        [
            *(str(exe), "--config", str(config)),
            *("--host", "127.0.0.1", "--port", str(port), "--num_workers", "1"),
        ],
        port,
        "/health/liveliness",
        workdir / "litellm.log",
        env={
            "LITELLM_MASTER_KEY": key,
            "LITELLM_LOG": "ERROR",  # also silences uvicorn's access log
            "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # no fetch from GitHub at start-up
            "DISABLE_ADMIN_UI": "True",
            "NO_DOCS": "True",
        },
    )


def bench(args: argparse.Namespace) -> int:
    me = [sys.executable, str(Path(__file__).resolve())]
    key = "sk-bench-" + secrets.token_hex(8)
    workdir = Path(tempfile.mkdtemp(prefix="proxy-overhead-"))
    names = ["direct", "sparsity-router", "router-direct-model"]
    litellm_note = "not measured (run with --litellm)"
    exe: Path | None = None
    if args.litellm:
        exe, why = ensure_litellm(args.litellm_venv)
        if exe is None:
            litellm_note = f"not measured: {why}"
            print(f"LiteLLM skipped: {why}", file=sys.stderr)
    try:
        with contextlib.ExitStack() as stack:
            port = free_port()
            upstream = Server(
                "upstream",
                [*me, "--serve", "upstream", "--port", str(port)],
                port,
                "/v1/models",
                workdir / "upstream.log",
            )
            stack.enter_context(running(upstream, START_TIMEOUT_S))
            print("upstream ready; starting sparsity-router (probe load + calibration) ...")
            port = free_port()
            gateway = Server(
                "sparsity-router",
                [
                    *(*me, "--serve", "gateway", "--port", str(port)),
                    *("--upstream", upstream.url, "--key", key, "--workdir", str(workdir)),
                    *(["--no-freeze-gc"] if args.no_freeze_gc else []),
                ],
                port,
                "/healthz",
                workdir / "gateway.log",
            )
            stack.enter_context(running(gateway, START_TIMEOUT_S))
            chat = "/v1/chat/completions"
            targets = [
                Target(
                    "direct", upstream.url + chat, UPSTREAM_MODEL, key, False, False, _pid(upstream)
                ),
                Target(
                    "sparsity-router", gateway.url + chat, "auto", key, True, True, _pid(gateway)
                ),
                Target(
                    "router-direct-model",
                    gateway.url + chat,
                    "small",
                    key,
                    True,
                    False,
                    _pid(gateway),
                ),
            ]
            if args.events:
                print(f"starting sparsity-router with {args.events} events ...")
                port = free_port()
                evdir = workdir / "events"
                evdir.mkdir()
                with_events = Server(
                    "router+events",
                    [
                        *(*me, "--serve", "gateway", "--port", str(port)),
                        *("--upstream", upstream.url, "--key", key, "--workdir", str(evdir)),
                        *("--events", args.events),
                        *(["--no-freeze-gc"] if args.no_freeze_gc else []),
                    ],
                    port,
                    "/healthz",
                    workdir / "gateway-events.log",
                )
                stack.enter_context(running(with_events, START_TIMEOUT_S))
                targets.append(
                    Target(
                        "router+events",
                        with_events.url + chat,
                        "auto",
                        key,
                        True,
                        True,
                        _pid(with_events),
                    )
                )
                names.append("router+events")
            if exe is not None:
                print("starting LiteLLM ...")
                litellm = litellm_server(exe, upstream, key, workdir)
                try:
                    stack.enter_context(running(litellm, LITELLM_START_TIMEOUT_S))
                except (RuntimeError, TimeoutError) as exc:
                    litellm_note = f"not measured: it did not start ({str(exc).splitlines()[0]})"
                    print(f"LiteLLM skipped: {exc}", file=sys.stderr)
                else:
                    litellm_note = (
                        f"litellm[proxy] {litellm_version(args.litellm_venv)} in its own venv "
                        "(bench/litellm_venv.sh; httptools added so that uvicorn parses HTTP as "
                        "fast as for the gateway), 1 worker, uvloop, `openai/` provider on the "
                        "same upstream"
                    )
                    targets.append(
                        Target(
                            "litellm",
                            litellm.url + chat,
                            UPSTREAM_MODEL,
                            key,
                            False,
                            False,
                            _pid(litellm),
                        )
                    )
                    names.append("litellm")
            print(f"measuring {', '.join(names)}: {args.requests} requests per cell ...")
            before = load_average()
            results = run_measure(targets, prompts(), args.requests)
            after = load_average()
    finally:
        if args.keep_logs:
            print(f"server logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    command = " ".join([".venv/bin/python bench/proxy_overhead.py", *sys.argv[1:]])
    setup = (
        "servers, each one uvicorn process (uvloop, httptools, access log off): the fake upstream "
        "(raw ASGI); sparsity-router (create_app with the bundled SmolLM2 probe, a calibration "
        "fitted on 64 prompts, the memory cache, a `share` rule choosing between two backends "
        "on the upstream); `router-direct-model` = the same gateway asked for model `small` "
        "(no probe, no policy: the bare proxy path); "
        + (
            "started without `freeze_gc` (--no-freeze-gc)"
            if args.no_freeze_gc
            else "`create_app(freeze_gc=True)` as in `sparsity-router serve`"
        )
    )
    text = report(
        results,
        names,
        n=args.requests,
        command=command,
        litellm_note=litellm_note,
        setup=setup,
        load=(before, after),
    )
    print()
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        print(f"wrote {args.out}")
    problems = [p for cell in results.values() for p in cell.problems]
    return 1 if problems else 0


def _exit_on_sigterm(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through the finally blocks that stop the servers


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve == "upstream":
        serve_upstream(args.port)
        return 0
    if args.serve == "gateway":
        serve_gateway(
            args.port,
            args.upstream,
            args.key,
            args.workdir,
            args.events,
            freeze_gc=not args.no_freeze_gc,
        )
        return 0
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    return bench(args)


if __name__ == "__main__":
    sys.exit(main())
