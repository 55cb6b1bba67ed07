"""`edgefleet telemetry audit`: per device and per outbox epoch, which sequence numbers reached S3, which
are missing, and which of the missing the device itself declared lost (gap records: queue full,
expired, damaged, dead-lettered, write failed). Sequence numbers count within an epoch (a lost or
repaired outbox starts a new one at 1), so completeness is computed per epoch. Unexplained missing
numbers are records still on their way; duplicates (a number in two different batches of one epoch) must
never happen.

The indexes come from both layouts (shared.lake): per-batch indexes under _batches/ (written before
flushes) and the batches listed by each flush index under _flushes/. A batch sent again after a lost
acknowledgement can be stored twice (in two flushes, by two replicas, or once in each layout): the same
(device, batch id) is counted once, and each further copy is counted as `copies` (harmless, shown so a
rate of resends can be seen).

The store has an identity (shared.lake.StoreMarker, made by cloud_ingest) and every batch's index keeps
the ranges the device sent with the batch: which store acknowledged which numbers of the epoch
(shared.schemas.AckRange; every batch repeats them, so one index is evidence enough). A missing number
that no gap declares is then:
- inside the range of a store that wrote to this bucket: lost, acknowledged by it and not in it, which
  must never happen. This store wrote here; so did any other store id one of whose ranges covers a
  record the bucket holds (the marker was deleted and made again: a new id, the same bucket);
- inside only the ranges of stores that never wrote here: acknowledged by an earlier store (sent before
  this store existed: an emptied bucket, a new local fleet beside devices that kept their outboxes);
- else missing (unexplained): on its way, or nothing says where it went.
A range covers exactly the numbers its store acknowledged (services/telemetry/outbox.py), so a number
the device dropped itself is never inside one: it is missing until its gap record arrives, then
declared lost. No evidence, no explanation: without a marker (a store older than store ids) no range is
told to be another store's, and every missing number stays unexplained."""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from shared import lake
from shared.schemas import AckRange


class _Counts:
    """How many numbers each kind of range list holds (EpochAudit and DeviceAudit alike)."""

    missing: list[tuple[int, int]]
    before_store: list[tuple[int, int]]
    lost: list[tuple[int, int]]

    @property
    def missing_count(self) -> int:
        return _count(self.missing)

    @property
    def before_store_count(self) -> int:
        return _count(self.before_store)

    @property
    def lost_count(self) -> int:
        return _count(self.lost)


@dataclass
class EpochAudit(_Counts):
    epoch: str
    received: int = 0
    highest_seq: int = 0
    duplicates: int = 0
    copies: int = 0  # a batch stored again under the same id: harmless, counted once
    declared_lost: dict[str, int] = field(default_factory=dict)  # by reason
    missing: list[tuple[int, int]] = field(default_factory=list)  # unexplained ranges
    before_store: list[tuple[int, int]] = field(default_factory=list)  # acknowledged by an earlier store
    lost: list[tuple[int, int]] = field(default_factory=list)  # acknowledged by this store, not in it
    first_stored_at: float = 0.0


@dataclass
class DeviceAudit(_Counts):
    """A device's totals over its epochs; `epochs` holds each epoch's own numbers, oldest first."""

    device: str
    epochs: dict[str, EpochAudit] = field(default_factory=dict)
    received: int = 0
    highest_seq: int = 0  # in the latest epoch
    duplicates: int = 0
    copies: int = 0
    declared_lost: dict[str, int] = field(default_factory=dict)
    missing: list[tuple[int, int]] = field(default_factory=list)  # every epoch's, in epoch order
    before_store: list[tuple[int, int]] = field(default_factory=list)  # every epoch's, in epoch order
    lost: list[tuple[int, int]] = field(default_factory=list)  # every epoch's, in epoch order

    @property
    def latest(self) -> EpochAudit:
        return list(self.epochs.values())[-1]


def audit(s3, bucket: str, store: lake.StoreMarker | None = None) -> dict[str, DeviceAudit]:
    """Reads every batch index under the lake's `_batches/` prefix and every flush index under `_flushes/`.
    Returns the audit by device.

    :param s3: a boto3 S3 client.
    :param str bucket: the telemetry bucket.
    :param store: the bucket's marker if the caller has read it already (lake.read_store_marker), else
        it is read here.
    :raises lake.StoreMarkerInvalid: the bucket's marker is not one.
    :raises lake.BatchIndexInvalid: a batch or flush index is not one (its key is named).
    :raises botocore.exceptions.ClientError, BotoCoreError: the store did not answer as S3 does.
    """
    store = store or lake.read_store_marker(s3, bucket)
    return audit_indexes(_indexes(s3, bucket), store.store if store else None)


def _indexes(s3, bucket: str) -> Iterable[lake.BatchIndex]:
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{lake.BATCHES}/"):
        for obj in page.get("Contents", []):
            body = s3.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
            yield lake.read_batch_index(body, f"s3://{bucket}/{obj['Key']}")
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{lake.FLUSHES}/"):
        for obj in page.get("Contents", []):
            body = s3.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
            yield from lake.read_flush_index(body, f"s3://{bucket}/{obj['Key']}").batches


def audit_indexes(indexes: Iterable[lake.BatchIndex], store: str | None) -> dict[str, DeviceAudit]:
    """The audit of a bucket's batch indexes, by device.

    :param indexes: every BatchIndex the bucket holds (a batch stored more than once: each copy).
    :param store: the bucket's store id (its marker's), None where it has none.
    """
    seqs: dict[tuple[str, str], Counter] = {}
    gaps: dict[tuple[str, str], list] = {}
    ranges: dict[tuple[str, str], set[AckRange]] = {}
    first_at: dict[tuple[str, str], float] = {}
    copies: Counter = Counter()
    # (device, batch id) -> every set of numbers stored under it (one, unless a bug gave an id other numbers)
    seen: dict[tuple[str, str], set[tuple[int, ...]]] = {}
    for index in indexes:
        key = (index.device, index.epoch)
        numbers = tuple(index.seqs)
        held = seen.setdefault((index.device, index.batch_id), set())
        if numbers in held:  # the same batch again: one copy more
            copies[key] += 1
            first_at[key] = min(first_at[key], index.stored_at)
            continue
        # A batch id seen with other numbers (never expected) is counted: its numbers show as duplicates.
        held.add(numbers)
        seqs.setdefault(key, Counter()).update(index.seqs)
        gaps.setdefault(key, []).extend(index.gaps)
        ranges.setdefault(key, set()).update(index.acknowledged)
        first_at[key] = min(first_at.get(key, index.stored_at), index.stored_at)
    wrote_here = (_stores_that_wrote_here(seqs, ranges) | {store}) if store else set()
    report: dict[str, DeviceAudit] = {}
    for (device, epoch) in sorted(seqs, key=lambda k: first_at[k]):
        result = _epoch(epoch, seqs[(device, epoch)], gaps.get((device, epoch), []), store,
                        ranges.get((device, epoch), set()), wrote_here)
        result.first_stored_at = first_at[(device, epoch)]
        result.copies = copies[(device, epoch)]
        total = report.setdefault(device, DeviceAudit(device))
        total.epochs[epoch] = result
        total.received += result.received
        total.highest_seq = result.highest_seq
        total.duplicates += result.duplicates
        total.copies += result.copies
        total.missing += result.missing
        total.before_store += result.before_store
        total.lost += result.lost
        for reason, n in result.declared_lost.items():
            total.declared_lost[reason] = total.declared_lost.get(reason, 0) + n
    return report


def _stores_that_wrote_here(seqs: dict[tuple[str, str], Counter],
                            ranges: dict[tuple[str, str], set[AckRange]]) -> set[str]:
    """The store ids one of whose ranges covers a record this bucket holds: a store acknowledges only
    what it stored, so each of them wrote to this bucket (under an id since lost with its marker)."""
    wrote: set[str] = set()
    for key, claims in ranges.items():
        held = sorted(seqs.get(key, ()))
        for claim in claims:
            at = bisect_left(held, claim.first_seq)
            if at < len(held) and held[at] <= claim.last_seq:
                wrote.add(claim.store)
    return wrote


def _epoch(epoch: str, counts: Counter, gaps: list, store: str | None = None,
           acknowledged: Iterable[AckRange] = (), wrote_here: Iterable[str] = ()) -> EpochAudit:
    """One epoch's audit.

    :param counts: how many times each sequence number is in the store.
    :param gaps: the gap records the store holds.
    :param store: this store's id (None: unknown, so no range counts as another store's, nor as its own).
    :param acknowledged: the acknowledgement ranges the epoch's batch indexes carry (the same range seen
        growing over batches is fine: each claims its own numbers).
    :param wrote_here: other store ids that wrote to this bucket (_stores_that_wrote_here): their ranges
        count as this store's own, so what they acknowledged and the bucket lacks is lost.
    """
    result = EpochAudit(epoch, received=len(counts), highest_seq=max(counts),
                        duplicates=sum(n - 1 for n in counts.values()))
    earlier: set[int] = set()
    own: set[int] = set()
    ours = {store, *wrote_here}
    for claim in acknowledged if store is not None else ():
        (own if claim.store in ours else earlier).update(range(claim.first_seq, claim.last_seq + 1))
    explained: set[int] = set()
    # A device declares a gap again when the batch carrying it was given up (it may have been stored
    # all the same, its ack lost): one loss, declared twice, counts once.
    for gap in {(g.first_seq, g.last_seq, g.reason): g for g in gaps}.values():
        explained.update(range(gap.first_seq, gap.last_seq + 1))
        result.declared_lost[gap.reason.value] = result.declared_lost.get(gap.reason.value, 0) + gap.count
    # Numbers this store acknowledged count even above the highest it still holds.
    top = max(result.highest_seq, max(own, default=0))
    absent = [s for s in range(1, top + 1) if s not in counts and s not in explained]
    # Another store's claim wins over ours: runs never overlap, so a number in both means this store's
    # id was reused (a restored bucket), and "earlier" is then the claim that accuses no one wrongly.
    result.before_store = _ranges([s for s in absent if s in earlier])
    result.lost = _ranges([s for s in absent if s in own and s not in earlier])
    result.missing = _ranges([s for s in absent if s not in own and s not in earlier])
    return result


def _count(ranges: list[tuple[int, int]]) -> int:
    return sum(b - a + 1 for a, b in ranges)


def _ranges(numbers: list[int]) -> list[tuple[int, int]]:
    ranges: list[tuple[int, int]] = []
    for n in numbers:
        if ranges and ranges[-1][1] == n - 1:
            ranges[-1] = (ranges[-1][0], n)
        else:
            ranges.append((n, n))
    return ranges
