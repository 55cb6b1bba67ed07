"""One simulated device's telemetry: the real outbox (SQLite, in the device's folder on the simulator's
tmpfs) and the real forwarding protocol (services.telemetry.sending.Sender), driven on the asyncio loop
instead of the telemetry service's threads.

Records are drawn, not measured: resource samples and drift samples in the proportion the telemetry
service takes them (every resource_interval_s and drift.sample_interval_s, by default), their values
from per-device distributions (a load level, a memory size, scores that wander as a mean-reverting
walk), and alerts raised and resolved where those scores cross the drift rules' thresholds with their
hysteresis, as the device's drift detector would. They are committed in one transaction per
flush_interval_s tick, as the service commits what it gathered, at `records_per_s` on average, each
stamped with when in the tick it was made (so a lag measured from `at` includes the tick's wait).

Batches go out as the Forwarder sends them (the same topic, content type and correlation data). A real
device's forwarder publishes to the device's own broker, which bridges to the fleet broker; that local
link is up for as long as the device runs (until its shutdown: link.closing), so the forwarder's clock
runs as a bridged device's: ack_timeout_s after a sending it times out and sends again with the Sender's
backoff, whether the fleet link is up or not. What it publishes while the fleet link is cut waits in the
DeviceLink's queue (the bridge's queue, in the real thing) and goes out on reconnect, resends and all;
the cloud acknowledges each copy, and stores a batch once (an identical copy, if stored again, is counted
by the audit as `copies`). The Sender's link-up-only ack clock (ack_left(connected)) is for a forwarder
linked straight to a cloud broker; here it is asked with the local link's state.

Every outbox call is synchronous SQLite on tmpfs (no disk to wait for), so it runs on the loop; each
is small: one tick's records, one batch."""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import paho.mqtt.client as paho

from services.telemetry.drift import Rule, rules_from
from services.telemetry.outbox import Outbox
from services.telemetry.sending import Outgoing, Sender
from shared import topics
from shared.codec import DecodeError, decode
from shared.config import TelemetrySettings
from shared.logs import fields
from shared.mqtt import content_type_of
from shared.schemas import (
    Alert,
    AlertState,
    AlertType,
    ContainerSample,
    DriftSample,
    ModelRef,
    RecordBody,
    ResourceSample,
    Severity,
    TelemetryAck,
)

if TYPE_CHECKING:
    from edgefleet.simulate.link import DeviceLink

log = logging.getLogger(__name__)

CONTAINERS = ("inference", "telemetry", "sync", "mosquitto")  # what a device runs (docs/deploy: compose)
MAX_HELD_ACKS = 8  # acknowledgements held for a batch not (or no longer) waited for: a resend finds its ack
OUTBOX_CACHE_KIB = 256  # caps SQLite's page cache per outbox (2 MiB by default): a backlog stays in the device budget


@dataclass
class TelemetryStats:
    """One simulated device's telemetry counts.

    :ivar int appended: records drawn and committed to the outbox (the outbox's own gap records aside).
    :ivar int acked: records the cloud acknowledged (stored).
    :ivar int sent_batches: batches sent for the first time.
    :ivar int resent_batches: sendings again after a timeout.
    :ivar int dead_lettered: batches given up (by the cloud, or after max_attempts).
    :ivar int queued: records in the outbox now.
    :ivar int queue_bytes: their bytes.
    :ivar int next_seq: the outbox's next sequence number.
    :ivar str epoch: the outbox's epoch.
    """

    appended: int = 0
    acked: int = 0
    sent_batches: int = 0
    resent_batches: int = 0
    dead_lettered: int = 0
    queued: int = 0
    queue_bytes: int = 0
    next_seq: int = 1
    epoch: str = ""


class _Walk:
    """A mean-reverting random walk (a discrete Ornstein-Uhlenbeck process): a score that drifts and comes back."""

    def __init__(self, rng: random.Random, mean: float, spread: float, reversion: float = 0.1) -> None:
        self.rng, self.mean, self.spread, self.reversion = rng, mean, spread, reversion
        self.value = rng.gauss(mean, spread)

    def step(self) -> float:
        # The noise is scaled so the walk's stationary spread is `spread`.
        noise = self.spread * math.sqrt(1 - (1 - self.reversion) ** 2)
        self.value = self.mean + (1 - self.reversion) * (self.value - self.mean) + self.rng.gauss(0, noise)
        return self.value


class RecordDraw:
    """Draws one device's telemetry records. Its level (load, memory, disk, temperature, latency) is
    drawn once, so devices differ as a fleet's do; each record varies around it.

    :param str device: the device id the records carry.
    :param random.Random rng: where the randomness comes from.
    :param TelemetrySettings settings: the telemetry service's settings: the drift rules and window, the
        mix of kinds (resource_interval_s, drift.sample_interval_s).
    :param model: what the device serves now (for drift samples and alerts); None: not known.
    """

    def __init__(self, device: str, rng: random.Random, settings: TelemetrySettings,
                 model: Callable[[], ModelRef | None] | None = None) -> None:
        self.device, self.rng, self._model = device, rng, model or (lambda: None)
        self.drift_share = drift_share(settings)
        self.cpu_load = rng.betavariate(2, 5)  # a busy device or an idle one: the mean of its CPU samples
        self.memory_total = rng.choice((4, 8, 16)) << 30
        self.memory_level = rng.uniform(25, 75)
        self.disk_level = rng.uniform(10, 80)
        self.temperature = rng.gauss(55, 6)
        self.latency_ms = rng.lognormvariate(math.log(15), 0.4)
        drift = settings.drift
        self.window = drift.window
        self.rules = {rule.type: rule for rule in rules_from(drift)}
        # Each score wanders around a level well under its rule's raise threshold, and now and then crosses it.
        self.scores = {
            AlertType.PREDICTION_DRIFT: _Walk(rng, drift.psi_clear * 0.5, drift.psi_raise * 0.3),
            AlertType.CONFIDENCE_DRIFT: _Walk(rng, 0.0, drift.confidence_raise * 0.35),
            AlertType.FEATURE_DRIFT: _Walk(rng, drift.feature_z_clear * 0.5, drift.feature_z_raise * 0.3),
            AlertType.LATENCY: _Walk(rng, 1.0, (drift.latency_raise - 1) * 0.3),
        }
        self.open: dict[AlertType, str] = {}  # the open alerts' ids

    def draw(self, count: int, queue_bytes: int = 0, queue_records: int = 0, span_s: float = 0.0) -> list[RecordBody]:
        """`count` records, with the alerts the drift samples among them raise or resolve besides.

        :param int count: how many resource and drift samples.
        :param int queue_bytes: the outbox's bytes now (what a resource sample reports).
        :param int queue_records: its records now.
        :param float span_s: the records were made evenly over the last span_s seconds (their `at`), the
            newest now: what a tick gathered since the last one.
        :returns: the records, oldest first.
        """
        records: list[RecordBody] = []
        end = time.time()
        for i in range(count):
            now = end - span_s * (count - 1 - i) / count
            if self.rng.random() < self.drift_share:
                sample = self._drift(now)
                records.append(sample)
                records.extend(self._judge(sample))
            else:
                records.append(self._resources(now, queue_bytes, queue_records))
        return records

    def _resources(self, now: float, queue_bytes: int, queue_records: int) -> ResourceSample:
        r = self.rng
        uniform = r.random  # uniform(a, b) is a + (b - a) * random(), without the call around it
        memory = _clip(r.gauss(self.memory_level, 3), 1, 99)
        containers = [
            ContainerSample(name=name, cpu_percent=round(_beta_2_8(uniform) * 100 * self.cpu_load * 2, 2),
                            memory_bytes=int(self.memory_total * memory / 100 * (0.05 + 0.25 * uniform())),
                            memory_limit_bytes=self.memory_total, at=now - 10 * uniform())
            for name in CONTAINERS
        ]
        return ResourceSample(
            device=self.device, cpu_percent=round(_clip(r.gauss(self.cpu_load * 100, 8), 0, 100), 2),
            memory_percent=round(memory, 2), memory_used_bytes=int(self.memory_total * memory / 100),
            disk_percent=round(_clip(r.gauss(self.disk_level, 0.5), 0, 100), 2),
            temperatures_c={"cpu_thermal": round(r.gauss(self.temperature, 2), 1)}, containers=containers,
            queue_bytes=queue_bytes, queue_records=queue_records, at=now)

    def _drift(self, now: float) -> DriftSample:
        scores = {kind: round(max(0.0, walk.step()) if kind != AlertType.CONFIDENCE_DRIFT else walk.step(), 4)
                  for kind, walk in self.scores.items()}
        p50 = self.rng.lognormvariate(math.log(self.latency_ms), 0.1)
        return DriftSample(device=self.device, model=self._model(), scores=scores, samples=self.window,
                           latency_p50_ms=round(p50, 2),
                           latency_p95_ms=round(p50 * scores[AlertType.LATENCY] * self.rng.uniform(1.2, 1.6), 2),
                           at=now)

    def _judge(self, sample: DriftSample) -> list[Alert]:
        """The drift detector's rule: raise above raise_at, resolve under clear_at (hysteresis)."""
        alerts = []
        for kind, value in sample.scores.items():
            rule = self.rules[kind]
            alert_id = self.open.get(kind)
            if alert_id is None and value > rule.raise_at:
                alert_id = self.open[kind] = f"{self.rng.getrandbits(48):012x}"  # as the detector's uuid4().hex[:12]
                alerts.append(self._alert(rule, AlertState.RAISED, alert_id, value, rule.raise_at, sample))
            elif alert_id is not None and value < rule.clear_at:
                del self.open[kind]
                alerts.append(self._alert(rule, AlertState.RESOLVED, alert_id, value, rule.clear_at, sample))
        return alerts

    def _alert(self, rule: Rule, state: AlertState, alert_id: str, value: float, threshold: float,
               sample: DriftSample) -> Alert:
        # As the drift detector words and grades them (services/telemetry/drift.py, DriftDetector._alert).
        raised = state is AlertState.RAISED
        severity = Severity.CRITICAL if raised and value > 2 * threshold else Severity.WARNING
        verb = "above" if raised else "back under"
        return Alert(device=self.device, alert_id=alert_id, type=rule.type, state=state, severity=severity,
                     value=round(value, 4), threshold=threshold, window=sample.samples, model=sample.model,
                     detail=f"{rule.what} {value:.3f}, {verb} {threshold}", at=sample.at)


def drift_share(settings: TelemetrySettings) -> float:
    """The share of drift samples in the service's mix: a resource sample every resource_interval_s, a
    drift sample every drift.sample_interval_s."""
    drift, resources = 1 / settings.drift.sample_interval_s, 1 / settings.resource_interval_s
    return drift / (drift + resources)


def _beta_2_8(uniform: Callable[[], float]) -> float:
    """A Beta(2, 8) draw as X / (X + Y), X ~ Gamma(2) and Y ~ Gamma(8) each a sum of exponentials (-log of a
    product of uniforms): the distribution random.betavariate(2, 8) draws, for 10 uniforms and 2 logs
    instead of its two general-purpose gammavariate calls."""
    x = -math.log((1.0 - uniform()) * (1.0 - uniform()))  # 1 - u is in (0, 1]: the log is finite
    product = 1.0
    for _ in range(8):
        product *= 1.0 - uniform()
    y = -math.log(product)
    return x / (x + y) if x + y > 0 else 0.0  # both 0 only if every uniform was 0


async def _wait(event: asyncio.Event, seconds: float | None) -> None:
    """Waits until `event` is set or `seconds` passed (None: no limit). asyncio.timeout rather than
    wait_for: on Python 3.11 wait_for makes a task per call, and each device waits twice a batch."""
    try:
        async with asyncio.timeout(seconds):
            await event.wait()
    except TimeoutError:
        pass


def _clip(value: float, low: float, high: float) -> float:
    return min(high, max(low, value))


class SimTelemetry:
    """One simulated device's telemetry service: records drawn into the real outbox, forwarded by the
    real Sender over the device's link (see the module's doc).

    :param str device: the device id.
    :param Path folder: the device's state folder; the outbox is folder / "outbox.db".
    :param DeviceLink link: the device's fleet link (its bridge, in the real thing): publishes made while it
        is down are queued by it; the ack topic is subscribed here (before it starts).
    :param float records_per_s: the average rate of drawn records (0: none; the outbox still forwards).
    :param TelemetrySettings settings: the telemetry service's settings, loaded as the service loads them
        (shared.config.load): batch (max_records, max_bytes, linger_s), forward (max_attempts,
        retry_max_s), ack_timeout_s (counted from each sending, the local link being always up),
        outbox.max_bytes, ttl, flush_interval_s, resource_interval_s and drift (the drawn records).
    :param model: what the device serves now, for drift samples and alerts; None: not known.
    :param random.Random rng: the randomness of the drawn records; None: a fresh one.
    :raises ValueError: records_per_s out of range.
    :raises sqlite3.Error: the outbox cannot be opened.
    """

    def __init__(self, device: str, folder: Path, link: DeviceLink, records_per_s: float,
                 settings: TelemetrySettings, *, model: Callable[[], ModelRef | None] | None = None,
                 rng: random.Random | None = None) -> None:
        if records_per_s < 0 or not math.isfinite(records_per_s):
            raise ValueError(f"records_per_s must be a finite number >= 0, not {records_per_s}")
        self.device, self.link, self.records_per_s = device, link, records_per_s
        # One outbox transaction per tick, as the service commits. Each costs about as much CPU as the
        # records in it, so a simulator of many devices at several records/s may set it to 1 s.
        self.flush_interval_s = settings.flush_interval_s
        self.outbox = Outbox(folder / "outbox.db", device, settings.outbox.max_bytes, ttl_s=settings.ttl.by_kind())
        # The outbox's connection is the simulator's to tune: a small page cache keeps a device in its budget.
        self.outbox.db.execute(f"PRAGMA cache_size=-{OUTBOX_CACHE_KIB}")
        # Nothing else opens a simulated device's outbox while it runs (the bench reads it once the simulator
        # stopped), so the connection keeps its lock instead of taking and dropping it every transaction:
        # the same commits (WAL, synchronous=FULL), fewer system calls.
        self.outbox.db.execute("PRAGMA locking_mode=EXCLUSIVE")
        self.sender = Sender(self.outbox, device, batch=settings.batch, forward=settings.forward,
                             ack_timeout_s=settings.ack_timeout_s)
        self.draw = RecordDraw(device, rng or random.Random(), settings, model)  # noqa: S311  simulated values
        self.appended = 0
        self._acks: dict[str, TelemetryAck] = {}
        self._acked = asyncio.Event()  # an acknowledgement arrived
        self._appended = asyncio.Event()  # records were committed while the forwarder waits for some
        self._idle = False  # the forwarder found nothing to send
        link.subscribe(topics.telemetry_ack(device), self._on_ack, qos=1)

    async def run(self) -> None:
        """Draws and forwards until cancelled.

        :raises ExceptionGroup: holding the sqlite3.Error of a failed outbox (on tmpfs: memory ran out);
            the device's telemetry stops, its records lost in the failed write counted for the next start.
        """
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self._write())
            tasks.create_task(self._forward())

    def stats(self) -> TelemetryStats:
        """The counts now (cheap: in-memory counters, no SQL)."""
        s, o = self.sender, self.outbox.stats
        return TelemetryStats(appended=self.appended, acked=s.acked_records.value, sent_batches=s.sent_batches.value,
                              resent_batches=s.resent_batches.value, dead_lettered=s.dead_lettered_batches.value,
                              queued=o.records, queue_bytes=o.bytes, next_seq=o.next_seq, epoch=self.outbox.epoch)

    def close(self) -> None:
        """Closes the outbox (after run() ended): what it holds is kept for the next start."""
        self.outbox.close()

    # -- records in ---------------------------------------------------------------------------------

    async def _write(self) -> None:
        """One transaction per tick with the records due by then; the fraction carries over."""
        if self.records_per_s <= 0:
            return
        loop = asyncio.get_running_loop()
        await asyncio.sleep(self.draw.rng.uniform(0, self.flush_interval_s))  # devices' ticks spread over it
        owed, last = 0.0, loop.time()
        while True:
            await asyncio.sleep(self.flush_interval_s)
            now = loop.time()
            owed += self.records_per_s * (now - last)
            last = now
            count = int(owed)
            if count == 0:
                continue
            owed -= count
            o = self.outbox.stats
            records = self.draw.draw(count, o.bytes, o.records, span_s=count / self.records_per_s)
            try:
                self.appended += len(self.outbox.append(records))
            except BaseException:  # as the telemetry service: count what is lost, then stop loudly
                self.outbox.lost_in_write(len(records))
                raise
            if self._idle or o.records >= self.sender.max_records:
                self._appended.set()

    # -- batches out ----------------------------------------------------------------------------------

    async def _forward(self) -> None:
        """The Forwarder's round on the device's local broker link, which is always up: publish (the
        DeviceLink queues it while the fleet link is down), wait ack_timeout_s, back off, send again."""
        while True:
            sending = self.sender.next()
            if not isinstance(sending, Outgoing):
                await self._wait_records(sending)
                continue
            self.link.publish(sending.topic, sending.payload, qos=1, content_type=sending.content_type,
                              correlation=sending.correlation)
            ack = await self._await_ack(sending.batch_id)
            if ack is not None:
                self.sender.settle(ack)
            else:
                delay = self.sender.timed_out()
                log.debug("batch not acknowledged; sending again",
                          extra=fields(device=self.device, batch=sending.batch_id, wait_s=delay))
                await asyncio.sleep(delay)

    async def _wait_records(self, seconds: float) -> None:
        """Waits `seconds`, or less when records come to an empty outbox or fill a batch."""
        self._idle = self.outbox.stats.records == 0
        self._appended.clear()
        try:
            await _wait(self._appended, seconds)
        finally:
            self._idle = False

    async def _await_ack(self, batch_id: str) -> TelemetryAck | None:
        """The batch's acknowledgement, or None once ack_timeout_s from its sending is over. The clock runs
        whatever the fleet link does: the forwarder's link is to the device's own broker, up until the
        device goes down as a whole (link.closing: shutdown), when nothing is sent again."""
        while True:
            if (ack := self._acks.pop(batch_id, None)) is not None:
                # Only this batch is in flight: any other ack held is stale (another copy's ack of a
                # batch settled before), as the Forwarder drops them.
                self._acks.clear()
                return ack
            left = self.sender.ack_left(not self.link.closing)
            if left is not None and left <= 0:
                return None
            self._acked.clear()
            # left None: the device is going down; an ack may still come, no timeout will
            await _wait(self._acked, left)

    def _on_ack(self, message: paho.MQTTMessage) -> None:
        try:
            ack = decode(TelemetryAck, message.payload, content_type_of(message))
        except DecodeError as exc:
            log.warning("bad ack", extra=fields(device=self.device, error=str(exc)))
            return
        self._acks[ack.batch_id] = ack
        while len(self._acks) > MAX_HELD_ACKS:  # acks of batches settled long ago: the oldest go first
            del self._acks[next(iter(self._acks))]
        self._acked.set()
