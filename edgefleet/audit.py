"""`edgefleet telemetry audit`: per device and per outbox epoch, which sequence numbers reached S3, which
are missing, and which of the missing the device itself declared lost (gap records: queue full,
expired, damaged, dead-lettered, write failed). Sequence numbers count within an epoch (a lost or
repaired outbox starts a new one at 1), so completeness is computed per epoch. Unexplained missing
numbers are records still on their way (or lost, which must never happen); duplicates (a number in two
batches of one epoch) must never happen either."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from shared import lake


@dataclass
class EpochAudit:
    epoch: str
    received: int = 0
    highest_seq: int = 0
    duplicates: int = 0
    declared_lost: dict[str, int] = field(default_factory=dict)  # by reason
    missing: list[tuple[int, int]] = field(default_factory=list)  # unexplained ranges
    first_stored_at: float = 0.0

    @property
    def missing_count(self) -> int:
        return sum(b - a + 1 for a, b in self.missing)


@dataclass
class DeviceAudit:
    """A device's totals over its epochs; `epochs` holds each epoch's own numbers, oldest first."""

    device: str
    epochs: dict[str, EpochAudit] = field(default_factory=dict)
    received: int = 0
    highest_seq: int = 0  # in the latest epoch
    duplicates: int = 0
    declared_lost: dict[str, int] = field(default_factory=dict)
    missing: list[tuple[int, int]] = field(default_factory=list)  # every epoch's, in epoch order

    @property
    def missing_count(self) -> int:
        return sum(b - a + 1 for a, b in self.missing)

    @property
    def latest(self) -> EpochAudit:
        return list(self.epochs.values())[-1]


def audit(s3, bucket: str) -> dict[str, DeviceAudit]:
    """Reads every batch index under the lake's `_batches/` prefix. Returns the audit by device."""
    seqs: dict[tuple[str, str], Counter] = {}
    gaps: dict[tuple[str, str], list] = {}
    first_at: dict[tuple[str, str], float] = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{lake.BATCHES}/"):
        for obj in page.get("Contents", []):
            index = lake.BatchIndex.model_validate_json(s3.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read())
            key = (index.device, index.epoch)
            seqs.setdefault(key, Counter()).update(index.seqs)
            gaps.setdefault(key, []).extend(index.gaps)
            first_at[key] = min(first_at.get(key, index.stored_at), index.stored_at)
    report: dict[str, DeviceAudit] = {}
    for (device, epoch) in sorted(seqs, key=lambda k: first_at[k]):
        result = _epoch(epoch, seqs[(device, epoch)], gaps.get((device, epoch), []))
        result.first_stored_at = first_at[(device, epoch)]
        total = report.setdefault(device, DeviceAudit(device))
        total.epochs[epoch] = result
        total.received += result.received
        total.highest_seq = result.highest_seq
        total.duplicates += result.duplicates
        total.missing += result.missing
        for reason, n in result.declared_lost.items():
            total.declared_lost[reason] = total.declared_lost.get(reason, 0) + n
    return report


def _epoch(epoch: str, counts: Counter, gaps: list) -> EpochAudit:
    result = EpochAudit(epoch, received=len(counts), highest_seq=max(counts),
                        duplicates=sum(n - 1 for n in counts.values()))
    explained = set()
    # A device declares a gap again when the batch carrying it was given up (it may have been stored
    # all the same, its ack lost): one loss, declared twice, counts once.
    for gap in {(g.first_seq, g.last_seq, g.reason): g for g in gaps}.values():
        explained.update(range(gap.first_seq, gap.last_seq + 1))
        result.declared_lost[gap.reason.value] = result.declared_lost.get(gap.reason.value, 0) + gap.count
    absent = [s for s in range(1, result.highest_seq + 1) if s not in counts and s not in explained]
    result.missing = _ranges(absent)
    return result


def _ranges(numbers: list[int]) -> list[tuple[int, int]]:
    ranges: list[tuple[int, int]] = []
    for n in numbers:
        if ranges and ranges[-1][1] == n - 1:
            ranges[-1] = (ranges[-1][0], n)
        else:
            ranges.append((n, n))
    return ranges
