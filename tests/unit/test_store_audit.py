"""Store identity in the telemetry audit, pure logic: which store acknowledged which records, as the
outbox keeps it on a real SQLite file, and the audit of constructed batch indexes, which tells numbers
an earlier store acknowledged (sent before this store existed) from numbers this store lost and from
unexplained ones. The same on real processes and real S3 servers is in tests/test_telemetry_store.py."""

from __future__ import annotations

import time
from collections import Counter

import pytest
from pydantic import ValidationError
from rich.console import Console

from edgefleet.audit import DeviceAudit, _epoch, audit_indexes
from edgefleet.cli.telemetry import audit_table
from services.telemetry.outbox import Outbox
from shared import lake
from shared.schemas import (
    MAX_ACK_RANGES,
    AckRange,
    DriftSample,
    Gap,
    GapReason,
    ResourceSample,
    TelemetryAck,
    TelemetryRecord,
)

STORE_A, STORE_B = "a" * 32, "b" * 32


def _sample() -> ResourceSample:
    return ResourceSample(device="edge-w", cpu_percent=1, memory_percent=2, memory_used_bytes=3, disk_percent=4,
                          at=time.time())


def _held(*ranges: tuple[int, int]) -> Counter:
    return Counter(s for a, b in ranges for s in range(a, b + 1))


def _ack_next(outbox: Outbox, records: int, store: str | None) -> None:
    batch = outbox.next_batch(records, 1 << 20)
    outbox.ack(batch[0].seq, batch[-1].seq, store)


def test_the_outbox_keeps_which_store_acknowledged_which_numbers_across_a_restart(tmp_path):
    outbox = Outbox(tmp_path / "outbox.db", "edge-w", 1 << 30)
    assert outbox.acknowledged == []  # nothing acknowledged yet: no claim
    outbox.append([_sample()] * 50)
    _ack_next(outbox, 10, STORE_A)
    _ack_next(outbox, 10, STORE_A)  # the same store again: its range grows
    assert outbox.acknowledged == [AckRange(store=STORE_A, first_seq=1, last_seq=20)]
    _ack_next(outbox, 10, None)  # an ingest older than store ids: no evidence, no claim
    assert outbox.acknowledged == [AckRange(store=STORE_A, first_seq=1, last_seq=20)]
    outbox.close()
    reopened = Outbox(tmp_path / "outbox.db", "edge-w", 1 << 30)  # a restart keeps it
    assert reopened.acknowledged == [AckRange(store=STORE_A, first_seq=1, last_seq=20)]
    _ack_next(reopened, 10, STORE_B)  # a new store: a range of its own
    reopened.ack(5, 5, STORE_A)  # an old acknowledgement arriving late claims nothing new
    assert reopened.acknowledged == [AckRange(store=STORE_A, first_seq=1, last_seq=20),
                                     AckRange(store=STORE_B, first_seq=31, last_seq=40)]
    reopened.close()


def test_the_outbox_sends_only_the_latest_ranges(tmp_path):
    outbox = Outbox(tmp_path / "outbox.db", "edge-w", 1 << 30)
    outbox.append([_sample()] * (MAX_ACK_RANGES + 2))
    for i in range(MAX_ACK_RANGES + 2):
        _ack_next(outbox, 1, (STORE_A, STORE_B)[i % 2])
    assert [r.first_seq for r in outbox.acknowledged] == list(range(3, MAX_ACK_RANGES + 3))
    outbox.close()


def _drift() -> DriftSample:
    return DriftSample(device="edge-w", scores={}, samples=0, at=time.time())


def _stored(batch: list[TelemetryRecord]) -> tuple[list[int], list[Gap]]:
    """What the store holds of an acknowledged batch: its numbers, and the gaps among its records."""
    return [r.seq for r in batch], [r.body for r in batch if isinstance(r.body, Gap)]


def test_records_the_device_dropped_are_missing_then_declared_lost_never_lost_by_the_store(tmp_path):
    """Store A acknowledged 1-5 and 16-40; the device itself let 6-15 expire while offline, and the gap
    record saying so (41) is still queued: nothing the store acknowledged is absent."""
    outbox = Outbox(tmp_path / "outbox.db", "edge-w", 1 << 30, ttl_s={"drift": 60})
    outbox.append([_sample()] * 5)
    batch = outbox.next_batch(5, 1 << 20)
    outbox.ack(1, 5, STORE_A)
    held, gaps = _stored(batch)
    outbox.append([_drift()] * 10 + [_sample()] * 25)  # 6-15 expire, 16-40 are sent
    assert outbox.expire(now=time.time() + 3600) == 10
    batch = outbox.next_batch(25, 1 << 20)
    assert [r.seq for r in batch] == list(range(16, 41))
    outbox.ack(16, 40, STORE_A)
    assert outbox.acknowledged == [AckRange(store=STORE_A, first_seq=1, last_seq=5),
                                   AckRange(store=STORE_A, first_seq=16, last_seq=40)]
    held += [r.seq for r in batch]
    before_gap = _epoch("e1", Counter(held), gaps, STORE_A, outbox.acknowledged)
    assert before_gap.missing == [(6, 15)] and before_gap.lost == [] and before_gap.before_store == []
    batch = outbox.next_batch(25, 1 << 20)  # the gap record arrives
    assert [r.seq for r in batch] == [41]
    outbox.ack(41, 41, STORE_A)
    more, gaps = _stored(batch)
    after_gap = _epoch("e1", Counter(held + more), gaps, STORE_A, outbox.acknowledged)
    assert after_gap.declared_lost == {"expired": 10}
    assert after_gap.missing == [] and after_gap.lost == [] and after_gap.before_store == []
    outbox.close()


def test_a_batch_with_holes_is_acknowledged_as_one_range_per_run(tmp_path):
    outbox = Outbox(tmp_path / "outbox.db", "edge-w", 1 << 30, ttl_s={"drift": 60})
    outbox.append([_sample()] * 10 + [_drift()] * 5 + [_sample()] * 5)
    outbox.expire(now=time.time() + 3600)  # 11-15 gone; their gap is 21
    batch = outbox.next_batch(100, 1 << 20)
    assert [r.seq for r in batch] == [*range(1, 11), *range(16, 22)]
    outbox.ack(1, 21, STORE_A)
    assert outbox.acknowledged == [AckRange(store=STORE_A, first_seq=1, last_seq=10),
                                   AckRange(store=STORE_A, first_seq=16, last_seq=21)]
    outbox.close()


def _index(seqs: list[int], acknowledged: list[AckRange], epoch: str = "e1", device: str = "edge-w"
           ) -> lake.BatchIndex:
    return lake.BatchIndex(device=device, batch_id=f"{epoch}-{seqs[0]}-{seqs[-1]}", epoch=epoch, seqs=seqs,
                           kinds={"metric": len(seqs)}, gaps=[], objects=[], stored_at=time.time(),
                           acknowledged=acknowledged)


def test_a_store_whose_marker_was_made_again_in_the_same_bucket_is_not_an_earlier_store():
    """The marker was deleted and ingest made a new one (B) in the same bucket. The bucket holds records
    inside A's range, so A wrote here: what A acknowledged and the bucket lacks is lost, not 'before store'."""
    a_range = AckRange(store=STORE_A, first_seq=1, last_seq=40)
    indexes = [_index(list(range(1, 21)), [AckRange(store=STORE_A, first_seq=1, last_seq=20)]),
               # 21-30: A acknowledged them, and their objects are gone from this bucket
               _index(list(range(31, 41)), [a_range]),
               _index(list(range(41, 51)), [a_range, AckRange(store=STORE_B, first_seq=41, last_seq=50)])]
    report = audit_indexes(indexes, STORE_B)["edge-w"]
    assert report.lost == [(21, 30)] and report.before_store == [] and report.missing == []


def test_a_truly_earlier_store_that_never_wrote_here_is_still_before_this_store():
    indexes = [_index(list(range(41, 51)), [AckRange(store=STORE_A, first_seq=1, last_seq=40),
                                           AckRange(store=STORE_B, first_seq=41, last_seq=50)])]
    report = audit_indexes(indexes, STORE_B)["edge-w"]
    assert report.before_store == [(1, 40)] and report.lost == [] and report.missing == []
    # Evidence from any device's epoch in the bucket counts: A wrote another device's records here.
    other = _index([7], [AckRange(store=STORE_A, first_seq=7, last_seq=7)], device="edge-x")
    report = audit_indexes([*indexes, other], STORE_B)["edge-w"]
    assert report.lost == [(1, 40)] and report.before_store == []


def test_a_range_or_store_id_that_is_not_one_is_refused_on_the_wire():
    with pytest.raises(ValidationError):
        AckRange(store=STORE_A, first_seq=10, last_seq=9)
    with pytest.raises(ValidationError):
        AckRange(store="not-a-store", first_seq=1, last_seq=9)
    with pytest.raises(ValidationError):
        TelemetryAck(device="d", batch_id="b", stored=1, at=1.0, store="../../x")


def test_numbers_an_earlier_store_acknowledged_are_sent_before_this_store_not_missing():
    result = _epoch("e1", _held((81, 160)), [], STORE_B,
                    [AckRange(store=STORE_A, first_seq=1, last_seq=80), AckRange(store=STORE_B, first_seq=81,
                                                                                 last_seq=140)])
    assert result.before_store == [(1, 80)] and result.before_store_count == 80
    assert result.missing == [] and result.lost == []


def test_numbers_this_store_acknowledged_and_does_not_hold_are_lost_even_its_first_batch():
    claims = [AckRange(store=STORE_A, first_seq=1, last_seq=80), AckRange(store=STORE_B, first_seq=81, last_seq=140)]
    result = _epoch("e1", _held((91, 99), (101, 160)), [], STORE_B, claims)
    assert result.lost == [(81, 90), (100, 100)] and result.lost_count == 11
    assert result.before_store == [(1, 80)] and result.missing == []


def test_numbers_outside_every_range_are_missing_unexplained():
    result = _epoch("e1", _held((11, 50), (61, 70)), [], STORE_A, [AckRange(store=STORE_A, first_seq=11, last_seq=50)])
    assert result.missing == [(1, 10), (51, 60)] and result.lost == [] and result.before_store == []


def test_without_this_stores_id_no_range_explains_anything():
    """A store with no marker cannot tell its own acknowledgements from another's: it fails closed."""
    result = _epoch("e1", _held((81, 160)), [], None,
                    [AckRange(store=STORE_A, first_seq=1, last_seq=80), AckRange(store=STORE_B, first_seq=81,
                                                                                 last_seq=140)])
    assert result.missing == [(1, 80)] and result.before_store == [] and result.lost == []


def test_a_declared_gap_explains_numbers_before_any_range_does():
    gap = Gap(device="edge-w", first_seq=85, last_seq=90, count=6, reason=GapReason.QUEUE_FULL, at=time.time())
    result = _epoch("e1", _held((81, 84), (91, 160)), [gap], STORE_B,
                    [AckRange(store=STORE_A, first_seq=1, last_seq=80), AckRange(store=STORE_B, first_seq=81,
                                                                                 last_seq=140)])
    assert result.declared_lost == {"queue_full": 6}
    assert result.before_store == [(1, 80)] and result.lost == [] and result.missing == []


def _text(table) -> str:
    console = Console(width=300, record=True)
    console.print(table)
    return console.export_text()


def test_the_audit_table_names_the_store_and_tells_earlier_stores_from_losses_and_unexplained():
    epoch = _epoch("e1", _held((81, 99), (101, 150), (161, 170)), [], STORE_B,
                   [AckRange(store=STORE_A, first_seq=1, last_seq=80), AckRange(store=STORE_B, first_seq=81,
                                                                                last_seq=150)])
    device = DeviceAudit(device="dev-1", epochs={"e1": epoch}, received=epoch.received, highest_seq=170,
                         before_store=epoch.before_store, lost=epoch.lost, missing=epoch.missing)
    text = _text(audit_table({"dev-1": device}, "lake", STORE_B))
    assert f"store {STORE_B}" in text
    header = next(line for line in text.splitlines() if "device" in line)
    assert "sent before this store existed" in header and "lost (acknowledged by this store)" in header
    row = next(line for line in text.splitlines() if "dev-1" in line)
    cells = [c.strip() for c in row.split("│")]
    assert "1-80" in cells and "100" in cells and "151-160" in cells
    assert "no store id" in _text(audit_table({"dev-1": device}, "lake", None))
