"""Drift scores and latency over time, per device, from the S3 telemetry: the DriftSample records that
cloud_ingest writes under telemetry/drift/date=<day>/device=<device>/<batch>.jsonl.gz (shared.lake).

Read bounded, since the store holds the whole fleet's history: only the days the window reaches are
listed (at most MAX_KEYS_LISTED keys), only objects modified within the window are read, newest first, at
most MAX_OBJECTS_PER_READ and MAX_BYTES_PER_READ a refresh (the rest waits for the next one), each object
at most MAX_OBJECT_BYTES compressed and MAX_INFLATED_BYTES inflated (checked before it is all inflated),
and each device's chart keeps its newest MAX_POINTS samples. An object once read is kept by its ETag (a
replayed batch overwrites its object with the same content), so a refresh reads only what is new."""

from __future__ import annotations

import logging
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pydantic import ValidationError

from services.console.snapshot import ChartsSnapshot, DeviceCharts
from shared import lake
from shared.logs import fields
from shared.schemas import AlertType, DriftSample, TelemetryRecord

if TYPE_CHECKING:  # boto3-stubs, a dev dependency
    from mypy_boto3_s3 import S3Client

log = logging.getLogger(__name__)

KIND = "drift"  # DriftSample.kind: the records' folder in the lake
MAX_KEYS_LISTED = 5000
MAX_OBJECTS_PER_READ = 200
MAX_BYTES_PER_READ = 16 << 20
MAX_OBJECT_BYTES = 1 << 20
MAX_INFLATED_BYTES = 8 << 20
MAX_POINTS = 720  # a sample a minute for half a day, or every 5 s for an hour
DAY_S = 86400.0
MAX_DAYS = 31  # date partitions listed, however long the window


@dataclass(frozen=True)
class _Read:
    etag: str
    samples: tuple[DriftSample, ...]


def inflate(body: bytes, limit: int = MAX_INFLATED_BYTES) -> bytes:
    """A gzip object's content, refused past `limit` bytes before the rest is inflated.

    :raises ValueError: not gzip, or it inflates past the limit.
    """
    inflater = zlib.decompressobj(wbits=31)  # 31: gzip's header and trailer
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise ValueError(f"not gzip: {exc}") from None
    if len(out) > limit or inflater.unconsumed_tail:
        raise ValueError(f"inflates past {limit} bytes")
    return out


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


def charts(reads: dict[str, _Read], devices: dict[str, str], now: float, window_s: float) -> list[DeviceCharts]:
    """Each device's series from the objects read: samples within the window, oldest first, its newest
    MAX_POINTS; `devices` maps each key to the device its key names."""
    by_device: dict[str, dict[float, DriftSample]] = {}
    for key, read in reads.items():
        series = by_device.setdefault(devices[key], {})
        for sample in read.samples:
            if now - window_s <= sample.at <= now + 60:  # a minute of clock skew ahead, no more
                series[sample.at] = sample  # a resent batch in a new epoch: the same sample once
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
        self._devices: dict[str, str] = {}
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
        listed = self._list(now, before_call)
        for gone in self._reads.keys() - listed.keys():  # out of the window, or deleted
            del self._reads[gone]
            self._devices.pop(gone, None)
        new = sorted((k for k, (etag, _) in listed.items() if k not in self._reads or self._reads[k].etag != etag),
                     key=lambda k: listed[k][1], reverse=True)
        budget, truncated = MAX_BYTES_PER_READ, len(new) > MAX_OBJECTS_PER_READ
        for key in new[:MAX_OBJECTS_PER_READ]:
            if budget <= 0:
                truncated = True
                break
            device = lake.device_of_key(key)
            if device is None:
                continue
            before_call()
            budget -= self._read(key, device, listed[key][0])
        self.latest = ChartsSnapshot(read_at=now, window_s=self.window_s, truncated=truncated, error=None,
                                     devices=charts(self._reads, self._devices, now, self.window_s))
        return self.latest

    def failed(self, error: str) -> ChartsSnapshot:
        """Keeps the last good charts, saying why they are not newer."""
        self.latest = self.latest.model_copy(update={"error": error[:500]})
        return self.latest

    def _list(self, now: float, before_call: Callable[[], None]) -> dict[str, tuple[str, float]]:
        """Key -> (ETag, last modified) of the records modified within the window, at most MAX_KEYS_LISTED."""
        found: dict[str, tuple[str, float]] = {}
        since = now - self.window_s
        for day in days(now, self.window_s):
            if len(found) >= MAX_KEYS_LISTED:
                break
            pages = self.s3.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=lake.records_prefix(KIND, day),
                PaginationConfig={"MaxItems": MAX_KEYS_LISTED - len(found), "PageSize": 1000})
            before_call()
            for page in pages:
                for item in page.get("Contents", []):
                    if item["LastModified"].timestamp() >= since:
                        found[item["Key"]] = (item.get("ETag", ""), item["LastModified"].timestamp())
                before_call()
        return found

    def _read(self, key: str, device: str, etag: str) -> int:
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
            samples, skipped = samples_of(inflate(raw), device)
            self.skipped_lines += skipped
        except ValueError as exc:
            log.warning("telemetry object skipped", extra=fields(key=key, error=str(exc)[:300]))
        self._reads[key] = _Read(etag, tuple(samples))
        self._devices[key] = device
        return len(raw)
