"""Writes one flush to S3 (shared.lake's flush layout): the records of all its batches by kind (drift
samples under telemetry/drift/...) as gzipped JSON lines, one StoredRecord each, then the flush index that
marks every batch in it complete, with each device's acknowledgement ranges for the audit. A retry writes
the same keys (the flush's id is fixed when it is sealed); a dead letter is kept per payload, named by
its SHA-256."""

from __future__ import annotations

import gzip
import hashlib
import json
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from services.cloud_ingest.flush import Flush
from shared import lake

if TYPE_CHECKING:  # boto3-stubs, a dev dependency
    from mypy_boto3_s3 import S3Client


def write_flush(s3: S3Client, bucket: str, replica: str, flush: Flush,
                before_put: Callable[[], None] = lambda: None) -> lake.FlushIndex:
    """Writes the flush's records objects, then its index.

    :param s3: a boto3 S3 client (shared.s3.client).
    :param str bucket: the telemetry bucket.
    :param str replica: the writing replica's id (its records' folder).
    :param Flush flush: a sealed flush (its flush_id given).
    :param before_put: called before each S3 write (the caller's liveness tick: each write is bounded).
    :returns: the index written.
    :raises ClientError, BotoCoreError: unchanged, for the caller to retry (the same keys again).
    """
    by_kind: dict[str, list[bytes]] = {}
    for entry in flush.batches.values():
        for kind, lines in entry.lines.items():
            by_kind.setdefault(kind, []).extend(lines)
    objects: dict[str, str] = {}
    for kind, lines in sorted(by_kind.items()):
        key = lake.flush_records_key(kind, replica, flush.flush_id)
        # mtime=0: a retry writes the same bytes.
        body = gzip.compress(b"\n".join(lines) + b"\n", compresslevel=6, mtime=0)
        before_put()
        s3.put_object(Bucket=bucket, Key=key, Body=body, ContentType="application/x-ndjson", ContentEncoding="gzip")
        objects[kind] = key
    stored_at = time.time()
    index = lake.FlushIndex(flush_id=flush.flush_id, replica=replica, stored_at=stored_at, batches=[
        entry.index.model_copy(update={"stored_at": stored_at, "objects": [objects[k] for k in sorted(entry.lines)]})
        for entry in flush.batches.values()])
    before_put()
    s3.put_object(Bucket=bucket, Key=lake.flush_index_key(flush.flush_id), Body=index.model_dump_json().encode(),
                  ContentType="application/json")
    return index


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
