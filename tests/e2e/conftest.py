"""End-to-end fixtures: real vLLM servers (CPU build) serving the bundled SmolLM2-135M-Instruct.

The vLLM venv is provisioned by ``make vllm-venv`` (``scripts/vllm_venv.sh``), which ``make
test`` runs first. When it is missing, these tests FAIL saying so: CI must never skip them
silently. Developers without it may opt out with ``SPARSITY_ROUTER_SKIP_E2E=1``.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.e2e.vllm_server import ROOT, VllmServer, wait_healthy

SKIP_ENV = "SPARSITY_ROUTER_SKIP_E2E"
#: Generous: two servers start at once on a small, shared CPU (~80-200 s each).
START_TIMEOUT_S = float(os.environ.get("SPARSITY_ROUTER_VLLM_START_TIMEOUT", "420"))


@dataclass(frozen=True, slots=True)
class VllmServers:
    generate: VllmServer  # chat/completions, served as "small" and "large"
    probe: VllmServer  # the remote probe's pooling server (layer 10)
    start_s: float  # wall time until both were healthy


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/e2e/" in str(item.path).replace(os.sep, "/"):
            item.add_marker(pytest.mark.e2e)


def vllm_provisioned() -> None:
    if os.environ.get(SKIP_ENV, "").strip() in ("1", "true", "yes"):
        pytest.skip(f"{SKIP_ENV} is set: real-vLLM end-to-end tests skipped on request")
    check = subprocess.run(
        [str(ROOT / "scripts" / "vllm_venv.sh"), "--check"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if check.returncode != 0:
        pytest.fail(
            f"{check.stderr.strip()} (the end-to-end tests need a real vLLM; developers may "
            f"set {SKIP_ENV}=1 to skip them)",
            pytrace=False,
        )


@pytest.fixture(scope="module")
def vllm_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VllmServers]:
    """ONE generation server (names ``small`` and ``large``) and ONE pooling server, started
    together, stopped (whole process groups) whatever happens."""
    vllm_provisioned()
    logs = tmp_path_factory.mktemp("vllm-logs")
    # Eager mode: torch.compile's warm-up would add one to two minutes per server start.
    generate = VllmServer(
        "generate", logs, "--served-model-name", "small", "large", "--enforce-eager"
    )
    probe = VllmServer("probe", logs, "--enforce-eager")
    started = time.monotonic()
    try:
        generate.launch()
        probe.launch()
        wait_healthy([generate, probe], START_TIMEOUT_S)
        servers = VllmServers(generate, probe, time.monotonic() - started)
        print(
            f"\nvLLM servers healthy after {servers.start_s:.0f} s (generate "
            f"{generate.started_s:.0f} s, probe {probe.started_s:.0f} s)"
        )
        yield servers
    finally:
        generate.stop()
        probe.stop()
