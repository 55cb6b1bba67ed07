"""Drift scores and latency over time, per device, from the S3 telemetry: the DriftSample records that
cloud_ingest writes in both of shared.lake's layouts: flushes, under
telemetry/drift/date=<day>/flush=<replica>/<flush id>.jsonl.gz (many devices' records, each line naming
its device), and, written before flushes, per batch under telemetry/drift/date=<day>/device=<device>/.

Read bounded, since the store holds the whole fleet's history: only the days the window reaches are
listed, each day folder by folder (its device=<id>/ and flush=<replica>/ folders from a delimiter
listing, at most MAX_DEVICES_LISTED; then each folder's keys, at most MAX_KEYS_PER_DEVICE, and
MAX_KEYS_LISTED in all; a flush folder listed only from its flushes made within the window, as flush ids
sort by time), so one chatty device or replica cannot hide the others' objects behind its own in key
order. Only objects modified within the window are read, each device's newest first and the devices in turn, at most
MAX_OBJECTS_PER_READ and MAX_BYTES_PER_READ a refresh (the rest waits for the next one), each object at
most MAX_OBJECT_BYTES compressed and MAX_INFLATED_BYTES inflated (checked before it is all inflated), and
each device's chart keeps its newest MAX_POINTS samples. A cap reached sets the snapshot's `truncated`.
An object once read is kept by its ETag (a replayed batch overwrites its object with the same content),
so a refresh reads only what is new; a sample stored twice (a batch sent again, in a second flush) is
charted once."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pydantic import ValidationError

from services.console.snapshot import ChartsSnapshot, DeviceCharts
from shared import codec, lake
from shared.logs import fields
from shared.schemas import AlertType, DriftSample, TelemetryRecord

if TYPE_CHECKING:  # boto3-stubs, a dev dependency
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_s3.type_defs import ListObjectsV2RequestTypeDef

log = logging.getLogger(__name__)

KIND = "drift"  # DriftSample.kind: the records' folder in the lake
# A device sampling every 30 s writes ~2,880 drift objects a day: a day of one device fits its cap.
MAX_KEYS_PER_DEVICE = 5000
MAX_DEVICES_LISTED = 2000  # device folders a day
MAX_KEYS_LISTED = 100_000  # keys a refresh, every device and day together
LIST_PAGE = 1000  # S3's largest page
MAX_OBJECTS_PER_READ = 200
MAX_BYTES_PER_READ = 16 << 20
MAX_OBJECT_BYTES = 1 << 20
MAX_INFLATED_BYTES = 8 << 20
MAX_POINTS = 720  # a sample a minute for half a day, or every 5 s for an hour
DAY_S = 86400.0
MAX_DAYS = 31  # date partitions listed, however long the window
# A flush is listed from its id's time, which precedes its write; a write retried while S3 was away is
# later still: flushes made this long before the window are listed too.
FLUSH_WRITE_SLACK_S = 300.0


@dataclass(frozen=True)
class _Read:
    etag: str
    samples: tuple[DriftSample, ...]


def flush_samples_of(text: bytes) -> tuple[list[DriftSample], int]:
    """The DriftSamples in one flush object's JSON lines (shared.lake.StoredRecord each), and how many lines
    were skipped (unreadable, another kind, or a sample naming another device than its line)."""
    found: list[DriftSample] = []
    skipped = 0
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            stored = lake.StoredRecord.model_validate_json(line)
        except ValidationError:
            skipped += 1
            continue
        if isinstance(stored.body, DriftSample) and stored.body.device == stored.device:
            found.append(stored.body)
        else:
            skipped += 1
    return found, skipped


def samples_of(text: bytes, device: str) -> tuple[list[DriftSample], int]:
    """The DriftSamples in one object's JSON lines (TelemetryRecord each), and how many lines were skipped
    (unreadable, another kind, or naming another device than the object's key)."""
    found: list[DriftSample] = []
    skipped = 0
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            body = TelemetryRecord.model_validate_json(line).body
        except ValidationError:
            skipped += 1
            continue
        if isinstance(body, DriftSample) and body.device == device:
            found.append(body)
        else:
            skipped += 1
    return found, skipped


def days(now: float, window_s: float) -> list[float]:
    """A time on each UTC day the window reaches (its date partition), newest first, at most MAX_DAYS."""
    times = [now - i * DAY_S for i in range(min(int(window_s // DAY_S), MAX_DAYS) + 1)] + [now - window_s]
    by_prefix: dict[str, float] = {}
    for at in times[:MAX_DAYS]:
        by_prefix.setdefault(lake.records_prefix(KIND, at), at)
    return list(by_prefix.values())


def read_order(new: dict[str, tuple[str, float]]) -> list[str]:
    """The keys to read, each device's newest first and the devices in turn (its newest of each, then its
    second newest of each, ...), so a read cut short by a cap leaves every device its latest points.

    :param new: key -> (device, or the folder of a replica's flushes; last modified) of the objects not read yet.
    :returns: the keys in the order to read them.
    """
    by_device: dict[str, list[tuple[float, str]]] = {}
    for key, (device, modified) in new.items():
        by_device.setdefault(device, []).append((modified, key))
    ranked = []
    for device, keys in by_device.items():
        for rank, (modified, key) in enumerate(sorted(keys, reverse=True)):
            ranked.append((rank, -modified, device, key))
    return [key for *_, key in sorted(ranked)]


def charts(reads: dict[str, _Read], now: float, window_s: float) -> list[DeviceCharts]:
    """Each device's series from the objects read: samples within the window, oldest first, its newest
    MAX_POINTS. A sample's device is its own (checked against its key or line when read)."""
    by_device: dict[str, dict[float, DriftSample]] = {}
    for read in reads.values():
        for sample in read.samples:
            if now - window_s <= sample.at <= now + 60:  # a minute of clock skew ahead, no more
                # a resent batch (a new epoch, or a second flush): the same sample once
                by_device.setdefault(sample.device, {})[sample.at] = sample
    out = []
    for device in sorted(by_device):
        points = sorted(by_device[device].values(), key=lambda s: s.at)[-MAX_POINTS:]
        measures = sorted({kind for s in points for kind in s.scores}, key=lambda k: list(AlertType).index(k))
        out.append(DeviceCharts(
            device=device, at=[s.at for s in points],
            scores={kind.value: [s.scores.get(kind) for s in points] for kind in measures},
            latency_p50_ms=[s.latency_p50_ms for s in points], latency_p95_ms=[s.latency_p95_ms for s in points]))
    return out


class DriftCharts:
    """What the charts show, read again on each refresh(). Not thread-safe: one reader thread owns it;
    `latest` is replaced whole, so other threads may read it at any time.

    :param s3: a boto3 S3 client (shared.s3.client).
    :param str bucket: the telemetry bucket.
    :param float window_s: how far back the charts reach.
    """

    def __init__(self, s3: S3Client, bucket: str, window_s: float) -> None:
        self.s3, self.bucket, self.window_s = s3, bucket, window_s
        self._reads: dict[str, _Read] = {}
        self.latest = ChartsSnapshot(read_at=None, window_s=window_s, devices=[], error=None, truncated=False)
        self.skipped_lines = 0

    def refresh(self, now: float | None = None, before_call: Callable[[], None] = lambda: None) -> ChartsSnapshot:
        """Lists the window's objects, reads the new ones (within the caps), and makes `latest` from them.

        :param now: the wall clock (time.time()), given by tests.
        :param before_call: called before each S3 call (the caller's liveness tick: each call is bounded).
        :returns: the new `latest`.
        :raises ClientError, BotoCoreError: unchanged; `latest` keeps what the last good refresh read.
        """
        now = time.time() if now is None else now
        listed, truncated = self._list(now, before_call)
        for gone in self._reads.keys() - listed.keys():  # out of the window, or deleted
            del self._reads[gone]
        new = read_order({key: (owner, modified) for key, (etag, modified) in listed.items()
                          if (key not in self._reads or self._reads[key].etag != etag)
                          and (owner := _owner(key)) is not None})
        budget, truncated = MAX_BYTES_PER_READ, truncated or len(new) > MAX_OBJECTS_PER_READ
        for key in new[:MAX_OBJECTS_PER_READ]:
            if budget <= 0:
                truncated = True
                break
            before_call()
            budget -= self._read(key, listed[key][0])
        self.latest = ChartsSnapshot(read_at=now, window_s=self.window_s, truncated=truncated, error=None,
                                     devices=charts(self._reads, now, self.window_s))
        return self.latest

    def failed(self, error: str) -> ChartsSnapshot:
        """Keeps the last good charts, saying why they are not newer."""
        self.latest = self.latest.model_copy(update={"error": error[:500]})
        return self.latest

    def _list(self, now: float, before_call: Callable[[], None]) -> tuple[dict[str, tuple[str, float]], bool]:
        """Key -> (ETag, last modified) of the records modified within the window, day by day and device by
        device within the caps; and whether a cap left keys unlisted."""
        found: dict[str, tuple[str, float]] = {}
        since, truncated, listed = now - self.window_s, False, 0
        for day in days(now, self.window_s):
            _, folders, cut = self._listing(lake.records_prefix(KIND, day), MAX_DEVICES_LISTED, before_call,
                                            delimiter=True)
            truncated |= cut
            for folder in folders:
                if _owner(folder) is None:
                    continue  # neither a device=<id>/ nor a flush=<replica>/ folder
                if listed >= MAX_KEYS_LISTED:
                    return found, True
                # A replica's flushes sort by time: skip those made before the window (and its slack).
                after = (folder + lake.flush_id_floor(since - FLUSH_WRITE_SLACK_S)
                         if lake.flush_of_key(folder) is not None else None)
                items, _, cut = self._listing(folder, min(MAX_KEYS_PER_DEVICE, MAX_KEYS_LISTED - listed),
                                              before_call, start_after=after)
                truncated |= cut
                listed += len(items)
                for key, etag, modified in items:
                    if modified >= since:
                        found[key] = (etag, modified)
        return found, truncated

    def _listing(self, prefix: str, cap: int, before_call: Callable[[], None], delimiter: bool = False,
                 start_after: str | None = None) -> tuple[list[tuple[str, str, float]], list[str], bool]:
        """One prefix's objects (key, ETag, last modified; those after `start_after` in key order) and, with
        `delimiter`, its folders, at most `cap` of them together; and whether the cap left some unlisted."""
        objects: list[tuple[str, str, float]] = []
        folders: list[str] = []
        token: str | None = None
        while True:
            before_call()
            request: ListObjectsV2RequestTypeDef = {
                "Bucket": self.bucket, "Prefix": prefix, "MaxKeys": min(LIST_PAGE, cap - len(objects) - len(folders))}
            if delimiter:
                request["Delimiter"] = "/"
            if start_after:
                request["StartAfter"] = start_after
            if token:
                request["ContinuationToken"] = token
            page = self.s3.list_objects_v2(**request)
            objects += [(item["Key"], item.get("ETag", ""), item["LastModified"].timestamp())
                        for item in page.get("Contents", [])]
            folders += [item["Prefix"] for item in page.get("CommonPrefixes", [])]
            if not page.get("IsTruncated"):
                return objects, folders, False
            if len(objects) + len(folders) >= cap:
                return objects, folders, True
            token = page["NextContinuationToken"]

    def _read(self, key: str, etag: str) -> int:
        """Reads one object into the cache (an unreadable one is kept empty, so it is not read again);
        returns the bytes it cost."""
        body = self.s3.get_object(Bucket=self.bucket, Key=key)["Body"]
        try:
            raw = body.read(MAX_OBJECT_BYTES + 1)
        finally:
            body.close()
        samples: list[DriftSample] = []
        try:
            if len(raw) > MAX_OBJECT_BYTES:
                raise ValueError(f"larger than {MAX_OBJECT_BYTES} bytes")
            text = codec.inflate(raw, MAX_INFLATED_BYTES, "telemetry object", gzip=True)
            device = lake.device_of_key(key)
            samples, skipped = samples_of(text, device) if device is not None else flush_samples_of(text)
            self.skipped_lines += skipped
        except ValueError as exc:
            log.warning("telemetry object skipped", extra=fields(key=key, error=str(exc)[:300]))
        self._reads[key] = _Read(etag, tuple(samples))
        return len(raw)


def _owner(key: str) -> str | None:
    """Whose objects a records key or folder holds, for fair reading: its device, or its replica's flush
    folder; None for another shape."""
    if (device := lake.device_of_key(key)) is not None:
        return device
    replica = lake.flush_of_key(key)
    return None if replica is None else f"{lake.FLUSH_FOLDER}{replica}"
