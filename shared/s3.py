"""The S3 client every part builds from its settings, so timeouts and retries are the same everywhere."""

from __future__ import annotations

import boto3
from botocore.config import Config

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
