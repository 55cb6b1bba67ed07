"""Drift scores and latency over time, per device, from the S3 telemetry: the DriftSample records that
cloud_ingest writes in both of shared.lake's layouts: flushes, under
telemetry/drift/date=<day>/flush=<replica>/<flush id>.jsonl.gz (many devices' records, each line naming
its device), and, written before flushes, per batch under telemetry/drift/date=<day>/device=<device>/.

Read bounded, since the store holds the whole fleet's history: only the days the window reaches are
listed, each day folder by folder (its device=<id>/ and flush=<replica>/ folders from a delimiter
listing, at most MAX_DEVICES_LISTED; then each folder's keys, at most MAX_KEYS_PER_DEVICE, and
MAX_KEYS_LISTED in all; a flush folder listed only from its flushes made within the window, as flush ids
sort by time), so one chatty device or replica cannot hide the others' objects behind its own in key
order. A flush id is its replica's clock: each flush folder's offset from S3's (LastModified less the id's
time, probed once with the folder's first key, then kept up to date from each listing) moves the listing's
start back by as much, so a replica whose clock is behind is not skipped. Where a flush folder holds more
of the window's flushes than its cap, it is listed on (jumping ahead at the rate seen) and its newest are
kept, not its oldest. Only objects modified within the window are read, each device's newest first and the
devices in turn, at most MAX_OBJECTS_PER_READ and MAX_BYTES_PER_READ a refresh (the rest waits for the next
one). A device's object is read whole, at most MAX_OBJECT_BYTES compressed and MAX_INFLATED_BYTES inflated
(checked before it is all inflated); a flush's object holds many devices' samples, so it is read line by
line as it inflates (MAX_FLUSH_OBJECT_BYTES compressed, MAX_FLUSH_INFLATED_BYTES inflated, lines over
MAX_LINE_BYTES skipped, each device's newest MAX_POINTS kept): one device's large batch costs its own
samples, not the others'. Each device's chart keeps its newest MAX_POINTS samples. A cap reached sets the
snapshot's `truncated`.
An object once read is kept by its ETag (a replayed batch overwrites its object with the same content),
so a refresh reads only what is new; a sample stored twice (a batch sent again, in a second flush) is
charted once."""

from __future__ import annotations

import gzip
import logging
import time
import zlib
from collections.abc import Callable, Iterator
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
MAX_FLUSH_OBJECT_BYTES = MAX_BYTES_PER_READ
# Above what a flush holds with the default ingest settings (32 MiB, plus one batch of at most 16 MiB); read as it
# inflates, so memory is the samples kept, not this.
MAX_FLUSH_INFLATED_BYTES = 64 << 20
MAX_LINE_BYTES = 64 << 10  # a drift sample's line is well under 1 KiB
MAX_RELISTS = 10  # further listings of one flush folder a refresh, to reach its newest flushes
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


def flush_samples_of(lines: Iterator[bytes]) -> tuple[list[DriftSample], int]:
    """The DriftSamples in one flush object's JSON lines (shared.lake.StoredRecord each), each device's newest
    MAX_POINTS, and how many lines were skipped (unreadable, another kind, a sample naming another device than
    its line, or a device's beyond its MAX_POINTS).

    :param lines: the object's lines as they inflate (flush_lines), each at most MAX_LINE_BYTES.
    """
    by_device: dict[str, list[DriftSample]] = {}
    skipped = 0
    for line in lines:
        if not line.strip():
            continue
        try:
            stored = lake.StoredRecord.model_validate_json(line)
        except ValidationError:
            skipped += 1
            continue
        if not (isinstance(stored.body, DriftSample) and stored.body.device == stored.device):
            skipped += 1
            continue
        kept = by_device.setdefault(stored.device, [])
        kept.append(stored.body)
        if len(kept) >= 2 * MAX_POINTS:  # trimmed now and then: memory stays ~2 x MAX_POINTS a device
            kept.sort(key=lambda s: s.at)
            skipped += len(kept) - MAX_POINTS
            del kept[:-MAX_POINTS]
    found: list[DriftSample] = []
    for kept in by_device.values():
        kept.sort(key=lambda s: s.at)
        skipped += max(0, len(kept) - MAX_POINTS)
        found += kept[-MAX_POINTS:]
    return found, skipped


class _Capped:
    """A stream that ends (reads b"") after `cap` bytes: what gzip reads of an S3 body."""

    def __init__(self, body, cap: int) -> None:  # type: ignore[no-untyped-def]  # botocore's StreamingBody
        self.body, self.left, self.read_bytes = body, cap, 0

    def read(self, size: int = -1) -> bytes:
        size = self.left if size < 0 else min(size, self.left)
        chunk: bytes = self.body.read(size) if size > 0 else b""
        self.left -= len(chunk)
        self.read_bytes += len(chunk)
        return chunk

    def seek(self, offset: int) -> int:
        raise OSError("an S3 body is read once, forwards")  # gzip seeks only to rewind, which is never asked


def flush_lines(stream: _Capped, cut: list[str]) -> Iterator[bytes]:
    """A gzipped flush object's lines as it inflates, at most MAX_FLUSH_INFLATED_BYTES in all; a line over
    MAX_LINE_BYTES is skipped whole. Where the object ends early (its compressed cap reached, damaged) or the
    inflated cap is reached, the lines so far are given and `cut` gets why."""
    inflated = 0
    try:
        with gzip.GzipFile(fileobj=stream, mode="rb") as text:
            while inflated < MAX_FLUSH_INFLATED_BYTES:
                line = text.readline(MAX_LINE_BYTES + 1)
                if not line:
                    return
                inflated += len(line)
                if len(line) <= MAX_LINE_BYTES:
                    yield line
                    continue
                while line and not line.endswith(b"\n") and inflated < MAX_FLUSH_INFLATED_BYTES:
                    line = text.readline(MAX_LINE_BYTES + 1)  # the rest of the long line, dropped
                    inflated += len(line)
            cut.append(f"more than {MAX_FLUSH_INFLATED_BYTES} bytes inflated")
    except (OSError, EOFError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
        cut.append(f"unreadable after {inflated} bytes inflated: {exc}")


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
        self._offsets: dict[str, float] = {}  # flush folder -> S3's clock less its replica's (seconds)
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
                cap = min(MAX_KEYS_PER_DEVICE, MAX_KEYS_LISTED - listed)
                if lake.flush_of_key(folder) is not None:
                    items, cut, count = self._flush_listing(folder, now, since, cap, before_call)
                else:
                    items, _, cut = self._listing(folder, cap, before_call)
                    count = len(items)
                truncated |= cut
                listed += count
                for key, etag, modified in items:
                    if modified >= since:
                        found[key] = (etag, modified)
        return found, truncated

    def _flush_listing(self, folder: str, now: float, since: float, cap: int,
                       before_call: Callable[[], None]) -> tuple[list[tuple[str, str, float]], bool, int]:
        """A replica's flushes (key, ETag, last modified) made within the window, its newest `cap`; whether some
        of the window's were left out; and how many keys were listed in all.

        A replica's flushes sort by time: listed from the window's start less the write slack and the
        replica's clock offset (as last seen). Where that finds none, the folder's first key tells the offset;
        where the offset found is more than the slack beyond the one listed with, listed again with it."""
        offset, listed = self._offsets.get(folder, 0.0), 0
        for _ in range(2):
            kept, cut, count = self._flushes_from(folder, now - offset, since - FLUSH_WRITE_SLACK_S - max(0.0, offset),
                                                  cap, before_call)
            listed += count
            if not kept:
                first, _, _ = self._listing(folder, 1, before_call)
                listed += len(first)
                kept_offset = _offset(first)
            else:
                kept_offset = _offset(kept)
            self._offsets[folder] = kept_offset
            if kept_offset <= max(0.0, offset) + FLUSH_WRITE_SLACK_S:
                break
            offset = kept_offset
        return kept, cut, listed

    def _flushes_from(self, folder: str, replica_now: float, start: float, cap: int,
                      before_call: Callable[[], None]) -> tuple[list[tuple[str, str, float]], bool, int]:
        """A replica's flushes made from `start` on (its clock), its newest `cap`: where the cap cuts a listing
        short, listed on from later flushes (jumping ahead by the rate seen so far), keeping the newest."""
        kept: dict[str, tuple[str, str, float]] = {}
        listed = 0
        for attempt in range(MAX_RELISTS + 1):
            items, _, cut = self._listing(folder, cap, before_call, start_after=folder + lake.flush_id_floor(start))
            listed += len(items)
            kept.update((item[0], item) for item in items)
            kept = {key: kept[key] for key in sorted(kept)[-cap:]}  # keys sort by time: the newest
            if not cut or attempt == MAX_RELISTS:
                break
            last = lake.flush_at(items[-1][0].rsplit("/", 1)[-1])
            # `cap` flushes took (last - start) seconds: the newest `cap` began about that long before now.
            start = max(last, replica_now - 0.9 * (last - start))
        return list(kept.values()), attempt > 0 or cut, listed

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
        if lake.device_of_key(key) is None:
            return self._read_flush(key, etag, body)
        try:
            raw = body.read(MAX_OBJECT_BYTES + 1)
        finally:
            body.close()
        samples: list[DriftSample] = []
        try:
            if len(raw) > MAX_OBJECT_BYTES:
                raise ValueError(f"larger than {MAX_OBJECT_BYTES} bytes")
            text = codec.inflate(raw, MAX_INFLATED_BYTES, "telemetry object", gzip=True)
            samples, skipped = samples_of(text, lake.device_of_key(key) or "")
            self.skipped_lines += skipped
        except ValueError as exc:
            log.warning("telemetry object skipped", extra=fields(key=key, error=str(exc)[:300]))
        self._reads[key] = _Read(etag, tuple(samples))
        return len(raw)


    def _read_flush(self, key: str, etag: str, body) -> int:  # type: ignore[no-untyped-def]  # StreamingBody
        """Reads one flush object line by line into the cache (what was read before a cap or damage is kept);
        returns the bytes it cost."""
        stream, cut = _Capped(body, MAX_FLUSH_OBJECT_BYTES), list[str]()
        try:
            samples, skipped = flush_samples_of(flush_lines(stream, cut))
        finally:
            body.close()
        self.skipped_lines += skipped
        if cut:
            log.warning("telemetry flush read in part", extra=fields(key=key, error=cut[0][:300]))
        self._reads[key] = _Read(etag, tuple(samples))
        return stream.read_bytes


def _offset(items: list[tuple[str, str, float]]) -> float:
    """How far a replica's clock is behind S3's, from its flushes listed (key, ETag, last modified): the least of
    LastModified less the flush id's time (a write follows its id's time; the quickest says the clocks' gap)."""
    return min((modified - lake.flush_at(key.rsplit("/", 1)[-1]) for key, _, modified in items), default=0.0)


def _owner(key: str) -> str | None:
    """Whose objects a records key or folder holds, for fair reading: its device, or its replica's flush
    folder; None for another shape."""
    if (device := lake.device_of_key(key)) is not None:
        return device
    replica = lake.flush_of_key(key)
    return None if replica is None else f"{lake.FLUSH_FOLDER}{replica}"
