"""One simulated device's MQTT session on the fleet broker, as the device's bridge holds it
(edgefleet/brokerconf.py `bridge`): its own client id and certificate, TLS 1.2+, MQTT v5, a persistent
session (clean start off, a session expiry), reconnects with backoff and jitter (restart_timeout 1 10).

Many links share one asyncio loop through paho's external-loop API (on_socket_open/close,
register/unregister_write, loop_read/loop_write/loop_misc), the way aiomqtt drives paho: no network
thread per device. Only the blocking part of a connect (TCP connect and the TLS handshake, which paho
does in reconnect()) runs in a small shared thread pool, so a slow broker never stalls the loop.
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
import ssl
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as paho
from paho.mqtt.client import ConnectFlags, DisconnectFlags
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from shared.logs import fields

log = logging.getLogger(__name__)

Handler = Callable[[paho.MQTTMessage], None]

# The bridge's `restart_timeout 1 10`: the first retry after about a second, then backing off to ten.
RECONNECT_BASE_S, RECONNECT_CAP_S = 1.0, 10.0
KEEPALIVE_S = 60  # mosquitto's bridge default keepalive_interval
# A persistent session as the bridge's `cleansession false` keeps it: queued QoS 1 messages survive a cut.
SESSION_EXPIRY_S = 24 * 3600
# What paho holds for one device while its link is down (the device broker's bridge queue, in the real thing).
MAX_QUEUED = 1000
MAX_INFLIGHT = 20


@dataclass(frozen=True)
class Endpoint:
    """Where every link of a process connects, and the certificate folder (ca.crt, <device>.crt/.key)."""

    host: str
    port: int
    certs: Path


@dataclass
class LinkCounters:
    """Per-process counts every link adds to (the loop thread only: no lock needed)."""

    connects: int = 0
    connect_failures: int = 0
    losses: int = 0


_CONTENT_TYPES: dict[str, Properties] = {}


def _content_type(content_type: str | None) -> Properties | None:
    """PUBLISH properties holding only a content type, made once per process: paho only reads them, and
    building Properties costs more than the rest of a publish."""
    if content_type is None:
        return None
    if (props := _CONTENT_TYPES.get(content_type)) is None:
        props = _CONTENT_TYPES[content_type] = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.ContentType = content_type
    return props


def tls_context(endpoint: Endpoint, device: str) -> ssl.SSLContext:
    """The device's own TLS context: the fleet CA, the device's certificate and key, TLS 1.2 or later.
    Each device has one (its certificate is its identity); nothing device-specific is shared."""
    context = ssl.create_default_context(cafile=str(endpoint.certs / "ca.crt"))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(endpoint.certs / f"{device}.crt"), str(endpoint.certs / f"{device}.key"))
    return context


class DeviceLink:
    """One device's MQTT v5 session, driven by the asyncio loop it is started on.

    :param str device: the device id, used as the client id (the broker takes the certificate's common
        name anyway: cloud.conf's use_identity_as_username and use_username_as_clientid).
    :param Endpoint endpoint: the fleet broker and the certificate folder.
    :param Executor connector: the shared pool the blocking connect (TCP + TLS handshake) runs in.
    :param LinkCounters counters: the process's connect/loss counts.
    """

    def __init__(self, device: str, endpoint: Endpoint, connector: Executor, counters: LinkCounters) -> None:
        self.device = device
        self.connected = asyncio.Event()
        self._endpoint, self._connector, self._counters = endpoint, connector, counters
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._subscriptions: list[tuple[str, int, Handler]] = []
        self._fd: int | None = None
        self._down_until = 0.0
        self._delay = 0.0
        self._closing = False
        self._connecting = False
        self._task: asyncio.Task[None] | None = None
        self.on_connected: Callable[[], None] | None = None  # after every CONNACK that accepts (loop thread)
        client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=device,
                             protocol=MQTTProtocolVersion.MQTTv5)
        client.tls_set_context(tls_context(endpoint, device))
        client.max_queued_messages_set(MAX_QUEUED)
        client.max_inflight_messages_set(MAX_INFLIGHT)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_register_write
        client.on_socket_unregister_write = self._on_unregister_write
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]  # paho leaves it unannotated
        props.SessionExpiryInterval = SESSION_EXPIRY_S
        client.connect_async(endpoint.host, endpoint.port, keepalive=KEEPALIVE_S, clean_start=False,
                             properties=props)
        self._client = client

    # -- what devices call -------------------------------------------------------------------------

    def subscribe(self, topic: str, handler: Handler, qos: int = 1) -> None:
        """Subscribes on every connect (as the bridge does); call before start().

        :param str topic: a topic filter from shared.topics.
        :param handler: called on the loop thread with each matching message; must not block.
        :param int qos: the most QoS the broker delivers with.
        """
        self._subscriptions.append((topic, qos, handler))

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False,
                content_type: str | None = None, correlation: bytes | None = None) -> None:
        """Queues a message; never blocks. Safe from any thread (other threads hand it to the loop).

        A QoS 1 message published while the link is down waits in paho's queue (up to MAX_QUEUED; past
        that it is dropped, as a full bridge queue drops) and goes out after the reconnect.

        :param str topic: the topic, from shared.topics.
        :param bytes payload: the encoded message.
        :param int qos: 0 or 1.
        :param bool retain: the broker keeps it as the topic's last message.
        :param str content_type: the MQTT v5 content type (WireFormat.content_type), or None.
        :param bytes correlation: MQTT v5 correlation data, or None.
        """
        props = _content_type(content_type)
        if correlation is not None:
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            if content_type is not None:
                props.ContentType = content_type
            props.CorrelationData = correlation
        if self._loop is None or threading.get_ident() == self._loop_thread:
            self._client.publish(topic, payload, qos=qos, retain=retain, properties=props)
        else:
            self.loop.call_soon_threadsafe(self._publish_now, topic, payload, qos, retain, props)

    def _publish_now(self, topic: str, payload: bytes, qos: int, retain: bool, props: Properties | None) -> None:
        self._client.publish(topic, payload, qos=qos, retain=retain, properties=props)

    def cut(self, seconds: float) -> None:
        """Cuts the link: the TCP connection is dropped without DISCONNECT (the broker sees the link lost,
        keeps the persistent session and queues QoS 1 messages for it), no reconnect for `seconds`.
        Call on the loop thread."""
        self._down_until = time.monotonic() + seconds
        sock = self._client.socket()
        if isinstance(sock, socket.socket):  # an ssl.SSLSocket is one
            try:
                sock.shutdown(socket.SHUT_RDWR)  # the reader sees EOF: paho reports the connection lost
            except OSError:
                pass

    def pending(self) -> int:
        """QoS 1 messages not yet acknowledged by the broker, or waiting for the link."""
        return len(self._client._out_messages)  # paho has no public count of its queue

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The loop the link was started on."""
        if self._loop is None:
            raise RuntimeError(f"{self.device}: the link is not started")
        return self._loop

    # -- lifecycle (loop thread) -------------------------------------------------------------------

    def start(self, delay_s: float = 0.0) -> None:
        """Connects after `delay_s` (a jittered start), then keeps the session up until close()."""
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._task = self.loop.create_task(self._connect_after(delay_s))

    def misc(self) -> None:
        """paho's periodic work (keepalive PINGREQ, a dead broker noticed); the fleet calls it every second."""
        if self._fd is not None and not self._connecting:
            self._client.loop_misc()

    def disconnect(self) -> None:
        """A clean DISCONNECT (the broker drops no will, keeps the session); no reconnect after it. The
        socket closes once the loop has written the packet (see `closed`)."""
        self._closing = True
        if self._task is not None:
            self._task.cancel()
        if self._fd is not None:
            self._client.disconnect()

    @property
    def closed(self) -> bool:
        """Whether the link has no socket open."""
        return self._fd is None

    async def _connect_after(self, delay_s: float) -> None:
        await asyncio.sleep(delay_s)
        while not self._closing:
            wait = self._down_until - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
                continue
            self._connecting = True
            try:
                await self.loop.run_in_executor(self._connector, self._client.reconnect)
                return  # the CONNACK (or a loss) arrives through loop_read
            except (OSError, ssl.SSLError, ValueError) as exc:
                self._counters.connect_failures += 1
                log.debug("connect failed", extra=fields(device=self.device, reason=str(exc)))
            finally:
                self._connecting = False
            await asyncio.sleep(self._backoff())

    def _backoff(self) -> float:
        """Decorrelated jitter between RECONNECT_BASE_S and RECONNECT_CAP_S, as the bridge's restart_timeout."""
        self._delay = min(RECONNECT_CAP_S, random.uniform(RECONNECT_BASE_S, max(RECONNECT_BASE_S, self._delay * 3)))  # noqa: S311
        return self._delay

    # -- paho's callbacks --------------------------------------------------------------------------

    def _on_loop(self, callback: Callable[[], None]) -> None:
        """Runs callback on the loop thread: paho calls the socket hooks from the connect pool too."""
        if threading.get_ident() == self._loop_thread:
            callback()
        else:
            self.loop.call_soon_threadsafe(callback)

    def _on_socket_open(self, client: paho.Client, userdata: object, sock: paho.SocketLike) -> None:
        fd = sock.fileno()

        def add() -> None:
            self._fd = fd
            self.loop.add_reader(fd, self._read)

        self._on_loop(add)

    def _on_socket_close(self, client: paho.Client, userdata: object, sock: paho.SocketLike) -> None:
        fd = self._fd

        def remove() -> None:
            if fd is not None:
                self.loop.remove_reader(fd)
                self.loop.remove_writer(fd)
            if self._fd == fd:
                self._fd = None

        self._on_loop(remove)

    def _on_register_write(self, client: paho.Client, userdata: object, sock: paho.SocketLike) -> None:
        fd = sock.fileno()

        def add() -> None:
            if fd >= 0:
                self.loop.add_writer(fd, self._write)

        self._on_loop(add)

    def _on_unregister_write(self, client: paho.Client, userdata: object, sock: paho.SocketLike) -> None:
        fd = sock.fileno()

        def remove() -> None:
            if fd >= 0:
                self.loop.remove_writer(fd)

        self._on_loop(remove)

    def _read(self) -> None:
        try:
            self._client.loop_read()
        except (OSError, ValueError):  # a broken socket: paho's state is reset on the next connect
            self._lost()

    def _write(self) -> None:
        try:
            self._client.loop_write()
        except (OSError, ValueError):
            self._lost()

    def _lost(self) -> None:
        if self._fd is not None:
            self.loop.remove_reader(self._fd)
            self.loop.remove_writer(self._fd)
            self._fd = None
        self._reconnect_later()

    def _on_connect(self, client: paho.Client, userdata: object, flags: ConnectFlags, reason_code: ReasonCode,
                    properties: Properties | None) -> None:
        if reason_code.is_failure:
            log.warning("broker refused the connection", extra=fields(device=self.device, reason=str(reason_code)))
            return
        self._counters.connects += 1
        self._delay = 0.0
        sock = client.socket()
        if isinstance(sock, socket.socket):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for topic, qos, _ in self._subscriptions:
            client.subscribe(topic, qos)
        self.connected.set()
        if self.on_connected is not None:
            self.on_connected()

    def _on_disconnect(self, client: paho.Client, userdata: object, flags: DisconnectFlags, reason_code: ReasonCode,
                       properties: Properties | None) -> None:
        was = self.connected.is_set()
        self.connected.clear()
        if was and not self._closing:
            self._counters.losses += 1
        if not self._closing:
            self._on_loop(self._reconnect_later)

    def _reconnect_later(self) -> None:
        if self._closing or (self._task is not None and not self._task.done()):
            return
        self._task = self.loop.create_task(self._connect_after(self._backoff()))

    def _on_message(self, client: paho.Client, userdata: object, message: paho.MQTTMessage) -> None:
        for topic, _, handler in self._subscriptions:
            if paho.topic_matches_sub(topic, message.topic):
                try:
                    handler(message)
                except Exception:  # a handler's bug must not stop the loop
                    log.exception("message handler failed", extra=fields(device=self.device, topic=message.topic))
