"""Cameras on the device's network: deploy/mosquitto/edge.conf's TLS listener (8884 in production),
opened by a real Mosquitto on a loopback port with the committed settings (edgefleet/brokerconf.py),
beside the services' plain listener."""

from __future__ import annotations

import queue
import ssl
import threading
import uuid
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from edgefleet.broker import Broker
from edgefleet.brokerconf import edge_listener, password_file
from edgefleet.certs import issue, new_ca
from edgefleet.ports import free_port, wait_listening
from edgefleet.spawner import Child
from shared import topics
from shared.config import SECRETS_DIR_ENV, CameraSettings, CommonSettings, load
from shared.mqtt import MqttLink
from tests.support import wait_until

DEVICE = "dev-lan"
USERS = {"cam-1": "p-cam-1", "cam-2": "p-cam-2", "inference": "p-inf"}


class Lan:
    """A device broker with both listeners: `broker.url` the services' one, `port` the cameras' (TLS)."""

    def __init__(self, tmp_path: Path) -> None:
        self.certs = tmp_path / "certs"
        new_ca(self.certs)
        # As the README says to issue it: a server certificate for the device's LAN names.
        issue(self.certs, f"{DEVICE}-lan", server=True, hosts=("localhost", "127.0.0.1"))
        self.ca = self.certs / "ca.crt"
        self.port = free_port()
        security = edge_listener(password_file(tmp_path / "passwords", USERS), lan_port=self.port,
                                 lan_certs=self.certs, lan_server=f"{DEVICE}-lan")
        self.broker = Broker(security=security).start()
        wait_listening(self.broker.process, self.port, 10, "the LAN listener")


@pytest.fixture
def lan(tmp_path):
    lan = Lan(tmp_path)
    yield lan
    lan.broker.close()


class Frames:
    """The services' side: `inference` on the plain loopback listener, recording every frame topic."""

    def __init__(self, url: str) -> None:
        self.received: list[tuple[str, bytes]] = []
        self._lock = threading.Lock()
        settings = CommonSettings(mqtt_url=url, device_id=DEVICE, mqtt_username="inference",
                                  mqtt_password=USERS["inference"], mqtt_reconnect_max_s=1)
        self.link = MqttLink(settings, "test", unique=True)
        self.link.subscribe(topics.all_frames(DEVICE), self._record, qos=1)
        self.link.start()
        assert self.link.wait_connected(10), "inference could not log in on the services' listener"
        # The subscription is in place once a QoS 1 round trip made after it comes back (in order).
        self.link.publish(topics.errors(DEVICE), b"", qos=1).wait_for_publish(5)

    def _record(self, message) -> None:
        with self._lock:
            self.received.append((message.topic, message.payload))

    def on(self, topic: str) -> list[bytes]:
        with self._lock:
            return [p for t, p in self.received if t == topic]

    def close(self) -> None:
        self.link.stop()


def _attempt(port: int, user: str | None = None, password: str | None = None, ca: Path | None = None,
             tls: bool = True) -> str:
    """One MQTT v5 connection attempt; returns what the broker did with it: `accepted`, `refused: <reason>`
    (CONNACK with a failure code), `closed: <reason>` (dropped before any CONNACK) or `tls failed: ...`."""
    outcome: queue.Queue[str] = queue.Queue()
    client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=f"probe-{uuid.uuid4().hex[:8]}",
                         protocol=MQTTProtocolVersion.MQTTv5)
    if user is not None:
        client.username_pw_set(user, password)
    if tls:
        client.tls_set(ca_certs=str(ca) if ca else None, tls_version=ssl.PROTOCOL_TLS_CLIENT)
    client.on_connect = lambda c, u, f, rc, p: outcome.put(f"refused: {rc}" if rc.is_failure else "accepted")
    client.on_disconnect = lambda c, u, f, rc, p: outcome.put(f"closed: {rc}")
    try:
        client.connect("127.0.0.1", port, keepalive=10)
    except ssl.SSLError as exc:
        return f"tls failed: {exc}"
    client.loop_start()
    try:
        return outcome.get(timeout=15)
    finally:
        client.disconnect()
        client.loop_stop()


def test_a_camera_on_the_lan_sends_frames_over_tls_with_its_password_and_the_services_get_them(lan, tmp_path):
    frames = Frames(lan.broker.url)
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "edgefleet_mqtt_password").write_text(USERS["cam-1"])
    # The real camera simulator, configured as a camera on the network would be: TLS to the LAN
    # listener, checking the broker's certificate (name 127.0.0.1) against the fleet CA, its password
    # from a secrets file: the folder is no setting but where the camera reads its password, so it goes
    # beside the typed settings, and the password itself never passes through them.
    settings = load(CameraSettings, None, mqtt_url=f"mqtts://127.0.0.1:{lan.port}", mqtt_ca_file=lan.ca,
                    mqtt_username="cam-1", device_id=DEVICE, cameras=["cam-1"], rate_hz=5, log_format="text")
    camera = Child("camera", tmp_path / "camera.log", settings, env={SECRETS_DIR_ENV: str(secrets)})
    try:
        got = wait_until(lambda: frames.on(topics.frames(DEVICE, "cam-1")) or not camera.alive(), 60,
                         "a frame from the camera on the LAN listener")
        assert camera.alive(), f"the camera exited:\n{camera.log()}"
        assert got[0][:3] == b"\xff\xd8\xff", "not the camera's JPEG"
    finally:
        camera.kill()
        frames.close()


def test_the_lan_listener_refuses_clients_without_credentials_or_without_tls(lan):
    # The listener works for a camera with its password over TLS...
    assert _attempt(lan.port, "cam-1", USERS["cam-1"], lan.ca) == "accepted"
    # ...and for no one else: no user name, a wrong password, an unknown user (password_file and
    # allow_anonymous false hold for this listener too),
    assert _attempt(lan.port, ca=lan.ca).startswith("refused:")
    assert _attempt(lan.port, "cam-1", "wrong", lan.ca).startswith("refused:")
    assert _attempt(lan.port, "mallory", "guess", lan.ca).startswith("refused:")
    # the right password in clear text (the broker drops it at the TLS handshake, before any CONNACK),
    assert _attempt(lan.port, "cam-1", USERS["cam-1"], tls=False).startswith("closed:")
    # and a client that takes the broker's certificate for anything but the fleet CA's.
    assert _attempt(lan.port, "cam-1", USERS["cam-1"], ca=None).startswith("tls failed:")


def test_edge_acl_confines_a_camera_on_the_lan_listener_to_its_own_frames(lan):
    frames = Frames(lan.broker.url)
    camera = MqttLink(CommonSettings(mqtt_url=f"mqtts://127.0.0.1:{lan.port}", device_id=DEVICE, mqtt_ca_file=lan.ca,
                                     mqtt_username="cam-1", mqtt_password=USERS["cam-1"], mqtt_reconnect_max_s=1),
                      "camera", unique=True)
    camera.start()
    try:
        assert camera.wait_connected(10)
        camera.publish(topics.frames(DEVICE, "cam-2"), b"forged", qos=1).wait_for_publish(5)
        # A sentinel after the forbidden ones: once it is in, they would have been too.
        camera.publish(topics.frames(DEVICE, "cam-1"), b"sentinel", qos=1).wait_for_publish(5)
        wait_until(lambda: frames.on(topics.frames(DEVICE, "cam-1")), 10, "the camera's own frame")
        assert frames.on(topics.frames(DEVICE, "cam-2")) == []
    finally:
        camera.stop()
        frames.close()
