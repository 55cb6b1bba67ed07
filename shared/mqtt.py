"""The MQTT link every edgefleet process uses: paho-mqtt 2.x on MQTT v5.

It reconnects by itself with exponential backoff (a dead broker is waited for, never a reason to exit),
subscribes again after every reconnect, leaves a retained "offline" status as its last will, and
publishes a retained "online" status on every connect.

Options for a consumer that must not lose what it took (cloud_ingest):
- `manual_ack`: a QoS 1 message is acknowledged to the broker only when the application calls ack(),
  after it has done its work; until then the broker owns it and delivers it again on a new session.
- `receive_maximum`: MQTT v5 Receive Maximum, the most unacknowledged QoS 1 messages the broker sends
  this client: the flow control that bounds work taken, so no callback ever has to block.
- `session_expiry_s`: a persistent session (clean start off): after a crash the broker keeps what the
  client took and did not acknowledge, and sends it again when the same client id comes back.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from shared.config import CommonSettings
from shared.logs import fields

log = logging.getLogger(__name__)

Handler = Callable[[paho.MQTTMessage], None]

# Bounds what paho holds while the broker is away, so a long outage cannot grow memory without end.
MAX_QUEUED_MESSAGES = 1000
MAX_INFLIGHT = 100


@dataclass(frozen=True)
class StatusPublisher:
    """The retained status this link keeps on its topic: `online()` on every connect, `will` on loss."""

    topic: str
    online: Callable[[], bytes]
    will: bytes


class MqttLink:
    def __init__(
        self,
        settings: CommonSettings,
        client_name: str,
        status: StatusPublisher | None = None,
        unique: bool = False,
        manual_ack: bool = False,
        receive_maximum: int | None = None,
        session_expiry_s: int | None = None,
    ) -> None:
        # Services keep a stable id per device; tools (cameras, benches) add a suffix so many can run.
        client_id = f"{client_name}-{settings.device_id}" + (f"-{uuid.uuid4().hex[:8]}" if unique else "")
        self._client = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=MQTTProtocolVersion.MQTTv5,
            manual_ack=manual_ack,
        )
        self._connect_props: Properties | None = None
        if receive_maximum is not None or session_expiry_s is not None:
            self._connect_props = Properties(PacketTypes.CONNECT)
            if receive_maximum is not None:
                self._connect_props.ReceiveMaximum = receive_maximum
            if session_expiry_s is not None:
                self._connect_props.SessionExpiryInterval = session_expiry_s
        self._clean_start = paho.MQTT_CLEAN_START_FIRST_ONLY if session_expiry_s is None else False
        self._settings = settings
        self._status = status
        self._subscriptions: list[tuple[str, int, Handler]] = []
        self._lock = threading.Lock()
        self.connected = threading.Event()
        self._closing = False
        self._content_types: dict[str, Properties] = {}
        self._unsubscribed: dict[int, threading.Event] = {}

        c = self._client
        c.reconnect_delay_set(settings.mqtt_reconnect_min_s, settings.mqtt_reconnect_max_s)
        c.max_queued_messages_set(MAX_QUEUED_MESSAGES)
        c.max_inflight_messages_set(MAX_INFLIGHT)
        if settings.mqtt_username:
            password = settings.mqtt_password.get_secret_value() if settings.mqtt_password else None
            c.username_pw_set(settings.mqtt_username, password)
        if settings.mqtt_tls:
            c.tls_set(
                ca_certs=str(settings.mqtt_ca_file) if settings.mqtt_ca_file else None,
                certfile=str(settings.mqtt_cert_file) if settings.mqtt_cert_file else None,
                keyfile=str(settings.mqtt_key_file) if settings.mqtt_key_file else None,
                tls_version=ssl.PROTOCOL_TLS_CLIENT,
            )
        if status is not None:
            c.will_set(status.topic, status.will, qos=1, retain=True, properties=self._props("application/json"))
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        c.on_unsubscribe = self._on_unsubscribe

    @property
    def client(self) -> paho.Client:
        return self._client

    def subscribe(self, topic_filter: str, handler: Handler, qos: int = 1) -> None:
        """Registers a handler; the subscription is made now if connected and again on every reconnect."""
        with self._lock:
            self._subscriptions.append((topic_filter, qos, handler))
        if self.connected.is_set():
            self._client.subscribe(topic_filter, qos)

    def unsubscribe(self, topic_filter: str, timeout: float = 5.0) -> bool:
        """Stops a subscription and waits for the broker's UNSUBACK; the handler is removed only then.
        Messages the broker sent before it saw the UNSUBSCRIBE still arrive in between, and were (or will
        be) acknowledged: they reach the handler, so a service that stops intake here loses none.
        Returns False if the broker did not answer in time (the handler is removed anyway)."""
        with self._lock:
            rc, mid = self._client.unsubscribe(topic_filter)
            done = self._unsubscribed[mid] = threading.Event()
        answered = rc == paho.MQTT_ERR_SUCCESS and done.wait(timeout)
        with self._lock:
            self._unsubscribed.pop(mid, None)
            self._subscriptions = [s for s in self._subscriptions if s[0] != topic_filter]
        return answered

    def ack(self, message: paho.MQTTMessage) -> None:
        """With manual_ack: tells the broker `message` is done with (PUBACK). Safe from any thread."""
        self._client.ack(message.mid, message.qos)

    def publish(
        self, topic: str, payload: bytes, qos: int = 0, retain: bool = False, content_type: str | None = None,
        correlation: bytes | None = None,
    ) -> paho.MQTTMessageInfo:
        """`correlation`: MQTT v5 correlation data, readable even when the payload is not (see correlation_of)."""
        properties = self._props(content_type)
        if correlation is not None:
            properties = Properties(PacketTypes.PUBLISH)
            if content_type is not None:
                properties.ContentType = content_type
            properties.CorrelationData = correlation
        return self._client.publish(topic, payload, qos=qos, retain=retain, properties=properties)

    def start(self) -> None:
        """Connects in the background; a broker that is not up yet is retried with backoff."""
        s = self._settings
        log.info("connecting to broker", extra=fields(url=s.mqtt_url))
        self._client.connect_async(s.mqtt_host, s.mqtt_port, keepalive=30, clean_start=self._clean_start,
                                   properties=self._connect_props)
        self._client.loop_start()

    def wait_connected(self, timeout: float) -> bool:
        return self.connected.wait(timeout)

    def stop(self, final_status: bytes | None = None, timeout: float = 5.0) -> None:
        """Publishes the final retained status (if connected), flushes what is in flight, disconnects."""
        if final_status is not None and self._status is not None and self.connected.is_set():
            info = self.publish(self._status.topic, final_status, qos=1, retain=True, content_type="application/json")
            try:
                info.wait_for_publish(timeout)
            except (RuntimeError, ValueError):
                log.warning("final status not delivered: broker unreachable")
        self._closing = True
        self._client.disconnect()
        self._client.loop_stop()

    def _props(self, content_type: str | None) -> Properties | None:
        if content_type is None:
            return None
        props = self._content_types.get(content_type)
        if props is None:
            props = Properties(PacketTypes.PUBLISH)
            props.ContentType = content_type
            self._content_types[content_type] = props
        return props

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.error("broker refused connection", extra=fields(reason=str(reason_code)))
            return
        _disable_nagle(client)
        with self._lock:
            subscriptions = list(self._subscriptions)
        for topic_filter, qos, _ in subscriptions:
            client.subscribe(topic_filter, qos)
        if self._status is not None:
            self.publish(self._status.topic, self._status.online(), qos=1, retain=True, content_type="application/json")
        self.connected.set()
        log.info("connected to broker", extra=fields(subscriptions=[s[0] for s in subscriptions]))

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        was_connected = self.connected.is_set()
        self.connected.clear()
        if was_connected and not self._closing:
            log.warning("lost broker, reconnecting with backoff", extra=fields(reason=str(reason_code)))

    def _on_unsubscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        with self._lock:
            done = self._unsubscribed.pop(mid, None)
        if done is not None:
            done.set()

    def _on_message(self, client, userdata, message: paho.MQTTMessage) -> None:
        with self._lock:
            subscriptions = list(self._subscriptions)
        for topic_filter, _, handler in subscriptions:
            if paho.topic_matches_sub(_unshared(topic_filter), message.topic):
                try:
                    handler(message)
                except Exception:  # a handler's bug must not stop the network loop
                    log.exception("message handler failed", extra=fields(topic=message.topic))


def _unshared(topic_filter: str) -> str:
    """The filter a message's topic is matched against: `$share/<group>/<filter>` delivers <filter>'s topics."""
    if topic_filter.startswith("$share/"):
        return topic_filter.split("/", 2)[2]
    return topic_filter


def _disable_nagle(client: paho.Client) -> None:
    """paho leaves Nagle's algorithm on. A frame larger than one TCP segment then holds its tail until
    the peer's delayed ACK, adding milliseconds to every frame; small predictions suffer the same."""
    sock = client.socket()
    raw = getattr(sock, "_sock", sock)  # paho may wrap the socket; setsockopt works on either
    try:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError):  # not TCP (a unix socket or websockets): nothing to tune
        pass


def content_type_of(message: paho.MQTTMessage) -> str | None:
    props = message.properties
    return getattr(props, "ContentType", None) if props is not None else None


def correlation_of(message: paho.MQTTMessage) -> bytes | None:
    props = getattr(message, "properties", None)
    return getattr(props, "CorrelationData", None) if props is not None else None
