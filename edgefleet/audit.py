"""`edgefleet telemetry audit`: per device, which sequence numbers reached S3, which are missing, and
which of the missing the device itself declared lost (gap records: queue full, expired, damaged).
Unexplained missing numbers are records still on their way (or lost, which must never happen);
duplicates (a number in two batches) must never happen either."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from shared import lake


@dataclass
class DeviceAudit:
    device: str
    received: int = 0
    highest_seq: int = 0
    duplicates: int = 0
    declared_lost: dict[str, int] = field(default_factory=dict)  # by reason
    missing: list[tuple[int, int]] = field(default_factory=list)  # unexplained ranges

    @property
    def missing_count(self) -> int:
        return sum(b - a + 1 for a, b in self.missing)


def audit(s3, bucket: str) -> dict[str, DeviceAudit]:
    seqs: dict[str, Counter] = {}
    gaps: dict[str, list] = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{lake.BATCHES}/"):
        for obj in page.get("Contents", []):
            index = lake.BatchIndex.model_validate_json(s3.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read())
            seqs.setdefault(index.device, Counter()).update(index.seqs)
            gaps.setdefault(index.device, []).extend(index.gaps)
    report = {}
    for device, counts in seqs.items():
        result = DeviceAudit(device, received=len(counts), highest_seq=max(counts), duplicates=sum(n - 1 for n in counts.values()))
        explained = set()
        for gap in gaps.get(device, []):
            explained.update(range(gap.first_seq, gap.last_seq + 1))
            result.declared_lost[gap.reason.value] = result.declared_lost.get(gap.reason.value, 0) + gap.count
        absent = [s for s in range(1, result.highest_seq + 1) if s not in counts and s not in explained]
        result.missing = _ranges(absent)
        report[device] = result
    return report


def _ranges(numbers: list[int]) -> list[tuple[int, int]]:
    ranges: list[tuple[int, int]] = []
    for n in numbers:
        if ranges and ranges[-1][1] == n - 1:
            ranges[-1] = (ranges[-1][0], n)
        else:
            ranges.append((n, n))
    return ranges
