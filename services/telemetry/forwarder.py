"""The forwarder: sends the outbox to the cloud broker in batches (QoS 1, msgpack + zlib) and deletes
records only when cloud_ingest acknowledged the batch, that is after its objects are in S3. While the
link is down it backs off; a batch not acknowledged in time (time counted while its link is up: over a
cut link no acknowledgement can come, so the clock pauses and resumes with what it had left; an ack
lost with the cut is made up for by the resend when that runs out) is sent again, the same batch with
the same id, so the cloud's idempotent writes leave no duplicate. The protocol
itself (which batch, attempts, dead letters, acknowledgements, backoff) is services.telemetry.sending's
Sender, shared with the fleet simulator; this module adds the thread, its waiting and MQTT.

A batch is never retried forever (one poison batch would stall every record behind it): after
`max_attempts` sendings without an acknowledgement, or at once when the cloud acknowledges it as
dead-lettered, its records move to the outbox's dead-letter table and a `dead_lettered` gap goes to
the cloud in their place. The attempt count is kept on disk, so a restart resends and counts on.

Each batch carries which stores acknowledged which of the epoch's records (Outbox.acknowledged, moved
on by each acknowledgement), so the cloud's audit can tell a store's own losses from what an earlier
store acknowledged."""

from __future__ import annotations

import logging
import threading

import paho.mqtt.client as paho

from services.telemetry.outbox import Outbox
from services.telemetry.sending import LINK_CHECK_S, Outgoing, Sender
from shared import topics
from shared.codec import DecodeError, decode
from shared.config import BatchSettings, ForwardSettings
from shared.lifecycle import Liveness, Progress
from shared.logs import fields
from shared.mqtt import MqttLink, content_type_of
from shared.schemas import TelemetryAck

log = logging.getLogger(__name__)


class Forwarder:
    """The Sender's protocol (services.telemetry.sending) on a thread: it waits (for records, for an
    acknowledgement, between attempts) and publishes over the MqttLink.

    :param Outbox outbox: the device's outbox.
    :param MqttLink link: the link the batches go out on and the acknowledgements come in on.
    :param str device: the device id.
    :param BatchSettings batch: the batches' limits and linger.
    :param ForwardSettings forward: attempts and backoff.
    :param float ack_timeout_s: how long (of link-up time) a batch waits for its acknowledgement.
    :param Liveness liveness: where the thread proves it is alive; None: a Liveness of its own.
    """

    def __init__(self, outbox: Outbox, link: MqttLink, device: str, *, batch: BatchSettings, forward: ForwardSettings,
                 ack_timeout_s: float, liveness: Liveness | None = None) -> None:
        self.outbox, self.link, self.device = outbox, link, device
        self.sender = Sender(outbox, device, batch=batch, forward=forward, ack_timeout_s=ack_timeout_s)
        s = self.sender  # its counters are the forwarder's (metrics and the status read them here)
        self.sent_batches, self.resent_batches, self.acked_records = s.sent_batches, s.resent_batches, s.acked_records
        self.dead_lettered_batches = s.dead_lettered_batches
        self._acks: dict[str, TelemetryAck] = {}
        self._changed = threading.Condition()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="forwarder")
        # Ticked every time round and before each bounded wait (shared.lifecycle): idle or backing off is
        # alive, stuck (a wedged SQLite read, a publish that never returns) is not.
        self._liveness, self._progress = liveness or Liveness(), Progress("forwarder")
        link.subscribe(topics.telemetry_ack(device), self._on_ack, qos=1)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self.wake()
        self._thread.join()

    def wake(self) -> None:
        with self._changed:
            self._changed.notify_all()

    def _on_ack(self, message: paho.MQTTMessage) -> None:
        try:
            ack = decode(TelemetryAck, message.payload, content_type_of(message))
        except DecodeError as exc:
            log.warning("bad ack", extra=fields(error=str(exc)))
            return
        with self._changed:
            self._acks[ack.batch_id] = ack
            self._changed.notify_all()

    def _run(self) -> None:
        with self._liveness.watch(self._progress):
            self._forward()

    def _forward(self) -> None:
        while not self._stopping.is_set():
            self._progress.tick()
            if not self.link.connected.is_set():
                self._wait(1.0)
                continue
            sending = self.sender.next()
            if not isinstance(sending, Outgoing):
                self._wait(sending)
                continue
            self.link.publish(sending.topic, sending.payload, qos=1, content_type=sending.content_type,
                              correlation=sending.correlation)
            ack = self._await_ack(sending.batch_id)
            if ack is not None:
                self.sender.settle(ack)
            elif not self._stopping.is_set():
                delay = self.sender.timed_out()
                log.info("batch not acknowledged; sending again",
                         extra=fields(batch=sending.batch_id, wait_s=delay))
                self._wait(delay)

    def _await_ack(self, batch_id: str) -> TelemetryAck | None:
        """The batch's acknowledgement; None when its time (counted while the link is up) is over, or on stop."""
        while True:
            left = self.sender.ack_left(self.link.connected.is_set())
            if left is not None and left <= 0:
                return None
            wait = LINK_CHECK_S if left is None else min(left, LINK_CHECK_S)
            self._progress.tick(wait)
            with self._changed:
                self._changed.wait_for(lambda: batch_id in self._acks or self._stopping.is_set(), wait)
                ack = self._acks.pop(batch_id, None)
                # Only this batch is in flight, and the next is not sent yet: any other ack is stale (a
                # second ack of a batch settled before, another device's) and would be held for ever.
                self._acks.clear()
            if ack is not None or self._stopping.is_set():
                return ack

    def _wait(self, seconds: float) -> None:
        self._progress.tick(seconds)
        with self._changed:
            self._changed.wait_for(self._stopping.is_set, seconds)
