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

from pydantic import BaseModel, ConfigDict, Field

from shared.schemas import STORE_ID_PATTERN, AckRange, Gap

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
