"""What the fleet bench measures with, outside the processes it measures: the fleet as the console sees
it on the broker (every device's retained sync report and sync status, the rollout), CPU meters on the
broker and the replicas, and the telemetry as S3 holds it (what was stored when, read back from the
flush indexes and the records themselves)."""

from __future__ import annotations

import gzip
import re
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import psutil
from pydantic import ValidationError

from edgefleet.simulate import loop_lag
from edgefleet.simulate.stats import SimStats
from shared import lake, topics
from shared.codec import DecodeError, decode
from shared.config import CommonSettings
from shared.mqtt import MqttLink, content_type_of
from shared.schemas import Rollout, ServiceState, ServiceStatus, SyncReport, SyncState, TelemetryRecord

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from paho.mqtt.client import MQTTMessage


# -- the fleet on the broker ---------------------------------------------------------------------------


@dataclass
class DeviceTrack:
    """One device's sync as the watcher saw it: per rollout, when (the report's own time) it first
    reported each state, and when its canary verdict came."""

    first: dict[str, dict[SyncState, float]] = field(default_factory=dict)
    verdict_at: dict[str, float] = field(default_factory=dict)
    verdict_passed: dict[str, bool] = field(default_factory=dict)
    verdict_reason: dict[str, str] = field(default_factory=dict)
    latest: SyncReport | None = None
    online: bool = False


class FleetWatch:
    """The fleet's sync reports, statuses and rollout, as they arrive on the fleet broker.

    Args:
        settings: a fleet client's settings (the console's certificate: it reads everything, writes nothing;
            the operator's stays free for the rollout commands, as the broker allows one session per identity).
    """

    def __init__(self, settings: CommonSettings) -> None:
        self.link = MqttLink(settings, "bench", unique=True)
        self._lock = threading.Lock()
        self.devices: dict[str, DeviceTrack] = {}
        self.rollouts: list[Rollout] = []
        self.status_messages = 0  # every device status received (all services): the broker's status traffic
        self.report_messages = 0  # sync-state reports received
        self.link.subscribe(topics.all_sync_states(), self._on_report)
        self.link.subscribe(topics.every_device_status(topics.SYNC_SERVICE), self._on_status)
        for service in topics.DEVICE_SERVICES:
            if service != topics.SYNC_SERVICE:  # counted only: the sync status alone says online
                self.link.subscribe(topics.every_device_status(service), self._on_other_status)
        self.link.subscribe(topics.rollout(), self._on_rollout)

    def start(self) -> FleetWatch:
        """Connects; raises TimeoutError if the broker does not accept it within 10 s."""
        self.link.start()
        if not self.link.wait_connected(10):
            raise TimeoutError("the fleet watcher could not connect to the fleet broker")
        return self

    def close(self) -> None:
        self.link.stop()

    def _track(self, message: MQTTMessage) -> DeviceTrack | None:
        try:
            device = topics.check_id("device", topics.device_of(message.topic))
        except (ValueError, IndexError):
            return None
        return self.devices.setdefault(device, DeviceTrack())

    def _on_report(self, message: MQTTMessage) -> None:
        with self._lock:
            self.report_messages += 1
        try:
            report = decode(SyncReport, message.payload, content_type_of(message))
        except DecodeError:
            return
        with self._lock:
            track = self._track(message)
            if track is None:
                return
            track.latest = report
            if report.rollout_id is not None:
                track.first.setdefault(report.rollout_id, {}).setdefault(report.state, report.at)
                if report.canary is not None and report.rollout_id not in track.verdict_at:
                    track.verdict_at[report.rollout_id] = report.at
                    track.verdict_passed[report.rollout_id] = report.canary.passed
                    track.verdict_reason[report.rollout_id] = report.reason or "; ".join(report.canary.reasons)

    def _on_status(self, message: MQTTMessage) -> None:
        with self._lock:
            self.status_messages += 1
        try:
            status = decode(ServiceStatus, message.payload, content_type_of(message))
        except DecodeError:
            return
        with self._lock:
            track = self._track(message)
            if track is not None:
                track.online = status.state is ServiceState.ONLINE

    def _on_other_status(self, message: MQTTMessage) -> None:
        with self._lock:
            self.status_messages += 1

    def _on_rollout(self, message: MQTTMessage) -> None:
        if not message.payload:
            return
        try:
            rollout = decode(Rollout, message.payload, content_type_of(message))
        except DecodeError:
            return
        with self._lock:
            self.rollouts.append(rollout)

    # -- reading -------------------------------------------------------------------------------------

    def message_counts(self) -> tuple[int, int]:
        """Device statuses (every service) and sync-state reports received so far: marked at a window's
        ends, their difference is what the devices published through the broker in it."""
        with self._lock:
            return self.status_messages, self.report_messages

    def online(self) -> int:
        """Devices whose latest sync status says online."""
        with self._lock:
            return sum(t.online for t in self.devices.values())

    def first_at(self, rollout_id: str, state: SyncState) -> dict[str, float]:
        """Each device's first report of `state` in the rollout (the report's time), by device."""
        with self._lock:
            return {d: t.first[rollout_id][state] for d, t in self.devices.items()
                    if state in t.first.get(rollout_id, {})}

    def verdicts(self, rollout_id: str) -> dict[str, tuple[float, bool]]:
        """Each device's canary verdict in the rollout: when, and whether it passed."""
        with self._lock:
            return {d: (t.verdict_at[rollout_id], t.verdict_passed[rollout_id]) for d, t in self.devices.items()
                    if rollout_id in t.verdict_at}

    def failed_verdicts(self, rollout_id: str) -> dict[str, str]:
        """The devices whose canary verdict in the rollout did not pass, and why."""
        with self._lock:
            return {d: t.verdict_reason[rollout_id] for d, t in self.devices.items()
                    if rollout_id in t.verdict_passed and not t.verdict_passed[rollout_id]}

    def latest_states(self, rollout_id: str) -> dict[str, SyncState]:
        """Each device's latest state, where its latest report is about the rollout."""
        with self._lock:
            return {d: t.latest.state for d, t in self.devices.items()
                    if t.latest is not None and t.latest.rollout_id == rollout_id}

    def rollout(self, rollout_id: str) -> Rollout | None:
        """The latest rollout message seen with this id."""
        with self._lock:
            return next((r for r in reversed(self.rollouts) if r.rollout_id == rollout_id), None)


def wait_for(check: Callable[[], bool], timeout_s: float, interval_s: float = 0.2) -> bool:
    """Polls `check` until it is true or `timeout_s` passes; returns its last answer (no exception: a
    bench reports what did not happen in time as a missed goal)."""
    deadline = time.monotonic() + timeout_s
    while not (done := check()) and time.monotonic() < deadline:
        time.sleep(interval_s)
    return done


def percentile(values: Iterable[float], q: float) -> float:
    """The q-th percentile (0..100, nearest rank) of the values; nan when there are none."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = max(1, -(-len(ordered) * q // 100))
    return ordered[int(rank) - 1]


# -- the simulators' own loop -----------------------------------------------------------------------------


LAG_WINDOW_S = loop_lag.TICK_S * loop_lag.WINDOW  # what one stats file's loop_lag figures cover: the last minute


@dataclass(frozen=True)
class LagFigures:
    """The simulators' loop lag over a phase: the worst process's p99 and max (seconds); `covers_s`: how
    much before the phase's start the figures may reach back (a phase shorter than LAG_WINDOW_S)."""

    p99_s: float
    max_s: float
    covers_s: float


class LagSampler:
    """Reads the simulators' stats every second and keeps their loop lag figures, so each phase can be
    given the lag its own minutes had. One owner: the bench starts it, and stops it with close().

    Args:
        read: the simulators' latest stats (edgefleet.bench.fleet.sim_totals over the processes).
        every_s: how often it reads.
    """

    def __init__(self, read: Callable[[], list[SimStats]], every_s: float = 1.0) -> None:
        self._read, self._every_s = read, every_s
        self._samples: dict[int, list[tuple[float, float, float]]] = {}  # pid -> (at, p99, max)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lag-sampler", daemon=True)

    def start(self) -> LagSampler:
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.wait(self._every_s):
            for s in self._read():
                with self._lock:
                    samples = self._samples.setdefault(s.pid, [])
                    if not samples or samples[-1][0] != s.at:
                        samples.append((s.at, s.loop_lag_p99_s, s.loop_lag_max_s))

    def over(self, start: float, end: float) -> LagFigures | None:
        """The phase [start, end] (wall clock): each process's figures reported from a minute into the
        phase (whole minutes inside it) to its end, or, for a phase shorter than that, at its end (they
        then reach back before it); the worst process's. None: no sample in it."""
        since = min(start + LAG_WINDOW_S, end)
        with self._lock:
            inside = [(p, m) for samples in self._samples.values() for at, p, m in samples if since <= at <= end + 2.5]
            first = min((samples[0][0] for samples in self._samples.values() if samples), default=start)
        if not inside:
            return None
        # How far the last minute reaches back before the phase, and only while the simulators ran.
        before = min(LAG_WINDOW_S - (end - start), start - first + 1.0)
        return LagFigures(max(p for p, _ in inside), max(m for _, m in inside), max(0.0, before))


# -- S3 requests, from the server's own log --------------------------------------------------------------

_REQUEST = re.compile(rb'"(GET|PUT|POST|HEAD|DELETE) [^"]*" (\d{3})')


def log_size(path: Path) -> int:
    """The log's size now (0 when absent): mark a window's ends with it."""
    try:
        return path.stat().st_size
    except OSError:
        return 0


def requests_logged(path: Path, start: int, end: int) -> Counter[str]:
    """The HTTP requests the S3 server logged (werkzeug's access lines) between two offsets of its log,
    by method: every PUT the replicas sent, refused ones too."""
    counted: Counter[str] = Counter()
    try:
        with path.open("rb") as log:
            log.seek(start)
            body = log.read(max(0, end - start))
    except OSError:
        return counted
    for match in _REQUEST.finditer(body):
        counted[match.group(1).decode()] += 1
    return counted


# -- CPU -------------------------------------------------------------------------------------------------


MACHINE = "machine"  # the whole machine's busy CPU seconds (every core, every process), beside the groups


@dataclass(frozen=True)
class CpuMark:
    at: float
    seconds: dict[str, float]


class CpuMeter:
    """CPU seconds (user + system, every thread) of named groups of processes, read at marks, so each
    phase's CPU seconds per second can be told apart; MACHINE is every core's busy time (what the groups
    and everything else on the machine took).

    Args:
        groups: name -> its processes (e.g. "broker": [mosquitto], "ingest": the replicas); a group may be
            added later (its figures then exist only between marks taken after it).
    """

    def __init__(self, groups: dict[str, list[psutil.Process]]) -> None:
        self.groups = groups

    def mark(self) -> CpuMark:
        times = psutil.cpu_times()
        busy = float(times.user + times.nice + times.system + getattr(times, "irq", 0) + getattr(times, "softirq", 0)
                     + getattr(times, "steal", 0))
        return CpuMark(time.monotonic(), {MACHINE: busy, **{name: sum(_cpu_s(p) for p in processes)
                                                            for name, processes in self.groups.items()}})

    @staticmethod
    def per_s(start: CpuMark, end: CpuMark, name: str) -> float:
        """A group's CPU seconds per second between two marks (nan where it was not metered at both)."""
        if name not in start.seconds or name not in end.seconds:
            return float("nan")
        return (end.seconds[name] - start.seconds[name]) / max(end.at - start.at, 1e-9)

    @staticmethod
    def used(start: CpuMark, end: CpuMark, name: str) -> float:
        """A group's CPU seconds between two marks (nan where it was not metered at both)."""
        if name not in start.seconds or name not in end.seconds:
            return float("nan")
        return end.seconds[name] - start.seconds[name]


def _cpu_s(process: psutil.Process) -> float:
    try:
        times = process.cpu_times()
    except psutil.NoSuchProcess:
        return 0.0
    return float(times.user + times.system)


# -- telemetry as S3 holds it -----------------------------------------------------------------------------


@dataclass(frozen=True)
class StoredBatch:
    """A batch as the store holds it (its first copy, where a resend was stored twice)."""

    device: str
    batch_id: str
    records: int
    stored_at: float
    objects: tuple[str, ...]


@dataclass
class StoredTelemetry:
    """Every batch the telemetry bucket holds (flush indexes and the older per-batch indexes), once each
    by (device, batch id); `copies`: batches held more than once (a resend after a lost acknowledgement)."""

    batches: dict[tuple[str, str], StoredBatch] = field(default_factory=dict)
    copies: int = 0
    index_objects: list[float] = field(default_factory=list)  # each index object's stored_at

    def add(self, index: lake.BatchIndex, stored_at: float) -> None:
        key = (index.device, index.batch_id)
        seen = self.batches.get(key)
        if seen is not None:
            self.copies += 1
            if seen.stored_at <= stored_at:
                return
        self.batches[key] = StoredBatch(index.device, index.batch_id, len(index.seqs), stored_at,
                                        tuple(index.objects))

    def records_between(self, start: float, end: float) -> int:
        return sum(b.records for b in self.batches.values() if start <= b.stored_at < end)

    def objects_between(self, start: float, end: float) -> int:
        """Objects written in the window: each index and each records object (a flush's records
        objects are shared by its batches: counted once)."""
        records = {o for b in self.batches.values() if start <= b.stored_at < end for o in b.objects}
        return len(records) + sum(start <= at < end for at in self.index_objects)

    def object_times(self) -> dict[str, float]:
        """Each records object's key -> when its index says it was stored."""
        times: dict[str, float] = {}
        for batch in self.batches.values():
            for key in batch.objects:
                times[key] = min(times.get(key, batch.stored_at), batch.stored_at)
        return times


def read_stored(s3: S3Client, bucket: str) -> StoredTelemetry:
    """Every batch index in the bucket: the flushes' and the per-batch layout's.

    Raises:
        lake.BatchIndexInvalid: an index that is not one.
    """
    stored = StoredTelemetry()
    for key in _keys(s3, bucket, f"{lake.FLUSHES}/"):
        flush = lake.read_flush_index(s3.get_object(Bucket=bucket, Key=key)["Body"].read(), key)
        stored.index_objects.append(flush.stored_at)
        for batch in flush.batches:
            stored.add(batch, flush.stored_at)
    for key in _keys(s3, bucket, f"{lake.BATCHES}/"):
        index = lake.read_batch_index(s3.get_object(Bucket=bucket, Key=key)["Body"].read(), key)
        stored.index_objects.append(index.stored_at)
        stored.add(index, index.stored_at)
    return stored


@dataclass(frozen=True)
class StoredRecordTime:
    """One record as read back from S3: whose, which, made when (the device's `at`), stored when."""

    device: str
    key: tuple[str, int, float]  # (epoch or records object's batch, seq, at): the same record twice is a copy
    at: float
    stored_at: float


def read_records(s3: S3Client, bucket: str, stored: StoredTelemetry, start: float,
                 end: float) -> list[StoredRecordTime]:
    """Every record in the records objects stored between `start` and `end` (each copy once), read back.

    Returns:
        Each record's device, identity, own time and its object's stored_at.
    """
    seen: set[tuple[str, tuple[str, int, float]]] = set()
    found: list[StoredRecordTime] = []
    for key, stored_at in sorted(stored.object_times().items(), key=lambda item: item[1]):
        if not start <= stored_at < end:
            continue
        body = gzip.decompress(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
        for line in body.splitlines():
            record = _record(line, key)
            if record is None or (record[0], record[1]) in seen:
                continue
            seen.add((record[0], record[1]))
            found.append(StoredRecordTime(record[0], record[1], record[1][2], stored_at))
    return found


def _record(line: bytes, key: str) -> tuple[str, tuple[str, int, float]] | None:
    """A stored line's device and identity: a flush's StoredRecord (with its epoch), or the per-batch
    layout's TelemetryRecord (its object's key names the batch, so the epoch)."""
    try:
        flushed = lake.StoredRecord.model_validate_json(line)
        return flushed.device, (flushed.epoch, flushed.seq, flushed.body.at)
    except ValidationError:
        pass
    try:
        record = TelemetryRecord.model_validate_json(line)
    except ValidationError:
        return None
    return record.body.device, (key.rsplit("/", 1)[-1].split("-", 1)[0], record.seq, record.body.at)


def best_rate(stored: StoredTelemetry, start: float, end: float, span_s: float = 10.0) -> float:
    """The most records stored in any `span_s` seconds of the window (from each batch's stored_at), per
    second: what the replicas and S3 took at their busiest (a cut link's backlog arriving on top)."""
    times = sorted((b.stored_at, b.records) for b in stored.batches.values() if start <= b.stored_at < end)
    best = total = 0
    lo = 0
    for at, records in times:
        total += records
        while times[lo][0] <= at - span_s:
            total -= times[lo][1]
            lo += 1
        best = max(best, total)
    return best / span_s


def _keys(s3: S3Client, bucket: str, prefix: str) -> list[str]:
    keys: list[str] = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys.extend(o["Key"] for o in page.get("Contents", []))
    return keys


def index_count(s3: S3Client, bucket: str) -> int:
    """How many indexes (flushes and per-batch) the bucket holds: stable once the replicas wrote all they took."""
    return len(_keys(s3, bucket, f"{lake.FLUSHES}/")) + len(_keys(s3, bucket, f"{lake.BATCHES}/"))


def held_in_outbox(path: Path) -> tuple[str, set[int]] | None:
    """What a stopped device's outbox still holds: its epoch (as batch ids spell it) and sequence numbers;
    None when there is no outbox file. Read-only: the file is left as the device left it."""
    if not path.exists():
        return None
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        epoch = db.execute("SELECT value FROM meta WHERE key='epoch'").fetchone()
        seqs = {row[0] for row in db.execute("SELECT seq FROM records")}
    finally:
        db.close()
    return (f"{int(epoch[0]):08x}" if epoch else ""), seqs
