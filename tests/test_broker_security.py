"""The committed Mosquitto ACLs and TLS settings (deploy/mosquitto/), on real brokers."""

from __future__ import annotations

import threading
import time

import pytest

from edgefleet.broker import Broker
from edgefleet.brokerconf import bridge, cloud_listener, edge_listener, password_file
from edgefleet.certs import issue, new_ca
from shared.config import CommonSettings
from shared.mqtt import MqttLink
from tests.support import wait_until

USERS = {"cam-1": "p-cam-1", "cam-2": "p-cam-2", "inference": "p-inf", "sync": "p-sync", "console": "p-console"}


class Client:
    """A real MQTT v5 client that records what it receives."""

    def __init__(self, url: str, name: str, **auth) -> None:
        self.received: list[tuple[str, bytes]] = []
        self._lock = threading.Lock()
        self.link = MqttLink(CommonSettings(mqtt_url=url, device_id=name.replace("@", "-"), mqtt_reconnect_max_s=1, **auth),
                             "test", unique=True)

    def connect(self, timeout: float = 3.0) -> bool:
        self.link.start()
        return self.link.wait_connected(timeout)

    def listen(self, topic_filter: str) -> None:
        def record(message):
            with self._lock:
                self.received.append((message.topic, message.payload))

        self.link.subscribe(topic_filter, record, qos=1)

    def topics(self) -> list[str]:
        with self._lock:
            return [t for t, _ in self.received]

    def close(self) -> None:
        self.link.stop()


@pytest.fixture
def edge(tmp_path):
    with Broker(security=edge_listener(password_file(tmp_path / "passwords", USERS))) as broker:
        yield broker


def _user(broker, name, password=None):
    client = Client(broker.url, name, mqtt_username=name, mqtt_password=password or USERS[name])
    return client


def test_an_unknown_user_or_a_wrong_password_is_refused(edge):
    assert not _user(edge, "mallory", "guess").connect()
    assert not _user(edge, "cam-1", "wrong").connect()
    assert not Client(edge.url, "anonymous").connect()
    ok = _user(edge, "cam-1")
    assert ok.connect()
    ok.close()


def test_a_camera_publishes_only_its_own_frames_and_reads_nothing(edge):
    console, camera, inference = _user(edge, "console"), _user(edge, "cam-1"), _user(edge, "inference")
    console.listen("edgefleet/#")
    camera.listen("edgefleet/d1/predictions/+")
    for client in (console, camera, inference):
        assert client.connect()
    time.sleep(0.3)
    for camera_id in ("cam-1", "cam-2"):
        camera.link.publish(f"edgefleet/d1/frames/{camera_id}", b"frame", qos=1).wait_for_publish(5)
    camera.link.publish("edgefleet/d1/predictions/cam-1", b"forged", qos=1).wait_for_publish(5)
    inference.link.publish("edgefleet/d1/predictions/cam-1", b"prediction", qos=1).wait_for_publish(5)
    wait_until(lambda: "edgefleet/d1/predictions/cam-1" in console.topics(), 10, "the real prediction")
    time.sleep(0.5)
    assert console.topics().count("edgefleet/d1/frames/cam-1") == 1
    assert "edgefleet/d1/frames/cam-2" not in console.topics(), "a camera published as another camera"
    assert [p for t, p in console.received if t.endswith("predictions/cam-1")] == [b"prediction"], "a camera forged a prediction"
    assert camera.received == [], "a camera read predictions"
    for client in (console, camera, inference):
        client.close()


@pytest.fixture
def pki(tmp_path):
    certs, rogue = tmp_path / "certs", tmp_path / "rogue"
    new_ca(certs)
    issue(certs, "cloud-broker", server=True)
    for name in ("dev-1", "dev-2", "cloud-ingest", "operator"):
        issue(certs, name)
    new_ca(rogue, "someone else's CA")
    issue(rogue, "dev-1")
    issue(rogue, "operator")
    issue(rogue, "cloud-broker", server=True)
    return certs, rogue


def _device(broker: Broker, folder, name, ca_folder=None):
    ca = (ca_folder or folder) / "ca.crt"
    return Client(f"mqtts://127.0.0.1:{broker.port}", name, mqtt_ca_file=ca,
                  mqtt_cert_file=folder / f"{name}.crt", mqtt_key_file=folder / f"{name}.key")


def test_on_the_cloud_broker_a_device_is_confined_to_its_topics_and_other_cas_are_refused(pki):
    certs, rogue = pki
    with Broker(security=cloud_listener(certs)) as cloud:
        ingest, device = _device(cloud, certs, "cloud-ingest"), _device(cloud, certs, "dev-1")
        ingest.listen("edgefleet/+/telemetry")
        assert ingest.connect() and device.connect()
        time.sleep(0.3)
        device.link.publish("edgefleet/dev-1/telemetry", b"mine", qos=1).wait_for_publish(5)
        device.link.publish("edgefleet/dev-2/telemetry", b"as dev-2", qos=1).wait_for_publish(5)
        wait_until(lambda: ingest.received, 10, "the device's own batch")
        time.sleep(0.5)
        assert ingest.received == [("edgefleet/dev-1/telemetry", b"mine")]
        # Operators publish the fleet's rollout; every device reads it, and only operators write it.
        operator, reader = _device(cloud, certs, "operator"), _device(cloud, certs, "dev-2")
        reader.listen("edgefleet/_fleet/rollout")
        assert operator.connect() and reader.connect()
        time.sleep(0.3)
        device.link.publish("edgefleet/_fleet/rollout", b"forged by a device", qos=1, retain=True).wait_for_publish(5)
        operator.link.publish("edgefleet/_fleet/rollout", b"the rollout", qos=1, retain=True).wait_for_publish(5)
        wait_until(lambda: reader.received, 10, "the rollout at a device")
        time.sleep(0.5)
        assert [p for _, p in reader.received] == [b"the rollout"]
        operator.close()
        reader.close()
        assert not _device(cloud, rogue, "dev-1", ca_folder=certs).connect(), "a certificate from another CA got in"
        assert not Client(f"mqtts://127.0.0.1:{cloud.port}", "nocert", mqtt_ca_file=certs / "ca.crt").connect()
        for client in (ingest, device):
            client.close()


def _brokers(fleet_certs, device_certs, tmp_path) -> tuple[Broker, Broker]:
    """A fleet broker on `fleet_certs` and dev-1's broker bridged to it with a certificate from `device_certs`."""
    cloud = Broker(security=cloud_listener(fleet_certs)).start()
    edge = Broker(security=edge_listener(password_file(tmp_path / "passwords", USERS)),
                  extra_config=bridge("dev-1", "127.0.0.1", cloud.port, device_certs)).start()
    return cloud, edge


def test_a_bridge_keeps_what_it_queued_across_a_cut_link_and_delivers_it(pki, tmp_path):
    certs, _ = pki
    cloud, edge = _brokers(certs, certs, tmp_path)
    try:
        operator = _device(cloud, certs, "operator")
        operator.listen("edgefleet/+/sync/state")
        assert operator.connect()
        sync = _user(edge, "sync")
        assert sync.connect()
        sync.link.publish("edgefleet/dev-1/sync/state", b"before", qos=1).wait_for_publish(5)
        wait_until(lambda: operator.received, 20, "the bridge to carry a first message")
        operator.close()
        cloud.kill()  # the link is cut
        time.sleep(1)
        for i in range(100):
            sync.link.publish("edgefleet/dev-1/sync/state", f"queued {i}".encode(), qos=1).wait_for_publish(5)
        cloud.start()
        returned = _device(cloud, certs, "operator")
        returned.listen("edgefleet/+/sync/state")
        assert returned.connect()
        wait_until(lambda: len(returned.received) >= 100, 60, "the queued messages")
        time.sleep(1)
        payloads = [p for _, p in returned.received]
        assert payloads == [f"queued {i}".encode() for i in range(100)], "lost, duplicated or reordered"
        sync.close()
        returned.close()
    finally:
        edge.close()
        cloud.close()


def test_a_bridge_refuses_a_fleet_broker_whose_certificate_another_ca_signed(pki, tmp_path):
    """An impostor fleet broker: the device's bridge must not hand it a single message."""
    certs, rogue = pki
    impostor, edge = _brokers(rogue, certs, tmp_path)
    try:
        listener = _device(impostor, rogue, "operator")
        listener.listen("edgefleet/#")
        assert listener.connect()
        sync = _user(edge, "sync")
        assert sync.connect()
        for i in range(5):
            sync.link.publish("edgefleet/dev-1/sync/state", f"secret {i}".encode(), qos=1).wait_for_publish(5)
            time.sleep(1)
        assert listener.received == []
        assert "certificate verify failed" in (edge.workdir / "mosquitto.log").read_text()
        listener.close()
        sync.close()
    finally:
        edge.close()
        impostor.close()
