"""Loopback ports for the servers the local stack, the benchmarks and the tests spawn."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import random
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil

log = logging.getLogger(__name__)

PORTS_ENV = "EDGEFLEET_PORTS"  # "LOW-HIGH": free_port draws from this range instead
# Below Linux's default ephemeral range (32768-60999), from which the kernel draws every outgoing connection's
# port and every bind(0): a broker killed and restarted on its port (a fault test) must not find it taken as a
# connection's source port in between. Below Kubernetes' NodePorts (30000-32767) too, and above every port the
# stack fixes (at most 10001).
DEFAULT_PORTS = range(20000, 30000)
# How long a claimed port stays out of other draws, from its draw or from its broker's stop or kill (the
# broker claims it again then): far longer than any test keeps a killed broker down (the whole suite takes
# 12 minutes). A port whose server listens is never drawn anyway.
CLAIM_S = 30 * 60
_DRAWS = 500  # with half the range claimed or bound, 500 misses in a row has a chance of 2^-500
EPHEMERAL_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")

_rng = random.Random()  # noqa: S311 not a secret; its own generator, so no test's seeding of `random` steers it
_warned = False


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


def free_port() -> int:
    """A loopback port nothing is bound to, drawn at random from `port_range()`, and claimed.

    A claim keeps the port out of every other draw for CLAIM_S, by any process of this user that draws through
    here with the same temporary folder (the tests' two workers, the processes they start, a local stack
    beside them): a broker killed and restarted on its port gets it back. Claims are files in `claims_dir()`,
    one per port, taken under one lock.

    Raises:
        ValueError: EDGEFLEET_PORTS is malformed.
        RuntimeError: every port of the range drawn was bound or claimed, or the claims folder is not this
            user's alone.
    """
    ports = port_range()
    _warn_if_ephemeral(ports)
    with _claims() as folder:
        for port in _rng.sample(ports, min(_DRAWS, len(ports))):
            if not _claimed(folder, port) and bindable("127.0.0.1", port):
                _touch(folder, port)
                return port
    raise RuntimeError(f"no free loopback port in {ports.start}-{ports.stop - 1} ({PORTS_ENV}; claims in "
                       f"{claims_dir()})")


def claim(port: int) -> None:
    """Claims `port` again for CLAIM_S from now: a server that stops or is killed calls it, so the time its port
    stays out of other draws counts from when it went down, not from when it was drawn.

    Raises:
        RuntimeError: the claims folder is not this user's alone.
    """
    with _claims() as folder:
        _touch(folder, port)


def claims_dir() -> Path:
    """Where the claims live: one folder per user under the temporary folder."""
    return Path(tempfile.gettempdir()) / f"edgefleet-ports-{os.getuid()}"


@contextlib.contextmanager
def _claims() -> Iterator[Path]:
    folder = claims_dir()
    folder.mkdir(mode=0o700, exist_ok=True)
    # Its name is predictable: one another user made, or left writable, could block every draw or, through
    # symbolic links, have us create files where they point. Files are opened without following links too.
    found = folder.lstat()
    if not stat.S_ISDIR(found.st_mode) or found.st_uid != os.getuid() or found.st_mode & 0o077:
        raise RuntimeError(f"{folder}: the port claims folder must be a folder of user {os.getuid()} alone "
                           "(mode 700); remove it")
    lock = os.open(folder / ".lock", os.O_CREAT | os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when closed
        yield folder
    finally:
        os.close(lock)


def _claimed(folder: Path, port: int) -> bool:
    try:
        age = time.time() - (folder / str(port)).lstat().st_mtime
    except FileNotFoundError:
        return False
    return 0 <= age < CLAIM_S  # a time ahead of the clock (set back since) is no claim


def _touch(folder: Path, port: int) -> None:
    file = os.open(folder / str(port), os.O_CREAT | os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.utime(file)  # an old claim's file gets a new time, which is what counts
    finally:
        os.close(file)


def bindable(host: str, port: int) -> bool:
    """Whether a TCP socket can bind `host`:`port` now (nothing listens or holds it there)."""
    with socket.socket() as probe:
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def ephemeral_overlap(ports: range, path: Path | None = None) -> range:
    """The part of `ports` inside the kernel's ephemeral range (read from `path`, EPHEMERAL_RANGE_FILE by default);
    empty where it cannot be read."""
    try:
        low, high = map(int, (path or EPHEMERAL_RANGE_FILE).read_text().split())
    except (OSError, ValueError):
        return range(0)
    return range(max(ports.start, low), min(ports.stop, high + 1))


def _warn_if_ephemeral(ports: range) -> None:
    global _warned
    overlap = ephemeral_overlap(ports)
    if overlap and not _warned:
        _warned = True
        log.warning("ports %d-%d, which free_port draws from, are in the kernel's range for outgoing connections: "
                    "a killed server's port may be taken before it restarts; set %s outside it",
                    overlap.start, overlap.stop - 1, PORTS_ENV)


def wait_listening(process: subprocess.Popen, port: int, timeout: float, what: str) -> None:
    """Returns once `process`, or a process it started, listens on `port`.

    Only that process counts: a connection that succeeds could reach another process on the port (one that
    took it before our server bound it), and the caller would then talk to the wrong server unawares.

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
        family = [process, *_children(process)]
    except psutil.NoSuchProcess:
        return False
    return any(port in _listening_ports(member) for member in family)


def _children(process: psutil.Process) -> list[psutil.Process]:
    try:
        return process.children(recursive=True)
    except psutil.AccessDenied:
        # psutil reads every process's parent to find them; a hidepid /proc hides other users' processes.
        # The process itself still counts (the servers we start listen themselves).
        return []


def _listening_ports(process: psutil.Process) -> set[int]:
    try:
        return {c.laddr.port for c in process.net_connections("tcp") if c.status == psutil.CONN_LISTEN}
    except psutil.NoSuchProcess:
        return set()
    except psutil.AccessDenied:
        # Its sockets are not ours to read (another user's process): the system-wide table still says which pid
        # listens where, or nothing, and then nothing here counts as listening.
        return {c.laddr.port for c in _system_listeners() if c.pid == process.pid}


def _system_listeners() -> list:
    try:
        return [c for c in psutil.net_connections("tcp") if c.status == psutil.CONN_LISTEN]
    except psutil.Error:
        return []


def _held_by(port: int) -> str:
    holders = [c.pid for c in _system_listeners() if c.laddr.port == port]
    if not holders:
        return ""
    pids = ", ".join(str(pid or "?") for pid in sorted(set(holders), key=str))
    return f" (pid {pids} listens on port {port})"
