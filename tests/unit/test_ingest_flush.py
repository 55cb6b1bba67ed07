"""cloud_ingest's flusher, pure logic (services/cloud_ingest/flush.py) with a write that stores nothing:
batches gather until a flush is full or due, a batch sent again while its first copy waits is not taken
twice, one stored recently is answered without a write (until the store changes), a full flush holds the
next batch back until a writer is free (the memory bound), and the sealer neither spins while it waits
for a writer nor goes unwatched. The same on real processes and S3 is in tests/test_cloud_ingest_flush.py;
the readers of both layouts in tests/unit/test_store_audit.py."""

from __future__ import annotations

import threading
import time

from edgefleet.audit import audit_indexes
from services.cloud_ingest.flush import BATCH_OVERHEAD_BYTES, Added, Flush, Flusher, Pending
from shared import lake
from shared.config import IngestGroupSettings
from shared.lifecycle import Liveness
from shared.schemas import (
    Alert,
    AlertState,
    AlertType,
    ResourceSample,
    Severity,
    TelemetryBatch,
    TelemetryRecord,
)


def _batch(device: str, first: int, count: int = 2) -> TelemetryBatch:
    records = [TelemetryRecord(seq=first + i, body=ResourceSample(
        device=device, cpu_percent=1, memory_percent=2, memory_used_bytes=3, disk_percent=4, at=1.0e9))
        for i in range(count)]
    return TelemetryBatch(device=device, epoch="0a0b0c0d", records=records, sent_at=1.0e9)


class _Store:
    """Keeps what it is given to write; a write waits while `held` is clear."""

    def __init__(self) -> None:
        self.written: list[Flush] = []
        self.acknowledged: list[tuple[str, int | None]] = []  # (batch id, packet id PUBACKed)
        self.held = threading.Event()
        self.held.set()
        self.writing = threading.Event()

    def write(self, flush: Flush) -> bool:
        self.writing.set()
        assert self.held.wait(10)
        self.written.append(flush)
        return True

    def acknowledge(self, flush: Flush) -> None:
        self.acknowledged += [(key[1], p.delivery[0] if p.delivery else None) for key, p in flush.batches.items()]


_mids = iter(range(1, 1 << 16))


def _add(flusher: Flusher, batch: TelemetryBatch, mid: int | None = None) -> tuple[Added, int]:
    delivery = (next(_mids) if mid is None else mid, 1)
    return flusher.add((batch.device, batch.batch_id), lambda: Pending.of(batch, delivery), delivery)


def test_batches_share_a_flush_until_it_is_full_and_one_sent_again_is_not_taken_twice():
    store = _Store()
    flusher = Flusher(IngestGroupSettings(flush_s=60, flush_batches=3, workers=1), store.write, store.acknowledge)
    flusher.start()
    a, b, c = _batch("dev-a", 1), _batch("dev-b", 1), _batch("dev-a", 3)
    assert _add(flusher, a, mid=7) == (Added.QUEUED, 0)
    assert _add(flusher, a) == (Added.JOINED, 0)  # sent again while it waits: PUBACKed by the caller at once
    assert _add(flusher, a, mid=7) == (Added.REDELIVERED, 0)  # the broker's redelivery of the one held
    assert _add(flusher, b, mid=8) == (Added.QUEUED, 0)
    time.sleep(0.2)
    assert store.written == [], "neither due nor full"
    assert _add(flusher, c, mid=9) == (Added.QUEUED, 0)  # full: sealed at once
    flusher.close()
    [flush] = store.written
    assert [key[1] for key in flush.batches] == [a.batch_id, b.batch_id, c.batch_id] and flush.records == 6
    # One PUBACK each, of the message held: the repeats' were the caller's, at once.
    assert store.acknowledged == [(a.batch_id, 7), (b.batch_id, 8), (c.batch_id, 9)]
    assert _add(flusher, a) == (Added.STORED, 2)  # stored: answered with its records, not written again


def test_a_full_flush_holds_the_next_batch_back_until_a_writer_is_free():
    store = _Store()
    store.held.clear()  # the one writer's write hangs
    flusher = Flusher(IngestGroupSettings(flush_s=0, flush_batches=1, workers=1), store.write, store.acknowledge)
    flusher.start()
    assert _add(flusher, _batch("dev-a", 1))[0] is Added.QUEUED  # sealed at once: the writer takes it
    assert store.writing.wait(5)
    assert _add(flusher, _batch("dev-a", 3))[0] is Added.QUEUED  # open flush now full, no writer free
    third = threading.Thread(target=_add, args=(flusher, _batch("dev-a", 5)))
    third.start()
    third.join(0.5)
    assert third.is_alive(), "a batch beyond the bound was taken in while no writer was free"
    store.held.set()
    third.join(10)
    flusher.close()
    assert [len(f.batches) for f in store.written] == [1, 1, 1]


class _CountingCondition(threading.Condition):
    """A real Condition that counts how often a thread named `sealer` waits on it."""

    def __init__(self) -> None:
        super().__init__()
        self.sealer_waits = 0

    def wait(self, timeout: float | None = None) -> bool:
        if threading.current_thread().name == "sealer":
            self.sealer_waits += 1
        return super().wait(timeout)


def test_the_sealer_sleeps_while_a_due_flush_waits_for_a_writer_instead_of_spinning():
    store = _Store()
    store.held.clear()
    flusher = Flusher(IngestGroupSettings(flush_s=0, flush_batches=100, workers=1), store.write, store.acknowledge)
    flusher._cond = counting = _CountingCondition()  # before start: the sealer and add() share it
    flusher.start()
    _add(flusher, _batch("dev-a", 1))
    assert store.writing.wait(5)  # the one writer is busy
    _add(flusher, _batch("dev-a", 3))  # due at once (flush_s 0), and no writer is free
    before = counting.sealer_waits
    time.sleep(0.5)
    # A wait a writer's end ends (at most one a second to tick its watch), not one a millisecond.
    assert counting.sealer_waits - before <= 2, counting.sealer_waits - before
    store.held.set()
    flusher.close()
    assert [len(f.batches) for f in store.written] == [1, 1]


def test_the_sealer_is_watched_by_the_services_liveness_while_it_runs():
    liveness = Liveness()
    flusher = Flusher(IngestGroupSettings(flush_s=60), _Store().write, _Store().acknowledge, liveness)
    assert "sealer" not in [name for name, _ in liveness.late()]
    flusher.start()
    deadline = time.monotonic() + 5
    while "sealer" not in [name for name, _ in liveness.late()] and time.monotonic() < deadline:
        time.sleep(0.01)
    [(name, late)] = liveness.late()
    assert name == "sealer" and late < 0, "watched, and due later (idle rounds tick it)"
    flusher.close()
    assert liveness.late() == [], "no longer watched once it has stopped"


def test_a_store_change_forgets_the_batches_stored_before_so_a_repeat_is_written_again():
    store = _Store()
    flusher = Flusher(IngestGroupSettings(flush_s=0, workers=1), store.write, store.acknowledge)
    flusher.start()
    a, b = _batch("dev-a", 1), _batch("dev-b", 1)
    _add(flusher, a)
    deadline = time.monotonic() + 5
    while _add(flusher, a)[0] is not Added.STORED and time.monotonic() < deadline:
        time.sleep(0.01)
    flusher.forget()  # the bucket emptied, the marker made anew
    assert _add(flusher, a)[0] is Added.QUEUED, "answered from a store that is gone"
    while len(store.written) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    store.held.clear()
    store.writing.clear()
    _add(flusher, b)  # written to the old store while the store changes: not remembered either
    assert store.writing.wait(5)
    flusher.forget()
    store.held.set()
    flusher.close()
    assert _add(flusher, b)[0] is Added.QUEUED


def test_a_batch_counts_the_bytes_it_holds_not_its_characters():
    alert = Alert(device="dev-a", alert_id="x", type=AlertType.LATENCY, state=AlertState.RAISED,
                  severity=Severity.WARNING, value=1, threshold=1, window=1, detail="é" * 1000, at=1.0e9)
    batch = TelemetryBatch(device="dev-a", epoch="0a0b0c0d", records=[TelemetryRecord(seq=1, body=alert)],
                           sent_at=1.0e9)
    entry = Pending.of(batch, (1, 1))
    [line] = entry.lines["alert"]
    assert len(line) >= 2000  # two bytes each in UTF-8
    assert entry.size == BATCH_OVERHEAD_BYTES + len(line) + 1


def test_the_audit_counts_a_batch_stored_twice_as_a_copy_and_a_number_in_two_batches_as_a_duplicate():
    def index(first: int, last: int, batch_id: str | None = None) -> lake.BatchIndex:
        return lake.BatchIndex(device="dev-a", batch_id=batch_id or f"0a0b0c0d-{first:012d}-{last:012d}",
                               epoch="0a0b0c0d", seqs=list(range(first, last + 1)), kinds={"metric": last - first + 1},
                               gaps=[], objects=[], stored_at=1.0)

    copied = audit_indexes([index(1, 5), index(6, 9), index(1, 5)], None)["dev-a"]
    assert (copied.received, copied.copies, copied.duplicates, copied.missing) == (9, 1, 0, [])
    overlapping = audit_indexes([index(1, 5), index(5, 9)], None)["dev-a"]
    assert (overlapping.copies, overlapping.duplicates) == (0, 1)
    # One id seen with two sets of numbers (never expected), then its first again: a copy of the first, not
    # its numbers counted twice.
    reused = audit_indexes([index(1, 5, "x"), index(6, 9, "x"), index(1, 5, "x")], None)["dev-a"]
    assert (reused.received, reused.copies, reused.duplicates) == (9, 1, 0)
