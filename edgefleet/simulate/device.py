"""One simulated device: its MQTT session on the fleet broker (link.py), its model store and the real
rollout state machine, its retained statuses, and (when the process sends telemetry) its telemetry.

What goes over the fleet broker is what the device's bridge carries (edgefleet/brokerconf.py `bridge`):
statuses of inference, sync and telemetry (retained, every status_interval_s, jittered, also while the
link is down: the link queues them as the bridge queue would), sync/state (retained), telemetry and its
acks, the fleet's rollout and plugin rollouts (subscribed on every connect, so a retained rollout present
at connect reaches a late joiner). On every connect the link re-sends each topic's last retained
message as it was published (not re-stamped), as the bridge re-sends the device broker's.
A rollout is handled as SyncService handles it: the newest message wins, a newer one (another model
or version, or an abort) supersedes the one in progress (membership.supersedes), and the Machine runs in a worker
thread only while there is work.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import shutil
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import paho.mqtt.client as paho

from edgefleet.simulate.link import DeviceLink, Endpoint, LinkCounters
from edgefleet.simulate.predictions import Draw, Recording
from edgefleet.simulate.stats import TelemetrySums
from edgefleet.simulate.sync_io import SimInference, SimSyncIo, skip_smoke_test
from services.sync.rollout import Machine, Superseded
from services.sync.store import FALLBACK, ModelStore
from shared import VERSION, topics
from shared.cascade import verify_folder
from shared.codec import DecodeError, WireFormat, decode, encode
from shared.config import SyncSettings
from shared.logs import fields
from shared.mqtt import content_type_of
from shared.schemas import (
    InferenceStats,
    ModelRef,
    PluginRollout,
    ProviderReport,
    Rollout,
    ServiceState,
    ServiceStatus,
    SyncState,
    TelemetryStats,
)

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from mypy_boto3_s3 import S3Client

log = logging.getLogger(__name__)
JSON = WireFormat.JSON.content_type
# What the simulated inference says it runs on: the recording was made on ONNX Runtime's CPU provider.
CPU = "CPUExecutionProvider"
SIM_PROVIDER = ProviderReport(requested=[CPU], available=[CPU], active=CPU, fallback=False)


class Telemetry(Protocol):
    """What a device needs of its telemetry (edgefleet.simulate.telemetry.SimTelemetry)."""

    async def run(self) -> None: ...

    def stats(self) -> Any: ...

    def close(self) -> None: ...


# (device, its folder, its link, what its inference serves) -> its telemetry
MakeTelemetry = Callable[[str, Path, DeviceLink, Callable[[], ModelRef | None]], Telemetry]


class Tally:
    """The counts a process's devices add to from any thread (rollout workers and the loop): rollouts
    handled, each device's last reported sync state, and tasks or workers that died of a bug."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._handled = 0
        self._failed = 0
        self._states: dict[str, SyncState] = {}

    def reported(self, device: str, state: SyncState) -> None:
        """Notes the state a device just reported."""
        with self._lock:
            self._states[device] = state

    def handled_one(self) -> None:
        """Notes a rollout message a device's state machine finished handling."""
        with self._lock:
            self._handled += 1

    def failed_one(self) -> None:
        """Notes a device's task or worker that ended with an exception."""
        with self._lock:
            self._failed += 1

    def snapshot(self) -> tuple[int, int, Counter[SyncState]]:
        """(rollouts handled, failures, devices by last reported state)."""
        with self._lock:
            return self._handled, self._failed, Counter(self._states.values())


def _uncounted(nbytes: int) -> None:
    """Download bytes nobody counts."""


@dataclass
class ProcessResources:
    """What every device of a process shares: nothing device-specific (each device has its own
    certificate, TLS context, session, store, state machine and outbox)."""

    settings: SyncSettings
    s3: S3Client
    trusted: dict[str, Ed25519PublicKey]
    recording: Recording
    predictions_per_s: float
    endpoint: Endpoint
    connector: Executor  # the blocking part of connects
    workers: Executor  # rollout workers: a thread per device while it handles a rollout
    stopping: threading.Event
    seed: Path  # the seed model, copied once per process; each store's fallback hard-links to it
    seed_model: ModelRef  # what it is (verified once)
    downloaded: Callable[[int], None] = _uncounted  # bytes each download step fetched (the registry counter)
    counters: LinkCounters = field(default_factory=LinkCounters)
    tally: Tally = field(default_factory=Tally)


class SimDevice:
    """One device (see the module's doc).

    :param str device: its id (its certificate's common name).
    :param Path folder: its state folder (store/, outbox.db).
    :param ProcessResources shared: what the process's devices share.
    :param make_telemetry: builds the device's telemetry on its link and folder; None: no telemetry.
    """

    def __init__(self, device: str, folder: Path, shared: ProcessResources,
                 make_telemetry: MakeTelemetry | None = None) -> None:
        self.device, self.shared = device, shared
        self.link = DeviceLink(device, shared.endpoint, shared.connector, shared.counters)
        self.store = ModelStore(folder / "store", shared.settings.keep_versions)
        if _seed(self.store, shared.seed):
            # A new store: its fallback is the process's seed copy, verified once (copy_seed), so it is
            # made current without hashing the seed model again for every device.
            self.store.activate(self.store.root / FALLBACK, remember_previous=False)
            self.repairs: list[str] = []
            serving = shared.seed_model
        else:  # a kept store (--state-dir): the real start-up, as SyncService does it
            self.store.seed(shared.seed)
            self.repairs = self.store.repair()
            serving = self.store.current()[1].ref()
        draw = Draw(shared.recording, shared.predictions_per_s, shared.settings.canary.warmup,
                    offset=random.randrange(len(shared.recording.predictions)))  # noqa: S311
        self.inference = SimInference(serving, draw)
        self.io = SimSyncIo(device, shared.settings, shared.s3, shared.trusted, self.store, self.link,
                            self.inference, shared.stopping, shared.tally.reported, shared.downloaded)
        self.machine = Machine(self.store, shared.settings, self.io, device, smoke=skip_smoke_test)
        self._handled: Rollout | None = None
        self._working = False
        self._status_timer: asyncio.TimerHandle | None = None
        self.link.subscribe(topics.rollout(), self._on_rollout, qos=1)
        # The bridge carries plugin rollouts too; the simulated device runs no plugins, so it only decodes them.
        self.link.subscribe(topics.all_plugin_rollouts(), self._on_plugin_rollout, qos=1)
        self._started = time.monotonic()
        self.telemetry = (make_telemetry(device, folder, self.link, self.inference_model) if make_telemetry is not None
                          else None)
        self._telemetry_task: asyncio.Task[None] | None = None

    # -- lifecycle (loop thread) ---------------------------------------------------------------------

    def start(self, delay_s: float) -> None:
        """Connects after `delay_s`; reports its sync state (queued until connected), starts statuses,
        telemetry and, if a canary was pending when the process last stopped, the recovery."""
        self.link.start(delay_s)  # first: from here on, publishes from other threads go through the loop
        if self.store.pending_canary() is not None:
            self._working = True
            self._submit(self._recover_then_work)
        else:
            self.io.report(SyncState.IDLE, None, reason="; ".join(self.repairs) or None)
        loop = asyncio.get_running_loop()
        self._publish_statuses()  # the services' first word at start, queued until the link is up
        self._status_timer = loop.call_later(self._status_interval(), self._status_tick)
        if self.telemetry is not None:
            self._telemetry_task = loop.create_task(self.telemetry.run())
            self._telemetry_task.add_done_callback(self._telemetry_ended)

    def _telemetry_ended(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and (exc := task.exception()) is not None:
            self.shared.tally.failed_one()
            log.error("telemetry stopped by a bug", exc_info=exc, extra=fields(device=self.device))

    def _submit(self, work: Callable[[], None]) -> None:
        """Runs a rollout worker; a bug that escapes it is logged and counted, never lost."""
        self.shared.workers.submit(work).add_done_callback(self._worker_ended)

    def _worker_ended(self, future: Future[None]) -> None:
        if not future.cancelled() and (exc := future.exception()) is not None:
            self.shared.tally.failed_one()
            log.error("rollout worker stopped by a bug", exc_info=exc, extra=fields(device=self.device))

    def stop_work(self) -> asyncio.Task[None] | None:
        """Stops the statuses and telemetry; returns the telemetry task to await (cancelled)."""
        if self._status_timer is not None:
            self._status_timer.cancel()
        if self._telemetry_task is not None:
            self._telemetry_task.cancel()
        return self._telemetry_task

    def say_offline(self) -> None:
        """The services' last word (reason "shutdown"), as the real services publish it when they stop
        (queued if the link is down, as the device broker would hold it)."""
        self._publish_statuses(ServiceState.OFFLINE, "shutdown")

    def close(self) -> None:
        """Closes the telemetry outbox (after the link is closed): what it holds is kept."""
        if self.telemetry is not None:
            self.telemetry.close()

    def wake(self) -> None:
        """Ends this device's waits (shutdown: the shared `stopping` is set)."""
        with self.io.changed:
            self.io.changed.notify_all()

    # -- statuses ------------------------------------------------------------------------------------

    def _status_interval(self) -> float:
        return self.shared.settings.status_interval_s * random.uniform(0.8, 1.2)  # noqa: S311  jitter

    def _status_tick(self) -> None:
        self._publish_statuses()  # link up or not: the real services publish to their own broker regardless
        self._status_timer = asyncio.get_running_loop().call_later(self._status_interval(), self._status_tick)

    def _publish_statuses(self, state: ServiceState = ServiceState.ONLINE, reason: str | None = None) -> None:
        now, model = time.time(), self.inference.model
        inference: dict[str, Any] = {"model": model, "provider": SIM_PROVIDER, "inference": self._inference_stats()}
        for service, extra in ((topics.INFERENCE_SERVICE, inference), (topics.SYNC_SERVICE, {"model": model}),
                               (topics.TELEMETRY_SERVICE, {"telemetry": self._telemetry_status()})):
            status = ServiceStatus(device=self.device, service=service, state=state, at=now,
                                   edgefleet_version=VERSION, reason=reason, **extra)
            self.link.publish(topics.status(self.device, service), encode(status), qos=1, retain=True,
                              content_type=JSON)

    def _inference_stats(self) -> InferenceStats:
        """The counts a camera at --predictions-per-s would have made since start (one frame, one prediction)."""
        made = int((time.monotonic() - self._started) * self.shared.predictions_per_s)
        return InferenceStats(frames_received=made, predictions_published=made, batches=made)

    def _telemetry_status(self) -> TelemetryStats | None:
        if self.telemetry is None:
            return None
        s = self.telemetry.stats()
        draw = getattr(self.telemetry, "draw", None)  # SimTelemetry's RecordDraw: the alerts it raised and holds
        open_alerts = sorted(str(getattr(kind, "value", kind)) for kind in getattr(draw, "open", {}))
        return TelemetryStats(queue_records=s.queued, queue_bytes=s.queue_bytes, next_seq=s.next_seq,
                              dropped={}, batches_sent=s.sent_batches, batches_resent=s.resent_batches,
                              records_acknowledged=s.acked, open_alerts=open_alerts, epoch=s.epoch,
                              batches_dead_lettered=s.dead_lettered)

    def telemetry_sums(self, into: TelemetrySums) -> None:
        """Adds this device's telemetry counts to `into`."""
        if self.telemetry is None:
            return
        s = self.telemetry.stats()
        for name in TelemetrySums.model_fields:
            setattr(into, name, getattr(into, name) + getattr(s, name))

    # -- rollouts ------------------------------------------------------------------------------------

    def _on_plugin_rollout(self, message: paho.MQTTMessage) -> None:
        if not message.payload:
            return
        try:
            decode(PluginRollout, message.payload, content_type_of(message))
        except DecodeError as exc:
            log.warning("malformed plugin rollout", extra=fields(device=self.device, detail=str(exc)[:200]))

    def _on_rollout(self, message: paho.MQTTMessage) -> None:
        if not message.payload:  # the retained rollout was cleared
            return
        try:
            rollout = decode(Rollout, message.payload, content_type_of(message))
        except DecodeError as exc:
            # The real sync service reports it on its errors topic, which the bridge does not carry.
            log.warning("malformed rollout", extra=fields(device=self.device, detail=str(exc)[:200]))
            return
        with self.io.changed:
            self.io.latest = rollout
            self.io.changed.notify_all()
            if self._working or rollout == self._handled:
                return
            self._working = True
        self._submit(self._work)

    def _recover_then_work(self) -> None:
        try:
            self.machine.recover()
        except Exception as exc:  # as SyncService: the store stays as it was; rollouts still get handled
            log.exception("recovery at start failed", extra=fields(device=self.device))
            self.io.report(SyncState.FAILED, None, reason=f"internal error while recovering at start: {exc}")
        self._work()

    def _work(self) -> None:
        """The rollout worker: handles the newest rollout until there is no newer one, then returns its thread."""
        try:
            while (rollout := self._next()) is not None:
                try:
                    self.machine.handle(rollout)
                except Superseded:
                    pass
                except Exception as exc:  # a bug must not stop the device; it keeps its model
                    log.exception("rollout failed unexpectedly", extra=fields(device=self.device))
                    self.io.report(SyncState.FAILED, rollout.rollout_id, reason=f"internal error: {exc}")
                self.shared.tally.handled_one()
        except BaseException:  # whatever escaped (_next clears it on the way out): later rollouts start a worker
            with self.io.changed:
                self._working = False
            raise

    def _next(self) -> Rollout | None:
        with self.io.changed:
            latest = self.io.latest
            if self.shared.stopping.is_set() or latest is None or latest == self._handled:
                self._working = False
                return None
            self._handled = latest
            return latest

    def inference_model(self) -> ModelRef:
        """The model the simulated inference serves (telemetry's drift samples name it)."""
        return self.inference.model


def _seed(store: ModelStore, seed: Path) -> bool:
    """The store's fallback as hard links to the process's seed copy, in one rename: a thousand stores
    do not hold a thousand copies of the seed model. Nothing ever writes into a fallback's files.

    :returns: whether the store was new (False: it has a fallback already, left as it is).
    """
    fallback = store.root / FALLBACK
    if fallback.exists() or store.current_link.is_symlink():
        return False
    staging = store.root / (FALLBACK + ".link")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    for path in seed.iterdir():  # model file, manifest.json, manifest.sig (a cascade's stages: copied by seed())
        if path.is_file():
            os.link(path, staging / path.name)
    os.replace(staging, fallback)
    return True


def copy_seed(seed_dir: Path, into: Path) -> tuple[Path, ModelRef]:
    """The process's one copy of the seed model (verified by the real store's seeding), which every
    device's fallback hard-links to, and what it is.

    :raises ModelError: the seed model does not verify.
    """
    ModelStore(into, keep_versions=1).seed(seed_dir)
    return into / FALLBACK, verify_folder(into / FALLBACK).ref()
