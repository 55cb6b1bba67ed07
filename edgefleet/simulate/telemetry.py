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

Batches go out as the Forwarder sends them (the same topic, content type and correlation data); the
acknowledgement is waited for on the loop, its time counted only while the link is up.

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
from services.telemetry.sending import LINK_CHECK_S, Outgoing, Sender
from shared import topics
from shared.codec import DecodeError, decode
from shared.config import BatchSettings, ForwardSettings, OutboxSettings, TelemetrySettings, TtlSettings
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

_DEFAULTS = TelemetrySettings.model_construct()  # the service's defaults, not this process's environment
_OUTBOX_MAX_BYTES, _TTL_S = OutboxSettings().max_bytes, TtlSettings().by_kind()
FLUSH_INTERVAL_S = _DEFAULTS.flush_interval_s  # one outbox transaction per tick, as the service commits
# The service's mix: a resource sample every resource_interval_s, a drift sample every sample_interval_s.
DRIFT_SHARE = (1 / _DEFAULTS.drift.sample_interval_s) / (
    1 / _DEFAULTS.resource_interval_s + 1 / _DEFAULTS.drift.sample_interval_s)
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
    :param model: what the device serves now (for drift samples and alerts); None: not known.
    """

    def __init__(self, device: str, rng: random.Random, model: Callable[[], ModelRef | None] | None = None) -> None:
        self.device, self.rng, self._model = device, rng, model or (lambda: None)
        self.cpu_load = rng.betavariate(2, 5)  # a busy device or an idle one: the mean of its CPU samples
        self.memory_total = rng.choice((4, 8, 16)) << 30
        self.memory_level = rng.uniform(25, 75)
        self.disk_level = rng.uniform(10, 80)
        self.temperature = rng.gauss(55, 6)
        self.latency_ms = rng.lognormvariate(math.log(15), 0.4)
        drift = _DEFAULTS.drift
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
            if self.rng.random() < DRIFT_SHARE:
                sample = self._drift(now)
                records.append(sample)
                records.extend(self._judge(sample))
            else:
                records.append(self._resources(now, queue_bytes, queue_records))
        return records

    def _resources(self, now: float, queue_bytes: int, queue_records: int) -> ResourceSample:
        r = self.rng
        memory = _clip(r.gauss(self.memory_level, 3), 1, 99)
        containers = [
            ContainerSample(name=name, cpu_percent=round(r.betavariate(2, 8) * 100 * self.cpu_load * 2, 2),
                            memory_bytes=int(self.memory_total * memory / 100 * r.uniform(0.05, 0.3)),
                            memory_limit_bytes=self.memory_total, at=now - r.uniform(0, 10))
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


def _clip(value: float, low: float, high: float) -> float:
    return min(high, max(low, value))


class SimTelemetry:
    """One simulated device's telemetry service: records drawn into the real outbox, forwarded by the
    real Sender over the device's link (see the module's doc).

    :param str device: the device id.
    :param Path folder: the device's state folder; the outbox is folder / "outbox.db".
    :param DeviceLink link: the device's MQTT session; the ack topic is subscribed here (before it starts).
    :param float records_per_s: the average rate of drawn records (0: none; the outbox still forwards).
    :param BatchSettings batch: max_records, max_bytes, linger_s of a batch.
    :param ForwardSettings forward: max_attempts, retry_max_s.
    :param float ack_timeout_s: how long (of link-up time) a batch waits for its acknowledgement.
    :param model: what the device serves now, for drift samples and alerts; None: not known.
    :param random.Random rng: the randomness of the drawn records; None: a fresh one.
    :param float flush_interval_s: one outbox transaction per this many seconds (the telemetry service's
        flush_interval_s by default). Each costs about as much CPU as the records in it, so a simulator
        of many devices at several records/s each may take 1 s: fewer, larger transactions.
    :raises ValueError: records_per_s or flush_interval_s out of range.
    :raises sqlite3.Error: the outbox cannot be opened.
    """

    def __init__(self, device: str, folder: Path, link: DeviceLink, records_per_s: float, batch: BatchSettings,
                 forward: ForwardSettings, ack_timeout_s: float, *, model: Callable[[], ModelRef | None] | None = None,
                 rng: random.Random | None = None, flush_interval_s: float = FLUSH_INTERVAL_S) -> None:
        if records_per_s < 0 or not math.isfinite(records_per_s):
            raise ValueError(f"records_per_s must be a finite number >= 0, not {records_per_s}")
        if not 0 < flush_interval_s <= 10:
            raise ValueError(f"flush_interval_s must be in (0, 10], not {flush_interval_s}")
        self.device, self.link, self.records_per_s = device, link, records_per_s
        self.flush_interval_s = flush_interval_s
        self.outbox = Outbox(folder / "outbox.db", device, _OUTBOX_MAX_BYTES, ttl_s=_TTL_S)
        # The outbox's connection is the simulator's to tune: a small page cache keeps a device in its budget.
        self.outbox.db.execute(f"PRAGMA cache_size=-{OUTBOX_CACHE_KIB}")
        self.sender = Sender(self.outbox, device, batch=batch, forward=forward, ack_timeout_s=ack_timeout_s)
        self.draw = RecordDraw(device, rng or random.Random(), model)  # noqa: S311  simulated values
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
        while True:
            if not self.link.connected.is_set():
                await self.link.connected.wait()
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
                          extra={"device": self.device, "batch": sending.batch_id, "wait_s": delay})
                await asyncio.sleep(delay)

    async def _wait_records(self, seconds: float) -> None:
        """Waits `seconds`, or less when records come to an empty outbox or fill a batch."""
        self._idle = self.outbox.stats.records == 0
        self._appended.clear()
        try:
            await asyncio.wait_for(self._appended.wait(), seconds)
        except TimeoutError:
            pass
        finally:
            self._idle = False

    async def _await_ack(self, batch_id: str) -> TelemetryAck | None:
        """The batch's acknowledgement, or None once its time (counted while the link is up) is over.
        While the link is down it waits for the link: the broker's session delivers a held ack after it."""
        while True:
            if (ack := self._acks.pop(batch_id, None)) is not None:
                return ack
            left = self.sender.ack_left(self.link.connected.is_set())
            if left is None:
                await self.link.connected.wait()
                continue
            if left <= 0:
                return None
            self._acked.clear()
            try:  # woken at least every LINK_CHECK_S: a cut in between stops the ack clock
                await asyncio.wait_for(self._acked.wait(), min(left, LINK_CHECK_S))
            except TimeoutError:
                pass

    def _on_ack(self, message: paho.MQTTMessage) -> None:
        try:
            ack = decode(TelemetryAck, message.payload, content_type_of(message))
        except DecodeError as exc:
            log.warning("bad ack", extra={"device": self.device, "error": str(exc)})
            return
        self._acks[ack.batch_id] = ack
        while len(self._acks) > MAX_HELD_ACKS:  # acks of batches settled long ago: the oldest go first
            del self._acks[next(iter(self._acks))]
        self._acked.set()
