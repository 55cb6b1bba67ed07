"""The telemetry layout in S3, written by cloud_ingest and read by `edgefleet telemetry audit` and the
console's charts. cloud_ingest writes flushes: each replica gathers the batches of many devices for up
to a second and writes them as one object per record kind and one flush index:

    telemetry/<kind>/date=<YYYY-MM-DD>/flush=<replica>/<flush id>.jsonl.gz  the records, one StoredRecord
                                                                          (device, epoch, seq, body) per line
    telemetry/_flushes/date=<YYYY-MM-DD>/<flush id>.json                  the flush's index (FlushIndex: each
                                                                          batch's BatchIndex; written last)

Why: a PUT per device batch costs what it carries not. This machine's S3 (moto) takes ~300 PUT/s with
all cores, so 1,000 devices cannot be stored at 2+ PUTs per batch; and at fleet scale S3 bills by request
(one PUT per batch is ~2.6 billion PUTs a month for 1,000 devices at a batch a second). A flush costs
kinds + 1 PUTs, however many batches it holds.

<flush id> is the flush's time (milliseconds, 13 digits, so keys sort by time and a reader can list
from the start of its window) and a random part; the date is the flush's own (its id's time), not a
record's: one device's clock cannot move the others' records into another partition. A batch sent
again after a lost acknowledgement may land in a second flush (the replica that stored it first
acknowledges a repeat without writing it while it remembers it): readers count a batch once by
(device, batch id); a second copy is harmless.

A flush's records object counts only where a flush index names it (FlushIndex.batches[].objects): a
replica stopped between its records and its index leaves records no index names, and their batches,
never acknowledged, are stored again in a later flush. A reader of records objects (the charts) may
therefore see a record twice; its key there is (device, epoch, seq), as a StoredRecord line names no
batch. The audit reads indexes only.

The layout written before flushes, still read by every reader (a store keeps it for as long as it holds
those objects):

    telemetry/<kind>/date=<YYYY-MM-DD>/device=<device>/<batch>.jsonl.gz   the records, one TelemetryRecord per line
    telemetry/_batches/device=<device>/<batch>.json                       the batch's index (written last)

and, in both:

    telemetry/_dead_letter/date=<YYYY-MM-DD>/device=<device>/<sha256>.bin  a payload that did not validate
    telemetry/_dead_letter/date=<YYYY-MM-DD>/device=<device>/<sha256>.json   and why
    telemetry/_store.json                                                 the store's identity (StoreMarker)

<batch> (a batch id) is the outbox's epoch and the batch's first and last sequence number
(`<epoch>-<first>-<last>`): a batch sent again has the same id. A lost, recreated or repaired outbox has
a new epoch and its numbers start again, so its batches never share an id with an earlier epoch's.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from shared.errors import EdgefleetError
from shared.schemas import STORE_ID_PATTERN, AckRange, Gap, RecordBody

if TYPE_CHECKING:  # boto3-stubs, a dev dependency
    from mypy_boto3_s3 import S3Client

ROOT = "telemetry"
BATCHES = f"{ROOT}/_batches"  # the per-batch layout's indexes (written before flushes; still read)
FLUSHES = f"{ROOT}/_flushes"
FLUSH_FOLDER = "flush="  # a flush's records folder under a date: flush=<replica>/, never device=<id>/
DEAD_LETTER = f"{ROOT}/_dead_letter"
# Made once, by the first cloud_ingest to start on an empty bucket (a conditional PUT, so replicas
# starting together agree on one), and never rewritten: the store's identity for as long as it exists.
STORE_MARKER = f"{ROOT}/_store.json"


def _date(at: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(at))


def records_key(kind: str, at: float, device: str, batch_id: str) -> str:
    """The per-batch layout (written before flushes, still read): the key of one batch's records of one kind;
    `at` (the batch's first record's time) picks the date."""
    return f"{ROOT}/{kind}/date={_date(at)}/device={device}/{batch_id}.jsonl.gz"


def records_prefix(kind: str, at: float) -> str:
    """The prefix of every device's records of one kind on the date of `at` (what a reader lists)."""
    return f"{ROOT}/{kind}/date={_date(at)}/"


def device_of_key(key: str) -> str | None:
    """The device a records key (records_key) or its folder names, or None for a key of another shape
    (a flush's records, flush_records_key, hold many devices' and name none)."""
    parts = key.split("/")
    return parts[3][len("device="):] if len(parts) == 5 and parts[3].startswith("device=") else None


def flush_id(at: float, token: str) -> str:
    """A flush's id: its time `at` in milliseconds (13 digits: ids sort by time) and a random `token`."""
    return f"{int(at * 1000):013d}-{token}"


def flush_id_floor(at: float) -> str:
    """What every flush id made at or after `at` sorts after (a listing's StartAfter, within a folder)."""
    return f"{max(0, int(at * 1000) - 1):013d}"


def flush_at(flush: str) -> float:
    """The time a flush id (flush_id) was made, in seconds."""
    return int(flush.split("-", 1)[0]) / 1000


def flush_records_key(kind: str, replica: str, flush: str) -> str:
    """The key of one flush's records of one kind; the flush id's time picks the date."""
    return f"{ROOT}/{kind}/date={_date(flush_at(flush))}/{FLUSH_FOLDER}{replica}/{flush}.jsonl.gz"


def flush_of_key(key: str) -> str | None:
    """The replica a flush's records key (flush_records_key) or its folder names, or None for another shape."""
    parts = key.split("/")
    return parts[3][len(FLUSH_FOLDER):] if len(parts) == 5 and parts[3].startswith(FLUSH_FOLDER) else None


def flush_index_key(flush: str) -> str:
    """The key of a flush's index (FlushIndex), written after its records."""
    return f"{FLUSHES}/date={_date(flush_at(flush))}/{flush}.json"


def index_key(device: str, batch_id: str) -> str:
    """The key of a batch's index (BatchIndex), written after its records."""
    return f"{BATCHES}/device={device}/{batch_id}.json"


def dead_letter_key(at: float, device: str, digest: str, suffix: str) -> str:
    """The key of a refused payload ("bin") or of why it was refused ("json"), by its SHA-256 `digest`."""
    return f"{DEAD_LETTER}/date={_date(at)}/device={device}/{digest}.{suffix}"


class BatchIndex(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    device: str
    batch_id: str
    epoch: str
    seqs: list[int]
    kinds: dict[str, int]
    gaps: list[Gap]
    objects: list[str]
    stored_at: float
    # The acknowledgement ranges the device sent with the batch (TelemetryBatch.acknowledged).
    acknowledged: list[AckRange] = []


class StoredRecord(BaseModel):
    """One line of a flush's records object: a record with the device and outbox epoch it came from (a
    flush holds many devices' records, so the key cannot say whose they are)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    device: str
    epoch: str
    seq: int
    body: RecordBody


class FlushIndex(BaseModel):
    """A flush's index, written after its records: each batch it holds, as the per-batch layout's index
    said it (its `objects` are the flush's records keys). Present means every batch in it is stored."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    flush_id: str
    replica: str
    stored_at: float
    batches: list[BatchIndex]


class StoreMarker(BaseModel):
    """The telemetry store's identity. Every acknowledgement names it (TelemetryAck.store), devices send
    back which store acknowledged which of their records (AckRange), and the audit tells by it what an earlier
    store acknowledged (sent before this store existed) from what this one lost."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    store: str = Field(pattern=STORE_ID_PATTERN)
    created_at: float


class BatchIndexInvalid(EdgefleetError, ValueError):
    """An object under BATCHES/ is not a BatchIndex, or one under FLUSHES/ not a FlushIndex (the text names
    its key)."""


def read_batch_index(body: bytes, where: str) -> BatchIndex:
    """A batch index as stored.

    :param bytes body: the object's bytes.
    :param str where: its key (or s3:// address), for the error.
    :raises BatchIndexInvalid: the bytes are not a BatchIndex.
    """
    try:
        return BatchIndex.model_validate_json(body)
    except ValidationError as exc:
        raise BatchIndexInvalid(f"{where} is not a batch index: {str(exc)[:300]}") from exc


def read_flush_index(body: bytes, where: str) -> FlushIndex:
    """A flush index as stored.

    :param bytes body: the object's bytes.
    :param str where: its key (or s3:// address), for the error.
    :raises BatchIndexInvalid: the bytes are not a FlushIndex.
    """
    try:
        return FlushIndex.model_validate_json(body)
    except ValidationError as exc:
        raise BatchIndexInvalid(f"{where} is not a flush index: {str(exc)[:300]}") from exc


class StoreMarkerInvalid(EdgefleetError, ValueError):
    """The object at STORE_MARKER is not a StoreMarker. It is evidence the audit rests on: never
    overwritten, never read as absent."""


def read_store_marker(s3: S3Client, bucket: str) -> StoreMarker | None:
    """The bucket's store marker, as cloud_ingest and `edgefleet telemetry audit` both read it.

    :param s3: a boto3 S3 client (shared.s3.client).
    :param str bucket: the telemetry bucket.
    :returns: the marker; None only when there is no object at STORE_MARKER (a store older than store
        ids, or one no ingest has started on yet).
    :raises StoreMarkerInvalid: the object is there and is not a StoreMarker (the text names its key).
    :raises botocore.exceptions.ClientError, BotoCoreError: any other answer, or none, from the store.
    """
    from botocore.exceptions import ClientError  # here: a device's services import this module without S3

    try:
        body = s3.get_object(Bucket=bucket, Key=STORE_MARKER)["Body"].read()
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
            return None
        raise
    try:
        return StoreMarker.model_validate_json(body)
    except ValidationError as exc:
        raise StoreMarkerInvalid(f"s3://{bucket}/{STORE_MARKER} is not a store marker; it is kept as it is "
                                 f"(move it aside only if this bucket is to count as a new store): "
                                 f"{str(exc)[:300]}") from exc
