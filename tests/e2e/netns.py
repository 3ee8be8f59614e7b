"""A small multi-host network on one machine: Linux network namespaces joined by veth pairs.

Each :class:`Host` is a network namespace with loopback up and one veth into a bridge in the
root namespace (the test process sits on the bridge's address, so it reaches every host); two
hosts may also get a private point-to-point link (:meth:`Network.link`), so that a fault on that
link cuts one path only. Faults are real kernel ones: a link set down (packets vanish: the
peers see timeouts, not refusals), and a slow link: ``tc netem delay`` when the kernel has
netem, else a ``tc tbf`` rate limit so low that any answer of a few KB takes seconds (some
kernels, Firecracker's among them, ship tbf and htb but no netem).

Processes run inside a namespace with ``ip netns exec``, each in its own session, and are
stopped by killing their process groups (then whatever is left in the namespace, by pid).
:meth:`Network.close` deletes every namespace, link and bridge it made, whatever happened; names
carry the pid of the test process and the network's ``instance`` (namespaces
``srm-<pid>-<instance><role>``, links ``srm<hex pid><kind><instance><n>``), and
:meth:`Network.create` first deletes those left by runs whose process is gone (and this
network's own, should an earlier attempt in this process have left any).

:func:`unsupported_reason` says why this machine cannot build such a network (no CAP_NET_ADMIN,
no ``ip`` or ``tc`` binary, ``ip netns add`` refused); tests skip with it.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from tests.e2e.vllm_server import log_tail, stop_process_group

__all__ = [
    "Host",
    "NetnsError",
    "Network",
    "NsProcess",
    "PointToPoint",
    "delete_stale",
    "unsupported_reason",
    "wait_until",
]

NS_PREFIX = "srm-"
LINK_PREFIX = "srm"
_NS_RE = re.compile(rf"^{re.escape(NS_PREFIX)}(\d+)-[a-z0-9]+$")
# srm + hex pid + one of z (bridge), v (root-side veth), n (host-side veth), p/q (p2p ends).
_LINK_RE = re.compile(rf"^{LINK_PREFIX}([0-9a-f]+)[zvnpq]\d*$")
_CMD_TIMEOUT_S = 15.0
_CAP_NET_ADMIN = 12


class NetnsError(RuntimeError):
    """An ``ip``/``tc`` command failed; the message holds the command and its stderr."""


def _run(argv: Sequence[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    try:
        done = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=_CMD_TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise NetnsError(f"{' '.join(argv)}: no answer within {_CMD_TIMEOUT_S:g} s") from exc
    if check and done.returncode != 0:
        raise NetnsError(f"{' '.join(argv)} exited {done.returncode}: {done.stderr.strip()}")
    return done


def _has_cap_net_admin() -> bool:
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return os.geteuid() == 0
    match = re.search(r"^CapEff:\s*([0-9a-fA-F]+)$", status, re.MULTILINE)
    if match is None:
        return os.geteuid() == 0
    return bool(int(match.group(1), 16) >> _CAP_NET_ADMIN & 1)


def unsupported_reason() -> str | None:
    """Why network namespaces cannot be used here (for a skip), or None when they can."""
    if not hasattr(os, "killpg") or not Path("/proc/self/ns/net").exists():
        return "not Linux (no /proc/self/ns/net)"
    missing = [b for b in ("ip", "tc") if shutil.which(b) is None]
    if missing:
        return f"no {' or '.join(missing)} binary on PATH (install iproute2)"
    if not _has_cap_net_admin():
        return "no CAP_NET_ADMIN (run as root, or in a container with --cap-add NET_ADMIN)"
    name = f"{NS_PREFIX}{os.getpid()}-check"
    done = _run(["ip", "netns", "add", name], check=False)
    if done.returncode != 0:
        return f"`ip netns add` fails here: {done.stderr.strip() or done.returncode}"
    _run(["ip", "netns", "del", name], check=False)
    return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_namespace_pids(ns: str) -> None:
    """SIGKILL every process still inside ``ns`` (all were started by this harness there)."""
    done = _run(["ip", "netns", "pids", ns], check=False)
    for word in done.stdout.split():
        with contextlib.suppress(ProcessLookupError, ValueError, PermissionError):
            os.kill(int(word), signal.SIGKILL)


def delete_stale(*, keep_live: bool = True) -> list[str]:
    """Delete namespaces and links of earlier runs whose test process is gone; their names."""
    removed: list[str] = []
    listing = _run(["ip", "netns", "list"], check=False).stdout
    for line in listing.splitlines():
        name = line.split()[0] if line.split() else ""
        match = _NS_RE.match(name)
        if match and not (keep_live and _pid_alive(int(match.group(1)))):
            _kill_namespace_pids(name)
            _run(["ip", "netns", "del", name], check=False)
            removed.append(name)
    links = _run(["ip", "-o", "link", "show"], check=False).stdout
    for line in links.splitlines():
        parts = line.split(":")
        if len(parts) < 2:
            continue
        name = parts[1].strip().split("@")[0]
        match = _LINK_RE.match(name)
        if match and not (keep_live and _pid_alive(int(match.group(1), 16))):
            _run(["ip", "link", "del", name], check=False)
            removed.append(name)
    return removed


@dataclass(frozen=True, slots=True)
class Host:
    """One namespace on the bridge: ``addr`` is its address there, ``dev`` its interface
    inside the namespace, ``peer`` the root-side end of the veth (a bridge port)."""

    role: str
    ns: str
    addr: str
    dev: str
    peer: str


@dataclass(frozen=True, slots=True)
class PointToPoint:
    """A private link between two hosts: ``a_dev`` in ``a`` (``a_addr``) and ``b_dev`` in
    ``b`` (``b_addr``)."""

    a: Host
    b: Host
    a_dev: str
    b_dev: str
    a_addr: str
    b_addr: str


@dataclass(slots=True)
class NsProcess:
    """A process started in a namespace, in its own session (process group)."""

    name: str
    host: Host
    process: subprocess.Popen[bytes]
    log_path: Path

    def alive(self) -> bool:
        return self.process.poll() is None

    def tail(self, lines: int = 40) -> str:
        return log_tail(self.log_path, lines)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM the process group, SIGKILL it after ``grace_s``, then once more."""
        stop_process_group(self.process, grace_s)


@dataclass
class Network:
    """Namespaces on a root-namespace bridge ``{subnet}.1/24``; see the module docstring."""

    subnet: str = "10.77.0"
    p2p_subnet: str = "10.77.1"
    log_dir: Path = field(default_factory=lambda: Path("/tmp"))
    pid: int = field(default_factory=os.getpid)
    instance: int = 0  # 0-9: several networks of one test process side by side
    hosts: dict[str, Host] = field(default_factory=dict)
    processes: list[NsProcess] = field(default_factory=list)
    _links: int = 0
    _p2p: int = 0
    _netem: bool | None = None
    _created: bool = False

    @property
    def tag(self) -> str:
        return f"{LINK_PREFIX}{self.pid:x}"

    def _name(self, kind: str, n: int | str = "") -> str:
        return f"{self.tag}{kind}{self.instance}{n}"

    @property
    def _ns_prefix(self) -> str:
        return f"{NS_PREFIX}{self.pid}-{self.instance}"

    @property
    def bridge(self) -> str:
        return self._name("z")

    @property
    def gateway_addr(self) -> str:
        """The root namespace's address on the bridge (where the test process talks from)."""
        return f"{self.subnet}.1"

    def create(self) -> Network:
        """Delete what crashed runs left, then make the bridge."""
        delete_stale()
        self._delete(self.leftovers())
        self._created = True
        _run(["ip", "link", "add", self.bridge, "type", "bridge"])
        _run(["ip", "addr", "add", f"{self.gateway_addr}/24", "dev", self.bridge])
        _run(["ip", "link", "set", self.bridge, "up"])
        return self

    def add_host(self, role: str, octet: int) -> Host:
        """A namespace ``srm-<pid>-<role>`` with loopback up and ``{subnet}.{octet}/24``."""
        if not re.fullmatch(r"[a-z][a-z0-9]*", role):
            raise ValueError(f"role must be [a-z][a-z0-9]*, got {role!r}")
        ns = f"{self._ns_prefix}{role}"
        n = self._links = self._links + 1
        dev, peer = self._name("n", n), self._name("v", n)
        _run(["ip", "netns", "add", ns])
        host = Host(role, ns, f"{self.subnet}.{octet}", dev, peer)
        self.hosts[role] = host
        _run(["ip", "-n", ns, "link", "set", "lo", "up"])
        _run(["ip", "link", "add", peer, "type", "veth", "peer", "name", dev])
        _run(["ip", "link", "set", dev, "netns", ns])
        _run(["ip", "link", "set", peer, "master", self.bridge])
        _run(["ip", "link", "set", peer, "up"])
        _run(["ip", "-n", ns, "addr", "add", f"{host.addr}/24", "dev", dev])
        _run(["ip", "-n", ns, "link", "set", dev, "up"])
        return host

    def link(self, a: Host, b: Host) -> PointToPoint:
        """A private veth between ``a`` and ``b`` on ``{p2p_subnet}.x/30`` (its own /30)."""
        n = self._p2p = self._p2p + 1
        a_dev, b_dev = self._name("p", n), self._name("q", n)
        base = 4 * (n - 1)
        a_addr, b_addr = f"{self.p2p_subnet}.{base + 1}", f"{self.p2p_subnet}.{base + 2}"
        _run(["ip", "link", "add", a_dev, "type", "veth", "peer", "name", b_dev])
        for host, dev, addr in ((a, a_dev, a_addr), (b, b_dev, b_addr)):
            _run(["ip", "link", "set", dev, "netns", host.ns])
            _run(["ip", "-n", host.ns, "addr", "add", f"{addr}/30", "dev", dev])
            _run(["ip", "-n", host.ns, "link", "set", dev, "up"])
        return PointToPoint(a, b, a_dev, b_dev, a_addr, b_addr)

    # -- processes ---------------------------------------------------------------------------

    def spawn(
        self,
        host: Host,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> NsProcess:
        """Start ``argv`` inside ``host``'s namespace, output to ``log_dir/NAME.log``."""
        log_path = self.log_dir / f"{name}.log"
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                ["ip", "netns", "exec", host.ns, *argv],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=dict(env) if env is not None else None,
                cwd=cwd,
                start_new_session=True,
            )
        started = NsProcess(name, host, process, log_path)
        self.processes.append(started)
        return started

    # -- faults ------------------------------------------------------------------------------

    def set_up(self, ns: str, dev: str, up: bool) -> None:
        """``ip link set DEV up|down`` inside ``ns``."""
        _run(["ip", "-n", ns, "link", "set", dev, "up" if up else "down"])

    def netem_available(self) -> bool:
        """Whether the kernel has the netem qdisc (tried once on a throw-away veth pair)."""
        if self._netem is None:
            a, b = self._name("v", 99), self._name("n", 99)
            _run(["ip", "link", "add", a, "type", "veth", "peer", "name", b])
            try:
                done = _run(
                    ["tc", "qdisc", "add", "dev", a, "root", "netem", "delay", "10ms"], check=False
                )
                self._netem = done.returncode == 0
            finally:
                _run(["ip", "link", "del", a], check=False)
        return self._netem

    def slow(self, host: Host, delay_ms: int) -> Literal["netem", "tbf"]:
        """Slow the traffic to and from ``host`` (both ends of its bridge veth): ``netem delay``
        of ``delay_ms`` each way when the kernel has netem; else a tbf rate limit of 8 kbit/s
        with a 1600-byte bucket: after an idle moment ~1.6 KB pass at once, everything past it
        at 1 KB/s, so an answer of a few KB (the vLLM probe server's vector of 576 floats is
        ~12 KB of JSON) takes seconds, far past ``delay_ms``; small exchanges may not notice.
        Returns which one is in place."""
        if self.netem_available():
            spec = ["netem", "delay", f"{delay_ms}ms"]
            kind: Literal["netem", "tbf"] = "netem"
        else:
            # burst must hold one full frame (MTU 1500 + header), or big frames are dropped.
            spec = ["tbf", "rate", "8kbit", "burst", "1600", "latency", "30s"]
            kind = "tbf"
        _run(["tc", "qdisc", "replace", "dev", host.peer, "root", *spec])
        _run(
            [
                "ip",
                "netns",
                "exec",
                host.ns,
                "tc",
                "qdisc",
                "replace",
                "dev",
                host.dev,
                "root",
                *spec,
            ]
        )
        return kind

    def unslow(self, host: Host) -> None:
        """Remove :meth:`slow`'s qdiscs (back to the default)."""
        _run(["tc", "qdisc", "del", "dev", host.peer, "root"], check=False)
        _run(
            ["ip", "netns", "exec", host.ns, "tc", "qdisc", "del", "dev", host.dev, "root"],
            check=False,
        )

    # -- teardown ----------------------------------------------------------------------------

    def close(self) -> None:
        """Stop every process, delete every namespace, link and the bridge (never raises)."""
        for started in reversed(self.processes):
            try:
                started.stop()
            except Exception:  # keep tearing down
                pass
        for host in self.hosts.values():
            _kill_namespace_pids(host.ns)
            _run(["ip", "netns", "del", host.ns], check=False)
            _run(["ip", "link", "del", host.peer], check=False)  # gone with the peer, normally
        if self._created:
            _run(["ip", "link", "del", self.bridge], check=False)
        self.hosts.clear()

    @staticmethod
    def _delete(names: list[str]) -> None:
        for name in names:
            if name.startswith(NS_PREFIX):
                _kill_namespace_pids(name)
                _run(["ip", "netns", "del", name], check=False)
            else:
                _run(["ip", "link", "del", name], check=False)

    def leftovers(self) -> list[str]:
        """Namespaces and links of this run still present (empty after :meth:`close`)."""
        names = [
            line.split()[0]
            for line in _run(["ip", "netns", "list"], check=False).stdout.splitlines()
            if line.split() and line.split()[0].startswith(self._ns_prefix)
        ]
        for line in _run(["ip", "-o", "link", "show"], check=False).stdout.splitlines():
            parts = line.split(":")
            name = parts[1].strip().split("@")[0] if len(parts) >= 2 else ""
            if re.fullmatch(rf"{re.escape(self.tag)}[zvnpq]{self.instance}\d*", name):
                names.append(name)
        return names


def wait_until(
    check: Callable[[], bool], timeout_s: float, what: str, interval_s: float = 0.2
) -> None:
    """Poll ``check()`` until it is true; past ``timeout_s`` raise TimeoutError naming ``what``."""
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout_s:g} s")
        time.sleep(interval_s)
