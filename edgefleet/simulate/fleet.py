"""One simulator process: the one owner of its asyncio loop, its devices, its thread pools, its stats
file and its shutdown (SIGTERM or SIGINT: statuses offline, clean disconnects, exit 0).

All devices' MQTT sessions run on the one loop (link.py); the rollout workers (a thread per device
while it handles a rollout) and the blocking part of connects run in pools the process owns.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import hashlib
import logging
import math
import os
import random
import resource
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import psutil

from edgefleet.certs import issue_device
from edgefleet.simulate import predictions
from edgefleet.simulate.device import MakeTelemetry, Shared, SimDevice, Telemetry, copy_seed
from edgefleet.simulate.link import DeviceLink, Endpoint
from edgefleet.simulate.stats import LinkStats, RegistryCounter, RolloutStats, SimStats, TelemetrySums, write
from shared import registry, s3
from shared.config import DEFAULT_MODEL_DIR, SyncSettings, TelemetrySettings
from shared.logs import fields
from shared.schemas import ModelRef

log = logging.getLogger(__name__)

# A rollout worker needs little stack (the state machine, boto3 calls, file I/O): a thousand of them
# reserve 1 GiB of address space instead of 8 (only touched pages count against RSS either way).
WORKER_STACK_BYTES = 1024 * 1024
TMPFS = Path("/dev/shm")  # noqa: S108  a parent for mkdtemp, not a file opened
CONNECT_THREADS = 8
# At shutdown: the most seconds the offline statuses, then the DISCONNECTs, may take to go out.
STOP_STEP_S = 5.0  # TLS handshakes at once: enough to keep a loopback broker busy on two cores


@dataclass(frozen=True)
class Options:
    """What `edgefleet simulate run` was asked for (edgefleet/cli/simulate.py documents each)."""

    devices: list[str]
    endpoint: Endpoint
    trusted_keys: Path
    seed_model: Path
    predictions_file: Path
    records_per_s: float = 5.0
    predictions_per_s: float = 20.0
    connect_spread_s: float = 5.0
    cut_share: float = 0.0
    cut_at_s: float = 0.0
    cut_for_s: float = 60.0
    stats: Path | None = None
    duration_s: float = 0.0
    state_dir: Path | None = None
    keep_state: bool = False


def cut_devices(devices: list[str], share: float) -> list[str]:
    """The ceil(share * N) devices whose link is cut, chosen by a stable hash of the id (the same ones
    on every run, and independent of which process simulates which device)."""
    count = min(len(devices), math.ceil(share * len(devices) - 1e-9)) if share > 0 else 0
    return sorted(devices, key=lambda d: hashlib.sha256(d.encode()).digest())[:count]


def ensure_certificates(certs: Path, devices: list[str]) -> int:
    """Issues <device>.crt/.key in `certs` (with the CA key there) for each device that has none.

    :returns: how many were issued.
    :raises ValueError: a device id that is not one (or is reserved for the fleet's services).
    :raises FileNotFoundError: no CA (ca.crt, ca.key) in `certs` while a certificate is missing.
    """
    missing = [d for d in devices if not (certs / f"{d}.crt").exists() or not (certs / f"{d}.key").exists()]
    for device in missing:
        issue_device(certs, device)
    return len(missing)


class Malloc:
    """glibc's allocator, tamed for a process of many short-lived worker threads (no-op elsewhere).

    Each thread that allocates gets its own malloc arena (up to 8 per core), and an arena keeps what
    it once held: a rollout's workers each read 1 MiB download chunks, and the freed chunks stayed
    resident, 1.6 MB per device after a rollout of a 1 MiB model. Two arenas, and free memory handed
    back to the system every second, keep the process near what its devices really hold.
    """

    M_ARENA_MAX = -8  # mallopt's parameter number (malloc.h)

    def __init__(self) -> None:
        self._libc = None
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            libc.mallopt(self.M_ARENA_MAX, 2)
            libc.malloc_trim.argtypes = [ctypes.c_size_t]
            self._libc = libc
        except (OSError, AttributeError):  # not glibc (musl, macOS): its allocator is left as it is
            pass

    def trim(self) -> None:
        """Hands free heap memory back to the system (glibc's malloc_trim)."""
        if self._libc is not None:
            self._libc.malloc_trim(0)


def raise_open_files() -> int:
    """RLIMIT_NOFILE's soft limit raised to its hard limit (each device holds a socket and files)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


class Simulator:
    """The process's devices and everything they share (see the module's doc).

    :param Options options: what to simulate.
    :param SyncSettings settings: the registry and sync settings (EDGEFLEET_* environment), shared by
        every device (each Machine gets its own device id).
    :param TelemetrySettings telemetry: the batch, forwarding and ack settings of the devices' telemetry.
    """

    def __init__(self, options: Options, settings: SyncSettings, telemetry: TelemetrySettings) -> None:
        self.options, self.settings, self.telemetry_settings = options, settings, telemetry
        self.stopping = threading.Event()
        self.devices: list[SimDevice] = []
        self._process = psutil.Process()
        self._rss_before = 0
        self._all_connected_at: float | None = None
        self._cut: list[str] = []
        self._own_state = options.state_dir is None
        self._malloc: Malloc | None = None
        self.state_dir = options.state_dir or Path(tempfile.mkdtemp(prefix="edgefleet-sim-", dir=_tmpfs()))

    def run(self) -> int:
        """Runs until SIGTERM/SIGINT or --duration-s; returns the exit status (0)."""
        raise_open_files()
        self._malloc = Malloc()  # before any thread of ours allocates
        try:
            return asyncio.run(self._main())
        finally:
            if self._own_state and not self.options.keep_state:
                shutil.rmtree(self.state_dir, ignore_errors=True)

    async def _main(self) -> int:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        n = len(self.options.devices)
        # Recorded from the real model (not the seed, which may be any small model) if it is missing.
        recording = predictions.load(self.options.predictions_file, DEFAULT_MODEL_DIR)
        # Pools start their threads on demand, so the stack size holds for the rest of the process.
        threading.stack_size(WORKER_STACK_BYTES)
        workers = ThreadPoolExecutor(max_workers=max(1, n), thread_name_prefix="rollout")
        connector = ThreadPoolExecutor(max_workers=CONNECT_THREADS, thread_name_prefix="connect")
        try:
            # One client for all devices (boto3 clients are thread-safe), a connection for each device that
            # may download at once; one attempt per call, as sync's: RegistryIo retries with backoff.
            client = s3.client(self.settings, attempts=1, timeout_s=self.settings.download.timeout_s,
                               max_pool_connections=max(10, n))
            counter = RegistryCounter(client)
            seed, seed_model = copy_seed(self.options.seed_model, self.state_dir / "_seed")
            shared = Shared(
                settings=self.settings, s3=client, trusted=registry.load_public_keys(self.options.trusted_keys),
                recording=recording, predictions_per_s=self.options.predictions_per_s, endpoint=self.options.endpoint,
                connector=connector, workers=workers, stopping=self.stopping,
                seed=seed, seed_model=seed_model,
            )
            if self._malloc is not None:
                self._malloc.trim()  # the stats trim every second: the baseline is measured the same way
            self._rss_before = self._process.memory_info().rss
            make_telemetry = self._telemetry_factory() if self.options.records_per_s > 0 else None
            for device in self.options.devices:
                folder = self.state_dir / device
                folder.mkdir(parents=True, exist_ok=True)
                self.devices.append(SimDevice(device, folder, shared, make_telemetry))
            spread = self.options.connect_spread_s
            for sim in self.devices:
                sim.start(random.uniform(0, spread) if spread > 0 else 0.0)  # noqa: S311  jitter
            log.info("devices started", extra=fields(devices=n))
            background = [loop.create_task(self._misc()), loop.create_task(self._stats(shared, counter)),
                          loop.create_task(self._cuts())]
            try:
                if self.options.duration_s > 0:
                    await asyncio.wait_for(stop.wait(), self.options.duration_s)
                else:
                    await stop.wait()
            except TimeoutError:
                pass
            await self._shutdown(shared, counter, background)
            return 0
        finally:  # the pools are this process's: stopped here whatever happened (a worker ends its step)
            self.stopping.set()
            for sim in self.devices:
                sim.wake()
            workers.shutdown(wait=True, cancel_futures=True)
            connector.shutdown(wait=False, cancel_futures=True)

    async def _shutdown(self, shared: Shared, counter: RegistryCounter, background: list[asyncio.Task[None]]) -> None:
        log.info("stopping: statuses offline, then clean disconnects", extra=fields(devices=len(self.devices)))
        self.stopping.set()
        for sim in self.devices:
            sim.wake()
        # All devices at once, phase by phase: the loop polls the whole fleet, not each device.
        telemetry = [task for sim in self.devices if (task := sim.stop_work()) is not None]
        await asyncio.gather(*telemetry, return_exceptions=True)
        for sim in self.devices:
            sim.say_offline()
        await _until(lambda: all(sim.link.pending() == 0 for sim in self.devices), STOP_STEP_S)
        for sim in self.devices:
            sim.link.disconnect()
        await _until(lambda: all(sim.link.closed for sim in self.devices), STOP_STEP_S)
        for sim in self.devices:
            sim.close()
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        self._write_stats(shared, counter)
        log.info("devices stopped", extra=fields(devices=len(self.devices)))

    def _telemetry_factory(self) -> MakeTelemetry:
        from edgefleet.simulate.telemetry import SimTelemetry

        t, rate = self.telemetry_settings, self.options.records_per_s

        def make(device: str, folder: Path, link: DeviceLink, model: Callable[[], ModelRef | None]) -> Telemetry:
            return SimTelemetry(device, folder, link, rate, t.batch, t.forward, t.ack_timeout_s, model=model)

        return make

    async def _misc(self) -> None:
        """paho's keepalive work for every link, once a second, spread over the second."""
        while True:
            started = time.monotonic()
            for i, sim in enumerate(self.devices):
                sim.link.misc()
                if i % 100 == 99:
                    await asyncio.sleep(0)
            await asyncio.sleep(max(0.1, 1.0 - (time.monotonic() - started)))

    async def _cuts(self) -> None:
        """--cut-share of the devices lose their link --cut-at-s after all devices connected."""
        o = self.options
        if o.cut_share <= 0:
            return
        while self._all_connected_at is None:
            await asyncio.sleep(0.2)
        await asyncio.sleep(max(0.0, self._all_connected_at + o.cut_at_s - time.time()))
        chosen = set(cut_devices(o.devices, o.cut_share))
        for sim in self.devices:
            if sim.device in chosen:
                sim.link.cut(o.cut_for_s)
        self._cut = sorted(chosen)
        log.info("links cut", extra=fields(devices=len(chosen), seconds=o.cut_for_s))

    async def _stats(self, shared: Shared, counter: RegistryCounter) -> None:
        while True:
            if self._all_connected_at is None and all(sim.link.connected.is_set() for sim in self.devices):
                self._all_connected_at = time.time()
                log.info("all devices connected", extra=fields(devices=len(self.devices)))
            if self._malloc is not None:
                self._malloc.trim()
            self._write_stats(shared, counter)
            await asyncio.sleep(1.0)

    def _write_stats(self, shared: Shared, counter: RegistryCounter) -> None:
        if self.options.stats is None:
            return
        write(self.options.stats, self.stats(shared, counter))

    def stats(self, shared: Shared, counter: RegistryCounter) -> SimStats:
        rss, n = self._process.memory_info().rss, len(self.devices)
        telemetry = TelemetrySums()
        for sim in self.devices:
            sim.telemetry_sums(telemetry)
        states: dict[str, int] = {}
        for state in list(shared.states.values()):
            states[state.value] = states.get(state.value, 0) + 1
        c = shared.counters
        return SimStats(
            pid=os.getpid(), at=time.time(), devices=n,
            connected=sum(1 for sim in self.devices if sim.link.connected.is_set()),
            all_connected_at=self._all_connected_at, rss_bytes=rss, rss_before_devices_bytes=self._rss_before,
            per_device_bytes=(rss - self._rss_before) // n if n else 0,
            link=LinkStats(connects=c.connects, connect_failures=c.connect_failures, losses=c.losses,
                           cut=len(self._cut)),
            telemetry=telemetry, registry=counter.stats(),
            rollouts=RolloutStats(handled=shared.handled[0], states=states),
        )


async def _until(done: Callable[[], bool], timeout_s: float) -> bool:
    """Whether `done()` came true within timeout_s (polled five times a second)."""
    deadline = time.monotonic() + timeout_s
    while not done():
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.2)
    return True


def _tmpfs() -> str | None:
    """The tmpfs where there is one: the devices' stores and outboxes cost no disk I/O."""
    return str(TMPFS) if TMPFS.is_dir() else None
