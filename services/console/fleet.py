"""The fleet's state as the fleet broker's retained messages tell it: every device's service statuses,
its sync state, the model's rollout and the plugins' rollouts. Fed from the MQTT link's thread, read by
the HTTP threads as a FleetSnapshot; pure (no I/O), so its rules are tested in-process.

Everything is keyed by the device the TOPIC names: the fleet broker's ACL ties a device's topics to its
certificate, while a payload's own `device` field is only a claim. A payload that does not decode is
counted and skipped: one broken device must not blank the page. An empty retained payload clears the
topic (MQTT's way of deleting a retained message). A topic whose device level is one of the fleet's own
identities (shared.topics.reserved_id: the console, an operator, an ingest replica) or whose status names
no device service (shared.topics.DEVICE_SERVICES) is refused and counted: it is no device's, whatever
the broker's ACL let through."""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TypeVar

from services.console.snapshot import DeviceView, FleetSnapshot, RollbackView, RolloutView
from shared import topics
from shared.codec import DecodeError, decode
from shared.logs import fields
from shared.schemas import (
    ModelRef,
    PluginRollout,
    Rollout,
    RolloutPhase,
    ServiceState,
    ServiceStatus,
    SyncReport,
    SyncState,
)

log = logging.getLogger(__name__)

# Rollbacks kept for the page, newest first: a retained sync state shows only a device's latest step,
# so a rollback the console saw is remembered here even after the device moved on.
MAX_ROLLBACKS = 20
# Devices and plugins tracked: topics come from authenticated clients, but each new id costs memory.
MAX_DEVICES = 10_000
MAX_PLUGINS = 64

M = TypeVar("M", ServiceStatus, SyncReport, Rollout, PluginRollout)


class _Unreadable(Exception):
    """A message skipped: it changes nothing."""


def _model(ref: ModelRef | None) -> str | None:
    return f"{ref.name} v{ref.version}" if ref is not None else None


def _canary_line(rollout: Rollout | PluginRollout, known_devices: int) -> str | None:
    """"device-1 (1 of 2 devices)" while the rollout is a canary on named devices; None otherwise. Out of the
    listed devices, else (the whole fleet) out of the devices the console knows; a target by groups: no total,
    since the console does not know the groups' members."""
    target = rollout.target
    if rollout.phase is not RolloutPhase.CANARY or not target.canary_devices:
        return None
    count = len(target.canary_devices)
    if target.devices:
        total: int | None = len(target.devices)
    elif target.groups:
        total = None
    else:
        total = max(known_devices, count)
    noun = "device" if (total or count) == 1 else "devices"
    of = f"{count} of {total} {noun}" if total is not None else f"{count} {noun}"
    return f"{', '.join(target.canary_devices)} ({of})"


@dataclass
class _Device:
    statuses: dict[str, ServiceStatus] = field(default_factory=dict)
    report: SyncReport | None = None
    # The inference status before the newest, for predictions per second (at, predictions_published).
    previous_count: tuple[float, int] | None = None
    rate: float | None = None


class FleetState:
    """The fleet as the console knows it. Thread-safe; every change wakes `wait_change`.

    :param float stale_after_s: a device whose newest status is older than this is stale.
    """

    def __init__(self, stale_after_s: float) -> None:
        self.stale_after_s = stale_after_s
        self._devices: dict[str, _Device] = {}
        self._rollout: Rollout | None = None
        self._plugin_rollouts: dict[str, PluginRollout] = {}
        self._plugin_reports: dict[str, dict[str, SyncReport]] = {}
        self._rollbacks: OrderedDict[tuple[str, str | None], RollbackView] = OrderedDict()
        self.undecodable = 0
        self.refused = 0  # messages on a reserved id's topic or an unknown service's
        self.version = 0
        self.broker_connected = False
        self.charts_version = 0
        self._changed = threading.Condition()

    # -- fed by the MQTT link ------------------------------------------------------------------------

    def on_status(self, topic: str, payload: bytes, content_type: str | None = None) -> None:
        """A retained status on edgefleet/<device>/status/<service>. cloud_ingest's replicas publish theirs
        under the same pattern (their replica id as the device): they are not devices and are skipped."""
        device, service = topics.device_of(topic), topics.last_level(topic)
        if service == topics.INGEST_SERVICE:
            return
        if service not in topics.DEVICE_SERVICES:
            self._refuse(topic, "not a device service's status")
            return
        try:
            status = self._decode(ServiceStatus, topic, payload, content_type)
        except _Unreadable:
            return
        with self._changed:
            entry = self._device(device, create=status is not None)
            if entry is None:
                return
            if status is None:
                entry.statuses.pop(service, None)
            else:
                if service == topics.INFERENCE_SERVICE:
                    self._count(entry, status)
                entry.statuses[service] = status
            self._bump()

    def on_sync_state(self, topic: str, payload: bytes, content_type: str | None = None) -> None:
        """A retained SyncReport on edgefleet/<device>/sync/state."""
        device = topics.device_of(topic)
        try:
            report = self._decode(SyncReport, topic, payload, content_type)
        except _Unreadable:
            return
        with self._changed:
            entry = self._device(device, create=report is not None)
            if entry is None:
                return
            entry.report = report
            if report is not None and report.state is SyncState.ROLLED_BACK:
                self._remember_rollback(device, report)
            self._bump()

    def on_plugin_sync_state(self, topic: str, payload: bytes, content_type: str | None = None) -> None:
        """A retained SyncReport on edgefleet/<device>/sync/plugins/<plugin>."""
        device, plugin = topics.device_of(topic), topics.plugin_of(topic)
        try:
            report = self._decode(SyncReport, topic, payload, content_type)
        except _Unreadable:
            return
        with self._changed:
            reports = self._plugin_reports.get(plugin)
            if reports is None:
                if report is None or not self._room_for_plugin(plugin):
                    return
                reports = self._plugin_reports[plugin] = {}
            if report is None:
                reports.pop(device, None)
            elif device in reports or len(reports) < MAX_DEVICES:
                reports[device] = report
            self._bump()

    def on_rollout(self, topic: str, payload: bytes, content_type: str | None = None) -> None:
        """The model's retained Rollout (topics.rollout()); an empty payload clears it."""
        try:
            rollout = self._decode(Rollout, topic, payload, content_type, per_device=False)
        except _Unreadable:
            return
        with self._changed:
            self._rollout = rollout
            self._bump()

    def _room_for_plugin(self, plugin: str) -> bool:
        """Whether devices' reports on `plugin` may be kept (the lock held): while fewer than MAX_PLUGINS
        plugins are tracked, yes; past that, only for a plugin the operators rolled out, in place of one no
        rollout names. A device's certificate may publish states under any plugin name it invents, and
        first come, first kept let one device hide every real plugin rolled out after it fleet-wide."""
        if len(self._plugin_reports) < MAX_PLUGINS:
            return True
        if plugin not in self._plugin_rollouts:
            return False
        invented = next((name for name in self._plugin_reports if name not in self._plugin_rollouts), None)
        if invented is None:
            return False
        del self._plugin_reports[invented]
        return True

    def on_plugin_rollout(self, topic: str, payload: bytes, content_type: str | None = None) -> None:
        """A plugin's retained PluginRollout (topics.plugin_rollout(name)); an empty payload clears it."""
        plugin = topics.plugin_of(topic)
        try:
            rollout = self._decode(PluginRollout, topic, payload, content_type, per_device=False)
        except _Unreadable:
            return
        with self._changed:
            if rollout is None:
                self._plugin_rollouts.pop(plugin, None)
            elif plugin in self._plugin_rollouts or len(self._plugin_rollouts) < MAX_PLUGINS:
                self._plugin_rollouts[plugin] = rollout
            self._bump()

    def set_connected(self, connected: bool) -> None:
        with self._changed:
            if connected != self.broker_connected:
                self.broker_connected = connected
                self._bump()

    def charts_changed(self) -> None:
        """The charts were read again: the page fetches /api/charts when charts_version moves."""
        with self._changed:
            self.charts_version += 1
            self._bump()

    # -- read by the HTTP threads --------------------------------------------------------------------

    def wait_change(self, seen: int, timeout: float) -> int:
        """Blocks until the state's version differs from `seen`, or `timeout` seconds; returns the version."""
        with self._changed:
            self._changed.wait_for(lambda: self.version != seen, timeout)
            return self.version

    def wake(self) -> None:
        """Wakes every waiter (the service is stopping)."""
        with self._changed:
            self._changed.notify_all()

    def snapshot(self, now: float | None = None) -> FleetSnapshot:
        """The fleet now (`now`: the console's wall clock, time.time(), given by tests)."""
        now = time.time() if now is None else now
        with self._changed:
            devices = [self._view(name, entry, now) for name, entry in sorted(self._devices.items())]
            known = len(self._devices)
            rollout = self._rollout_view(self._rollout, {d: e.report for d, e in self._devices.items()}, known)
            plugins = [view for plugin, r in sorted(self._plugin_rollouts.items())
                       if (view := self._rollout_view(r, self._plugin_reports.get(plugin, {}), known)) is not None]
            return FleetSnapshot(now=now, broker_connected=self.broker_connected, stale_after_s=self.stale_after_s,
                                 devices=devices, rollout=rollout, plugin_rollouts=plugins,
                                 rollbacks=list(reversed(self._rollbacks.values())),
                                 charts_version=self.charts_version)

    # -- rules ---------------------------------------------------------------------------------------

    def _view(self, name: str, entry: _Device, now: float) -> DeviceView:
        statuses, report = entry.statuses, entry.report
        newest = max((s.at for s in statuses.values()), default=None)
        # A device clock ahead of ours gives a negative age: it was heard from "now", no older.
        age = None if newest is None else max(0.0, now - newest)
        offline = sorted(f"{service} offline" + (f" ({s.reason})" if s.reason else "")
                         for service, s in statuses.items() if s.state is ServiceState.OFFLINE)
        if age is None:
            reason: str | None = "no service status"
        elif offline:
            reason = "; ".join(offline)
        elif age > self.stale_after_s:
            reason = f"no status for {age:.0f} s"
        else:
            reason = None
        inference, telemetry = statuses.get(topics.INFERENCE_SERVICE), statuses.get(topics.TELEMETRY_SERVICE)
        serving = inference.model if inference is not None and inference.model else (report.serving if report else None)
        online = inference is not None and inference.state is ServiceState.ONLINE and reason is None
        stats = telemetry.telemetry if telemetry is not None else None
        return DeviceView(
            device=name, health="stale" if reason else "online", health_reason=reason,
            age_s=None if age is None else round(age, 1),
            services={service: s.state.value for service, s in sorted(statuses.items())},
            model=_model(serving), sync_state=report.state.value if report else None,
            sync_reason=report.reason if report else None, sync_rollout=report.rollout_id if report else None,
            predictions_per_s=round(entry.rate, 2) if online and entry.rate is not None else None,
            outbox_records=stats.queue_records if stats else None,
            open_alerts=list(stats.open_alerts) if stats else [],
        )

    @staticmethod
    def _rollout_view(rollout: Rollout | PluginRollout | None, reports: Mapping[str, SyncReport | None],
                      known_devices: int) -> RolloutView | None:
        if rollout is None:
            return None
        name, version = rollout.artifact
        states = {device: r.state.value for device, r in sorted(reports.items())
                  if r is not None and r.rollout_id == rollout.rollout_id}
        counts: dict[str, int] = {}
        for state in states.values():
            counts[state] = counts.get(state, 0) + 1
        return RolloutView(
            kind="plugin" if isinstance(rollout, PluginRollout) else "model", rollout_id=rollout.rollout_id,
            name=name, version=version, phase=rollout.phase.value, target_devices=list(rollout.target.devices),
            target_groups=list(rollout.target.groups), share=rollout.target.share,
            canary_devices=list(rollout.target.canary_devices), canary=_canary_line(rollout, known_devices),
            issued_at=rollout.issued_at, states=counts, devices=states)

    @staticmethod
    def _count(entry: _Device, status: ServiceStatus) -> None:
        """Predictions per second between two inference statuses (their own clock, so no skew); a counter
        that went back (a restarted service) starts again."""
        if status.state is not ServiceState.ONLINE or status.inference is None:
            return
        now = (status.at, status.inference.predictions_published)
        before = entry.previous_count
        if before is not None and now[0] > before[0]:
            delta = now[1] - before[1]
            entry.rate = delta / (now[0] - before[0]) if delta >= 0 else None
        if before is None or now[0] > before[0]:
            entry.previous_count = now

    def _remember_rollback(self, device: str, report: SyncReport) -> None:
        canary = report.canary
        key = (device, report.rollout_id)
        self._rollbacks.pop(key, None)
        self._rollbacks[key] = RollbackView(
            device=device, rollout_id=report.rollout_id, target=_model(report.target), serving=_model(report.serving),
            reason=report.reason, canary_passed=canary.passed if canary else None,
            canary_conclusive=canary.conclusive if canary else None,
            canary_reasons=list(canary.reasons) if canary else [], at=report.at)
        while len(self._rollbacks) > MAX_ROLLBACKS:
            self._rollbacks.popitem(last=False)

    def _device(self, device: str, create: bool) -> _Device | None:
        entry = self._devices.get(device)
        if entry is None and create and len(self._devices) < MAX_DEVICES:
            entry = self._devices[device] = _Device()
        return entry

    def _decode(self, cls: type[M], topic: str, payload: bytes, content_type: str | None,
                per_device: bool = True) -> M | None:
        """The payload as `cls`; None for an empty payload (the retained message cleared).

        :raises _Unreadable: the payload is not a valid `cls`, or the topic's ids are not ids (counted, logged),
            or its device is a reserved id (counted as refused, logged).
        """
        if per_device and topics.reserved_id(topics.device_of(topic)):
            self._refuse(topic, "a reserved id is no device")
            raise _Unreadable
        if not payload:
            return None
        try:
            if per_device:  # a fleet topic's level is `_fleet`, never a device
                topics.check_id("device", topics.device_of(topic))
            return decode(cls, payload, content_type)
        except (DecodeError, ValueError, IndexError) as exc:
            with self._changed:
                self.undecodable += 1
            log.warning("unreadable message skipped", extra=fields(topic=topic[:200], error=str(exc)[:300]))
            raise _Unreadable from exc

    def _refuse(self, topic: str, why: str) -> None:
        with self._changed:
            self.refused += 1
        log.warning("message refused", extra=fields(topic=topic[:200], reason=why))

    def _bump(self) -> None:
        self.version += 1
        self._changed.notify_all()
