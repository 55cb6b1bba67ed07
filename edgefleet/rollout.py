"""The operators' rollout commands: they publish the fleet's rollout, retained, on the fleet broker (a
device that is offline gets it when it returns), and read every device's retained sync state back."""

from __future__ import annotations

import threading
import time
import uuid

from shared import topics
from shared.codec import DecodeError, WireFormat, decode, encode
from shared.config import CommonSettings
from shared.mqtt import MqttLink, content_type_of
from shared.schemas import Rollout, RolloutPhase, RolloutTarget, SyncReport


class NoRollout(RuntimeError):
    pass


def _link(settings: CommonSettings) -> MqttLink:
    link = MqttLink(settings, "operator", unique=True)
    link.start()
    if not link.wait_connected(10):
        link.stop()
        raise ConnectionError(f"cannot reach the fleet broker at {settings.mqtt_url}")
    return link


def publish(settings: CommonSettings, rollout: Rollout) -> None:
    link = _link(settings)
    try:
        link.publish(topics.rollout(), encode(rollout), qos=1, retain=True,
                     content_type=WireFormat.JSON.content_type).wait_for_publish(10)
    finally:
        link.stop()


def start(settings: CommonSettings, model: str, version: int, target: RolloutTarget, allow_downgrade: bool = False,
          rollout_id: str | None = None) -> Rollout:
    rollout = Rollout(
        rollout_id=rollout_id or f"{model}-v{version}-{uuid.uuid4().hex[:6]}", model=model, version=version,
        phase=RolloutPhase.CANARY if target.share < 1 else RolloutPhase.PROMOTED, target=target,
        allow_downgrade=allow_downgrade, issued_at=time.time(),
    )
    publish(settings, rollout)
    return rollout


def current(settings: CommonSettings, wait_s: float = 2.0) -> Rollout:
    found: list[Rollout] = []
    got = threading.Event()

    def on_rollout(message) -> None:
        if message.payload:
            try:
                found.append(decode(Rollout, message.payload, content_type_of(message)))
            except DecodeError:
                pass
        got.set()

    link = MqttLink(settings, "operator", unique=True)
    link.subscribe(topics.rollout(), on_rollout)
    link.start()
    try:
        got.wait(wait_s)
    finally:
        link.stop()
    if not found:
        raise NoRollout("no rollout is retained on the fleet broker")
    return found[-1]


def change_phase(settings: CommonSettings, phase: RolloutPhase) -> Rollout:
    rollout = current(settings)
    changed = Rollout(**{**rollout.model_dump(), "phase": phase, "issued_at": time.time()})
    publish(settings, changed)
    return changed


def states(settings: CommonSettings, wait_s: float = 2.0) -> dict[str, SyncReport]:
    """Every device's latest retained sync report, by device id."""
    reports: dict[str, SyncReport] = {}

    def on_state(message) -> None:
        try:
            report = decode(SyncReport, message.payload, content_type_of(message))
        except DecodeError:
            return
        reports[report.device] = report

    link = MqttLink(settings, "operator", unique=True)
    link.subscribe(topics.all_sync_states(), on_state)
    link.start()
    time.sleep(wait_s)
    link.stop()
    return reports
