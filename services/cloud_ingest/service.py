"""cloud_ingest: the fleet's telemetry into S3. Replicas share one MQTT v5 shared subscription, so
the broker splits the batches among them; each batch is validated, gathered with others into a flush
(flush.py: one S3 object per record kind and one index for up to EDGEFLEET_INGEST_FLUSH_S, instead of 2+
PUTs per batch, which this machine's S3 could not take for 1,000 devices and which S3 bills by), written
(writer.py) and only then acknowledged: first to its device (which deletes it from its outbox on that
acknowledgement alone), then to the broker (MQTT PUBACK, paho's manual_ack). A replica killed mid-write
acknowledges nothing: its persistent session keeps the batches at the broker, which delivers them again
when the replica comes back (and the device sends them again after its ack timeout). What does not
validate goes to the dead-letter prefix with the reason, and is acknowledged (it will never validate; it
must not block the device's outbox).

paho's network thread never waits here: the broker sends at most Receive Maximum (2 x flush_batches +
2 x workers: one flush fills while the one before is written) unacknowledged batches, so the backlog is
bounded by the protocol's flow control, not by a callback that blocks (which would stall keepalives and
acknowledgements too). Memory: payloads waiting for a decoder are at most Receive Maximum x the broker's
max_packet_size (worst case 1,008 x 1 MiB with the defaults and the fleet broker's cap; a device batch is
a few KB compressed); a decoded batch keeps only its stored lines (counted in flush_bytes) and its
packet id, never its payload. The window is not cut to flush_bytes / max_packet_size: that would allow a
replica ~32 batches in flight, far below a fleet's one batch per device. A failed S3 write is retried
with backoff by its writer until it succeeds or the replica stops: giving up would leave the batches
unacknowledged and their slots of the receive window taken until the next session. (Vector's S3 sink
retries the same way; Kafka consumers commit an offset only after the sink's write, as here.)

Every acknowledgement names the store (TelemetryAck.store, from the bucket's store marker, made or read
at start: store_marker.py), and each batch's index keeps the device's acknowledgement ranges, so the
audit can tell records an earlier store acknowledged from records this one lost. The marker is read again
every status interval: a bucket emptied or a marker made anew is another store, so the batches this
replica remembers as stored are forgotten (a repeat is then written again, not answered from memory) and
later acknowledgements name the new store.

PUBACKs: a PUBACK only releases the broker's copy. A device deletes a batch from its outbox on its
TelemetryAck alone, which goes out only once the batch is stored, so a PUBACK that lands on the wrong
message (a packet id the broker reused after a reconnect, for a redelivery PUBACKed twice) loses nothing:
that message's device, never acknowledged, sends its batch again after its ack timeout.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import paho.mqtt.client as paho
from botocore.exceptions import BotoCoreError, ClientError

from services.cloud_ingest import store_marker
from services.cloud_ingest.errors import IngestError, StoreUnreachable
from services.cloud_ingest.flush import Added, Delivery, Flush, Flusher, Pending
from services.cloud_ingest.metrics import IngestCollector, IngestCounters, Outcome, write_seconds
from services.cloud_ingest.writer import dead_letter, write_flush
from shared import VERSION, lake, lifecycle, metrics, s3, topics
from shared.codec import DecodeError, WireFormat, decode, encode
from shared.config import IngestSettings
from shared.lifecycle import Liveness, Progress, serve
from shared.logs import fields
from shared.mqtt import MqttLink, StatusPublisher, content_type_of, correlation_of
from shared.schemas import ServiceState, ServiceStatus, TelemetryAck, TelemetryBatch

SERVICE = topics.INGEST_SERVICE
log = logging.getLogger(__name__)


class IngestService:
    def __init__(self, settings: IngestSettings) -> None:
        self.settings = settings
        self.s3 = s3.client(settings)
        try:
            s3.ensure_bucket(self.s3, settings.telemetry_bucket)
            self.store = store_marker.claim(self.s3, settings.telemetry_bucket)
        except (BotoCoreError, ClientError) as exc:
            raise StoreUnreachable(f"the telemetry bucket s3://{settings.telemetry_bucket} cannot be reached or "
                                   f"created: {exc}") from exc
        # Replicas may share one configured id (docker compose `replicas: 2`); the host name tells them apart,
        # as the broker needs distinct client ids.
        self._replica = f"{settings.device_id}-{socket.gethostname()}"[:64]
        # Decoders validate each batch (and keep a dead letter); the flusher's writers write flushes. Each task is
        # watched while it runs (shared.lifecycle): an idle pool is alive, a write stuck past its S3 timeouts is not.
        self.pool = ThreadPoolExecutor(settings.ingest.workers, thread_name_prefix="decoder")
        self.liveness = Liveness()
        self.flusher = Flusher(settings.ingest, self._write_flush, self._acknowledge, self.liveness)
        self._put_s = s3.call_bound_s()
        self.counters = IngestCounters()
        self._status_at: float | None = None
        self.metrics = metrics.service_registry(device=self._replica, service=SERVICE,
                                                connected=lambda: self.link.connected.is_set(),
                                                status_at=lambda: self._status_at)
        self.metrics.register(IngestCollector(self._replica, self.counters))
        self._write_seconds = write_seconds(self._replica, self.metrics)
        self._stopping = threading.Event()
        self._filter = topics.all_telemetry(settings.share_group)
        self.link = MqttLink(
            settings.model_copy(update={"device_id": self._replica}), SERVICE,
            StatusPublisher(topics.status(self._replica, SERVICE),
                            online=lambda: encode(self._status(ServiceState.ONLINE)),
                            will=encode(self._status(ServiceState.OFFLINE, reason="connection lost"))),
            manual_ack=True, receive_maximum=receive_maximum(settings),
            session_expiry_s=settings.ingest.session_expiry_s,
        )

    def run(self) -> int:
        self.flusher.start()
        self.link.subscribe(self._filter, self._on_batch, qos=1)
        self.link.start()
        log.info("ingesting", extra=fields(filter=self._filter, bucket=self.settings.telemetry_bucket,
                                           store=self.store.store))
        while not self._stopping.wait(self.settings.status_interval_s):
            self.link.publish(topics.status(self._replica, SERVICE), encode(self._status(ServiceState.ONLINE)),
                              qos=1, retain=True, content_type=WireFormat.JSON.content_type)
            self._status_at = time.time()
            self._check_store()
        self.link.unsubscribe(self._filter)
        self.pool.shutdown(wait=True)  # every batch taken is in a flush (or dead-lettered)
        self.flusher.close()  # every flush is written and acknowledged (one attempt each once stopping)
        self.link.stop(final_status=encode(self._status(ServiceState.OFFLINE, reason="shutdown")))
        return 0

    def stop(self) -> None:
        self._stopping.set()

    def _on_batch(self, message: paho.MQTTMessage) -> None:
        """paho's network thread: hand over and return at once (the receive window bounds the backlog)."""
        # The batch id (the device's correlation data, unverified: bounded) lets an operator follow one batch from
        # the device's outbox to S3 across replicas and redeliveries.
        batch = (correlation_of(message) or b"").decode(errors="replace")[:200]
        log.debug("batch taken", extra=fields(topic=message.topic, mid=message.mid, batch=batch,
                                              redelivered=bool(message.dup)))
        self.pool.submit(self._store, message)

    def _store(self, message: paho.MQTTMessage) -> None:
        with self.liveness.watch(threading.current_thread().name) as progress:
            try:
                self._take(message, progress)
            except Exception as exc:  # a bug here must be loud: in the pool it would otherwise vanish with the future
                self.counters.batches[Outcome.FAILED].add()
                log.exception("batch not taken", extra=fields(topic=message.topic[:200]))
                lifecycle.fail(f"decoder: {type(exc).__name__}: {exc}", exc)

    def _take(self, message: paho.MQTTMessage, progress: Progress) -> None:
        """Validates one batch and hands it to the flusher; dead-letters (and acknowledges) what does not validate."""
        device = topics.device_of(message.topic)
        if topics.reserved_id(device):
            # A fleet service's certificate (the console's, an operator's) may publish on its own id's telemetry
            # topic where the broker's ACL lets it: that is no device, so nothing is stored and nothing answered;
            # the broker is told it was handled, or it would hold a slot of the receive window for good.
            self.counters.batches[Outcome.REFUSED].add()
            log.error("batch refused: a reserved id is no device", extra=fields(device=device[:64]))
            self.link.ack(message)
            return
        try:
            batch = decode(TelemetryBatch, message.payload, content_type_of(message), sniff_compressed=True,
                           max_inflated_bytes=self.settings.max_batch_bytes)
            if batch.device != device:
                raise DecodeError(f"batch names device {batch.device!r} but came on {device!r}'s topic")
        except DecodeError as exc:
            self._dead_letter(device, message, str(exc), progress)
            return
        delivery: Delivery = (message.mid, message.qos)  # the payload itself is not kept once decoded
        added, stored = self.flusher.add((device, batch.batch_id), lambda: Pending.of(batch, delivery), delivery,
                                         waiting=lambda: progress.tick(2.0))
        if added is not Added.QUEUED:
            self.counters.batches[Outcome.DUPLICATE].add()
        if added is Added.STORED:  # sent again after this replica stored it: answered, not written again
            log.debug("batch stored", extra=fields(device=device, batch=batch.batch_id, records=stored, again=True))
            self._ack(device, batch.batch_id, stored)
            self.link.ack(message)
        elif added is Added.JOINED:
            # Held already: this copy is released at once, so repeats cannot fill the receive window; the
            # device's ack goes out once, when the held copy is stored.
            self.link.ack(message)

    def _dead_letter(self, device: str, message: paho.MQTTMessage, reason: str, progress: Progress) -> None:
        def write() -> None:
            key = dead_letter(self.s3, self.settings.telemetry_bucket, device, bytes(message.payload), reason)
            self.counters.batches[Outcome.DEAD_LETTERED].add()
            log.warning("dead-lettered", extra=fields(device=device, key=key, reason=reason[:300]))

        if not self._retrying(write, progress, 1, 2 * self._put_s, device=device):
            return
        if (correlation := correlation_of(message)) is not None:
            self._ack(device, correlation.decode(errors="replace")[:200], 0, dead_lettered=True)
        self.link.ack(message)

    def _write_flush(self, flush: Flush) -> bool:
        """A writer thread: the flush's objects and index, retried until stored or stopping. Returns whether
        it is stored (the flusher then acknowledges its batches)."""
        with self.liveness.watch(threading.current_thread().name) as progress:
            try:
                def write() -> None:
                    started = time.monotonic()
                    write_flush(self.s3, self.settings.telemetry_bucket, self._replica, flush,
                                lambda: progress.tick(self._put_s))
                    self._write_seconds.observe(time.monotonic() - started)

                if not self._retrying(write, progress, len(flush.batches), self._put_s, flush=flush.flush_id):
                    return False
            except Exception as exc:  # a bug: loud, as above
                log.exception("flush not stored", extra=fields(flush=flush.flush_id))
                lifecycle.fail(f"writer: {type(exc).__name__}: {exc}", exc)
                return False
        self.counters.stored(len(flush.batches), flush.records)
        # Logged before any acknowledgement: a replica killed without these lines acknowledged nothing of them.
        log.debug("flush stored", extra=fields(flush=flush.flush_id, batches=len(flush.batches),
                                               records=flush.records))
        if log.isEnabledFor(logging.DEBUG):  # a line per batch: hundreds a second at fleet scale
            for (device, batch_id), entry in flush.batches.items():
                log.debug("batch stored", extra=fields(device=device, batch=batch_id, records=len(entry.index.seqs),
                                                       flush=flush.flush_id))
        return True

    def _acknowledge(self, flush: Flush) -> None:
        """Each batch of a stored flush: its device's ack, then the broker's PUBACK of the message that
        carried it."""
        for (device, batch_id), entry in flush.batches.items():
            self._ack(device, batch_id, len(entry.index.seqs))
            if entry.delivery is not None:
                released = paho.MQTTMessage(mid=entry.delivery[0])  # all a PUBACK needs: packet id and QoS
                released.qos = entry.delivery[1]
                self.link.ack(released)

    def _check_store(self) -> None:
        """Reads the store marker again; where the bucket or its marker is gone or another, the batches stored
        recently are forgotten and the store is claimed again (an S3 error: tried again next time)."""
        bucket = self.settings.telemetry_bucket
        try:
            marker = lake.read_store_marker(self.s3, bucket)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in ("NoSuchBucket", "404"):
                log.warning("store marker not read", extra=fields(error=str(exc)[:300]))
                return
            marker = None
        except (BotoCoreError, ValueError) as exc:  # ValueError: lake.StoreMarkerInvalid, kept as it is
            log.warning("store marker not read", extra=fields(error=str(exc)[:300]))
            return
        if marker is not None and marker.store == self.store.store:
            return
        self.flusher.forget()  # what it remembers went to a store that is gone
        try:
            s3.ensure_bucket(self.s3, bucket)
            new = store_marker.claim(self.s3, bucket)
        except (BotoCoreError, ClientError, ValueError) as exc:
            log.warning("store not claimed; trying again", extra=fields(error=str(exc)[:300]))
            return
        log.warning("the store changed: batches stored before are forgotten",
                    extra=fields(bucket=bucket, old=self.store.store, new=new.store))
        self.store = new

    def _retrying(self, write: Callable[[], None], progress: Progress, batches: int, allow_s: float,
                  **about: str) -> bool:
        """Runs `write` until it succeeds; once stopping, no further attempt. Returns whether it succeeded."""
        while True:
            progress.tick(allow_s)
            try:
                write()
                return True
            except (BotoCoreError, ClientError, OSError) as exc:
                self.counters.batches[Outcome.FAILED].add(batches)
                log.warning("write failed; retrying", extra=fields(error=str(exc)[:300], **about))
            if self._stopping.is_set():
                log.info("stopping with batches unwritten; the broker keeps them for the next session",
                         extra=fields(batches=batches, **about))
                return False
            progress.tick(1.0)
            self._stopping.wait(1.0)

    def _ack(self, device: str, batch_id: str, stored: int, dead_lettered: bool = False) -> None:
        ack = TelemetryAck(device=device, batch_id=batch_id, stored=stored, dead_lettered=dead_lettered, at=time.time(),
                           store=self.store.store)
        self.link.publish(topics.telemetry_ack(device), encode(ack), qos=1, content_type=WireFormat.JSON.content_type)

    def _status(self, state: ServiceState, reason: str | None = None) -> ServiceStatus:
        c = self.counters
        detail = (f"stored {c.records.value} records, dead-lettered {c.batches[Outcome.DEAD_LETTERED].value}, "
                  f"failed writes {c.batches[Outcome.FAILED].value}")
        return ServiceStatus(device=self._replica, service=SERVICE, state=state, at=time.time(),
                             edgefleet_version=VERSION, reason=reason or detail)


def receive_maximum(settings: IngestSettings) -> int:
    """The replica's MQTT v5 Receive Maximum: every batch in a flush is unacknowledged until the flush is
    written, so the broker must let a full flush (flush_batches) fill while the one before is written, and
    each decoder hold one more; 65,535 is MQTT's most."""
    return min(65_535, 2 * settings.ingest.flush_batches + 2 * settings.ingest.workers)


def main(settings: IngestSettings) -> int:
    # IngestError: the store unreachable at start; ValueError: its marker invalid (lake.StoreMarkerInvalid) or a
    # bad setting; OSError: a certificate or key file it cannot read.
    return serve(SERVICE, settings, lambda: IngestService(settings), (IngestError, OSError, ValueError))
