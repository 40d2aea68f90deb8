"""Two network namespaces joined by a veth pair: two "nodes" on one machine, for multi-node tests
and the scaling benchmark. Needs root and iproute2 (``ip``; ``tc`` for a rate limit).

    with two_nodes(rate="100mbit") as net:       # NetnsUnavailable when not root / no ip
        procs = [net.popen(i, cmd, env) for i in range(2)]
        results = net.wait_all(procs, timeout=60)  # kills everything left on timeout

Namespaces, their veth pair and any process still inside them are always removed on exit.
This kernel has no netem, so only the rate (tbf) can be limited, not latency.
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass

_COUNTER = itertools.count()
HZ = 250  # a tbf bucket must hold at least one timer tick of traffic or the rate is not reached


class NetnsUnavailable(RuntimeError):
    """Namespaces cannot be made here (not root, or no ``ip``); the message says why."""


def unavailable_reason() -> str | None:
    """Why namespaces cannot be created here, or None when they can."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2 `ip` is not installed"
    return None


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=10)


@dataclass
class NodePair:
    """Node ``i`` lives in namespace ``names[i]`` with interface ``ifaces[i]`` at ``addrs[i]``."""

    names: tuple[str, str]
    ifaces: tuple[str, str]
    addrs: tuple[str, str]

    def popen(self, node: int, cmd: list[str], env: dict | None = None, **kwargs) -> subprocess.Popen:
        """Start ``cmd`` inside node ``node``'s namespace (``ip netns exec``)."""
        return subprocess.Popen(["ip", "netns", "exec", self.names[node], *cmd], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True, **kwargs)

    def wait_all(self, procs: list[subprocess.Popen], timeout: float) -> list[tuple[int, str]]:
        """(return code, output) of each process; past ``timeout`` seconds all are killed (-9)."""
        deadline = time.monotonic() + timeout
        out = []
        for p in procs:
            try:
                text, _ = p.communicate(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                for q in procs:
                    _kill_group(q)
                text, _ = p.communicate()
            out.append((p.returncode, text))
        return out


def _kill_group(p: subprocess.Popen) -> None:
    if p.poll() is None:
        with suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)


@contextmanager
def two_nodes(rate: str | None = None, burst_bytes: int | None = None) -> Iterator[NodePair]:
    """Create the namespaces and veth pair (optionally rate-limited with tbf in both directions),
    yield them, and always delete them (and kill what still runs inside) on the way out."""
    reason = unavailable_reason()
    if reason:
        raise NetnsUnavailable(reason)
    if rate and shutil.which("tc") is None:
        raise NetnsUnavailable("`tc` is not installed (needed for a rate limit)")
    tag = f"{os.getpid() % 100000}x{next(_COUNTER)}"
    names = (f"cnt{tag}a", f"cnt{tag}b")
    ifaces = (f"cv{tag}a"[:15], f"cv{tag}b"[:15])
    subnet = f"10.{200 + os.getpid() % 50}.{next(_COUNTER) % 250}"
    addrs = (f"{subnet}.1", f"{subnet}.2")
    created: list[str] = []
    try:
        for name in names:
            _ip("netns", "add", name)
            created.append(name)
        _ip("link", "add", ifaces[0], "netns", names[0], "type", "veth", "peer", "name", ifaces[1],
            "netns", names[1])
        for name, iface, addr in zip(names, ifaces, addrs):
            _ip("-n", name, "addr", "add", f"{addr}/24", "dev", iface)
            _ip("-n", name, "link", "set", iface, "up")
            _ip("-n", name, "link", "set", "lo", "up")
            if rate:
                burst = burst_bytes or max(4096, _rate_bits(rate) // 8 // HZ)
                subprocess.run(["ip", "netns", "exec", name, "tc", "qdisc", "add", "dev", iface, "root", "tbf",
                                "rate", rate, "burst", str(burst), "latency", "50ms"],
                               check=True, capture_output=True, text=True, timeout=10)
        yield NodePair(names, ifaces, addrs)
    except subprocess.CalledProcessError as exc:
        raise NetnsUnavailable(f"{' '.join(exc.cmd)} failed: {exc.stderr.strip()}") from None
    finally:
        for name in created:
            _kill_inside(name)
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10)


def _kill_inside(name: str) -> None:
    """SIGKILL every process still in namespace ``name`` (all of them were started by us)."""
    pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True, timeout=10).stdout.split()
    for pid in pids:
        with suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)


def _rate_bits(rate: str) -> int:
    """Bits per second of a tc rate such as ``100mbit`` or ``1gbit``."""
    units = {"gbit": 10**9, "mbit": 10**6, "kbit": 10**3, "bit": 1}
    for unit, factor in units.items():
        if rate.endswith(unit):
            return int(float(rate[: -len(unit)]) * factor)
    raise ValueError(f"rate {rate!r}: use e.g. 100mbit or 1gbit")
