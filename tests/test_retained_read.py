"""The operator's read of the fleet's retained sync states (edgefleet.fleet_rollout rows/states, behind
every `edgefleet rollout start/promote/status`) on a real Mosquitto: it ends at the broker's marker that
every retained message was sent, and still has all of them."""

from __future__ import annotations

import time

from edgefleet import fleet_rollout
from edgefleet.broker import Broker
from shared import topics
from shared.codec import WireFormat, encode
from shared.config import CommonSettings
from shared.schemas import ServiceState, ServiceStatus, SyncReport, SyncState
from tests.support import client_link

DEVICES = [f"device-{n:03d}" for n in range(300)]
# Far longer than the read needs: a read that ran into it would show as marked=False.
WAIT_S = 30.0


def _retain_fleet(url: str) -> None:
    """Every device's sync status (online) and sync report (idle), retained as sync publishes them."""
    link = client_link(url)
    link.start()
    assert link.wait_connected(10)
    now = time.time()
    sent = []
    for device in DEVICES:
        status = ServiceStatus(device=device, service=topics.SYNC_SERVICE, state=ServiceState.ONLINE,
                               at=now, edgefleet_version="test")
        report = SyncReport(device=device, rollout_id=None, state=SyncState.IDLE, at=now)
        for topic, message in ((topics.status(device, topics.SYNC_SERVICE), status),
                               (topics.sync_state(device), report)):
            sent.append(link.publish(topic, encode(message), qos=1, retain=True,
                                     content_type=WireFormat.JSON.content_type))
    for info in sent:
        info.wait_for_publish(10)
    link.stop()


def test_the_retained_read_of_300_devices_collects_all_and_ends_at_the_brokers_marker(broker: Broker) -> None:
    _retain_fleet(broker.url)
    settings = CommonSettings(mqtt_url=broker.url, device_id="operator")

    reports, statuses, marked = fleet_rollout._collect(settings, WAIT_S)

    assert marked, "the read ran to wait_s instead of ending at the broker's SUBACK marker"
    assert sorted(statuses) == DEVICES and sorted(reports) == DEVICES
    assert all(s.state is ServiceState.ONLINE for s in statuses.values())
    assert fleet_rollout.known_devices(settings, WAIT_S) == DEVICES
