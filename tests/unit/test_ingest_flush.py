"""cloud_ingest's flusher, pure logic (services/cloud_ingest/flush.py) with a write that stores nothing:
batches gather until a flush is full or due, a batch sent again while its first copy waits goes along
with it, one stored recently is answered without a write, and a full flush holds the next batch back
until a writer is free (the memory bound). The same on real processes and S3 is in
tests/test_cloud_ingest_flush.py; the readers of both layouts in tests/unit/test_store_audit.py."""

from __future__ import annotations

import threading
import time

import paho.mqtt.client as paho

from edgefleet.audit import audit_indexes
from services.cloud_ingest.flush import Added, Flush, Flusher, pending
from shared import lake
from shared.config import IngestGroupSettings
from shared.schemas import ResourceSample, TelemetryBatch, TelemetryRecord


def _batch(device: str, first: int, count: int = 2) -> TelemetryBatch:
    records = [TelemetryRecord(seq=first + i, body=ResourceSample(
        device=device, cpu_percent=1, memory_percent=2, memory_used_bytes=3, disk_percent=4, at=1.0e9))
        for i in range(count)]
    return TelemetryBatch(device=device, epoch="0a0b0c0d", records=records, sent_at=1.0e9)


class _Store:
    """Keeps what it is given to write; a write waits while `held` is clear."""

    def __init__(self) -> None:
        self.written: list[Flush] = []
        self.acknowledged: list[tuple[str, int]] = []  # (batch id, messages)
        self.held = threading.Event()
        self.held.set()

    def write(self, flush: Flush) -> bool:
        assert self.held.wait(10)
        self.written.append(flush)
        return True

    def acknowledge(self, flush: Flush) -> None:
        self.acknowledged += [(key[1], len(p.messages)) for key, p in flush.batches.items()]


_mids = iter(range(1, 1 << 16))


def _add(flusher: Flusher, batch: TelemetryBatch, mid: int | None = None) -> tuple[Added, int]:
    message = paho.MQTTMessage(mid=next(_mids) if mid is None else mid)
    return flusher.add((batch.device, batch.batch_id), lambda: pending(batch, message), message)


def test_batches_share_a_flush_until_it_is_full_and_one_sent_again_goes_along_or_is_answered():
    store = _Store()
    flusher = Flusher(IngestGroupSettings(flush_s=60, flush_batches=3, workers=1), store.write, store.acknowledge)
    flusher.start()
    a, b, c = _batch("dev-a", 1), _batch("dev-b", 1), _batch("dev-a", 3)
    assert _add(flusher, a, mid=7) == (Added.QUEUED, 0)
    assert _add(flusher, a) == (Added.JOINED, 0)  # sent again while it waits: one copy, two messages
    assert _add(flusher, a, mid=7) == (Added.JOINED, 0)  # the broker's redelivery of the first: one PUBACK
    assert _add(flusher, b) == (Added.QUEUED, 0)
    time.sleep(0.2)
    assert store.written == [], "neither due nor full"
    assert _add(flusher, c) == (Added.QUEUED, 0)  # full: sealed at once
    flusher.close()
    [flush] = store.written
    assert [key[1] for key in flush.batches] == [a.batch_id, b.batch_id, c.batch_id] and flush.records == 6
    assert store.acknowledged == [(a.batch_id, 2), (b.batch_id, 1), (c.batch_id, 1)]
    assert _add(flusher, a) == (Added.STORED, 2)  # stored: answered with its records, not written again


def test_a_full_flush_holds_the_next_batch_back_until_a_writer_is_free():
    store = _Store()
    store.held.clear()  # the one writer's write hangs
    flusher = Flusher(IngestGroupSettings(flush_s=0, flush_batches=1, workers=1), store.write, store.acknowledge)
    flusher.start()
    assert _add(flusher, _batch("dev-a", 1))[0] is Added.QUEUED  # sealed at once: the writer takes it
    time.sleep(0.1)
    assert _add(flusher, _batch("dev-a", 3))[0] is Added.QUEUED  # open flush now full, no writer free
    third = threading.Thread(target=_add, args=(flusher, _batch("dev-a", 5)))
    third.start()
    third.join(0.5)
    assert third.is_alive(), "a batch beyond the bound was taken in while no writer was free"
    store.held.set()
    third.join(10)
    flusher.close()
    assert [len(f.batches) for f in store.written] == [1, 1, 1]


def test_the_audit_counts_a_batch_stored_twice_as_a_copy_and_a_number_in_two_batches_as_a_duplicate():
    def index(first: int, last: int) -> lake.BatchIndex:
        return lake.BatchIndex(device="dev-a", batch_id=f"0a0b0c0d-{first:012d}-{last:012d}", epoch="0a0b0c0d",
                               seqs=list(range(first, last + 1)), kinds={"metric": last - first + 1}, gaps=[],
                               objects=[], stored_at=1.0)

    copied = audit_indexes([index(1, 5), index(6, 9), index(1, 5)], None)["dev-a"]
    assert (copied.received, copied.copies, copied.duplicates, copied.missing) == (9, 1, 0, [])
    overlapping = audit_indexes([index(1, 5), index(5, 9)], None)["dev-a"]
    assert (overlapping.copies, overlapping.duplicates) == (0, 1)
