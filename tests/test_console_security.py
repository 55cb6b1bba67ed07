"""The fleet's own identities are no devices, on real processes: the console's certificate (and the
operator's) cannot pass a telemetry batch or a status off as a device's, neither through the committed
fleet ACL (deploy/mosquitto/cloud.acl) nor, were the broker to let one through, past cloud_ingest and the
console themselves. And the console's HTTP server is bounded: idle connections are closed, connections
over its cap are refused, a Host header it does not serve gets 421."""

from __future__ import annotations

import json
import re
import socket
import time
import urllib.request

import pytest

from edgefleet.audit import audit
from edgefleet.brokerconf import CLOUD_ACL
from edgefleet.certs import issue
from edgefleet.ports import free_port
from edgefleet.spawner import keys_of
from edgefleet.waiting import wait_until
from services.console import server as console_server
from services.console.fleet import MAX_PLUGINS
from shared import lake, topics
from shared.codec import WireFormat, encode
from shared.config import ConsoleSettings, load
from shared.mqtt import MqttLink
from shared.schemas import (
    Gap,
    GapReason,
    PluginRollout,
    RolloutPhase,
    RolloutTarget,
    ServiceState,
    ServiceStatus,
    SyncReport,
    SyncState,
    TelemetryBatch,
    TelemetryRecord,
)
from tests import uplink as uplink_rig
from tests.uplink import Uplink

JSON = WireFormat.JSON.content_type
IMPOSTORS = ("console", "operator")


def _batch(device: str) -> bytes:
    gap = Gap(device=device, first_seq=1, last_seq=1, count=1, reason=GapReason.EXPIRED, at=time.time())
    return encode(TelemetryBatch(device=device, epoch="0123abcd", records=[TelemetryRecord(seq=2, body=gap)],
                                 sent_at=time.time()))


def _status(device: str) -> bytes:
    return encode(ServiceStatus(device=device, service=topics.INFERENCE_SERVICE, state=ServiceState.ONLINE,
                                at=time.time(), edgefleet_version="0.1.0"))


def _start_console(rig: Uplink, port: int):
    issue(rig.certs, "console")
    return rig.services.start(load(
        ConsoleSettings, None, **keys_of(rig.s3_server.settings()), mqtt_url=rig.cloud_url, device_id="console",
        mqtt_ca_file=rig.certs / "ca.crt", mqtt_cert_file=rig.certs / "console.crt",
        mqtt_key_file=rig.certs / "console.key", mqtt_reconnect_max_s=1, console_port=port,
        console_stale_after_s=120), "console", "console")


def _fleet(port: int) -> dict | None:
    """The console's /api/fleet, or None while it does not answer."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/fleet", timeout=2) as response:  # noqa: S310
            return json.load(response)
    except OSError:
        return None


def _fleet_devices(port: int) -> list[str] | None:
    return None if (fleet := _fleet(port)) is None else [d["device"] for d in fleet["devices"]]


def _impersonate(link: MqttLink, name: str) -> None:
    """`name`'s certificate publishes a batch and a retained inference status as if it were a device."""
    link.publish(topics.telemetry(name), _batch(name), qos=1, content_type=JSON).wait_for_publish(5)
    link.publish(topics.status(name, topics.INFERENCE_SERVICE), _status(name), qos=1, retain=True,
                 content_type=JSON).wait_for_publish(5)


def _stored_devices(rig: Uplink) -> set[str]:
    """The devices S3 holds anything of: a stored batch (in either of shared.lake's layouts) or a dead letter."""
    stored = set(audit(rig.store, uplink_rig.BUCKET))
    return stored | {m.group(1) for key in rig.objects(lake.DEAD_LETTER) if (m := re.search(r"/device=([^/]+)/", key))}


@pytest.fixture
def permissive_rig(tmp_path, request, monkeypatch):
    """The rig's fleet broker on cloud.acl without its `deny` lines (the ACL before them): the patterns let
    the console's and the operator's certificates write their own ids' device topics."""
    acl = tmp_path / "cloud-permissive.acl"
    acl.write_text("".join(line for line in CLOUD_ACL.read_text().splitlines(keepends=True)
                           if not line.startswith("topic deny ")))
    listener = uplink_rig.cloud_listener
    monkeypatch.setattr(uplink_rig, "cloud_listener", lambda certs: listener(certs, acl=acl))
    with_rig = Uplink(tmp_path, request)
    yield with_rig
    with_rig.close()


def _connected(link: MqttLink, round_trip: str) -> MqttLink:
    """The link started, its subscriptions in place (a QoS 1 publish after them has been answered)."""
    link.start()
    assert link.wait_connected(10)
    link.publish(round_trip, b"", qos=1).wait_for_publish(5)
    return link


def _as_console(rig: Uplink) -> None:
    """The console's certificate impersonates a device, before the console process holds its client id."""
    issue(rig.certs, "console")
    link = _connected(rig.cloud_client("console"), topics.status("console", topics.INGEST_SERVICE))
    _impersonate(link, "console")
    link.stop()


def _real_device_arrives(rig: Uplink, port: int) -> None:
    rig.start_telemetry()  # a real device: its batches and statuses come after the impostors'
    wait_until(lambda: rig.device_id in _stored_devices(rig), 60, "the real device's batch in S3")
    wait_until(lambda: rig.device_id in (_fleet_devices(port) or []), 30, "the real device on the console")


def test_the_fleet_acl_drops_what_the_consoles_and_operators_certificates_publish_as_devices(uplink):
    """Through the committed cloud.acl: the broker passes nothing the console's or the operator's
    certificate publishes on its own id's device topics, so a real cloud_ingest stores nothing of theirs
    and the real console shows no such device."""
    rig = uplink
    ingest, port = rig.start_ingest(), free_port()
    # Watchers on every device's batches and statuses: the broker queues to them in the order it takes
    # publishes, so the real device's messages arriving with none of the impostors' before them shows
    # that the broker dropped theirs.
    seen: list[str] = []
    batches, operator = rig.cloud_client("cloud-ingest-1"), rig.cloud_client("operator")
    batches.subscribe(topics.all_telemetry(), lambda m: seen.append(m.topic), qos=1)
    operator.subscribe(topics.every_device_status("+"), lambda m: seen.append(m.topic), qos=1)
    _connected(batches, topics.status("cloud-ingest-1", topics.INGEST_SERVICE))
    _connected(operator, topics.plugin_rollout("round-trip"))
    _as_console(rig)
    _impersonate(operator, "operator")
    console = _start_console(rig, port)
    _real_device_arrives(rig, port)
    wait_until(lambda: topics.telemetry(rig.device_id) in seen, 30, "the real device's batch at the watcher")
    assert not [t for t in seen if topics.device_of(t) in IMPOSTORS], seen
    assert _stored_devices(rig) == {rig.device_id}
    assert _fleet_devices(port) == [rig.device_id]
    assert ingest.alive() and console.alive()


def _refused_batches(metrics_port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=2) as response:  # noqa: S310
        text = response.read().decode()
    found = re.search(r'^edgefleet_ingest_batches_total\{[^}]*outcome="refused"[^}]*\} (\S+)$', text, re.M)
    return float(found.group(1)) if found else 0.0


def test_cloud_ingest_and_the_console_refuse_reserved_ids_the_broker_let_through(permissive_rig):
    """Were the ACL to pass them (the patterns alone do): cloud_ingest stores and acknowledges nothing of
    a batch on a reserved id's topic and counts it refused; the console shows no status of one."""
    rig, port, metrics_port = permissive_rig, free_port(), free_port()
    ingest = rig.start_ingest(metrics_port=metrics_port)
    _as_console(rig)
    operator = _connected(rig.cloud_client("operator"), topics.plugin_rollout("round-trip"))
    acks: list[str] = []
    operator.subscribe(topics.all_telemetry_acks(), lambda m: acks.append(m.topic), qos=1)
    _impersonate(operator, "operator")
    wait_until(lambda: ingest.log().count("batch refused") >= 2, 30, "cloud_ingest to refuse both batches")
    console = _start_console(rig, port)  # reads both impostors' retained statuses
    wait_until(lambda: console.log().count("message refused") >= 2, 30, "the console to refuse both statuses")
    _real_device_arrives(rig, port)
    assert _stored_devices(rig) == {rig.device_id}
    assert _fleet_devices(port) == [rig.device_id]
    assert _refused_batches(metrics_port) == 2
    assert not [t for t in acks if topics.device_of(t) in IMPOSTORS], acks
    assert ingest.alive() and console.alive()


def _ask(port: int, host: str | None, path: str = "/api/fleet") -> bytes:
    """One raw HTTP request with this Host header (none: no header); the whole answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        header = f"Host: {host}\r\n" if host is not None else ""
        try:
            conn.sendall(f"GET {path} HTTP/1.1\r\n{header}Connection: close\r\n\r\n".encode())
        except (BrokenPipeError, ConnectionResetError):
            return b""  # closed unanswered
        answer = b""
        try:
            while chunk := conn.recv(65536):
                answer += chunk
        except ConnectionResetError:
            pass  # closed unanswered
        return answer


def _closed_by_server(conn: socket.socket) -> bool:
    """The server closed this connection without a word (recv sees end of stream)."""
    try:
        return conn.recv(1) == b""
    except ConnectionResetError:
        return True


def test_the_console_closes_idle_connections_refuses_those_over_its_cap_and_unknown_hosts(uplink):
    port = free_port()
    console = _start_console(uplink, port)
    wait_until(lambda: _fleet_devices(port) is not None, 30, "the console to listen", interval=0.2)
    # DNS rebinding: a page of another name resolving to the console's address is refused.
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", "LOCALHOST"):
        assert _ask(port, host).startswith(b"HTTP/1.0 200"), host
    for host in (f"evil.example:{port}", "127.0.0.1.evil.example", None, f"[::1]evil:{port}"):
        answer = _ask(port, host)
        assert answer.startswith(b"HTTP/1.0 421") and b"devices" not in answer, host
    # Connections that send nothing: each holds a thread until REQUEST_TIMEOUT_S; past MAX_CONNECTIONS
    # the next one is closed unanswered, a real request included.
    idle = [socket.create_connection(("127.0.0.1", port), timeout=30)
            for _ in range(console_server.MAX_CONNECTIONS)]
    try:
        over = socket.create_connection(("127.0.0.1", port), timeout=5)
        with over:
            assert _closed_by_server(over), "a connection over the cap was served"
        assert _ask(port, "127.0.0.1") == b"", "a request over the cap was answered"
        # Past the timeout the server closes the idle ones, and answers again.
        for conn in idle:  # each socket waits 30 s at most (its timeout raises): the server's is 10 s
            assert _closed_by_server(conn)
        assert _ask(port, "127.0.0.1").startswith(b"HTTP/1.0 200")
    finally:
        for conn in idle:
            conn.close()
    assert "too many open" in console.log()
    assert console.alive()


def _plugin_views(port: int) -> list[dict] | None:
    return None if (fleet := _fleet(port)) is None else fleet["plugin_rollouts"]


def test_plugin_names_one_device_invents_cannot_hide_a_rolled_out_plugin_from_a_restarted_console(uplink):
    """A device's certificate may publish retained plugin states under any name (cloud.acl lets it write
    its own `sync/plugins/+`). The console keeps states of at most MAX_PLUGINS plugins; started after a
    flood of invented names, it still shows the plugin the operators rolled out, because it reads the
    rollouts first and a rolled-out plugin takes an invented one's place."""
    rig, port = uplink, free_port()
    evil = _connected(rig.cloud_client("dev-evil"), topics.plugin_sync_state("dev-evil", "round-trip"))
    invented = SyncReport(device="dev-evil", rollout_id="x", state=SyncState.ACTIVE, at=time.time())
    for n in range(MAX_PLUGINS + 6):
        evil.publish(topics.plugin_sync_state("dev-evil", f"fake-{n:03d}"), encode(invented), qos=1, retain=True,
                     content_type=JSON).wait_for_publish(5)
    operator = _connected(rig.cloud_client("operator"), topics.plugin_rollout("round-trip"))
    rollout = PluginRollout(rollout_id="p-1", plugin="night_alert", version=2, phase=RolloutPhase.PROMOTED,
                            target=RolloutTarget(), issued_at=time.time())
    operator.publish(topics.plugin_rollout("night_alert"), encode(rollout), qos=1, retain=True,
                     content_type=JSON).wait_for_publish(5)
    device = _connected(rig.cloud_client("dev-real"), topics.plugin_sync_state("dev-real", "round-trip"))
    real = SyncReport(device="dev-real", rollout_id="p-1", state=SyncState.ACTIVE, at=time.time())
    device.publish(topics.plugin_sync_state("dev-real", "night_alert"), encode(real), qos=1, retain=True,
                   content_type=JSON).wait_for_publish(5)

    console = _start_console(rig, port)
    views = wait_until(lambda: (v := _plugin_views(port)) and v[0]["states"] and v, 30,
                       "the console to show the rolled-out plugin's device states")
    assert [(v["name"], v["states"]) for v in views] == [("night_alert", {"active": 1})]
    assert console.alive()
