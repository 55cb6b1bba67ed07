"""One simulator process: the one owner of its asyncio loop, its devices, its thread pools, its stats
file and its shutdown (SIGTERM or SIGINT: statuses offline, clean disconnects, exit 0). SIGUSR1 stops the
devices appending telemetry records while they go on forwarding what their outboxes hold (a drain: a bench
audits the store once every outbox is empty, which the stats file's telemetry.queued shows).

All devices' MQTT sessions run on the one loop (link.py); the rollout workers (a thread per device
while it handles a rollout) and the blocking part of connects run in pools the process owns.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import psutil

from edgefleet.simulate import predictions
from edgefleet.simulate.cuts import cut_devices
from edgefleet.simulate.device import MakeTelemetry, ProcessResources, SimDevice, Telemetry, copy_seed
from edgefleet.simulate.identities import ensure_certificates
from edgefleet.simulate.link import CutMode, DeviceLink, Endpoint
from edgefleet.simulate.loop_lag import LoopLag
from edgefleet.simulate.process import Malloc, peak_rss_bytes, raise_open_files, state_bytes
from edgefleet.simulate.registry_counter import RegistryCounter
from edgefleet.simulate.stats import LinkStats, RolloutStats, SimStats, TelemetrySums, write
from shared import registry, s3
from shared.config import SyncSettings, TelemetrySettings
from shared.logs import fields
from shared.schemas import ModelRef

if TYPE_CHECKING:  # imported when the first device's telemetry is made (a process without any skips it)
    from edgefleet.simulate.telemetry import SimTelemetry

log = logging.getLogger(__name__)
# Re-exported: the bench and the CLI take them from here.
__all__ = ["Options", "Simulator", "cut_devices", "ensure_certificates", "raise_open_files"]

# A rollout worker needs little stack (the state machine, boto3 calls, file I/O): a thousand of them
# reserve 1 GiB of address space instead of 8 (only touched pages count against RSS either way).
WORKER_STACK_BYTES = 1024 * 1024
TMPFS = Path("/dev/shm")  # noqa: S108  a parent for mkdtemp, not a file opened
CONNECT_THREADS = 8  # TLS handshakes at once: enough to keep a loopback broker busy on two cores
STATE_BYTES_EVERY = 5  # seconds between walks over the devices' folders (state_bytes)
# At shutdown: the most seconds the offline statuses, then the DISCONNECTs, may take to go out.
STOP_STEP_S = 5.0


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
    cut_mode: CutMode = CutMode.SILENT
    stats: Path | None = None
    duration_s: float = 0.0
    state_dir: Path | None = None
    keep_state: bool = False


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
        self._state_bytes = 0
        self._all_connected_at: float | None = None
        self._cut: list[str] = []
        self._telemetries: list[SimTelemetry] = []  # every device's, for the drain (SIGUSR1)
        self._own_state = options.state_dir is None
        self._malloc: Malloc | None = None
        self.loop_lag = LoopLag()
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
        stop = _stop_on_signals()
        asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, self._drain)
        # Read before the baseline is measured, and never recorded here (the CLI records a missing one in
        # a child process): the real model run in this process would inflate the baseline.
        recording = predictions.load(self.options.predictions_file)
        # Pools start their threads on demand, so the stack size holds for the rest of the process.
        threading.stack_size(WORKER_STACK_BYTES)
        workers = ThreadPoolExecutor(max_workers=max(1, len(self.options.devices)), thread_name_prefix="rollout")
        connector = ThreadPoolExecutor(max_workers=CONNECT_THREADS, thread_name_prefix="connect")
        try:
            shared, counter = self._resources(recording, workers, connector)
            self._measure_baseline()
            self._start_devices(shared)
            loop = asyncio.get_running_loop()
            background = [loop.create_task(self._misc()), loop.create_task(self._stats(shared, counter)),
                          loop.create_task(self._cuts()), loop.create_task(self.loop_lag.run())]
            await self._run_until(stop)
            await self._shutdown(shared, counter, background, workers)
            return 0
        finally:  # the pools are this process's: stopped here whatever happened (a worker ends its step)
            self.stopping.set()
            for sim in self.devices:
                sim.wake()
            await _joined(workers)
            connector.shutdown(wait=False, cancel_futures=True)

    def _resources(self, recording: predictions.Recording, workers: ThreadPoolExecutor,
                   connector: ThreadPoolExecutor) -> tuple[ProcessResources, RegistryCounter]:
        """What the devices share: one S3 client for all (boto3 clients are thread-safe) with a connection
        for each device that may download at once, one attempt per call as sync's (RegistryIo retries with
        backoff), counted; the trusted keys; the seed model, copied once."""
        client = s3.client(self.settings, attempts=1, timeout_s=self.settings.download.timeout_s,
                           max_pool_connections=max(10, len(self.options.devices)))
        counter = RegistryCounter(client)
        seed, seed_model = copy_seed(self.options.seed_model, self.state_dir / "_seed")
        shared = ProcessResources(
            settings=self.settings, s3=client, trusted=registry.load_public_keys(self.options.trusted_keys),
            recording=recording, predictions_per_s=self.options.predictions_per_s, endpoint=self.options.endpoint,
            connector=connector, workers=workers, stopping=self.stopping, seed=seed, seed_model=seed_model,
            downloaded=counter.downloaded,
        )
        return shared, counter

    def _measure_baseline(self) -> None:
        if self._malloc is not None:
            self._malloc.trim()  # the stats trim every second: the baseline is measured the same way
        self._rss_before = self._process.memory_info().rss

    def _start_devices(self, shared: ProcessResources) -> None:
        make_telemetry = self._telemetry_factory() if self.options.records_per_s > 0 else None
        for device in self.options.devices:
            folder = self.state_dir / device
            folder.mkdir(parents=True, exist_ok=True)
            self.devices.append(SimDevice(device, folder, shared, make_telemetry))
        spread = self.options.connect_spread_s
        for sim in self.devices:
            sim.start(random.uniform(0, spread) if spread > 0 else 0.0)  # noqa: S311  jitter
        log.info("devices started", extra=fields(devices=len(self.devices)))

    async def _run_until(self, stop: asyncio.Event) -> None:
        try:
            await asyncio.wait_for(stop.wait(), self.options.duration_s or None)
        except TimeoutError:
            pass

    async def _shutdown(self, shared: ProcessResources, counter: RegistryCounter, background: list[asyncio.Task[None]],
                        workers: ThreadPoolExecutor) -> None:
        """Work stops first (telemetry, then the rollout workers, joined off the loop), then the services'
        offline statuses go out, then the clean DISCONNECTs: nothing a worker reports follows "offline"."""
        log.info("stopping: work, statuses offline, then clean disconnects", extra=fields(devices=len(self.devices)))
        self.stopping.set()
        for sim in self.devices:
            sim.wake()
        # All devices at once, phase by phase: the loop polls the whole fleet, not each device.
        telemetry = [task for sim in self.devices if (task := sim.stop_work()) is not None]
        await asyncio.gather(*telemetry, return_exceptions=True)
        await _joined(workers)
        for sim in self.devices:
            sim.say_offline()
        await _until(lambda: all(sim.link.settled for sim in self.devices), STOP_STEP_S)
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

    def _drain(self) -> None:
        """SIGUSR1: no more records are drawn; what the outboxes hold is still forwarded and acknowledged."""
        for telemetry in self._telemetries:
            telemetry.records_per_s = 0.0  # its writer then owes nothing more each tick
        log.info("draining: no new records", extra=fields(devices=len(self._telemetries)))

    def _telemetry_factory(self) -> MakeTelemetry:
        from edgefleet.simulate.telemetry import SimTelemetry

        t, rate = self.telemetry_settings, self.options.records_per_s

        def make(device: str, folder: Path, link: DeviceLink, model: Callable[[], ModelRef | None]) -> Telemetry:
            made = SimTelemetry(device, folder, link, rate, t, model=model)
            self._telemetries.append(made)
            return made

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
                sim.link.cut(o.cut_for_s, o.cut_mode)
        self._cut = sorted(chosen)
        log.info("links cut", extra=fields(devices=len(chosen), seconds=o.cut_for_s, mode=o.cut_mode.value))

    async def _stats(self, shared: ProcessResources, counter: RegistryCounter) -> None:
        loop, tick = asyncio.get_running_loop(), 0
        while True:
            if self._all_connected_at is None and all(sim.link.connected.is_set() for sim in self.devices):
                self._all_connected_at = time.time()
                log.info("all devices connected", extra=fields(devices=len(self.devices)))
            if self._malloc is not None:
                self._malloc.trim()
            if tick % STATE_BYTES_EVERY == 0:  # a walk over every device's folder: off the loop, now and then
                self._state_bytes = await loop.run_in_executor(None, state_bytes, self.state_dir)
            self._write_stats(shared, counter)
            tick += 1
            await asyncio.sleep(1.0)

    def _write_stats(self, shared: ProcessResources, counter: RegistryCounter) -> None:
        if self.options.stats is None:
            return
        write(self.options.stats, self.stats(shared, counter))

    def stats(self, shared: ProcessResources, counter: RegistryCounter) -> SimStats:
        """The process now (stats.SimStats documents each figure)."""
        rss, peak, n = self._process.memory_info().rss, peak_rss_bytes(), len(self.devices)
        telemetry = TelemetrySums()
        for sim in self.devices:
            sim.telemetry_sums(telemetry)
        handled, failed, states = shared.tally.snapshot()
        c = shared.counters
        return SimStats(
            pid=os.getpid(), at=time.time(), devices=n,
            connected=sum(1 for sim in self.devices if sim.link.connected.is_set()),
            all_connected_at=self._all_connected_at, rss_bytes=rss, rss_before_devices_bytes=self._rss_before,
            per_device_bytes=(rss - self._rss_before) // n if n else 0,
            peak_rss_bytes=peak, per_device_peak_bytes=(peak - self._rss_before) // n if n else 0,
            state_bytes=self._state_bytes, per_device_state_bytes=self._state_bytes // n if n else 0,
            failed=failed,
            link=LinkStats(connects=c.connects, connect_failures=c.connect_failures, losses=c.losses,
                           cut=len(self._cut), refused=c.refused,
                           queued=sum(sim.link.queued() for sim in self.devices)),
            telemetry=telemetry, registry=counter.stats(), rollouts=RolloutStats(handled=handled, states=dict(states)),
            loop_lag_p99_s=self.loop_lag.p99_s(), loop_lag_max_s=self.loop_lag.max_s(),
        )


async def _until(done: Callable[[], bool], timeout_s: float) -> bool:
    """Whether `done()` came true within timeout_s (polled five times a second)."""
    deadline = time.monotonic() + timeout_s
    while not done():
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.2)
    return True


async def _joined(workers: ThreadPoolExecutor) -> None:
    """The rollout workers joined off the loop (each ends its step: a download chunk, a wait)."""
    await asyncio.get_running_loop().run_in_executor(None, lambda: workers.shutdown(wait=True, cancel_futures=True))


def _stop_on_signals() -> asyncio.Event:
    """An event SIGTERM or SIGINT sets."""
    stop, loop = asyncio.Event(), asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


def _tmpfs() -> str | None:
    """The tmpfs where there is one: the devices' stores and outboxes cost no disk I/O."""
    return str(TMPFS) if TMPFS.is_dir() else None
