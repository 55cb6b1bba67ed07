"""The telemetry outbox on a real SQLite file, in this process: repair of a damaged file (and the new
epoch it starts), expiry into a counted gap, refusal of invalid records, and the gap records of batches
given up. Pure logic on a real file; the outbox under the real telemetry process, brokers and S3 is in
tests/test_telemetry.py."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

from edgefleet.audit import _epoch
from services.telemetry.outbox import Outbox
from shared.schemas import MAX_ACK_RANGES, ResourceSample


def _sample(device: str) -> ResourceSample:
    return ResourceSample(device=device, cpu_percent=1, memory_percent=2, memory_used_bytes=3, disk_percent=4,
                          at=time.time())


def _outbox_of_2000_samples(path: Path, device: str):
    """A real outbox on disk holding 2000 resource samples, committed 100 at a time."""
    outbox = Outbox(path, device, 1 << 30)
    sample = _sample(device)
    for _ in range(20):
        outbox.append([sample] * 100)
    return outbox


def test_a_damaged_outbox_is_repaired_keeping_what_is_readable(tmp_path):
    """Real file damage: pages in the middle of the database overwritten with garbage."""
    path = tmp_path / "outbox.db"
    outbox = _outbox_of_2000_samples(path, "edge-d")
    outbox.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    outbox.close()
    data = bytearray(path.read_bytes())
    page = 4096
    assert len(data) > 40 * page
    for p in range(10, 14):  # four pages of record data
        data[p * page : (p + 1) * page] = b"\xde\xad\xbe\xef" * (page // 4)
    path.write_bytes(bytes(data))

    repaired = Outbox(path, "edge-d", 1 << 30)
    note = repaired.stats.repaired
    assert note and "kept" in note and "lost" in note
    kept = int(note.split("kept ")[1].split()[0])
    lost = int(note.split("lost ")[1].split()[0].rstrip(";"))
    assert 1000 < kept < 2000 and kept + lost == 2000
    assert list(tmp_path.glob("outbox.db.damaged-*")), "the damaged file is kept, not deleted"
    rows = repaired.db.execute("SELECT count(*) FROM records WHERE kind = 'gap'").fetchone()[0]
    assert rows == 1 and repaired.stats.next_seq == 2002  # the gap record took 2001
    assert repaired.next_batch(5000, 1 << 30)[-1].body.reason == "damaged"
    repaired.close()


def test_records_past_their_ttl_expire_into_a_counted_gap(tmp_path):
    outbox = Outbox(tmp_path / "outbox.db", "edge-ttl", 1 << 30, ttl_s={"metric": 0.05})
    sample = _sample("edge-ttl")
    outbox.append([sample] * 10)
    in_flight = outbox.next_batch(3, 1 << 20)  # the batch in flight never expires under the forwarder
    time.sleep(0.1)
    assert outbox.expire() == 7 and outbox.stats.dropped["expired"] == 7
    batch = outbox.next_batch(100, 1 << 20)
    assert [r.seq for r in batch] == [r.seq for r in in_flight]
    outbox.ack(batch[0].seq, batch[-1].seq)
    gap = outbox.next_batch(100, 1 << 20)[0].body
    assert (gap.kind, gap.reason, gap.first_seq, gap.last_seq, gap.count) == ("gap", "expired", 4, 10, 7)
    outbox.close()


def test_a_repaired_outbox_gets_a_new_epoch_numbered_from_one(tmp_path):
    path = tmp_path / "outbox.db"
    outbox = _outbox_of_2000_samples(path, "edge-r")
    sent = outbox.next_batch(500, 1 << 30)
    outbox.ack(sent[0].seq, sent[-1].seq)  # 1..500 are in the cloud, in the first epoch
    first_epoch = outbox.epoch
    outbox.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    outbox.close()
    data = bytearray(path.read_bytes())
    for p in range(60, 63):  # past the pages the acknowledged records freed
        data[p * 4096 : (p + 1) * 4096] = b"\xde\xad\xbe\xef" * 1024
    path.write_bytes(bytes(data))
    repaired = Outbox(path, "edge-r", 1 << 30)
    assert repaired.stats.repaired and repaired.epoch != first_epoch
    records = repaired.next_batch(5000, 1 << 30)
    assert records[0].seq == 1, "a new epoch numbers from 1"
    gap = records[-1].body
    assert gap.reason == "damaged" and 1 <= gap.first_seq <= gap.last_seq <= 1500
    assert len(records) - 1 + gap.count == 1500 and repaired.stats.next_seq == 1502
    repaired.close()


def test_invalid_records_never_enter_the_outbox(tmp_path):
    outbox = Outbox(tmp_path / "outbox.db", "edge-v", 1 << 30)
    good = _sample("edge-v")
    bad = good.model_copy(update={"at": float("inf")})  # model_copy does not validate: this one exists
    assert outbox.append([bad, good]) == [1]
    assert outbox.stats.refused == 1 and outbox.stats.records == 1
    assert [r.body.at for r in outbox.next_batch(10, 1 << 20)] == [good.at]
    outbox.close()


def test_a_gap_record_in_a_batch_given_up_is_declared_again_and_the_audit_explains_every_number(tmp_path):
    """Pure logic on a real outbox file: the second batch given up carries the first one's gap record;
    the declaration of the first loss must still reach the cloud, and counts once if it arrives twice."""
    outbox = Outbox(tmp_path / "outbox.db", "edge-g", 1 << 30)
    sample = _sample("edge-g")
    outbox.append([sample] * 2)
    first = outbox.next_batch(100, 1 << 20)
    assert outbox.dead_letter(first[0].seq, first[-1].seq, "not acknowledged") == 2
    outbox.append([sample])
    second = outbox.next_batch(100, 1 << 20)
    assert [(r.seq, r.body.kind) for r in second] == [(3, "gap"), (4, "metric")]
    assert outbox.dead_letter(3, 4, "not acknowledged") == 2
    third = outbox.next_batch(100, 1 << 20)  # what reaches the cloud
    declared = sorted((r.body.first_seq, r.body.last_seq, r.body.reason) for r in third if r.body.kind == "gap")
    assert declared == [(1, 2, "dead_lettered"), (3, 4, "dead_lettered")]
    result = _epoch(outbox.epoch, Counter(r.seq for r in third), [r.body for r in third if r.body.kind == "gap"])
    assert result.missing == [] and result.declared_lost == {"dead_lettered": 4}
    # The second batch stored after all, its ack lost: the first loss is declared twice and counts once.
    both = second + third
    result = _epoch(outbox.epoch, Counter(r.seq for r in both), [r.body for r in both if r.body.kind == "gap"])
    assert result.missing == [] and result.duplicates == 0 and result.declared_lost == {"dead_lettered": 4}
    assert [seq for seq, _, _ in outbox.dead_letters()] == [1, 2, 3, 4]
    outbox.close()


def test_a_row_changed_on_disk_after_append_is_decoded_again_and_dead_lettered(tmp_path):
    """A record checked at append is decoded again when it is read for a batch: a row that no longer
    decodes is given up, never sent."""
    outbox = Outbox(tmp_path / "outbox.db", "edge-k", 1 << 30)
    outbox.append([_sample("edge-k"), _sample("edge-k")])
    outbox.db.execute("UPDATE records SET body = ? WHERE seq = 1", (b"\xc1not msgpack",))
    batch = outbox.next_batch(10, 1 << 20)
    assert [r.seq for r in batch] == [2]
    assert [seq for seq, _, _ in outbox.dead_letters()] == [1]
    outbox.close()


def test_what_the_outbox_holds_in_memory_is_what_a_restart_reads_from_the_file(tmp_path):
    """Sequence numbers, the batch in flight, its attempts and the acknowledged ranges are kept in memory
    and written in the same transaction: a reopened outbox (reading only the file) agrees with them."""
    path = tmp_path / "outbox.db"
    outbox = Outbox(path, "edge-m", 1 << 30)
    stores = ["a" * 32, "b" * 32]
    for i in range(12):  # one range per change of store, more than MAX_ACK_RANGES of them
        outbox.append([_sample("edge-m")] * 3)
        batch = outbox.next_batch(2, 1 << 20)
        outbox.attempt()
        outbox.ack(batch[0].seq, batch[-1].seq, stores[i % 2])
    outbox.append([_sample("edge-m")])
    in_flight = outbox.next_batch(5, 1 << 20)
    assert outbox.attempt() == 1 and outbox.attempt() == 2
    assert len(outbox.acknowledged) == MAX_ACK_RANGES
    held = (outbox.stats.next_seq, outbox.stats.records, outbox.acknowledged)
    outbox.close()
    reopened = Outbox(path, "edge-m", 1 << 30)
    assert (reopened.stats.next_seq, reopened.stats.records, reopened.acknowledged) == held
    assert [r.seq for r in reopened.next_batch(5, 1 << 20)] == [r.seq for r in in_flight]
    assert reopened.attempt() == 3
    reopened.close()
