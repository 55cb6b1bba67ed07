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
from typing import TYPE_CHECKING, NoReturn

from botocore.exceptions import BotoCoreError, ClientError

from services.sync.errors import SyncError
from shared.manifest import sha256_of

if TYPE_CHECKING:  # boto3-stubs, a dev dependency
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_s3.type_defs import GetObjectOutputTypeDef

# A reply that will not change on retry: the object is missing or not what the manifest says.
_PERMANENT = {"NoSuchKey", "404", "InvalidRange", "416", "AccessDenied", "403", "NoSuchBucket"}


class DownloadFailed(SyncError, RuntimeError):
    """The artifact is missing, the wrong size or the wrong content: retrying will not help."""


class DownloadInterrupted(SyncError, RuntimeError):
    """The store could not be reached or stopped answering: the staging file keeps what arrived."""


class Cancelled(SyncError, RuntimeError):
    """The download is no longer wanted (a newer rollout, or shutdown)."""


def download(
    s3: S3Client, bucket: str, key: str, part: Path, size: int, sha256: str, chunk_bytes: int, limit_bytes_s: int,
    progress: Callable[[int], None], cancelled: threading.Event | Callable[[], bool],
) -> Path:
    """Download an artifact into `part`, resuming from what `part` already holds, and verify it.

    The object's size is checked against `size` before any byte is fetched; the whole file's SHA-256
    against `sha256` after the last. Each chunk is a ranged GET whose Content-Range is checked
    (read_range), appended and fsynced before the next is asked for.

    :param s3: a boto3 S3 client (shared.s3.client); sync builds it with one attempt and retries by
        calling again, which resumes.
    :param str bucket: the registry's bucket.
    :param str key: the artifact's key (shared.registry.key).
    :param Path part: the staging file; bytes already in it are kept and the download goes on after
        them (a file longer than `size` is started again).
    :param int size: the artifact's size in bytes, from the signed manifest.
    :param str sha256: the artifact's SHA-256 (hex), from the signed manifest.
    :param int chunk_bytes: the size of one ranged GET.
    :param int limit_bytes_s: the most bytes a second to fetch on average; 0: no limit.
    :param progress: called with the count of good bytes in `part` after each chunk.
    :param cancelled: an Event, or a function that says whether the download is still wanted; asked
        before each chunk.

    Returns `part`, once its size and SHA-256 match the manifest.

    :raises DownloadFailed: if the object is missing, forbidden, of another size or content (`part` is
        deleted when its SHA-256 is wrong), or the store answers another range: retrying will not help.
    :raises DownloadInterrupted: if the store cannot be reached or stops answering; `part` keeps the
        good bytes and a later call resumes from them.
    :raises Cancelled: if `cancelled` says so between two chunks.
    :raises OSError: if `part` cannot be written (disk full).
    """
    is_cancelled = cancelled.is_set if isinstance(cancelled, threading.Event) else cancelled
    try:
        stored = s3.head_object(Bucket=bucket, Key=key)["ContentLength"]
    except ClientError as exc:
        _raise_for(exc, key)
    except BotoCoreError as exc:
        raise DownloadInterrupted(f"the store did not answer: {exc}") from None
    if stored != size:
        raise DownloadFailed(f"{key} is {stored} bytes in the store, the signed manifest says {size}: "
                             "truncated or replaced")
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
                response = s3.get_object(Bucket=bucket, Key=key, Range=f"bytes={offset}-{end}")
                data = read_range(response, offset, end, size)
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
        raise DownloadFailed(f"{key} has SHA-256 {actual[:16]}…, the signed manifest says {sha256[:16]}…: "
                             "tampered or corrupt")
    return part


def read_range(response: GetObjectOutputTypeDef, first: int, last: int, size: int) -> bytes:
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
            raise DownloadFailed(f"asked for bytes {first}-{last}/{size}, "
                                 f"the store answered Content-Range {declared!r}")
        want = last - first + 1
        data = body.read(want + 1)
        if len(data) > want:
            raise DownloadFailed(f"asked for {want} bytes at {first}, the store sent more")
        return data
    finally:
        body.close()


def _raise_for(exc: ClientError, key: str) -> NoReturn:
    code = str(exc.response.get("Error", {}).get("Code", ""))
    if code in _PERMANENT:
        raise DownloadFailed(f"{key}: {code} from the store") from None
    raise DownloadInterrupted(f"{key}: {code or exc} from the store") from None
