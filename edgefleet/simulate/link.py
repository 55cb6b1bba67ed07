"""One simulated device's MQTT session on the fleet broker, as the device's bridge holds it
(edgefleet/brokerconf.py `bridge`, whose settings this module imports): its own client id and
certificate, TLS 1.2+, MQTT v5, a persistent session (clean start off, a session expiry), the bridge's
topics and v5 subscription options (and its UNSUBSCRIBE of the `out` topics at connect), reconnects with
backoff and jitter (restart_timeout 1 10). Not mirrored: the bridge's $SYS connection notification and
its will, which the fleet's ACL does not let a device write (docs/scale.md).

Many links share one asyncio loop through paho's external-loop API (on_socket_open/close,
register/unregister_write, loop_read/loop_write/loop_misc), the way aiomqtt drives paho: no network
thread per device. Every paho call for a client is made on the loop thread, except reconnect() (the
TCP connect and TLS handshake), which runs in a small shared thread pool while the loop leaves that
client alone: no publish, read, write or keepalive until it returns.

The device's broker is modelled where it shows on the fleet broker: what the device publishes while
the link is down or connecting waits in the link's own queue, bounded like the bridge's queue (edge.conf
max_queued_messages; past it a new message is refused and counted), and goes out after the next
CONNACK; on every CONNACK the last retained message of each topic is sent again first, as mosquitto's
bridge re-sends the local broker's retained messages on its `out` topics.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import random
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as paho
from paho.mqtt.client import ConnectFlags, DisconnectFlags
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from edgefleet.brokerconf import (
    BRIDGE_KEEPALIVE_S,
    BRIDGE_MAX_INFLIGHT,
    BRIDGE_RESTART_S,
    BRIDGE_SESSION_EXPIRY_S,
    bridge_queue_limit,
    bridge_topics,
)
from shared.logs import fields

log = logging.getLogger(__name__)

Handler = Callable[[paho.MQTTMessage], None]
# paho's publish answers that mean the message is on its way (NO_CONN: queued by paho for the reconnect).
_ACCEPTED = (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN)


class CutMode(enum.StrEnum):
    """How a link is cut. SILENT: a WAN cut as the broker sees it, nothing arrives and nothing is
    answered, so the broker holds the connection until 1.5 x keepalive or the reconnect takes the session
    over. FIN: the TCP connection is shut down, so the broker learns of the loss at once."""

    SILENT = "silent"
    FIN = "fin"


@dataclass(frozen=True)
class Endpoint:
    """Where every link of a process connects, and the certificate folder (ca.crt, <device>.crt/.key)."""

    host: str
    port: int
    certs: Path


@dataclass
class LinkCounters:
    """Per-process counts every link adds to (the loop thread only: no lock needed)."""

    connects: int = 0  # CONNACKs accepted
    connect_failures: int = 0  # connects that raised (refused, TLS, timeouts, anything else)
    losses: int = 0  # sessions lost without a DISCONNECT of ours, cuts included
    refused: int = 0  # publishes refused: the queue was full (as a full bridge queue drops) or paho said no


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


_Message = tuple[str, bytes, int, bool, Properties | None]  # topic, payload, qos, retain, properties
_QUEUE_LIMIT: list[int] = []


def queue_limit() -> int:
    """The most messages a link holds while down: the bridge queue's bound (edge.conf max_queued_messages),
    read once per process."""
    if not _QUEUE_LIMIT:
        _QUEUE_LIMIT.append(bridge_queue_limit())
    return _QUEUE_LIMIT[0]


class DeviceLink:
    """One device's MQTT v5 session, driven by the asyncio loop it is started on (see the module's doc).

    :param str device: the device id, used as the client id (the broker takes the certificate's common
        name anyway: cloud.conf's use_identity_as_username and use_username_as_clientid).
    :param Endpoint endpoint: the fleet broker and the certificate folder.
    :param Executor connector: the shared pool the blocking connect (TCP + TLS handshake) runs in.
    :param LinkCounters counters: the process's connect/loss/refusal counts.
    """

    def __init__(self, device: str, endpoint: Endpoint, connector: Executor, counters: LinkCounters) -> None:
        self.device = device
        self.connected = asyncio.Event()
        self._endpoint, self._connector, self._counters = endpoint, connector, counters
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._subscriptions: list[tuple[str, int, Handler]] = []
        # mosquitto's bridge (attempt_unsubscribe, on by default) unsubscribes its `out` topics on connect.
        self._out_topics = [topic for topic, direction, _ in bridge_topics(device) if direction == "out"]
        self._queue: deque[_Message] = deque()  # published while not connected (the bridge queue)
        self._retained: dict[str, _Message] = {}  # each topic's last retained message, re-sent on every CONNACK
        self._unacked: set[int] = set()  # message ids of QoS 1 messages paho holds, not yet acknowledged
        self._fd: int | None = None  # the socket the loop services
        self._opened_fd: int | None = None  # the socket reconnect() opened in the pool, serviced once it returns
        self._want_write = False
        self._silent = False  # a silent cut: the socket is open and nobody services it
        self._down_until = 0.0
        self._delay = 0.0
        self._closing = False
        self._connecting = False
        self._task: asyncio.Task[None] | None = None
        self.on_connected: Callable[[], None] | None = None  # after every CONNACK that accepts (loop thread)
        client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=device,
                             protocol=MQTTProtocolVersion.MQTTv5)
        client.tls_set_context(tls_context(endpoint, device))
        client.max_inflight_messages_set(BRIDGE_MAX_INFLIGHT)
        client.max_queued_messages_set(0)  # unbounded in paho: the link bounds what it queues (queue_limit)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_register_write
        client.on_socket_unregister_write = self._on_unregister_write
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]  # paho leaves it unannotated
        props.SessionExpiryInterval = BRIDGE_SESSION_EXPIRY_S
        client.connect_async(endpoint.host, endpoint.port, keepalive=BRIDGE_KEEPALIVE_S, clean_start=False,
                             properties=props)
        self._client = client

    # -- what devices call -------------------------------------------------------------------------

    def subscribe(self, topic: str, handler: Handler, qos: int = 1) -> None:
        """Subscribes on every connect, with the bridge's v5 options (no local, retain as published,
        retained messages sent on subscribe); call before start().

        :param str topic: a topic filter from shared.topics.
        :param handler: called on the loop thread with each matching message; must not block.
        :param int qos: the most QoS the broker delivers with.
        """
        self._subscriptions.append((topic, qos, handler))

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False,
                content_type: str | None = None, correlation: bytes | None = None) -> None:
        """Sends a message; never blocks. Safe from any thread (other threads hand it to the loop).

        While the link is down, cut or connecting the message waits in the link's queue (the bridge
        queue, bounded by queue_limit(); past it the message is refused and counted in
        LinkCounters.refused, as a full bridge queue drops) and goes out after the next CONNACK.

        :param str topic: the topic, from shared.topics.
        :param bytes payload: the encoded message.
        :param int qos: 0 or 1.
        :param bool retain: the broker keeps it as the topic's last message (and the link re-sends it on
            every connect, as the bridge re-sends the local broker's retained messages).
        :param str content_type: the MQTT v5 content type (WireFormat.content_type), or None.
        :param bytes correlation: MQTT v5 correlation data, or None.
        """
        props = _content_type(content_type)
        if correlation is not None:
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            if content_type is not None:
                props.ContentType = content_type
            props.CorrelationData = correlation
        message = (topic, payload, qos, retain, props)
        if self._loop is None or threading.get_ident() == self._loop_thread:
            self._publish(message)
        else:
            self._loop.call_soon_threadsafe(self._publish, message)

    def cut(self, seconds: float, mode: CutMode = CutMode.SILENT) -> None:
        """Cuts the link for `seconds` (no reconnect before), without DISCONNECT: the broker keeps the
        persistent session and queues QoS 1 messages for it. A connect under way when the cut starts is
        dropped at its CONNACK. Call on the loop thread.

        :param float seconds: how long the link stays down.
        :param CutMode mode: SILENT (the socket is left unserviced, then dropped at reconnect) or FIN.
        """
        self._down_until = time.monotonic() + seconds
        if mode is CutMode.FIN:
            sock = self._client.socket()
            if isinstance(sock, socket.socket):  # an ssl.SSLSocket is one
                try:
                    sock.shutdown(socket.SHUT_RDWR)  # the reader sees EOF: paho reports the connection lost
                except OSError:
                    pass
        elif self._fd is not None:
            self._go_silent()

    def pending(self) -> int:
        """QoS 1 messages not yet acknowledged by the broker, plus those waiting for the link."""
        return len(self._unacked) + len(self._queue)

    def queued(self) -> int:
        """Messages waiting for the link (down, cut or connecting)."""
        return len(self._queue)

    @property
    def settled(self) -> bool:
        """Nothing left to send that could go out now (connected and all acknowledged, or not connected)."""
        return not self.connected.is_set() or self.pending() == 0

    @property
    def closing(self) -> bool:
        """Whether the device is going down as a whole (disconnect() was called: shutdown)."""
        return self._closing

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The loop the link was started on."""
        if self._loop is None:
            raise RuntimeError(f"{self.device}: the link is not started")
        return self._loop

    # -- lifecycle (loop thread) -------------------------------------------------------------------

    def start(self, delay_s: float = 0.0) -> None:
        """Connects after `delay_s` (a jittered start), then keeps the session up until disconnect()."""
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._task = self.loop.create_task(self._connect_after(delay_s))

    def misc(self) -> None:
        """paho's periodic work (keepalive PINGREQ, a dead broker noticed); the fleet calls it every second.
        Nothing while connecting or silently cut: nobody services that socket."""
        if self._fd is not None and not self._connecting and not self._silent:
            self._client.loop_misc()

    def disconnect(self) -> None:
        """A clean DISCONNECT (the broker drops no will, keeps the session); no reconnect after it. The
        socket closes once the loop has written the packet (see `closed`). A cut link just closes."""
        self._closing = True
        if self._task is not None:
            self._task.cancel()
        if self._fd is not None:
            self._client.disconnect()
        elif self._silent and (sock := self._client.socket()) is not None:
            sock.close()

    @property
    def closed(self) -> bool:
        """Whether the link has no socket the loop services."""
        return self._fd is None

    # -- publishing (loop thread) --------------------------------------------------------------------

    def _publish(self, message: _Message) -> None:
        if message[3]:
            self._retained[message[0]] = message
        if self.connected.is_set():
            self._send(message)
        elif self.pending() >= queue_limit():
            self._counters.refused += 1
        else:
            self._queue.append(message)

    def _send(self, message: _Message) -> None:
        topic, payload, qos, retain, props = message
        info = self._client.publish(topic, payload, qos=qos, retain=retain, properties=props)
        if info.rc not in _ACCEPTED:
            self._counters.refused += 1
            log.warning("publish refused", extra=fields(device=self.device, topic=topic, reason=str(info.rc)))
        elif qos > 0:
            self._unacked.add(info.mid)

    def _on_publish(self, client: paho.Client, userdata: object, mid: int, reason_code: ReasonCode,
                    properties: Properties) -> None:
        self._unacked.discard(mid)  # a QoS 0 message's mid was never added

    def _flush(self) -> None:
        """After a CONNACK: every topic's last retained message again, then the queue, oldest first."""
        queued = {id(message) for message in self._queue}
        for message in list(self._retained.values()):
            if id(message) not in queued:
                self._send(message)
        while self._queue and self.connected.is_set():
            self._send(self._queue.popleft())

    # -- connecting (loop thread) ------------------------------------------------------------------

    async def _connect_after(self, delay_s: float) -> None:
        await asyncio.sleep(delay_s)
        while not self._closing:
            wait = self._down_until - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
                continue
            self._unservice()  # reconnect() closes the old socket: the loop lets go of it first
            self._silent, self._opened_fd, self._want_write = False, None, False
            self._connecting = True
            try:
                await self.loop.run_in_executor(self._connector, self._client.reconnect)
                self._service(self._opened_fd)
                return  # the CONNACK (or a loss) arrives through loop_read
            except (OSError, ssl.SSLError, ValueError) as exc:
                self._counters.connect_failures += 1
                log.debug("connect failed", extra=fields(device=self.device, reason=str(exc)))
            except Exception:  # a bug must not leave the device offline for good: log, back off, retry
                self._counters.connect_failures += 1
                log.exception("connect failed unexpectedly", extra=fields(device=self.device))
            finally:
                self._connecting = False
            await asyncio.sleep(self._backoff())

    def _backoff(self) -> float:
        """Decorrelated jitter within the bridge's restart_timeout (BRIDGE_RESTART_S)."""
        base, cap = BRIDGE_RESTART_S
        self._delay = min(cap, random.uniform(base, max(base, self._delay * 3)))  # noqa: S311
        return self._delay

    def _service(self, fd: int | None) -> None:
        """The loop starts servicing the socket reconnect() opened."""
        if fd is None or self._closing:
            return
        self._fd = fd
        self.loop.add_reader(fd, self._read)
        if self._want_write:
            self.loop.add_writer(fd, self._write)

    def _unservice(self) -> None:
        if self._fd is not None:
            self.loop.remove_reader(self._fd)
            self.loop.remove_writer(self._fd)
            self._fd = None

    def _go_silent(self) -> None:
        """The socket stays open, unserviced: the broker hears nothing until the reconnect takes over."""
        self._unservice()
        self._silent = True
        if self.connected.is_set():
            self._counters.losses += 1
        self.connected.clear()
        self._reconnect_later()

    def _reconnect_later(self) -> None:
        if self._closing or (self._task is not None and not self._task.done()):
            return
        self._task = self.loop.create_task(self._connect_after(self._backoff()))

    # -- paho's socket hooks: on the loop thread they act, from the connect pool they only note ------

    def _on_loop_thread(self) -> bool:
        return threading.get_ident() == self._loop_thread

    def _on_socket_open(self, client: paho.Client, userdata: object, sock: paho.SocketLike) -> None:
        self._opened_fd = sock.fileno()  # always in the pool (reconnect); serviced once it returns

    def _on_socket_close(self, client: paho.Client, userdata: object, sock: paho.SocketLike) -> None:
        if self._on_loop_thread():
            self._unservice()

    def _on_register_write(self, client: paho.Client, userdata: object, sock: paho.SocketLike) -> None:
        self._want_write = True
        if self._on_loop_thread() and self._fd is not None:
            self.loop.add_writer(self._fd, self._write)

    def _on_unregister_write(self, client: paho.Client, userdata: object, sock: paho.SocketLike) -> None:
        self._want_write = False
        if self._on_loop_thread() and self._fd is not None:
            self.loop.remove_writer(self._fd)

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
        self._unservice()
        if self.connected.is_set() and not self._closing:
            self._counters.losses += 1
        self.connected.clear()
        self._reconnect_later()

    # -- paho's MQTT callbacks (loop thread: they run inside loop_read/loop_write/loop_misc) ----------

    def _on_connect(self, client: paho.Client, userdata: object, flags: ConnectFlags, reason_code: ReasonCode,
                    properties: Properties | None) -> None:
        if reason_code.is_failure:
            self._counters.connect_failures += 1
            log.warning("broker refused the connection", extra=fields(device=self.device, reason=str(reason_code)))
            return
        if self._closing:  # shutdown began while connecting: no "online" left behind
            client.disconnect()
            return
        if time.monotonic() < self._down_until:  # a cut began while connecting: it holds this link too
            self._go_silent()
            return
        self._counters.connects += 1
        self._delay = 0.0
        sock = client.socket()
        if isinstance(sock, socket.socket):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client.unsubscribe(self._out_topics)
        client.subscribe([(topic, SubscribeOptions(qos=qos, noLocal=True, retainAsPublished=True))
                          for topic, qos, _ in self._subscriptions])
        self.connected.set()
        self._flush()
        if self.on_connected is not None:
            self.on_connected()

    def _on_disconnect(self, client: paho.Client, userdata: object, flags: DisconnectFlags, reason_code: ReasonCode,
                       properties: Properties | None) -> None:
        was = self.connected.is_set()
        self.connected.clear()
        if was and not self._closing:
            self._counters.losses += 1
        if not self._closing and self._on_loop_thread():
            self._reconnect_later()

    def _on_message(self, client: paho.Client, userdata: object, message: paho.MQTTMessage) -> None:
        for topic, _, handler in self._subscriptions:
            if paho.topic_matches_sub(topic, message.topic):
                try:
                    handler(message)
                except Exception:  # a handler's bug must not stop the loop
                    log.exception("message handler failed", extra=fields(device=self.device, topic=message.topic))
