"""The S3 client every part builds from its settings, so timeouts and retries are the same everywhere."""

from __future__ import annotations

from typing import TYPE_CHECKING

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

from shared.config import StoreSettings

if TYPE_CHECKING:  # the S3 client's types come from boto3-stubs (a dev dependency); images run without them
    from mypy_boto3_s3 import S3Client

ATTEMPTS, TIMEOUT_S = 3, 10.0
MAX_BACKOFF_S = 20.0  # botocore's standard retry mode never waits longer than this between attempts


def client(settings: StoreSettings, attempts: int = ATTEMPTS, timeout_s: float = TIMEOUT_S,
           max_pool_connections: int = 10) -> S3Client:
    """A boto3 S3 client for the store the settings name (settings.s3: endpoint, region, keys).

    :param StoreSettings settings: the service's settings.
    :param int attempts: botocore's max_attempts (standard retry mode); 1 for a caller that retries by
        itself (sync: its downloads resume).
    :param float timeout_s: the connect and the read timeout of each attempt.
    :param int max_pool_connections: HTTP connections kept open (botocore's default is 10); a client
        many threads share (the simulator's devices) needs one per concurrent request.

    Returns the client; it makes no request yet.
    """
    secret = settings.s3.secret_access_key.get_secret_value() if settings.s3.secret_access_key else None
    return boto3.client(
        "s3",
        endpoint_url=settings.s3.endpoint_url,
        region_name=settings.s3.region,
        aws_access_key_id=settings.s3.access_key_id,
        aws_secret_access_key=secret,
        config=Config(
            connect_timeout=timeout_s, read_timeout=timeout_s, max_pool_connections=max_pool_connections,
            retries={"max_attempts": attempts, "mode": "standard"},
            s3={"addressing_style": "path"},  # MinIO and other self-hosted stores have no per-bucket DNS names
        ),
    )


def ensure_bucket(s3: S3Client, bucket: str) -> None:
    """Create the bucket unless it exists.

    :raises ClientError, BotoCoreError: unchanged, for any answer but "no such bucket" (access denied,
        the store unreachable).
    """
    try:
        s3.head_bucket(Bucket=bucket)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket"):
            raise
        s3.create_bucket(Bucket=bucket)


def call_bound_s(attempts: int = ATTEMPTS, timeout_s: float = TIMEOUT_S) -> float:
    """The longest one call of a client() built with these may take while the store answers nothing:
    each attempt's connect and read timeouts, and the backoff between attempts. What a caller announces
    to its liveness watch (shared.lifecycle.Progress.tick) before the call."""
    return attempts * 2 * timeout_s + (attempts - 1) * MAX_BACKOFF_S
