"""Loopback ports for the servers the local stack, the benchmarks and the tests spawn."""

from __future__ import annotations

import collections
import os
import random
import socket
import subprocess
import threading
import time

import psutil

PORTS_ENV = "EDGEFLEET_PORTS"  # "LOW-HIGH": free_port draws from this range alone (the tests give each worker one)
# Below Linux's default ephemeral range (32768-60999), from which the kernel draws every outgoing connection's
# port and every bind(0): a broker killed and restarted on its port (a fault test, the local stack) must not
# find it handed to another server, or taken as a connection's source port, in between. Below Kubernetes'
# NodePort range (30000-32767) too, and above every port the stack fixes (at most 10001).
DEFAULT_PORTS = range(20000, 30000)
_PICKS = 500

_lock = threading.Lock()
_handed_out: collections.deque[int] = collections.deque()


def port_range() -> range:
    """The ports free_port draws from: EDGEFLEET_PORTS ("LOW-HIGH", both included) where set, else DEFAULT_PORTS.

    Raises:
        ValueError: EDGEFLEET_PORTS is set and is not such a range of unprivileged ports.
    """
    raw = os.environ.get(PORTS_ENV)
    if not raw:
        return DEFAULT_PORTS
    low, _, high = raw.partition("-")
    try:
        ports = range(int(low), int(high) + 1)
    except ValueError:
        ports = range(0)
    if not ports or ports.start < 1024 or ports.stop > 65536:
        raise ValueError(f"{PORTS_ENV}={raw!r}: expected LOW-HIGH, 1024 <= LOW <= HIGH <= 65535")
    return ports


def share(index: int, count: int) -> str:
    """The `index`-th of `count` disjoint slices of port_range(), as an EDGEFLEET_PORTS value: one for each of
    the processes that start servers side by side (the tests' workers).

    Raises:
        ValueError: index is not in 0..count-1, or the range is too small to share.
    """
    ports = port_range()
    size = len(ports) // count if count > 0 else 0
    if not 0 <= index < count or size < 2:
        raise ValueError(f"cannot give share {index} of {count} of ports {ports.start}-{ports.stop - 1}")
    return f"{ports.start + index * size}-{ports.start + (index + 1) * size - 1}"


def free_port() -> int:
    """A loopback port nothing is bound to, drawn at random from `port_range()`.

    This process never hands a port out twice while it remembers it (the last half of the range): a broker
    the tests kill keeps its port for its restart, and no other server of this process takes it meanwhile.

    Raises:
        ValueError: EDGEFLEET_PORTS is malformed.
        RuntimeError: no free port found in the range.
    """
    ports = port_range()
    with _lock:
        for port in random.sample(ports, min(_PICKS, len(ports))):
            if port not in _handed_out and _bindable(port):
                _handed_out.append(port)
                if len(_handed_out) > len(ports) // 2:
                    _handed_out.popleft()
                return port
    raise RuntimeError(f"no free loopback port in {ports.start}-{ports.stop - 1} ({PORTS_ENV})")


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def wait_listening(process: subprocess.Popen, port: int, timeout: float, what: str) -> None:
    """Returns once `process`, or a process it started, listens on `port`.

    Only that process counts: a connection that succeeds could reach another process on the port (one that
    took it between free_port and the bind), and the caller would then talk to the wrong server unawares.

    Raises:
        RuntimeError: the process exited (the message names whoever listens on the port, if anyone does).
        TimeoutError: it did not listen within `timeout` seconds.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}{_held_by(port)}")
        if _listens(process.pid, port):
            return
        time.sleep(0.05)
    raise TimeoutError(f"{what} did not listen on port {port} within {timeout}s{_held_by(port)}")


def _listens(pid: int, port: int) -> bool:
    try:
        process = psutil.Process(pid)
        family = [process, *process.children(recursive=True)]
    except psutil.NoSuchProcess:
        return False
    return any(port in _listening_ports(member) for member in family)


def _listening_ports(process: psutil.Process) -> set[int]:
    try:
        return {c.laddr.port for c in process.net_connections("tcp") if c.status == psutil.CONN_LISTEN}
    except psutil.NoSuchProcess:
        return set()


def _held_by(port: int) -> str:
    holders = [c.pid for c in psutil.net_connections("tcp") if c.status == psutil.CONN_LISTEN and c.laddr.port == port]
    if not holders:
        return ""
    pids = ", ".join(str(pid or "?") for pid in sorted(set(holders), key=str))
    return f" (another process listens on port {port}: pid {pids})"
