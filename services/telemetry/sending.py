"""The forwarding protocol for one outbox, without its waiting: which batch goes next (the batch in
flight again after a timeout, the same records under the same id, so the cloud's idempotent writes
leave no duplicate), how often it was sent and when it is given up (dead-lettered after max_attempts,
or at once when the cloud dead-lettered it), what an acknowledgement settles, and how long to back off
after a timeout. The threaded Forwarder and the simulator's asyncio devices both drive it: each does
its own waiting and MQTT, and so both speak the same protocol.

Two clocks: records carry wall-clock times (`at`), so lingering is measured on time.time(); the ack
timeout is a duration, measured on a monotonic clock, which a clock set at boot (NTP) cannot stretch.

The ack timeout counts only time the link is up: over a cut link no acknowledgement can arrive, so
the clock pauses while the link is down and runs on, with the time it had left, once the link is back.
A batch is not sent again merely because the link was away (a broker session that held the ack
delivers it after the reconnect), and it is not kept waiting forever either: where the ack was lost
with the cut (a link without a persistent session), the rest of the timeout runs out and the batch goes
again, and a link that keeps flapping still adds up to ack_timeout_s of up-time."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from services.telemetry.outbox import Outbox
from shared import topics
from shared.codec import WireFormat, encode
from shared.config import BatchSettings, ForwardSettings
from shared.metrics import Counter
from shared.schemas import TelemetryAck, TelemetryBatch

log = logging.getLogger(__name__)

IDLE_S = 0.5  # how long to wait when nothing is queued (a writer wakes the waiter sooner)
FIRST_BACKOFF_S = 0.5  # the first wait after a timeout; doubled each time, up to retry_max_s
WIRE = WireFormat.MSGPACK_ZLIB  # what batches travel as
# How often a waiter for an ack looks at its link at the least (ack_left): a cut in between stops the clock.
LINK_CHECK_S = 1.0


@dataclass(frozen=True)
class Outgoing:
    """One sending of a batch, ready to publish (QoS 1) as it is. It keeps the encoded batch only (a
    simulator holds one per device: the decoded records would cost ten times the bytes).

    :ivar str batch_id: the batch's id (TelemetryBatch.batch_id: the same on every attempt).
    :ivar int first_seq: its first sequence number.
    :ivar int last_seq: its last.
    :ivar int records: how many records it holds.
    :ivar int attempt: which sending of it this is (1: the first; kept on disk, so a restart counts on).
    :ivar str topic: where it goes (shared.topics.telemetry of the device).
    :ivar bytes payload: the TelemetryBatch, encoded as `content_type` says.
    :ivar str content_type: the MQTT v5 content type.
    """

    batch_id: str
    first_seq: int
    last_seq: int
    records: int
    attempt: int
    topic: str
    payload: bytes = field(repr=False)
    content_type: str = WIRE.content_type

    @property
    def correlation(self) -> bytes:
        """The MQTT v5 correlation data: the batch id, readable without decoding the payload."""
        return self.batch_id.encode()


class Sender:
    """The forwarder's protocol for one outbox (see the module's doc). Not thread-safe by itself: one
    caller at a time (the Forwarder's thread, or one device's task on the asyncio loop). The outbox it
    reads may be appended to from other threads (the Outbox locks).

    The caller's round: next() (wait what it says, or publish what it gives), then ack_left() until
    the acknowledgement comes (settle() it) or the time is up (timed_out(), then wait what it says).

    :param Outbox outbox: the device's outbox.
    :param str device: the device id the batches carry.
    :param BatchSettings batch: max_records, max_bytes and linger_s of a batch.
    :param ForwardSettings forward: max_attempts before a batch is given up, retry_max_s (the longest backoff).
    :param float ack_timeout_s: how long (of link-up time) a sending waits for its acknowledgement.
    :param monotonic: the clock of the ack timeout (time.monotonic; a test may pass its own).
    """

    def __init__(self, outbox: Outbox, device: str, *, batch: BatchSettings, forward: ForwardSettings,
                 ack_timeout_s: float, monotonic: Callable[[], float] = time.monotonic) -> None:
        self.outbox, self.device = outbox, device
        self.max_records, self.max_bytes, self.linger_s = batch.max_records, batch.max_bytes, batch.linger_s
        self.max_attempts, self.retry_max_s = forward.max_attempts, forward.retry_max_s
        self.ack_timeout_s = ack_timeout_s
        self._monotonic = monotonic
        self.sent_batches, self.resent_batches, self.acked_records = Counter(), Counter(), Counter()
        self.dead_lettered_batches = Counter()
        self.in_flight: Outgoing | None = None  # the last sending, until settled or timed out
        self._ack_left = 0.0  # link-up seconds the sending in flight still waits, as of _up_since
        self._up_since: float | None = None  # monotonic, when the link was last seen up; None: seen down
        self._backoff = FIRST_BACKOFF_S

    def next(self, now: float | None = None) -> Outgoing | float:
        """The sending to publish now, or how long to wait before asking again.

        The batch in flight (sent and not acknowledged) comes again, the same records under the same id;
        else the oldest records, up to max_records and max_bytes. A batch short of both limits lingers
        until its oldest record is linger_s old. A batch past max_attempts is given up here (dead-lettered,
        a gap record queued in its place) and the next one is looked at. The ack timeout of the returned
        sending starts now, as if the link is up (the caller asks only while it is).

        :param float now: the wall-clock time (time.time()) to measure lingering against; None: now.
        :returns: an Outgoing to publish now (counted as sent or resent), or the seconds to wait:
            IDLE_S when nothing is queued, the rest of the linger when lingering. A writer that appends
            may wake the caller sooner; asking early is harmless.
        :raises sqlite3.Error: the outbox could not be read or written.
        """
        while True:
            if (wait := self._lingering(time.time() if now is None else now)) is not None:
                return wait
            records = self.outbox.next_batch(self.max_records, self.max_bytes)
            if not records:
                return IDLE_S
            batch = TelemetryBatch(device=self.device, epoch=self.outbox.epoch, records=records, sent_at=time.time(),
                                   acknowledged=self.outbox.acknowledged)
            attempt = self.outbox.attempt()
            if attempt > self.max_attempts:
                self.dead_lettered_batches.add()
                self.outbox.dead_letter(records[0].seq, records[-1].seq,
                                        f"batch {batch.batch_id} not acknowledged after {self.max_attempts} attempts")
                continue
            (self.resent_batches if attempt > 1 else self.sent_batches).add()
            self.in_flight = Outgoing(batch.batch_id, records[0].seq, records[-1].seq, len(records), attempt,
                                      topics.telemetry(self.device), encode(batch, WIRE))
            self._ack_left, self._up_since = self.ack_timeout_s, self._monotonic()
            return self.in_flight

    def _lingering(self, now: float) -> float | None:
        """Seconds the batch should still wait for more records; None: send (or look) now. The batch in
        flight is not looked for: it was full, or its oldest record old enough, when first sent, and its
        records stay until settled, so the same test lets it go again."""
        if self.linger_s <= 0:
            return None
        stats = self.outbox.stats
        if stats.records >= self.max_records or stats.bytes >= self.max_bytes:
            return None
        oldest = self.outbox.oldest_at()
        if oldest is None:
            return None  # empty: next_batch says so
        left = oldest + self.linger_s - now
        # A record from the future (the clock was set back since) would linger until then: it goes now.
        return left if 0 < left <= self.linger_s else None

    def ack_left(self, connected: bool) -> float | None:
        """How long the sending in flight still waits for its acknowledgement, counting only time the link
        is up: call it whenever the waiter wakes (at least every LINK_CHECK_S while waiting), with the
        link's state then.

        The clock pauses while the link is down and resumes with the time it had left: it is never
        restarted, so a flapping link still times a sending out after ack_timeout_s of up-time in all.
        The time between two calls counts as the link was at the first of them (up: it runs; down: it
        does not), so a cut is noticed at most one wake late.

        :param bool connected: whether the link is up now.
        :returns: seconds left (0.0: timed out, call timed_out()); None while the link is down (wait for
            it, then ask again: what was left is kept); 0.0 also when nothing is in flight.
        """
        if self.in_flight is None:
            return 0.0
        now = self._monotonic()
        if self._up_since is not None:  # up when last seen: the time since ran on the clock
            self._ack_left = max(0.0, self._ack_left - (now - self._up_since))
        self._up_since = now if connected else None
        return self._ack_left if connected else None

    def settle(self, ack: TelemetryAck) -> bool:
        """Applies the cloud's acknowledgement of the sending in flight: its records are deleted from the
        outbox (counted in acked_records), or, when the cloud dead-lettered the batch, moved to the
        outbox's dead letters with a gap record queued in their place. The backoff starts again.

        :param TelemetryAck ack: an acknowledgement from the device's ack topic.
        :returns: True if it settled the batch in flight; False if it is for another batch (one settled
            before, or not this device's): nothing changes.
        :raises sqlite3.Error: the outbox could not be written.
        """
        sending = self.in_flight
        if sending is None or ack.batch_id != sending.batch_id:
            return False
        if ack.dead_lettered:  # the cloud kept it aside with its reason: it would never be stored
            self.dead_lettered_batches.add()
            self.outbox.dead_letter(sending.first_seq, sending.last_seq,
                                    f"batch {sending.batch_id} dead-lettered by cloud_ingest "
                                    "(its reason is in the cloud's dead letters)")
        else:
            self.acked_records.add(self.outbox.ack(sending.first_seq, sending.last_seq, ack.store))
        self.in_flight, self._up_since, self._backoff = None, None, FIRST_BACKOFF_S
        return True

    def timed_out(self) -> float:
        """The sending in flight was not acknowledged in time: the next next() sends it again (or gives it
        up past max_attempts).

        :returns: the seconds to wait before that: FIRST_BACKOFF_S, doubled after each timeout in a row,
            at most retry_max_s.
        """
        delay, self._backoff = self._backoff, min(self._backoff * 2, self.retry_max_s)
        self.in_flight, self._up_since = None, None
        return delay
