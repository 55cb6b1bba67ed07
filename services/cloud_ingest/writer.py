"""Writes one validated batch to S3 (shared.lake's layout): the records by kind (drift samples under
telemetry/drift/...) as gzipped JSON lines, then the batch index that marks it complete, with the
device's acknowledgement ranges for the audit. Idempotent: the keys come from the batch's sequence
numbers and the outbox's epoch, so a replay overwrites the same objects with the same content and a new
epoch never touches an older one's."""

from __future__ import annotations

import gzip
import hashlib
import json
import time
from collections import defaultdict
from collections.abc import Callable
from typing import TYPE_CHECKING

from shared import lake
from shared.schemas import Gap, TelemetryBatch

if TYPE_CHECKING:  # boto3-stubs, a dev dependency
    from mypy_boto3_s3 import S3Client


def write_batch(s3: S3Client, bucket: str, batch: TelemetryBatch, before_put: Callable[[], None] = lambda: None) -> int:
    """Writes the batch's objects, then its index; returns how many records it stored.

    :param s3: a boto3 S3 client (shared.s3.client).
    :param str bucket: the telemetry bucket.
    :param TelemetryBatch batch: a validated batch.
    :param before_put: called before each S3 write (the caller's liveness tick: each write is bounded).
    :raises ClientError, BotoCoreError: unchanged, for the caller to retry (the keys make a retry safe).
    """
    by_kind: dict[str, list[str]] = defaultdict(list)
    for record in batch.records:
        by_kind[record.body.kind].append(record.model_dump_json())
    first_at = batch.records[0].body.at
    objects = []
    for kind, lines in sorted(by_kind.items()):
        key = lake.records_key(kind, first_at, batch.device, batch.batch_id)
        # mtime=0: the same batch compresses to the same bytes, so a replay writes identical objects.
        body = gzip.compress(("\n".join(lines) + "\n").encode(), mtime=0)
        before_put()
        s3.put_object(Bucket=bucket, Key=key, Body=body, ContentType="application/x-ndjson", ContentEncoding="gzip")
        objects.append(key)
    index = lake.BatchIndex(
        device=batch.device, batch_id=batch.batch_id, epoch=batch.epoch, seqs=[r.seq for r in batch.records],
        kinds={k: len(v) for k, v in by_kind.items()},
        gaps=[r.body for r in batch.records if isinstance(r.body, Gap)], objects=objects, stored_at=time.time(),
        acknowledged=batch.acknowledged,
    )
    before_put()
    s3.put_object(Bucket=bucket, Key=lake.index_key(batch.device, batch.batch_id),
                  Body=index.model_dump_json().encode(), ContentType="application/json")
    return len(batch.records)


def dead_letter(s3: S3Client, bucket: str, device: str, payload: bytes, reason: str) -> str:
    """Keeps a payload that did not validate, and why, under the dead-letter prefix (named by its SHA-256,
    so the same payload sent again lands on the same keys).

    :param bytes payload: the payload as it came off the wire.
    :param str reason: why it was refused (the DecodeError's text).
    :returns: the key of the reason's object.
    :raises ClientError, BotoCoreError: unchanged, for the caller to retry.
    """
    digest = hashlib.sha256(payload).hexdigest()
    now = time.time()
    s3.put_object(Bucket=bucket, Key=lake.dead_letter_key(now, device, digest, "bin"), Body=payload)
    key = lake.dead_letter_key(now, device, digest, "json")
    s3.put_object(Bucket=bucket, Key=key, Body=json.dumps({"device": device, "reason": reason, "at": now}).encode(),
                  ContentType="application/json")
    return key
