"""Downloading an artifact from the registry into a staging file with ranged GETs, resuming where a
previous attempt (or a previous process, killed mid-download) stopped.

Each chunk is appended and fsynced before the next is asked for, so the staging file's length is
always the count of good bytes and a restart resumes from it. The artifact is only trusted after its
size and SHA-256 match the signed manifest; until then it is a `.part` file nobody loads.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from botocore.exceptions import BotoCoreError, ClientError

from shared.manifest import sha256_of

# A reply that will not change on retry: the object is missing or not what the manifest says.
_PERMANENT = {"NoSuchKey", "404", "InvalidRange", "416", "AccessDenied", "403", "NoSuchBucket"}


class DownloadFailed(RuntimeError):
    """The artifact is missing, the wrong size or the wrong content: retrying will not help."""


class DownloadInterrupted(RuntimeError):
    """The store could not be reached or stopped answering: the staging file keeps what arrived."""


class Cancelled(RuntimeError):
    """The download is no longer wanted (a newer rollout, or shutdown)."""


def download(
    s3, bucket: str, key: str, part: Path, size: int, sha256: str, chunk_bytes: int, limit_bytes_s: int,
    progress: Callable[[int], None], cancelled: threading.Event | Callable[[], bool],
) -> Path:
    is_cancelled = cancelled.is_set if isinstance(cancelled, threading.Event) else cancelled
    try:
        stored = s3.head_object(Bucket=bucket, Key=key)["ContentLength"]
    except ClientError as exc:
        _raise_for(exc, key)
    except BotoCoreError as exc:
        raise DownloadInterrupted(f"the store did not answer: {exc}") from None
    if stored != size:
        raise DownloadFailed(f"{key} is {stored} bytes in the store, the signed manifest says {size}: truncated or replaced")
    offset = part.stat().st_size if part.exists() else 0
    if offset > size:
        part.unlink()
        offset = 0
    started, fetched = time.monotonic(), 0
    with part.open("ab") as out:
        while offset < size:
            if is_cancelled():
                raise Cancelled(f"stopped at {offset} of {size} bytes")
            end = min(offset + chunk_bytes, size) - 1
            try:
                data = read_range(s3.get_object(Bucket=bucket, Key=key, Range=f"bytes={offset}-{end}"), offset, end, size)
            except ClientError as exc:
                _raise_for(exc, key)
            except (BotoCoreError, OSError) as exc:
                raise DownloadInterrupted(f"the store stopped answering at byte {offset}: {exc}") from None
            if not data:
                raise DownloadInterrupted(f"the store sent nothing at byte {offset}")
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
            offset += len(data)
            fetched += len(data)
            progress(offset)
            if limit_bytes_s:
                ahead = fetched / limit_bytes_s - (time.monotonic() - started)
                if ahead > 0:
                    time.sleep(ahead)
    actual = sha256_of(part)
    if actual != sha256:
        part.unlink()
        raise DownloadFailed(f"{key} has SHA-256 {actual[:16]}…, the signed manifest says {sha256[:16]}…: tampered or corrupt")
    return part


def read_range(response: dict, first: int, last: int, size: int) -> bytes:
    """The body of a ranged GET for bytes first..last of a `size`-byte object, read only after its
    Content-Range says it is exactly that range, and never more than the range's length.

    A server that ignores the range (200 with the whole object), answers another range, or streams more
    than it declared is refused before a byte reaches the staging file: appended, it would be taken for
    good bytes at the wrong offset (curl and the AWS SDKs check Content-Range the same way).

    :param response: boto3's get_object answer (ContentRange, Body).
    :returns: at most last - first + 1 bytes (fewer if the stream broke off; the caller resumes).
    :raises DownloadFailed: for a missing or different Content-Range, or a longer body.
    """
    body = response["Body"]
    try:
        declared = response.get("ContentRange")
        if declared != f"bytes {first}-{last}/{size}":
            raise DownloadFailed(f"asked for bytes {first}-{last}/{size}, the store answered Content-Range {declared!r}")
        want = last - first + 1
        data = body.read(want + 1)
        if len(data) > want:
            raise DownloadFailed(f"asked for {want} bytes at {first}, the store sent more")
        return data
    finally:
        body.close()


def _raise_for(exc: ClientError, key: str):
    code = str(exc.response.get("Error", {}).get("Code", ""))
    if code in _PERMANENT:
        raise DownloadFailed(f"{key}: {code} from the store") from None
    raise DownloadInterrupted(f"{key}: {code or exc} from the store") from None
