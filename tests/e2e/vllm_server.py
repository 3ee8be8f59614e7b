"""A real vLLM OpenAI server in a child process, started by scripts/vllm_serve.sh.

Each server runs in its own session (process group) and is stopped by signalling the whole
group: SIGTERM, then SIGKILL after a grace period, so vLLM's engine and worker processes go too.
Start-up waits for ``/health`` with a deadline; if the process dies or the deadline passes, the
error carries the tail of the server's log.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import httpx

__all__ = ["ROOT", "VllmServer", "free_port", "log_tail", "stop_process_group", "wait_healthy"]

ROOT = Path(__file__).resolve().parents[2]
SERVE = ROOT / "scripts" / "vllm_serve.sh"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class VllmServer:
    """``scripts/vllm_serve.sh MODE PORT ARGS`` on a free loopback port."""

    def __init__(
        self, mode: str, log_dir: Path, *args: str, env: Mapping[str, str] | None = None
    ) -> None:
        self.mode = mode
        self.port = free_port()
        self.args = args
        self.env = dict(env or {})  # added to the environment (e.g. PROBE_CONFIG)
        self.log_path = log_dir / f"vllm-{mode}-{self.port}.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.started_s: float | None = None  # seconds from launch to healthy

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def launch(self) -> VllmServer:
        env = dict(os.environ, PYTHON=sys.executable, **self.env)
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [str(SERVE), self.mode, str(self.port), *self.args],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,  # its own process group: stop() reaches every child
            )
        self._launched = time.monotonic()
        return self

    def healthy(self) -> bool:
        """Whether ``/health`` answers 200 now; raises if the server process has exited."""
        assert self.process is not None, "launch() first"
        code = self.process.poll()
        if code is not None:
            raise RuntimeError(f"vLLM {self.mode} server exited with {code}:\n{self.tail()}")
        if self.started_s is not None:
            return True
        try:
            ok = httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False
        if ok:
            self.started_s = time.monotonic() - self._launched
        return ok

    def tail(self, lines: int = 40) -> str:
        return log_tail(self.log_path, lines)

    def stop(self, grace: float = 20.0) -> None:
        if self.process is not None:
            stop_process_group(self.process, grace)


def log_tail(path: Path, lines: int = 40) -> str:
    """The last ``lines`` lines of a server's log (or a note that there is none)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def stop_process_group(process: subprocess.Popen[bytes], grace_s: float) -> None:
    """SIGTERM a process started in its own session, SIGKILL its group after ``grace_s``, then
    once more for children that outlived the leader (vLLM's engine and workers)."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
        if process.poll() is not None:
            break
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        try:
            process.wait(wait)
            break
        except subprocess.TimeoutExpired:
            continue
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def wait_healthy(servers: list[VllmServer], timeout: float) -> None:
    """Poll every server until all are healthy; past ``timeout`` raise with their logs' tails."""
    deadline = time.monotonic() + timeout
    while not all([s.healthy() for s in servers]):  # a list: poll every server each round
        if time.monotonic() > deadline:
            late = [s for s in servers if s.started_s is None]
            logs = "\n\n".join(f"[{s.mode}]\n{s.tail()}" for s in late)
            raise TimeoutError(f"vLLM server(s) not healthy within {timeout:.0f} s:\n{logs}")
        time.sleep(1.0)
