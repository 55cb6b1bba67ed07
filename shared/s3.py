"""The S3 client every part builds from its settings, so timeouts and retries are the same everywhere."""

from __future__ import annotations

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

from shared.config import StoreSettings


def client(settings: StoreSettings, attempts: int = 3, timeout_s: float = 10.0):
    secret = settings.s3_secret_access_key.get_secret_value() if settings.s3_secret_access_key else None
    return boto3.client(
        "s3",
        endpoint_url=settings.s3_endpoint_url,
        region_name=settings.s3_region,
        aws_access_key_id=settings.s3_access_key_id,
        aws_secret_access_key=secret,
        config=Config(
            connect_timeout=timeout_s, read_timeout=timeout_s,
            retries={"max_attempts": attempts, "mode": "standard"},
            s3={"addressing_style": "path"},  # MinIO and other self-hosted stores have no per-bucket DNS names
        ),
    )


def ensure_bucket(s3, bucket: str) -> None:
    try:
        s3.head_bucket(Bucket=bucket)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket"):
            raise
        s3.create_bucket(Bucket=bucket)
