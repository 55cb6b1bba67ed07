"""Batches gathered into flushes (shared.lake's flush layout): a replica holds the validated batches of
every device for up to EDGEFLEET_INGEST_FLUSH_S, or until EDGEFLEET_INGEST_FLUSH_BATCHES or
EDGEFLEET_INGEST_FLUSH_BYTES, then writes them all as one object per record kind and one flush index, and
only then acknowledges each (device ack, then MQTT PUBACK).

Why: S3 counts requests, not bytes. One PUT per device batch (plus its index) is what this machine's S3
cannot take (moto: ~300 PUT/s with all cores, so 1,000 devices at a batch a second need ~2,000 PUT/s),
and at fleet scale it is the bill (~2.6 billion PUTs a month for 1,000 devices at a batch a second). A
flush costs kinds + 1 PUTs however many batches it holds. (Firehose and Vector's S3 sink buffer the same
way, by time and size.)

Bounds: a batch waits at most flush_s plus the write before a writer is free; what a flush holds is at
most flush_bytes (its records as stored, plus BATCH_OVERHEAD_BYTES a batch; with one batch over), for the
open flush and each of the `workers` flushes being written; a batch that would not fit waits (its decoder
blocks, the broker's Receive Maximum stops sending) instead of growing memory. A held batch keeps only its
stored lines and its message's packet id and QoS (Delivery), never the payload it came in.

Idempotency: keys are per flush, not per batch, so a batch sent again (its ack lost or late) could be
written into a second flush. A batch already waiting or being written is not taken twice: the repeat's
message is PUBACKed at once (its batch is held; were the replica to die, the first message is still the
broker's to deliver again), and the device's acknowledgement goes out once, when the first is stored.
One stored recently (the last RECENT_BATCHES, forgotten when the store changes: forget()) is
acknowledged again without writing. Beyond that memory (or on another replica) a second copy may be
written: readers count a batch once by (device, batch id), and the audit shows such copies apart from
duplicates."""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import StrEnum

from shared import lake, lifecycle
from shared.config import IngestGroupSettings
from shared.lifecycle import Liveness
from shared.logs import fields
from shared.schemas import Gap, TelemetryBatch

log = logging.getLogger(__name__)

# Batch ids remembered per replica to acknowledge a batch sent again without writing it: a device resends
# only its batch in flight, so this covers a fleet of tens of thousands of devices many times over
# (an id and its key: ~200 bytes each, ~20 MB in all).
RECENT_BATCHES = 100_000
# What a held batch costs beside its records' lines (its index entry, the keys and containers holding it),
# counted in flush_bytes so that many tiny batches are bounded too.
BATCH_OVERHEAD_BYTES = 1024
SEAL_TICK_S = 1.0  # the sealer's longest wait: it ticks its liveness watch at least this often
BatchKey = tuple[str, str]  # (device, batch id)
Delivery = tuple[int, int]  # (packet id, QoS) of the message that carried a batch: all its PUBACK needs


@dataclass
class Pending:
    """One batch waiting in a flush: its index entry (stored_at and objects filled in when written), its
    records as stored lines (UTF-8 bytes) by kind, the bytes it holds, and the delivery to PUBACK once
    it is stored (None: a batch not taken off a broker)."""

    index: lake.BatchIndex
    lines: dict[str, list[bytes]]
    size: int
    delivery: Delivery | None

    @classmethod
    def of(cls, batch: TelemetryBatch, delivery: Delivery | None) -> Pending:
        """A validated batch made ready for a flush: each record a StoredRecord line (its device and epoch
        with it), grouped by kind.

        :param batch: the batch as decoded.
        :param delivery: (packet id, QoS) of the message that carried it.
        """
        lines: dict[str, list[bytes]] = {}
        size = BATCH_OVERHEAD_BYTES
        for record in batch.records:
            line = lake.StoredRecord(device=batch.device, epoch=batch.epoch, seq=record.seq,
                                     body=record.body).model_dump_json().encode()
            lines.setdefault(record.body.kind, []).append(line)
            size += len(line) + 1
        index = lake.BatchIndex(
            device=batch.device, batch_id=batch.batch_id, epoch=batch.epoch, seqs=[r.seq for r in batch.records],
            kinds={k: len(v) for k, v in lines.items()},
            gaps=[r.body for r in batch.records if isinstance(r.body, Gap)],
            objects=[], stored_at=0.0, acknowledged=batch.acknowledged)
        return cls(index, lines, size, delivery)


@dataclass
class Flush:
    """Batches written together. Its id is given when it is sealed (a retry writes the same keys)."""

    opened: float  # time.monotonic() of its first batch
    batches: dict[BatchKey, Pending] = field(default_factory=dict)
    size: int = 0
    flush_id: str = ""
    generation: int = 0  # the flusher's store generation when sealed (Flusher.forget)

    @property
    def records(self) -> int:
        return sum(len(p.index.seqs) for p in self.batches.values())


class Added(StrEnum):
    """What add() did with a batch."""

    QUEUED = "queued"  # in the open flush
    # The same batch already waits or is being written: PUBACK this message now (the device's ack goes out
    # once, when the held copy is stored).
    JOINED = "joined"
    # The broker's redelivery of the very message held (the same packet id, after a reconnect): nothing to do,
    # the held copy's PUBACK answers it (a second PUBACK could acknowledge a later message given that id).
    REDELIVERED = "redelivered"
    STORED = "stored"  # stored recently by this replica: acknowledge it again, write nothing


class Flusher:
    """The open flush, the flushes being written and the batches stored recently; a sealer thread that
    seals the open flush when it is due or full and a writer is free, and `workers` writer threads.

    :param settings: the ingest group (flush_s, flush_batches, flush_bytes, workers).
    :param write: writes one sealed flush; returns whether it is stored (False: given up while stopping).
        Runs on a writer thread.
    :param acknowledge: acknowledges every batch of a stored flush. Called once nothing more can join them
        (a message for one of them arriving later finds it among the recent ones).
    :param liveness: the service's, to watch the sealer thread (a dead or stuck sealer would leave every
        decoder waiting for room for good).
    """

    def __init__(self, settings: IngestGroupSettings, write: Callable[[Flush], bool],
                 acknowledge: Callable[[Flush], None], liveness: Liveness | None = None) -> None:
        self.settings = settings
        self._write, self._acknowledge = write, acknowledge
        self._liveness = liveness or Liveness()
        self._open = Flush(opened=time.monotonic())
        self._writing: dict[BatchKey, Pending] = {}
        self._recent: OrderedDict[BatchKey, int] = OrderedDict()  # -> records stored
        self._generation = 0
        self._slots = settings.workers  # writers free
        self._cond = threading.Condition()
        self._closing = False
        self._writers = ThreadPoolExecutor(settings.workers, thread_name_prefix="flush")
        self._sealer = threading.Thread(target=self._seal_loop, name="sealer", daemon=True)

    def start(self) -> None:
        """Starts the sealer thread (the writers start with their first flush). Call once, before add();
        close() is the one way to stop it."""
        self._sealer.start()

    def add(self, key: BatchKey, make: Callable[[], Pending], delivery: Delivery,
            waiting: Callable[[], None] = lambda: None) -> tuple[Added, int]:
        """Puts a batch in the open flush, waiting while that is full.

        :param key: (device, batch id).
        :param make: makes its Pending (called only when it is to be written).
        :param delivery: (packet id, QoS) of the message that carried it.
        :param waiting: called before each bounded wait for room (the caller's liveness tick).
        :returns: what was done (see Added: the caller PUBACKs a JOINED or STORED message itself), and the
            batch's records where STORED.
        """
        with self._cond:
            if (known := self._known(key, delivery)) is not None:
                return known
        entry = make()  # outside the lock: serialising records is the costly part
        with self._cond:
            while self._full() and self._open.batches:
                waiting()
                self._cond.wait(1.0)
            if (known := self._known(key, delivery)) is not None:  # another copy came in meanwhile
                return known
            if not self._open.batches:
                self._open.opened = time.monotonic()
            self._open.batches[key] = entry
            self._open.size += entry.size
            self._cond.notify_all()
            return Added.QUEUED, 0

    def forget(self) -> None:
        """Forgets the batches stored recently, and those being written now once they are: the store they went
        to is gone or replaced (an emptied bucket, a new store marker), so a repeat must be written again."""
        with self._cond:
            self._recent.clear()
            self._generation += 1

    def close(self) -> None:
        """Seals and writes what is open (the caller has stopped adding), then waits for every write."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._sealer.is_alive():
            self._sealer.join()
        self._writers.shutdown(wait=True)

    def _known(self, key: BatchKey, delivery: Delivery) -> tuple[Added, int] | None:
        """With the lock: STORED (and its records) for a batch stored recently, JOINED or REDELIVERED for one
        held, None for a batch not seen."""
        if (stored := self._recent.get(key)) is not None:
            self._recent.move_to_end(key)
            return Added.STORED, stored
        if (held := self._open.batches.get(key) or self._writing.get(key)) is not None:
            same = held.delivery is not None and held.delivery[0] == delivery[0]
            return (Added.REDELIVERED if same else Added.JOINED), 0
        return None

    def _full(self) -> bool:
        return len(self._open.batches) >= self.settings.flush_batches or self._open.size >= self.settings.flush_bytes

    def _seal_loop(self) -> None:
        with self._liveness.watch("sealer", SEAL_TICK_S + 1.0) as progress:
            try:
                while (flush := self._next(lambda: progress.tick(SEAL_TICK_S + 1.0))) is not None:
                    self._writers.submit(self._written, flush)
            except Exception as exc:  # a bug: without the sealer every decoder would wait for room for good
                log.exception("sealer failed", extra=fields(error=str(exc)[:300]))
                lifecycle.fail(f"sealer: {type(exc).__name__}: {exc}", exc)

    def _next(self, tick: Callable[[], None]) -> Flush | None:
        """Waits until the open flush is due (or full, or closing) and a writer is free, then seals it; None once
        closing with nothing open."""
        with self._cond:
            while True:
                tick()
                due = self._open.opened + self.settings.flush_s
                ready = self._open.batches and (self._closing or self._full() or time.monotonic() >= due)
                if ready and self._slots > 0:
                    break
                if self._closing and not self._open.batches:
                    return None
                if ready or not self._open.batches:  # a writer's end or a batch's arrival notifies
                    self._cond.wait(SEAL_TICK_S)
                else:
                    self._cond.wait(max(0.001, min(SEAL_TICK_S, due - time.monotonic())))
            flush, self._open = self._open, Flush(opened=time.monotonic())
            flush.flush_id = lake.flush_id(time.time(), secrets.token_hex(4))
            flush.generation = self._generation
            self._writing.update(flush.batches)
            self._slots -= 1
            self._cond.notify_all()  # adders waiting for room
            return flush

    def _written(self, flush: Flush) -> None:
        stored = False
        try:
            stored = self._write(flush)
        finally:
            with self._cond:
                remember = stored and flush.generation == self._generation
                for key, entry in flush.batches.items():
                    self._writing.pop(key, None)
                    if remember:
                        self._recent[key] = len(entry.index.seqs)
                        self._recent.move_to_end(key)
                while len(self._recent) > RECENT_BATCHES:
                    self._recent.popitem(last=False)
                self._slots += 1
                self._cond.notify_all()
        if stored:
            self._acknowledge(flush)
