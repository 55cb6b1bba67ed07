"""The fleet as the console sees it on the fleet broker, for the fleet bench: every device's retained sync
report and sync status, the rollout, and how many statuses and reports went through (the other measures
live beside it: fleet_cpu.py, fleet_lag.py, fleet_s3.py, fleet_outboxes.py)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from shared import topics
from shared.codec import DecodeError, decode
from shared.config import CommonSettings
from shared.mqtt import MqttLink, content_type_of
from shared.schemas import Rollout, ServiceState, ServiceStatus, SyncReport, SyncState

if TYPE_CHECKING:
    from paho.mqtt.client import MQTTMessage


# -- the fleet on the broker ---------------------------------------------------------------------------


@dataclass
class DeviceTrack:
    """One device's sync as the watcher saw it: per rollout, when it first reported each state, and when
    its canary verdict came (each the later of the report's own time and its arrival here)."""

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
        arrived = time.time()
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
                # The later of the device's own clock and the arrival: a report counts once the fleet
                # can see it (a queued report made before a cut is not "active" before it arrives).
                seen = max(report.at, arrived)
                track.first.setdefault(report.rollout_id, {}).setdefault(report.state, seen)
                if report.canary is not None and report.rollout_id not in track.verdict_at:
                    track.verdict_at[report.rollout_id] = seen
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
        """Each device's first report of `state` in the rollout (the later of its time and its arrival)."""
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

    def latest_reports(self) -> dict[str, SyncReport]:
        """Each device's latest sync report, by device."""
        with self._lock:
            return {d: t.latest for d, t in self.devices.items() if t.latest is not None}

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
