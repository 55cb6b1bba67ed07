"""The telemetry as S3 holds it, read back by the fleet bench (what was stored when, from the flush
indexes and the records themselves), and the S3 server's own request log (every PUT, refused ones too)."""

from __future__ import annotations

import gzip
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import ValidationError

from shared import lake
from shared.schemas import TelemetryRecord

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

_REQUEST = re.compile(rb'"(GET|PUT|POST|HEAD|DELETE) [^"]*" (\d{3})')


def log_size(path: Path) -> int:
    """The log's size now (0 when absent): mark a window's ends with it."""
    try:
        return path.stat().st_size
    except OSError:
        return 0


def requests_logged(path: Path, start: int, end: int) -> Counter[str]:
    """The HTTP requests the S3 server logged (werkzeug's access lines) between two offsets of its log,
    by method: every PUT the replicas sent, refused ones too."""
    counted: Counter[str] = Counter()
    try:
        with path.open("rb") as log:
            log.seek(start)
            body = log.read(max(0, end - start))
    except OSError:
        return counted
    for match in _REQUEST.finditer(body):
        counted[match.group(1).decode()] += 1
    return counted


# -- telemetry as S3 holds it -----------------------------------------------------------------------------


@dataclass(frozen=True)
class StoredBatch:
    """A batch as the store holds it (its first copy, where a resend was stored twice)."""

    device: str
    batch_id: str
    records: int
    stored_at: float
    objects: tuple[str, ...]
    replica: str  # the replica whose flush stored it ("" in the per-batch layout)


@dataclass
class StoredTelemetry:
    """Every batch the telemetry bucket holds (flush indexes and the older per-batch indexes), once each
    by (device, batch id); `copies`: batches held more than once (a resend after a lost acknowledgement)."""

    batches: dict[tuple[str, str], StoredBatch] = field(default_factory=dict)
    copies: int = 0
    index_objects: list[float] = field(default_factory=list)  # each index object's stored_at

    def add(self, index: lake.BatchIndex, stored_at: float, replica: str = "") -> None:
        key = (index.device, index.batch_id)
        seen = self.batches.get(key)
        if seen is not None:
            self.copies += 1
            if seen.stored_at <= stored_at:
                return
        self.batches[key] = StoredBatch(index.device, index.batch_id, len(index.seqs), stored_at,
                                        tuple(index.objects), replica)

    def records_by_replica(self, start: float, end: float) -> Counter[str]:
        """Records stored in the window, by the replica that stored them."""
        counted: Counter[str] = Counter()
        for b in self.batches.values():
            if start <= b.stored_at < end:
                counted[b.replica] += b.records
        return counted

    def flush_rate(self, start: float, end: float) -> float:
        """Records/s the replicas stored in the window, flush to flush: each replica's flushes in it but
        its first (which holds what came before the window) over the time from its first to its last. A
        flush is all or nothing, so counting whole flushes against a window's edges would be off by up
        to a flush per replica at each end; this is exact to the records' own flushing.

        Returns:
            The sum over the replicas (a replica with fewer than two flushes in the window adds nothing).
        """
        flushes: dict[str, Counter[float]] = {}
        for b in self.batches.values():
            if start <= b.stored_at < end:
                flushes.setdefault(b.replica, Counter())[b.stored_at] += b.records
        rate = 0.0
        for records in flushes.values():
            times = sorted(records)
            if len(times) >= 2 and times[-1] > times[0]:
                rate += sum(records[t] for t in times[1:]) / (times[-1] - times[0])
        return rate

    def records_between(self, start: float, end: float) -> int:
        return sum(b.records for b in self.batches.values() if start <= b.stored_at < end)

    def objects_between(self, start: float, end: float) -> int:
        """Objects written in the window: each index and each records object (a flush's records
        objects are shared by its batches: counted once)."""
        records = {o for b in self.batches.values() if start <= b.stored_at < end for o in b.objects}
        return len(records) + sum(start <= at < end for at in self.index_objects)

    def object_times(self) -> dict[str, float]:
        """Each records object's key -> when its index says it was stored."""
        times: dict[str, float] = {}
        for batch in self.batches.values():
            for key in batch.objects:
                times[key] = min(times.get(key, batch.stored_at), batch.stored_at)
        return times


def read_stored(s3: S3Client, bucket: str) -> StoredTelemetry:
    """Every batch index in the bucket: the flushes' and the per-batch layout's.

    Raises:
        lake.BatchIndexInvalid: an index that is not one.
    """
    stored = StoredTelemetry()
    for key in _keys(s3, bucket, f"{lake.FLUSHES}/"):
        flush = lake.read_flush_index(s3.get_object(Bucket=bucket, Key=key)["Body"].read(), key)
        stored.index_objects.append(flush.stored_at)
        for batch in flush.batches:
            stored.add(batch, flush.stored_at, flush.replica)
    for key in _keys(s3, bucket, f"{lake.BATCHES}/"):
        index = lake.read_batch_index(s3.get_object(Bucket=bucket, Key=key)["Body"].read(), key)
        stored.index_objects.append(index.stored_at)
        stored.add(index, index.stored_at)
    return stored


@dataclass(frozen=True)
class StoredRecordTime:
    """One record as read back from S3: whose, which, made when (the device's `at`), stored when."""

    device: str
    key: tuple[str, int, float]  # (epoch or records object's batch, seq, at): the same record twice is a copy
    at: float
    stored_at: float


def read_records(s3: S3Client, bucket: str, stored: StoredTelemetry, start: float,
                 end: float) -> list[StoredRecordTime]:
    """Every record in the records objects stored between `start` and `end` (each copy once), read back.

    Returns:
        Each record's device, identity, own time and its object's stored_at.
    """
    seen: set[tuple[str, tuple[str, int, float]]] = set()
    found: list[StoredRecordTime] = []
    for key, stored_at in sorted(stored.object_times().items(), key=lambda item: item[1]):
        if not start <= stored_at < end:
            continue
        body = gzip.decompress(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
        for line in body.splitlines():
            record = _record(line, key)
            if record is None or (record[0], record[1]) in seen:
                continue
            seen.add((record[0], record[1]))
            found.append(StoredRecordTime(record[0], record[1], record[1][2], stored_at))
    return found


def _record(line: bytes, key: str) -> tuple[str, tuple[str, int, float]] | None:
    """A stored line's device and identity: a flush's StoredRecord (with its epoch), or the per-batch
    layout's TelemetryRecord (its object's key names the batch, so the epoch)."""
    try:
        flushed = lake.StoredRecord.model_validate_json(line)
        return flushed.device, (flushed.epoch, flushed.seq, flushed.body.at)
    except ValidationError:
        pass
    try:
        record = TelemetryRecord.model_validate_json(line)
    except ValidationError:
        return None
    return record.body.device, (key.rsplit("/", 1)[-1].split("-", 1)[0], record.seq, record.body.at)


def best_rate(stored: StoredTelemetry, start: float, end: float, span_s: float = 10.0) -> float:
    """The most records stored in any `span_s` seconds of the window (from each batch's stored_at), per
    second: what the replicas and S3 took at their busiest (a cut link's backlog arriving on top)."""
    times = sorted((b.stored_at, b.records) for b in stored.batches.values() if start <= b.stored_at < end)
    best = total = 0
    lo = 0
    for at, records in times:
        total += records
        while times[lo][0] <= at - span_s:
            total -= times[lo][1]
            lo += 1
        best = max(best, total)
    return best / span_s


def _keys(s3: S3Client, bucket: str, prefix: str) -> list[str]:
    keys: list[str] = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys.extend(o["Key"] for o in page.get("Contents", []))
    return keys


def index_count(s3: S3Client, bucket: str) -> int:
    """How many indexes (flushes and per-batch) the bucket holds: stable once the replicas wrote all they took."""
    return len(_keys(s3, bucket, f"{lake.FLUSHES}/")) + len(_keys(s3, bucket, f"{lake.BATCHES}/"))
