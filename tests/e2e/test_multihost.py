"""Multi-host faults: the gateway's own processes on separate "hosts" (network namespaces), with
real network faults between them (issue 19, part 4).

Hosts, each a namespace on one bridge (``10.77.0.0/24``; the test process is ``10.77.0.1``):

* ``gw1`` (.11) and ``gw2`` (.12): ``sparsity-router serve``, probe on the remote vLLM server,
  probe cache and rate limits on Redis. gw1 reaches Redis over a private link of its own
  (``10.77.1.0/30``), so that link can fail without touching anyone else; gw2 over the bridge.
* ``redis`` (.20): redis-server.
* ``probe`` (.30): a real vLLM pooling server (CPU) serving the remote probe (layer 10).
* ``upa`` (.41) and ``upb`` (.42): two replicas of a fake OpenAI upstream that names itself in
  every answer and streams one chunk per 100 ms.

Faults: ``ip link set DEV down`` (packets vanish, no refusals) and a slowed link (``tc netem
delay`` where the kernel has netem, else a ``tc tbf`` rate limit; see :mod:`tests.e2e.netns`).
Every scenario heals its fault in ``finally`` and prints one line with the figures. The module
skips (with the reason) where namespaces cannot be made: no CAP_NET_ADMIN, no ``ip``/``tc``, or
``ip netns add`` refused. Run: ``.venv/bin/python -m pytest -q tests/e2e/test_multihost.py``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import vllm_provisioned
from tests.e2e.netns import Host, Network, NsProcess, PointToPoint, unsupported_reason, wait_until
from tests.e2e.vllm_server import ROOT
from tests.redis_server import redis_server_binary

VLLM_START_TIMEOUT_S = float(os.environ.get("SPARSITY_ROUTER_VLLM_START_TIMEOUT", "420"))

GATEWAY_PORT = 8080
REDIS_PORT = 6379
PROBE_PORT = 8000
UPSTREAM_PORT = 9000

#: The gateway's probe deadline (probe.timeout_s) and the remote probe's HTTP timeout.
PROBE_DEADLINE_S = 1.0
PROBE_HTTP_TIMEOUT_S = 1.5
#: Upstream deadlines: a silent replica is noticed within READ_S (mid-stream) or CONNECT_S.
CONNECT_S = 0.5
READ_S = 0.6
BREAKER_COOLDOWN_S = 2.0
STREAM_INTERVAL_S = 0.1


# -- the cluster -------------------------------------------------------------------------------


@dataclass
class Gateway:
    name: str
    host: Host
    process: NsProcess

    @property
    def url(self) -> str:
        return f"http://{self.host.addr}:{GATEWAY_PORT}"


@dataclass
class Cluster:
    net: Network
    gw1: Gateway
    gw2: Gateway
    redis: Host
    redis_link: PointToPoint  # gw1 <-> redis
    probe: Host
    vllm: NsProcess  # the probe host's vLLM server
    upstreams: dict[str, Host]  # replica name -> host
    started_s: float
    report: Callable[[str], None]
    log_dir: Path


def _env() -> dict[str, str]:
    """The environment of every process started: no proxies (the hosts reach each other
    directly), one BLAS thread (two shared cores), vLLM and the hub kept offline."""
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env.update(
        PYTHON=sys.executable,
        PYTHONPATH=str(ROOT),
        OMP_NUM_THREADS="1",
        OPENBLAS_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        VLLM_NO_USAGE_STATS="1",
        DO_NOT_TRACK="1",
    )
    return env


def _gateway_yaml(redis_url: str, probe: Host, upstreams: list[Host]) -> str:
    urls = ", ".join(f'"http://{h.addr}:{UPSTREAM_PORT}/v1"' for h in upstreams)
    backend = (
        f"{{type: openai, base_urls: [{urls}], "
        f"timeouts: {{connect_s: {CONNECT_S}, read_s: {READ_S}, total_s: 20}}, "
        f"retries: 1, backoff: {{base_s: 0.05, max_s: 0.2}}, "
        f"breaker: {{failures: 1, cooldown_s: {BREAKER_COOLDOWN_S}}}}}"
    )
    return f"""
server: {{host: 0.0.0.0, port: {GATEWAY_PORT}, request_timeout_s: 30}}
probe:
  backend: vllm
  vllm: {{base_url: "http://{probe.addr}:{PROBE_PORT}/v1", timeout_s: {PROBE_HTTP_TIMEOUT_S}}}
  layers: [10]
  device: cpu
  timeout_s: {PROBE_DEADLINE_S}
  warm_up: false
cache:
  redis: {{url: "{redis_url}", timeout_s: 0.05}}
auth:
  rate_limit: {{requests_per_s: 500, burst: 1000}}
  public_metrics: true
backends:
  main: {backend}
  safe: {backend}
policies:
  default:
    rules:
      # Matches every probed request: "probed" says the probe's result decided.
      - {{name: probed, when: {{score: {{min: -1000000}}}}, route: main}}
    default: main
    on_probe_error: safe
"""


def _serve_command() -> list[str]:
    """The ``sparsity-router`` console script of this venv (``python -m cli.main`` without it)."""
    script = Path(sys.executable).with_name("sparsity-router")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "cli.main"]


def _redis_pings(addr: str) -> bool:
    try:
        with socket.create_connection((addr, REDIS_PORT), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def _get(url: str, timeout: float = 2.0) -> httpx.Response | None:
    try:
        with httpx.Client(trust_env=False, timeout=timeout) as client:
            return client.get(url)
    except httpx.HTTPError:
        return None


def _wait_http(process: NsProcess, url: str, timeout_s: float) -> float:
    """Seconds until ``url`` answers 200; raises with the log's tail if the process dies or
    the deadline passes."""
    start = time.monotonic()
    deadline = start + timeout_s
    while True:
        if not process.alive():
            raise RuntimeError(f"{process.name} exited during start-up:\n{process.tail()}")
        response = _get(url)
        if response is not None and response.status_code == 200:
            return time.monotonic() - start
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"{process.name}: {url} not 200 within {timeout_s:g} s:\n{process.tail()}"
            )
        time.sleep(0.5)


@pytest.fixture(scope="module")
def cluster(
    tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config
) -> Iterator[Cluster]:
    """Build the network, start every host's process, wait for them; tear all down after."""
    reason = unsupported_reason()
    if reason is not None:
        pytest.skip(f"multi-host test needs Linux network namespaces: {reason}")
    vllm_provisioned()
    redis_binary = redis_server_binary()
    log_dir = tmp_path_factory.mktemp("multihost")
    terminal = pytestconfig.pluginmanager.get_plugin("terminalreporter")

    capture = pytestconfig.pluginmanager.get_plugin("capturemanager")
    report_path = log_dir / "report.txt"

    def report(line: str) -> None:
        """The line on the terminal (past pytest's capture) and in the logs' report.txt."""
        with open(report_path, "a") as out:
            out.write(line.lstrip("\n") + "\n")
        if terminal is None or capture is None:
            print(line)
            return
        with capture.global_and_fixture_disabled():
            terminal.write_line(line)

    net = Network(log_dir=log_dir)
    started = time.monotonic()
    try:
        net.create()
        gw1, gw2 = net.add_host("gw1", 11), net.add_host("gw2", 12)
        redis = net.add_host("redis", 20)
        probe = net.add_host("probe", 30)
        upa, upb = net.add_host("upa", 41), net.add_host("upb", 42)
        redis_link = net.link(gw1, redis)
        env = _env()
        # vLLM first: it takes longest (~80-200 s on two shared cores).
        vllm = net.spawn(
            probe,
            "vllm-probe",
            [
                str(ROOT / "scripts" / "vllm_serve.sh"),
                "probe",
                str(PROBE_PORT),
                "--enforce-eager",
                "--host",
                probe.addr,
            ],
            env=env,
        )
        redis_process = net.spawn(
            redis,
            "redis",
            [
                redis_binary,
                "--port",
                str(REDIS_PORT),
                "--bind",
                "0.0.0.0",
                "--protected-mode",
                "no",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(log_dir),
            ],
            env=env,
        )
        ups = {}
        for name, host in (("replica-a", upa), ("replica-b", upb)):
            ups[name] = net.spawn(
                host,
                name,
                [
                    sys.executable,
                    "-m",
                    "tests.e2e.slow_upstream",
                    "--host",
                    host.addr,
                    "--port",
                    str(UPSTREAM_PORT),
                    "--name",
                    name,
                    "--interval-s",
                    str(STREAM_INTERVAL_S),
                ],
                env=env,
                cwd=ROOT,
            )
        gateways = []
        for name, host, redis_url in (
            ("gw1", gw1, f"redis://{redis_link.b_addr}:{REDIS_PORT}/0"),
            ("gw2", gw2, f"redis://{redis.addr}:{REDIS_PORT}/0"),
        ):
            config = log_dir / f"{name}.yaml"
            config.write_text(_gateway_yaml(redis_url, probe, [upa, upb]))
            process = net.spawn(
                host,
                name,
                [
                    *_serve_command(),
                    "serve",
                    "--config",
                    str(config),
                    "--log-level",
                    "info",
                ],
                env=env,
                cwd=ROOT,
            )
            gateways.append(Gateway(name, host, process))
        for name, host in (("replica-a", upa), ("replica-b", upb)):
            _wait_http(ups[name], f"http://{host.addr}:{UPSTREAM_PORT}/v1/models", 60)
        for gateway in gateways:
            _wait_http(gateway.process, f"{gateway.url}/readyz", 180)
        wait_until(lambda: _redis_pings(redis.addr), 10, "redis-server answering PING")
        assert redis_process.alive()
        vllm_s = _wait_http(vllm, f"http://{probe.addr}:{PROBE_PORT}/health", VLLM_START_TIMEOUT_S)
        cluster = Cluster(
            net,
            gateways[0],
            gateways[1],
            redis,
            redis_link,
            probe,
            vllm,
            {"replica-a": upa, "replica-b": upb},
            time.monotonic() - started,
            report,
            log_dir,
        )
        report(
            f"\nmultihost: 6 hosts up after {cluster.started_s:.0f} s (vLLM probe healthy after "
            f"{vllm_s:.0f} s of waiting); slow links by "
            f"{'netem' if net.netem_available() else 'tbf (no netem in this kernel)'}"
        )
        yield cluster
    finally:
        net.close()
        left = net.leftovers()
        assert not left, f"namespaces or links left after teardown: {left}"


# -- the harness itself ------------------------------------------------------------------------


def _fetch_from(host: Host, url: str, timeout_s: float = 1.0) -> bool:
    """Whether a GET of ``url`` made from inside ``host``'s namespace answers 200."""
    done = subprocess.run(
        [
            "ip",
            "netns",
            "exec",
            host.ns,
            "curl",
            "-sf",
            "-o",
            "/dev/null",
            "--noproxy",
            "*",
            "--max-time",
            str(timeout_s),
            url,
        ],
        capture_output=True,
        timeout=timeout_s + 10,
        check=False,
    )
    return done.returncode == 0


def test_harness_cuts_one_path_and_leaves_nothing(tmp_path: Path) -> None:
    """The harness without vLLM (a second network, instance 1, beside the cluster's): a host
    reaches another over the bridge and over their private link; that link set down cuts that
    path only (a timeout: packets vanish) and set up restores it; a slowed host gets its qdisc
    on both ends; close() stops the process and deletes every namespace and link."""
    reason = unsupported_reason()
    if reason is not None:
        pytest.skip(f"multi-host test needs Linux network namespaces: {reason}")
    if shutil.which("curl") is None:
        pytest.skip("no curl binary (the harness check fetches from inside a namespace)")
    net = Network(subnet="10.78.0", p2p_subnet="10.78.1", log_dir=tmp_path, instance=1)
    try:
        net.create()
        a, b = net.add_host("ha", 2), net.add_host("hb", 3)
        link = net.link(a, b)
        server = net.spawn(
            b,
            "harness-upstream",
            [
                sys.executable,
                "-m",
                "tests.e2e.slow_upstream",
                "--host",
                "0.0.0.0",
                "--port",
                str(UPSTREAM_PORT),
                "--name",
                "hb",
            ],
            env=_env(),
            cwd=ROOT,
        )
        _wait_http(server, f"http://{b.addr}:{UPSTREAM_PORT}/v1/models", 30)
        private = f"http://{link.b_addr}:{UPSTREAM_PORT}/v1/models"
        bridged = f"http://{b.addr}:{UPSTREAM_PORT}/v1/models"
        assert _fetch_from(a, private) and _fetch_from(a, bridged)
        net.set_up(b.ns, link.b_dev, up=False)
        start = time.monotonic()
        assert not _fetch_from(a, private, timeout_s=1.0)
        assert time.monotonic() - start >= 0.9, "refused, not partitioned"
        assert _fetch_from(a, bridged), "the fault cut more than the private link"
        net.set_up(b.ns, link.b_dev, up=True)
        wait_until(lambda: _fetch_from(a, private), 10, "the private link back")
        kind = net.slow(b, delay_ms=500)
        shown = subprocess.run(
            ["tc", "qdisc", "show", "dev", b.peer], capture_output=True, text=True, check=True
        ).stdout
        assert kind in shown, shown
        net.unslow(b)
        assert _fetch_from(a, bridged)
    finally:
        net.close()
    assert not net.leftovers()
    assert not server.alive()


# -- requests and figures ----------------------------------------------------------------------


@dataclass
class Tally:
    """Requests sent through one gateway while a fault holds: failures and latencies."""

    sent: int = 0
    failed: int = 0
    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def add(self, seconds: float, error: str | None) -> None:
        self.sent += 1
        self.latencies.append(seconds)
        if error is not None:
            self.failed += 1
            self.errors.append(error)

    def quantile(self, q: float) -> float:
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]

    def line(self) -> str:
        return (
            f"sent={self.sent} failed={self.failed} p50={1000 * self.quantile(0.5):.0f}ms "
            f"p99={1000 * self.quantile(0.99):.0f}ms"
        )


def _client(gateway: Gateway) -> httpx.Client:
    return httpx.Client(base_url=gateway.url, trust_env=False, timeout=httpx.Timeout(15.0))


def _chat(
    client: httpx.Client, text: str, **extra: object
) -> tuple[httpx.Response | None, float, str | None]:
    """One non-streamed chat request: (response, seconds, error or None)."""
    body = {"model": "auto", "messages": [{"role": "user", "content": text}], **extra}
    start = time.monotonic()
    try:
        response = client.post("/v1/chat/completions", json=body)
    except httpx.HTTPError as exc:
        return None, time.monotonic() - start, f"{type(exc).__name__}: {exc}"
    seconds = time.monotonic() - start
    if response.status_code != 200:
        return response, seconds, f"HTTP {response.status_code}: {response.text[:200]}"
    return response, seconds, None


def _answer(response: httpx.Response) -> str:
    return str(response.json()["choices"][0]["message"]["content"])


def _prompt(tag: str) -> str:
    """A prompt nobody asked before (no cache can answer it)."""
    return f"Question {tag} {uuid.uuid4().hex[:12]}: what is the capital of France?"


_SAMPLE = re.compile(
    r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>[^}]*)\})?\s+(?P<value>\S+)$"
)


def _metric(gateway: Gateway, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples on the gateway's /metrics whose labels include ``labels``."""
    response = _get(f"{gateway.url}/metrics", timeout=5)
    assert response is not None and response.status_code == 200, f"{gateway.name} /metrics"
    total = 0.0
    for line in response.text.splitlines():
        match = _SAMPLE.match(line)
        if match is None or match.group("name") != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group("labels") or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(match.group("value"))
    return total


def _redis_used(gateway: Gateway) -> float:
    """Redis cache lookups that reached Redis and got an answer (hit, miss or invalid)."""
    name = "sparsity_router_cache_lookups_total"
    return sum(_metric(gateway, name, tier="redis", result=r) for r in ("hit", "miss", "invalid"))


def _redis_failed(gateway: Gateway) -> float:
    """Redis cache lookups that failed (error) or were not tried while it is down (skipped)."""
    name = "sparsity_router_cache_lookups_total"
    return sum(_metric(gateway, name, tier="redis", result=r) for r in ("error", "skipped"))


# -- scenario 1: Redis partitioned from gateway 1 ------------------------------------------------


def test_redis_partitioned_from_one_gateway(cluster: Cluster) -> None:
    """gw1 loses its (private) link to Redis; gw2 keeps its own path.

    Checks: during the partition gw1 and gw2 answer every request (0 failed); gw1's /metrics
    count Redis cache lookups failing or skipped (each a probe-cache miss) and rate-limit Redis
    errors (its limiter fell back to memory, which its log says); gw2's count none and keep
    reaching Redis. After the link is back, gw1 reaches Redis again: a prompt gw2 measured is a
    Redis hit on gw1, the limiter says it is back on Redis and its error count stops growing.
    """
    gw1, gw2, link = cluster.gw1, cluster.gw2, cluster.redis_link
    rl_errors = "sparsity_router_rate_limit_redis_errors_total"
    with _client(gw1) as c1, _client(gw2) as c2:
        b1, b2 = Tally(), Tally()  # before the fault: the same loop, for comparison
        for i in range(10):
            for client, tally in ((c1, b1), (c2, b2)):
                _, seconds, error = _chat(client, _prompt(f"s1-before-{i}"))
                tally.add(seconds, error)
        assert b1.failed == 0 and b2.failed == 0, (b1.errors + b2.errors)[:3]
        assert _redis_used(gw1) > 0 and _redis_used(gw2) > 0, "Redis not used before the fault"
        before = {
            g.name: (_redis_failed(g), _metric(g, rl_errors), _redis_used(g)) for g in (gw1, gw2)
        }
        t1, t2 = Tally(), Tally()
        cluster.net.set_up(cluster.redis.ns, link.b_dev, up=False)  # Redis's end of gw1's link
        try:
            for i in range(30):
                for client, tally in ((c1, t1), (c2, t2)):
                    response, seconds, error = _chat(client, _prompt(f"s1-{i}"))
                    tally.add(seconds, error)
            failed1, rl1, _ = (_redis_failed(gw1), _metric(gw1, rl_errors), _redis_used(gw1))
            failed2, rl2, used2 = (_redis_failed(gw2), _metric(gw2, rl_errors), _redis_used(gw2))
        finally:
            cluster.net.set_up(cluster.redis.ns, link.b_dev, up=True)
        healed = time.monotonic()
        cluster.report(
            f"multihost redis-partition gw1: {t1.line()}; gw2: {t2.line()} "
            f"(before the fault gw1 {b1.line()}; gw2 {b2.line()})"
        )
        assert t1.failed == 0, f"gw1 failed requests with Redis partitioned: {t1.errors[:3]}"
        assert t2.failed == 0, f"gw2 failed requests: {t2.errors[:3]}"
        assert failed1 - before["gw1"][0] > 0, "gw1 counted no Redis cache error or skip"
        assert rl1 - before["gw1"][1] > 0, "gw1's rate limiter counted no Redis error"
        assert "rate limiting falls back to memory" in gw1.process.log_text()
        assert failed2 == before["gw2"][0] and rl2 == before["gw2"][1], "gw2 saw Redis fail"
        assert used2 - before["gw2"][2] >= 30, "gw2 stopped using Redis"
        # Redis backed off on both paths (cache and limiter): gw1 pays no timeout per request.
        assert t1.quantile(0.5) <= t2.quantile(0.5) + 0.025, "gw1 slowed by the partition"

        # Recovery: gw1's cache backs off (at most 5 s) before trying Redis again.
        used_before = _redis_used(gw1)
        recovery = Tally()

        def redis_back() -> bool:
            _, seconds, error = _chat(c1, _prompt("s1-heal"))
            recovery.add(seconds, error)
            return _redis_used(gw1) > used_before

        wait_until(redis_back, 20, "gw1 using Redis again after the partition", interval_s=0.3)
        recovered_s = time.monotonic() - healed
        shared = _prompt("s1-shared")
        _, _, error = _chat(c2, shared)  # gw2 measures it, into Redis
        assert error is None, error
        hits = _metric(gw1, "sparsity_router_cache_lookups_total", tier="redis", result="hit")
        response, _, error = _chat(c1, shared)
        assert error is None and response is not None, error
        assert (
            _metric(gw1, "sparsity_router_cache_lookups_total", tier="redis", result="hit")
            == hits + 1
        )
        assert response.headers["x-router-cache"] == "hit"
        rl_after = _metric(gw1, rl_errors)
        for i in range(5):
            _, _, error = _chat(c1, _prompt(f"s1-after-{i}"))
            assert error is None, error
        assert _metric(gw1, rl_errors) == rl_after, "gw1's rate limiter still fails on Redis"
        assert "rate limiting is back on Redis" in gw1.process.log_text()
        cluster.report(
            f"multihost redis-partition recovery: gw1 on Redis again {recovered_s:.1f} s after "
            f"the link came back ({recovery.line()}); gw1 redis errors+skips during the fault "
            f"{failed1 - before['gw1'][0]:.0f}, rate-limit redis errors "
            f"{rl1 - before['gw1'][1]:.0f}"
        )
        assert recovery.failed == 0, recovery.errors[:3]


# -- scenario 2: the probe host slowed past the deadline -----------------------------------------


def _direct_upstream_p99(cluster: Cluster, n: int = 10) -> float:
    """The upstream's own latency (straight to replica a, no gateway): p99 of ``n``."""
    host = cluster.upstreams["replica-a"]
    tally = Tally()
    with httpx.Client(trust_env=False, timeout=5) as client:
        for _ in range(n):
            start = time.monotonic()
            response = client.post(
                f"http://{host.addr}:{UPSTREAM_PORT}/v1/chat/completions",
                json={"model": "m", "messages": [{"role": "user", "content": "hi"}]},
            )
            tally.add(time.monotonic() - start, None if response.status_code == 200 else "status")
    assert tally.failed == 0
    return tally.quantile(0.99)


def test_probe_host_slowed_past_the_deadline(cluster: Cluster) -> None:
    """The probe host's link is slowed far past probe.timeout_s.

    Checks: every request is answered (0 failed) by the policy's on_probe_error backend
    (x-router-backend: safe, x-router-rule: on_probe_error, x-router-probe-error: 1), and the
    p99 of the whole request stays within probe.timeout_s + the upstream's own p99 + 100 ms.
    After the link is healed the probe decides again (x-router-rule: probed, a score).
    """
    upstream_s = _direct_upstream_p99(cluster)
    bound = PROBE_DEADLINE_S + upstream_s + 0.1
    with _client(cluster.gw1) as c1, _client(cluster.gw2) as c2:
        for client in (c1, c2):
            response, _, error = _chat(client, _prompt("s2-before"))
            assert error is None and response is not None, error
            assert response.headers["x-router-rule"] == "probed", dict(response.headers)
        timeouts = "sparsity_router_probe_errors_total"
        before = sum(_metric(g, timeouts, reason="timeout") for g in (cluster.gw1, cluster.gw2))
        tally = Tally()
        wrong: list[str] = []
        kind = cluster.net.slow(cluster.probe, delay_ms=int(3000 * PROBE_DEADLINE_S))
        try:
            for i in range(16):
                client = c1 if i % 2 == 0 else c2
                response, seconds, error = _chat(client, _prompt(f"s2-{i}"))
                tally.add(seconds, error)
                if response is not None and error is None:
                    h = response.headers
                    got = (
                        h.get("x-router-backend"),
                        h.get("x-router-rule"),
                        h.get("x-router-probe-error"),
                    )
                    if got != ("safe", "on_probe_error", "1"):
                        wrong.append(f"request {i}: {got}")
            timed_out = sum(
                _metric(g, timeouts, reason="timeout") for g in (cluster.gw1, cluster.gw2)
            )
        finally:
            cluster.net.unslow(cluster.probe)
        healed = time.monotonic()
        assert cluster.vllm.alive(), (
            "the vLLM probe server stopped during the fault (signalled from outside this test?):"
            f"\n{cluster.vllm.tail(15)}"
        )
        cluster.report(
            f"multihost probe-slow ({kind}): {tally.line()} (bound {1000 * bound:.0f}ms = "
            f"probe.timeout_s {1000 * PROBE_DEADLINE_S:.0f} + upstream p99 "
            f"{1000 * upstream_s:.0f} + 100)"
        )
        assert tally.failed == 0, tally.errors[:3]
        assert not wrong, f"not answered by on_probe_error: {wrong[:3]}"
        # The deadline, not a refused connection, sent them there: one probe timeout each.
        assert timed_out - before == tally.sent, f"{timed_out - before} probe timeouts"
        assert tally.quantile(0.99) <= bound, f"p99 {tally.quantile(0.99):.3f} s > {bound:.3f} s"

        recovery = Tally()
        decided: list[str] = []

        def probe_decides() -> bool:
            response, seconds, error = _chat(c1, _prompt("s2-heal"))
            recovery.add(seconds, error)
            rule = response.headers.get("x-router-rule", "") if response is not None else ""
            decided.append(rule)
            return rule == "probed" and "x-router-score" in response.headers  # type: ignore[union-attr]

        wait_until(probe_decides, 30, "the probe deciding again after the link healed", 0.3)
        recovered_s = time.monotonic() - healed
        response, _, error = _chat(c2, _prompt("s2-after"))
        assert error is None and response is not None, error
        assert response.headers["x-router-rule"] == "probed"
        cluster.report(
            f"multihost probe-slow recovery: the probe decides again {recovered_s:.1f} s after "
            f"the link healed ({recovery.sent} requests, {recovery.failed} failed)"
        )
        assert recovery.failed == 0, recovery.errors[:3]


# -- scenario 3: one upstream replica partitioned mid-stream -------------------------------------


def test_upstream_replica_partitioned_mid_stream(cluster: Cluster) -> None:
    """The replica serving a slow stream loses its link while the stream is in flight.

    Checks: the client gets an error event then ``data: [DONE]`` within the backend's read_s
    (plus 1 s) of the fault; the requests after it are all answered (0 failed) by the other
    replica; after the link is back (and the breaker's cooldown) both replicas answer again.
    """
    gateway = cluster.gw2
    body = {
        "model": "auto",
        "messages": [{"role": "user", "content": _prompt("s3-stream")}],
        "stream": True,
        "max_tokens": 60,  # 6 s of chunks
    }
    lines: list[str] = []
    served_by = ""
    victim: Host | None = None
    faulted_at = 0.0
    error_after: float | None = None
    tally = Tally()
    answered: list[str] = []
    with _client(gateway) as client:
        try:
            with client.stream("POST", "/v1/chat/completions", json=body) as streamed:
                assert streamed.status_code == 200, streamed.read()[:300]
                for line in streamed.iter_lines():
                    if not line:
                        continue
                    lines.append(line)
                    if victim is None and line.startswith("data: {"):
                        delta = json.loads(line[6:])["choices"][0]["delta"].get("content", "")
                        served_by = delta.split()[0]
                        victim = cluster.upstreams[served_by]
                        cluster.net.set_up(victim.ns, victim.dev, up=False)
                        faulted_at = time.monotonic()
                    elif victim is not None and error_after is None and '"error"' in line:
                        error_after = time.monotonic() - faulted_at
            assert victim is not None, f"no content chunk: {lines[:3]}"
            failures = "sparsity_router_upstream_failures_total"
            failed_before = _metric(gateway, failures)
            for i in range(12):
                response, seconds, error = _chat(client, _prompt(f"s3-{i}"))
                tally.add(seconds, error)
                if response is not None and error is None:
                    answered.append(_answer(response).removeprefix("answer from "))
            failed_tries = _metric(gateway, failures) - failed_before
        finally:
            if victim is not None:
                cluster.net.set_up(victim.ns, victim.dev, up=True)
        healed = time.monotonic()
        other = next(name for name in cluster.upstreams if name != served_by)
        cluster.report(
            f"multihost replica-partition: stream from {served_by} ended with an error event and "
            f"[DONE] {error_after or -1:.2f} s after the fault; next requests {tally.line()}, "
            f"answered by {sorted(set(answered))}"
        )
        assert error_after is not None, f"no error event: {lines[-3:]}"
        assert lines[-1] == "data: [DONE]" and '"error"' in lines[-2], lines[-3:]
        assert error_after <= READ_S + 1.0, f"the broken stream took {error_after:.2f} s"
        assert tally.failed == 0, tally.errors[:3]
        assert answered and set(answered) == {other}, answered
        assert failed_tries == 0, f"{failed_tries} tries went to the partitioned replica first"

        seen: set[str] = set()
        recovery = Tally()

        def both_serve() -> bool:
            response, seconds, error = _chat(client, _prompt("s3-heal"))
            recovery.add(seconds, error)
            if response is not None and error is None:
                seen.add(_answer(response).removeprefix("answer from "))
            return seen == set(cluster.upstreams)

        wait_until(both_serve, BREAKER_COOLDOWN_S + 15, "both replicas serving again", 0.2)
        cluster.report(
            f"multihost replica-partition recovery: both replicas answer "
            f"{time.monotonic() - healed:.1f} s after the link came back ({recovery.line()})"
        )
        assert recovery.failed == 0, recovery.errors[:3]
