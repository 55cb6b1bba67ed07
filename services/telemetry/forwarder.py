"""The forwarder: sends the outbox to the cloud broker in batches (QoS 1, msgpack + zlib) and deletes
records only when cloud_ingest acknowledged the batch, that is after its objects are in S3. While the
link is down it backs off; a batch not acknowledged in time is sent again, the same batch with the same
id, so the cloud's idempotent writes leave no duplicate.

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
import time

import paho.mqtt.client as paho

from services.telemetry.outbox import Outbox
from shared import topics
from shared.codec import DecodeError, WireFormat, decode, encode
from shared.config import BatchSettings, ForwardSettings
from shared.lifecycle import Liveness, Progress
from shared.logs import fields
from shared.metrics import Counter
from shared.mqtt import MqttLink, content_type_of
from shared.schemas import TelemetryAck, TelemetryBatch

log = logging.getLogger(__name__)


class Forwarder:
    def __init__(self, outbox: Outbox, link: MqttLink, device: str, *, batch: BatchSettings, forward: ForwardSettings,
                 ack_timeout_s: float, liveness: Liveness | None = None) -> None:
        self.outbox, self.link, self.device = outbox, link, device
        self.max_records, self.max_bytes = batch.max_records, batch.max_bytes
        self.ack_timeout_s = ack_timeout_s
        self.retry_max_s, self.max_attempts = forward.retry_max_s, forward.max_attempts
        self._acks: dict[str, TelemetryAck] = {}
        self._changed = threading.Condition()
        self._stopping = threading.Event()
        self.sent_batches, self.resent_batches, self.acked_records = Counter(), Counter(), Counter()
        self.dead_lettered_batches = Counter()
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
        delay = 0.5
        while not self._stopping.is_set():
            self._progress.tick()
            if not self.link.connected.is_set():
                self._wait(1.0)
                continue
            records = self.outbox.next_batch(self.max_records, self.max_bytes)
            if not records:
                self._wait(0.5)
                continue
            batch = TelemetryBatch(device=self.device, epoch=self.outbox.epoch, records=records, sent_at=time.time(),
                                   acknowledged=self.outbox.acknowledged)
            attempts = self.outbox.attempt()
            if attempts > self.max_attempts:
                self.dead_lettered_batches.add()
                self.outbox.dead_letter(records[0].seq, records[-1].seq,
                                        f"batch {batch.batch_id} not acknowledged after {self.max_attempts} attempts")
                continue
            (self.resent_batches if attempts > 1 else self.sent_batches).add()
            self.link.publish(topics.telemetry(self.device), encode(batch, WireFormat.MSGPACK_ZLIB), qos=1,
                              content_type=WireFormat.MSGPACK_ZLIB.content_type, correlation=batch.batch_id.encode())
            self._progress.tick(self.ack_timeout_s)
            with self._changed:
                # B023: the predicate is called here, within this round, never after `batch` changes.
                self._changed.wait_for(lambda: batch.batch_id in self._acks or self._stopping.is_set(),  # noqa: B023
                                       self.ack_timeout_s)
                ack = self._acks.pop(batch.batch_id, None)
            if ack is None:
                if not self._stopping.is_set():
                    log.info("batch not acknowledged; sending again", extra=fields(batch=batch.batch_id, wait_s=delay))
                    self._wait(delay)
                    delay = min(delay * 2, self.retry_max_s)
                continue
            if ack.dead_lettered:  # the cloud kept it aside with its reason: it would never be stored
                self.dead_lettered_batches.add()
                self.outbox.dead_letter(records[0].seq, records[-1].seq,
                                        f"batch {batch.batch_id} dead-lettered by cloud_ingest "
                                        "(its reason is in the cloud's dead letters)")
            else:
                self.acked_records.add(self.outbox.ack(records[0].seq, records[-1].seq, ack.store))
            delay = 0.5

    def _wait(self, seconds: float) -> None:
        self._progress.tick(seconds)
        with self._changed:
            self._changed.wait_for(self._stopping.is_set, seconds)
