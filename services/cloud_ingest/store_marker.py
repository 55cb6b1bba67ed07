"""The telemetry store's identity (shared.lake.StoreMarker): made once, by whichever cloud_ingest replica
first starts on an empty bucket, and read by every later one. Replicas starting together on an empty
bucket race to create it with a conditional PUT (If-None-Match: *, as AWS S3 and MinIO honour it): one
wins, the others are refused with 412 and read the winner's, so every replica acknowledges with the same
id. A marker that does not validate is never overwritten: the store's identity is the evidence the
audit rests on, so ingest refuses to start instead of making up a new one."""

from __future__ import annotations

import secrets
import time
from typing import TYPE_CHECKING

from botocore.exceptions import ClientError

from shared import lake
from shared.lake import StoreMarkerInvalid

if TYPE_CHECKING:  # boto3-stubs, a dev dependency
    from mypy_boto3_s3 import S3Client

# What S3 answers a conditional PUT that lost the race (412), or one racing another in flight (409, AWS).
_LOST_RACE = {"PreconditionFailed", "412", "ConditionalRequestConflict", "409"}
_ABSENT = {"NoSuchKey", "404"}


def claim(s3: S3Client, bucket: str) -> lake.StoreMarker:
    """The bucket's store marker: read, or created if there is none.

    :param s3: a boto3 S3 client (shared.s3.client).
    :param str bucket: the telemetry bucket (it exists).
    :returns: the marker every replica of this store agrees on.
    :raises StoreMarkerInvalid: (shared.lake's, a ValueError) the object at lake.STORE_MARKER is not a
        StoreMarker, or cannot be read back once written.
    :raises ClientError, BotoCoreError: the store did not answer as S3 does (for the caller to report).
    """
    marker = lake.read_store_marker(s3, bucket)
    if marker is not None:
        return marker
    mine = lake.StoreMarker(store=secrets.token_hex(16), created_at=time.time())
    try:
        s3.put_object(Bucket=bucket, Key=lake.STORE_MARKER, Body=mine.model_dump_json().encode(),
                      ContentType="application/json", IfNoneMatch="*")
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") not in _LOST_RACE:
            raise
    # Ours, or another replica's written between our read and our PUT. Read back even when ours was
    # taken: a store that ignores the condition keeps the last writer's, and that is the one to use.
    marker = lake.read_store_marker(s3, bucket)
    if marker is None:
        raise StoreMarkerInvalid(f"s3://{bucket}/{lake.STORE_MARKER} was written but cannot be read back")
    return marker
