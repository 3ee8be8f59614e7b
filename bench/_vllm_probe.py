"""The vLLM probe next to the local one, for bench/probe_throughput.py (``--vllm``).

For two probe configurations read from the project's examples, the same prompts go through the
gateway's ``ProbeService`` at 1, 4, 16 and 64 concurrent clients, alternating in rounds between
the in-process probe (micro-batching on, as the gateway runs it) and a real vLLM server on the
same machine (started here with scripts/vllm_serve.sh, stopped after):

- **default score** (config/examples/vllm-probe.yaml: layer 10, last token) on a stock vLLM
  serving the derived layer-10 folder (prefix caching on, vLLM's default for LAST pooling);
- **supervised prompt recipe** (config/examples/vllm-supervised.yaml: metrics of layers 10 and
  20-30 at the last token and averaged over tokens, hidden vectors of layers 12, 18 and 30) on
  vLLM with the project's plugin (every prompt token computed: no prefix caching).

Then a paper estimate of decisions/s per GPU, with its arithmetic (:func:`estimate_lines`).
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from policies.engine import PolicyEngine
from policies.loader import load_settings
from probes.probe import SparsityProbe
from router.probing import BatchingConfig, ProbeService
from router.remote_probe import RemoteProbe

__all__ = ["estimate_lines", "gateway_lines", "vllm_tables"]

ROOT = Path(__file__).resolve().parents[1]

#: NVIDIA H100 SXM dense BF16 peak (datasheet, without sparsity), FLOP/s.
H100_BF16_PEAK = 989e12


@dataclass(frozen=True, slots=True)
class Probe:
    label: str
    config: Path
    mode: str  # scripts/vllm_serve.sh mode


PROBES = (
    Probe(
        "default score (layer 10, last token)", ROOT / "config/examples/vllm-probe.yaml", "probe"
    ),
    Probe(
        "supervised prompt recipe (layers 10, 20-30 + token means + vectors 12/18/30)",
        ROOT / "config/examples/vllm-supervised.yaml",
        "features",
    ),
)


def _pct(xs: Sequence[float], q: float) -> float:
    ordered = sorted(xs)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


ClosedLoop = Callable[
    [Callable[[str], Awaitable[float]], list[str], int], Awaitable[tuple[float, list[float]]]
]
MakeDecider = Callable[[ProbeService, PolicyEngine], Callable[[str], Awaitable[float]]]


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _group_cpu(pgid: int) -> dict[str, float]:
    """CPU seconds of every live process in process group ``pgid``, summed by name (vLLM's API
    server is ``python``, then ``VLLM::EngineCor`` and ``VLLM::Worker``)."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text()
        except OSError:
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[2]) != pgid:  # fields[0] is the state: pgrp is the 5th field overall
            continue
        key = "worker" if "Worker" in name else "engine" if "Engine" in name else "api"
        out[key] = out.get(key, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return out


async def _measure(
    probe: Probe,
    url: str,
    pgid: int,
    make_prompts: Callable[[int, int], list[str]],
    closed_loop: ClosedLoop,
    decider: MakeDecider,
    args: argparse.Namespace,
) -> tuple[list[str], float, float]:
    """Rows of one probe's table; the prompts' mean token count; gateway CPU ms per remote
    decision (this process: tokenising, HTTP, unpacking; the clients too). CPU ms per decision:
    this process for local, the vLLM server's processes (worker / engine core / API server) and
    this process for vllm."""
    env = {"SPARSITY_ROUTER_PROBE_URL": url}
    settings = load_settings(probe.config, env=env)
    section = settings.probe
    assert section.vllm is not None
    probe_settings = section.probe_settings().model_copy(update={"device": "cpu"})
    local = SparsityProbe(probe_settings)
    remote = RemoteProbe(probe_settings, section.vllm.model_copy(update={"timeout_s": 300}))
    engine = PolicyEngine(settings, n_layers=local.n_layers)
    batching = BatchingConfig(max_batch=args.max_batch, window_s=args.window_ms / 1000)

    def service(which: str) -> ProbeService:
        prober = local if which == "local" else remote
        return ProbeService(
            prober,  # type: ignore[arg-type]
            calibration=None,
            cache=None,
            timeout_s=300,
            batching=batching if which == "local" else None,
        )

    warm = [service("local"), service("vllm")]
    for svc in warm:
        for p in make_prompts(4, 98):
            await decider(svc, engine)(p)
    tokens = [len(local.encode(p)[0]) for p in make_prompts(64, 97)]
    rows: list[str] = []
    seed = 1000
    remote_cpu, remote_n = 0.0, 0
    for concurrency in (1, 4, 16, 64):
        n = max(args.requests, concurrency)
        seconds = {"local": 0.0, "vllm": 0.0}
        latencies: dict[str, list[float]] = {"local": [], "vllm": []}
        cpu_by: dict[str, dict[str, float]] = {"local": {}, "vllm": {}}
        for _ in range(args.rounds):
            for which in ("local", "vllm"):
                seed += 1
                svc = service(which)
                cpu, group = _cpu_s(), _group_cpu(pgid)
                took, lat = await closed_loop(
                    decider(svc, engine), make_prompts(n, seed), concurrency
                )
                used = {"gateway": _cpu_s() - cpu}
                if which == "vllm":
                    remote_cpu += used["gateway"]
                    remote_n += len(lat)
                    after = _group_cpu(pgid)
                    used |= {k: after.get(k, 0.0) - group.get(k, 0.0) for k in after}
                for k, v in used.items():
                    cpu_by[which][k] = cpu_by[which].get(k, 0.0) + v
                await svc.aclose()
                seconds[which] += took
                latencies[which] += lat
        rate = {w: len(latencies[w]) / seconds[w] for w in seconds}
        for which in ("local", "vllm"):
            lat = latencies[which]
            ratio = f"**{rate['vllm'] / rate['local']:.2f}x**" if which == "vllm" else ""
            per = {k: 1000 * v / len(lat) for k, v in cpu_by[which].items()}
            cpu_ms = f"{sum(per.values()):.0f}"
            if which == "vllm":
                parts = (per.get(k, 0.0) for k in ("worker", "engine", "api", "gateway"))
                cpu_ms += " (" + " / ".join(f"{v:.0f}" for v in parts) + ")"
            row = (
                f"| {concurrency} | {which} | {len(lat)} | {rate[which]:.1f} | "
                f"{_pct(lat, 0.5) * 1000:.0f} | {_pct(lat, 0.99) * 1000:.0f} | {cpu_ms} | "
                f"{ratio} |"
            )
            rows.append(row)
            print(row, flush=True)
    await remote.aclose()
    return rows, sum(tokens) / len(tokens), 1000 * remote_cpu / max(1, remote_n)


def estimate_lines(tokens: float, n_layers_run: int) -> list[str]:
    """Decisions/s per H100 for SmolLM2-135M running ``n_layers_run`` of 30 layers on prompts of
    ``tokens`` tokens, from FLOPs."""
    d, layers, vocab, params = 576, 30, 49152, 134.5e6
    per_layer = (params - vocab * d) / layers  # tied embeddings: not multiplied in a prefill
    dense = 2 * per_layer * n_layers_run  # FLOP per token, weights
    attention = 2 * 2 * n_layers_run * d * tokens / 2  # QK^T and AV, mean context T/2
    per_prompt = (dense + attention) * tokens
    out = [
        f"Per token: 2 x {per_layer / 1e6:.2f} M weights/layer x {n_layers_run} layers = "
        f"{dense / 1e6:.0f} MFLOP, attention 4 x {n_layers_run} x {d} x T/2 = "
        f"{attention / 1e6:.1f} MFLOP at T = {tokens:.0f}; per prompt "
        f"{per_prompt / 1e9:.2f} GFLOP.",
        "",
        "| model FLOP utilisation | decisions/s per H100 | H100s for 1k req/s | for 10k req/s |",
        "|---:|---:|---:|---:|",
    ]
    for mfu in (0.05, 0.15, 0.40):
        rate = H100_BF16_PEAK * mfu / per_prompt
        out.append(
            f"| {mfu:.0%} | {rate:,.0f} | {max(1, -(-1000 // int(rate)))} | "
            f"{max(1, -(-10000 // int(rate)))} |"
        )
    return out


def gateway_lines(cpu_ms: float) -> list[str]:
    """Gateway cores for 1k and 10k req/s at ``cpu_ms`` of CPU per remote decision."""
    return [
        f"Gateway side, measured here: {cpu_ms:.1f} ms of CPU per remote decision in the "
        "gateway's process (tokenising, HTTP, reading the answer; the benchmark's clients "
        f"included, so an upper bound): about {cpu_ms:.0f} cores for 1k req/s and "
        f"{cpu_ms * 10:.0f} for 10k req/s, spread over gateway replicas sharing one Redis.",
    ]


async def vllm_tables(
    args: argparse.Namespace,
    make_prompts: Callable[[int, int], list[str]],
    closed_loop: ClosedLoop,
    decider: MakeDecider,
) -> list[str]:
    """Start each vLLM server in turn, measure it next to the local probe (probe_throughput's
    ``closed_loop`` clients and ``Decider``), stop it."""
    from tests.e2e.vllm_server import VllmServer, wait_healthy

    lines = [
        "## The vLLM probe next to the local one (same prompts, same cores)",
        "",
        "Decisions (ProbeService + policy) per second at c concurrent clients; local = the "
        "in-process probe with micro-batching, vllm = a vLLM CPU server on this machine "
        "(float32, --enforce-eager) reached over loopback. Prompts of 15-40 words, distinct. "
        "CPU ms per decision: local, this process (probe, batching, clients); vllm, the sum "
        "of vLLM's worker / engine core / API server processes and this process (tokenising, "
        "HTTP, unpacking, clients), each in brackets.",
    ]
    estimate: tuple[float, float] | None = None
    for probe in PROBES:
        with tempfile.TemporaryDirectory() as tmp:
            env = {"PROBE_CONFIG": str(probe.config)}
            server = VllmServer(probe.mode, Path(tmp), "--enforce-eager", env=env)
            try:
                server.launch()
                wait_healthy([server], 600)
                lines += [
                    "",
                    f"### {probe.label}",
                    "",
                    f"vLLM healthy after {server.started_s:.0f} s.",
                    "",
                    "| c | probe | decisions | per s | p50 ms | p99 ms | CPU ms per decision "
                    "| vllm/local |",
                    "|---:|---|---:|---:|---:|---:|---:|---:|",
                ]
                assert server.process is not None
                rows, tokens, cpu_ms = await _measure(
                    probe, server.url, server.process.pid, make_prompts, closed_loop, decider, args
                )
                lines += rows
                if probe.mode == "features":
                    estimate = (tokens, cpu_ms)
            finally:
                server.stop()
    if estimate is not None:
        tokens, cpu_ms = estimate
        lines += [
            "",
            "## Paper estimate: the supervised recipe's probe on one H100",
            "",
            "Not measured (no GPU here): FLOPs of SmolLM2-135M's prefill over the 30 layers the "
            "recipe reads, at the H100 SXM's dense BF16 peak of 989 TFLOP/s, for three model "
            "FLOP utilisations (a 576-wide model keeps GPU matrix units far from peak: plan "
            "with the low end). At typical prompt lengths, and at 500 tokens (a long chat):",
            "",
            *estimate_lines(tokens, 30),
            "",
            *estimate_lines(500.0, 30),
            "",
            *gateway_lines(cpu_ms),
        ]
    return lines
