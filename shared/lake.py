"""The telemetry layout in S3, written by cloud_ingest and read by `edgefleet telemetry audit`:

    telemetry/<kind>/date=<YYYY-MM-DD>/device=<device>/<batch>.jsonl.gz   the records, one JSON per line
    telemetry/_batches/device=<device>/<batch>.json                       the batch's index: its sequence
                                                                          numbers and gaps (written last)
    telemetry/_dead_letter/date=<YYYY-MM-DD>/device=<device>/<sha256>.bin  a payload that did not validate
    telemetry/_dead_letter/date=<YYYY-MM-DD>/device=<device>/<sha256>.json   and why
    telemetry/_store.json                                                 the store's identity (StoreMarker)

<batch> is the outbox's epoch and the batch's first and last sequence number (`<epoch>-<first>-<last>`).
A batch sent again has the same epoch and numbers, so the same keys: a replay overwrites, it never
duplicates. A lost, recreated or repaired outbox has a new epoch and its numbers start again, so it
can never overwrite an object an earlier epoch wrote. The date is the first record's, so a replay
lands in the same partition.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from shared.errors import EdgefleetError
from shared.schemas import STORE_ID_PATTERN, AckRange, Gap

if TYPE_CHECKING:  # boto3-stubs, a dev dependency
    from mypy_boto3_s3 import S3Client

ROOT = "telemetry"
BATCHES = f"{ROOT}/_batches"
DEAD_LETTER = f"{ROOT}/_dead_letter"
# Made once, by the first cloud_ingest to start on an empty bucket (a conditional PUT, so replicas
# starting together agree on one), and never rewritten: the store's identity for as long as it exists.
STORE_MARKER = f"{ROOT}/_store.json"


def _date(at: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(at))


def records_key(kind: str, at: float, device: str, batch_id: str) -> str:
    """The key of one batch's records of one kind; `at` (the batch's first record's time) picks the date."""
    return f"{ROOT}/{kind}/date={_date(at)}/device={device}/{batch_id}.jsonl.gz"


def records_prefix(kind: str, at: float) -> str:
    """The prefix of every device's records of one kind on the date of `at` (what a reader lists)."""
    return f"{ROOT}/{kind}/date={_date(at)}/"


def device_of_key(key: str) -> str | None:
    """The device a records key (records_key) names, or None for a key of another shape."""
    parts = key.split("/")
    return parts[3][len("device="):] if len(parts) == 5 and parts[3].startswith("device=") else None


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


class StoreMarker(BaseModel):
    """The telemetry store's identity. Every acknowledgement names it (TelemetryAck.store), devices send
    back which store acknowledged which of their records (AckRange), and the audit tells by it what an earlier
    store acknowledged (sent before this store existed) from what this one lost."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    store: str = Field(pattern=STORE_ID_PATTERN)
    created_at: float


class BatchIndexInvalid(EdgefleetError, ValueError):
    """An object under BATCHES/ is not a BatchIndex (the text names its key)."""


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
