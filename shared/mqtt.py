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
from paho.mqtt.client import ConnectFlags, DisconnectFlags
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

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
    """One process's connection to one broker: a paho client with the reconnect, resubscribe and status
    behaviour the module's doc describes. Thread-safe: publish, subscribe and ack may be called from any
    thread, handlers run on paho's network thread.

    :param CommonSettings settings: the broker (settings.mqtt: URL, credentials, TLS, reconnect backoff)
        and the device id, which becomes part of the MQTT client id.
    :param str client_name: the first part of the client id (`<client_name>-<device_id>`).
    :param StatusPublisher status: the retained status kept on its topic; None: no status, no will.
    :param bool unique: add a random suffix to the client id, so several instances (cameras, benches)
        can connect at once; services keep a stable id so the broker resumes their session.
    :param bool manual_ack: QoS 1 messages are acknowledged only by ack() (see the module's doc).
    :param int receive_maximum: MQTT v5 Receive Maximum; None: the broker's default.
    :param int session_expiry_s: keep the session this long after a disconnect (clean start off);
        None: a clean session on the first connect, resumed on reconnects.
    """

    def __init__(
        self,
        settings: CommonSettings,
        client_name: str,
        status: StatusPublisher | None = None,
        *,
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
            self._connect_props = _properties(PacketTypes.CONNECT)
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
        self._subacked: dict[int, threading.Event] = {}

        c = self._client
        # paho annotates the delays as int but computes with any number (min(delay * 2, max_delay)).
        c.reconnect_delay_set(settings.mqtt.reconnect_min_s, settings.mqtt.reconnect_max_s)  # type: ignore[arg-type]
        c.max_queued_messages_set(MAX_QUEUED_MESSAGES)
        c.max_inflight_messages_set(MAX_INFLIGHT)
        if settings.mqtt.username:
            password = settings.mqtt.password.get_secret_value() if settings.mqtt.password else None
            c.username_pw_set(settings.mqtt.username, password)
        if settings.mqtt.tls:
            c.tls_set(
                ca_certs=str(settings.mqtt.ca_file) if settings.mqtt.ca_file else None,
                certfile=str(settings.mqtt.cert_file) if settings.mqtt.cert_file else None,
                keyfile=str(settings.mqtt.key_file) if settings.mqtt.key_file else None,
                tls_version=ssl.PROTOCOL_TLS_CLIENT,
            )
        if status is not None:
            c.will_set(status.topic, status.will, qos=1, retain=True, properties=self._props("application/json"))
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        c.on_unsubscribe = self._on_unsubscribe
        c.on_subscribe = self._on_subscribe

    @property
    def client(self) -> paho.Client:
        return self._client

    def subscribe(self, topic_filter: str, handler: Handler, qos: int = 1) -> None:
        """Subscribe to a topic filter and call `handler` with every message whose topic matches it.

        The subscription is made at once if the link is up, and again on every reconnect, so a caller
        subscribes once, before or after start(). A handler runs on paho's network thread: it must not
        block, and an exception it raises is logged and does not stop the link.

        :param str topic_filter: an MQTT topic filter (wildcards allowed), from shared.topics; a shared
            subscription `$share/<group>/<filter>` delivers the messages of <filter>'s topics.
        :param handler: called with each matching paho.MQTTMessage.
        :param int qos: the maximum QoS the broker delivers with (0, 1 or 2).

        Returns nothing: the broker's SUBACK is not waited for (subscribing is repeated on reconnect).

        :raises ValueError: for an empty or invalid filter or a qos other than 0-2, when the link is up
            (paho's check); while it is down the same mistake surfaces on paho's thread at the next connect.
        """
        with self._lock:
            self._subscriptions.append((topic_filter, qos, handler))
        if self.connected.is_set():
            self._client.subscribe(topic_filter, qos)

    def unsubscribe(self, topic_filter: str, timeout: float = 5.0) -> bool:
        """Stop a subscription, waiting for the broker's UNSUBACK before the handler is removed.

        Messages the broker sent before it saw the UNSUBSCRIBE still arrive in between, and were (or will
        be) acknowledged: they reach the handler, so a service that stops intake here loses none.

        :param str topic_filter: the filter exactly as given to subscribe().
        :param float timeout: the most seconds to wait for the UNSUBACK.

        Returns True if the broker acknowledged the UNSUBSCRIBE in time; False if it did not, or the
        link is down (the handler is removed either way, and is not subscribed again on reconnect).

        :raises ValueError: for an empty or invalid filter (paho's check).
        """
        with self._lock:
            rc, mid = self._client.unsubscribe(topic_filter)
            done = threading.Event()
            if mid is not None:
                self._unsubscribed[mid] = done
        answered = rc == paho.MQTT_ERR_SUCCESS and done.wait(timeout)
        with self._lock:
            if mid is not None:
                self._unsubscribed.pop(mid, None)
            self._subscriptions = [s for s in self._subscriptions if s[0] != topic_filter]
        return answered

    def subscribe_acked(self, topic_filter: str, timeout: float, qos: int = 1) -> bool:
        """Send one SUBSCRIBE now and wait for the broker's SUBACK: a marker of how far the broker has
        got with this link's earlier packets. No handler is added and it is not repeated on reconnect.

        :param str topic_filter: an MQTT topic filter the client may subscribe to (a SUBACK that refuses
            it is still an answer, and counts).
        :param float timeout: the most seconds to wait for the SUBACK.
        :param int qos: the maximum QoS asked for (0, 1 or 2).

        Returns True if the SUBACK came in time; False if it did not, or the link is down.

        :raises ValueError: for an empty or invalid filter or a bad qos (paho's check).
        """
        with self._lock:
            rc, mid = self._client.subscribe(topic_filter, qos)
            done = threading.Event()
            if rc == paho.MQTT_ERR_SUCCESS and mid is not None:
                self._subacked[mid] = done
        answered = rc == paho.MQTT_ERR_SUCCESS and done.wait(timeout)
        with self._lock:
            if mid is not None:
                self._subacked.pop(mid, None)
        return answered

    def ack(self, message: paho.MQTTMessage) -> None:
        """With manual_ack: tell the broker `message` is done with (PUBACK for QoS 1). Safe from any thread.

        :param paho.MQTTMessage message: a message a handler of this link received.
        """
        self._client.ack(message.mid, message.qos)

    def publish(
        self, topic: str, payload: bytes, qos: int = 0, retain: bool = False, content_type: str | None = None,
        correlation: bytes | None = None,
    ) -> paho.MQTTMessageInfo:
        """Publish a message on a topic.

        A QoS 1 or 2 message published while the broker is away is queued by paho (up to
        MAX_QUEUED_MESSAGES; past that it is refused) and sent after the reconnect; a QoS 0 one is lost.

        :param str topic: the topic, from shared.topics (no wildcards).
        :param bytes payload: the message, usually shared.codec.encode's output.
        :param int qos: the quality of service level to use (0, 1 or 2).
        :param bool retain: the broker keeps it as the topic's last known good message.
        :param str content_type: the MQTT v5 content type (WireFormat.content_type), which
            shared.codec.decode reads to pick the format; None: no content type property.
        :param bytes correlation: MQTT v5 correlation data, readable even when the payload is not (see
            correlation_of); None: none.

        Returns paho's MQTTMessageInfo: `rc` is MQTT_ERR_SUCCESS, MQTT_ERR_NO_CONN (the link is down: a
        QoS 1 or 2 message waits in the queue, a QoS 0 one is lost) or MQTT_ERR_QUEUE_SIZE (the queue is
        full: the message is dropped); wait_for_publish() blocks until the message has gone out (for QoS
        1 and 2: until the broker acknowledged it).

        :raises ValueError: if the topic is invalid (empty or with a wildcard), qos is not 0-2, or the
            payload is longer than MQTT allows (268435455 bytes).
        """
        properties = self._props(content_type)
        if correlation is not None:
            properties = _properties(PacketTypes.PUBLISH)
            if content_type is not None:
                properties.ContentType = content_type
            properties.CorrelationData = correlation
        return self._client.publish(topic, payload, qos=qos, retain=retain, properties=properties)

    def start(self) -> None:
        """Connects in the background; a broker that is not up yet is retried with backoff."""
        s = self._settings
        log.info("connecting to broker", extra=fields(url=s.mqtt.url))
        self._client.connect_async(s.mqtt.host, s.mqtt.port, keepalive=30, clean_start=self._clean_start,
                                   properties=self._connect_props)
        self._client.loop_start()

    def wait_connected(self, timeout: float) -> bool:
        """Whether the link is up within `timeout` seconds (True at once if it is up now)."""
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
            props = _properties(PacketTypes.PUBLISH)
            props.ContentType = content_type
            self._content_types[content_type] = props
        return props

    def _on_connect(self, client: paho.Client, userdata: object, flags: ConnectFlags, reason_code: ReasonCode,
                    properties: Properties | None) -> None:
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

    def _on_disconnect(self, client: paho.Client, userdata: object, flags: DisconnectFlags, reason_code: ReasonCode,
                       properties: Properties | None) -> None:
        was_connected = self.connected.is_set()
        self.connected.clear()
        if was_connected and not self._closing:
            log.warning("lost broker, reconnecting with backoff", extra=fields(reason=str(reason_code)))

    def _on_unsubscribe(self, client: paho.Client, userdata: object, mid: int, reason_codes: list[ReasonCode],
                        properties: Properties | None) -> None:
        with self._lock:
            done = self._unsubscribed.pop(mid, None)
        if done is not None:
            done.set()

    def _on_subscribe(self, client: paho.Client, userdata: object, mid: int, reason_codes: list[ReasonCode],
                      properties: Properties | None) -> None:
        with self._lock:
            done = self._subacked.pop(mid, None)
        if done is not None:
            done.set()

    def _on_message(self, client: paho.Client, userdata: object, message: paho.MQTTMessage) -> None:
        with self._lock:
            subscriptions = list(self._subscriptions)
        for topic_filter, _, handler in subscriptions:
            if paho.topic_matches_sub(_unshared(topic_filter), message.topic):
                try:
                    handler(message)
                except Exception:  # a handler's bug must not stop the network loop
                    log.exception("message handler failed", extra=fields(topic=message.topic))


def _properties(packet_type: int) -> Properties:
    """An empty MQTT v5 property set for one packet type."""
    return Properties(packet_type)  # type: ignore[no-untyped-call]  # paho leaves Properties.__init__ unannotated


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
    if not isinstance(raw, socket.socket):  # websockets' wrapper, or no connection: nothing to tune
        return
    try:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:  # not TCP (a unix socket): nothing to tune
        pass


def content_type_of(message: paho.MQTTMessage) -> str | None:
    """The MQTT v5 content type a message was published with; None if it has none (an MQTT 3.1.1
    sender, or a hop that dropped it): shared.codec.decode then tells the format by its first byte."""
    props = message.properties
    return getattr(props, "ContentType", None) if props is not None else None


def correlation_of(message: paho.MQTTMessage) -> bytes | None:
    """The MQTT v5 correlation data of a message, if it has any (the telemetry batch id of a batch)."""
    props = getattr(message, "properties", None)
    return getattr(props, "CorrelationData", None) if props is not None else None
