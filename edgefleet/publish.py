"""The operators' side of the model registry: publish a model (signed, immutable, versions only going
up) and list what is published. The layout and signature format are in shared.registry."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from botocore.exceptions import ClientError

from edgefleet.errors import ToolError
from shared import VERSION, registry
from shared.manifest import ModelManifest, load_verified
from shared.s3 import ensure_bucket

_OBJECT_KEY = re.compile(r"(?P<version>[1-9][0-9]{0,8})/(?P<object>[^/]+)")
# One PUT is how an object is created conditionally; S3 caps a single PUT at 5 GiB, far above an edge model.
MAX_SINGLE_PUT_BYTES = 5 * 1024**3
# 412 from a PUT If-None-Match: *; 409 when another conditional write of the key is in flight (AWS).
_TAKEN = ("PreconditionFailed", "ConditionalRequestConflict", "412", "409")


class PublishRefused(ToolError, RuntimeError):
    """A model that must not reach the fleet: failed gate, stale or taken version."""


@dataclass(frozen=True)
class Published:
    name: str
    version: int
    sha256: str
    key_id: str
    prefix: str


def versions(s3, bucket: str, name: str) -> list[int]:
    """Every complete (signed) version of a model, oldest first."""
    return sorted(v for v, obj in _objects(s3, bucket, name) if obj == registry.SIGNATURE_OBJECT)


def _objects(s3, bucket: str, name: str) -> list[tuple[int, str]]:
    """(version, object) for every registry object of a model, complete versions or not."""
    prefix = f"{registry.ROOT}/{registry.check_name(name)}/"
    found = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            match = _OBJECT_KEY.fullmatch(obj["Key"].removeprefix(prefix))
            if match:
                found.append((int(match["version"]), match["object"]))
    return found


def publish(s3, bucket: str, model_dir: Path, private_key_path: Path, name: str | None = None,
            version: int | None = None) -> Published:
    """Signs a built model and writes it as a new version: artifact, manifest, then signature.

    Every write is conditional (If-None-Match: *), so nothing that exists is ever overwritten: not a
    published version, not the objects a racing publisher or a half-finished publish left behind.

    :param name: the registry name (default: the manifest's); version: default one past every version
        that has any object.
    :returns: what was published.
    :raises PublishRefused: gate failed, version taken or not above the latest, an object already there.
    :raises ValueError: an invalid name or version.
    """
    manifest, model_path = load_verified(model_dir)
    if manifest.quality is not None and not manifest.quality.passed:
        q = manifest.quality
        raise PublishRefused(
            f"{manifest.name} failed its quality gate ({q.metric} {q.value:.4f} < {q.threshold} on {q.samples} "
            f"images of {q.measured_on}); a gate-failed model cannot be published"
        )
    name = registry.check_name(name or manifest.name)
    if version is not None:
        registry.check_version(version)
    if model_path.stat().st_size > MAX_SINGLE_PUT_BYTES:
        raise PublishRefused(f"{model_path} is over {MAX_SINGLE_PUT_BYTES} bytes, the most one conditional PUT writes")
    private_key = registry.load_private_key(private_key_path)
    ensure_bucket(s3, bucket)
    found = _objects(s3, bucket, name)
    existing = sorted(v for v, obj in found if obj == registry.SIGNATURE_OBJECT)
    latest = existing[-1] if existing else 0
    # Past any version that has objects, signed or not: an unsigned one is a half-finished or racing
    # publish whose objects are never overwritten, so its number is spent.
    version = version if version is not None else max((v for v, _ in found), default=0) + 1
    if version in existing:
        raise PublishRefused(f"{name} v{version} is already published; a published version never changes")
    if version <= latest:
        raise PublishRefused(
            f"{name} v{version} is older than the registry's latest, v{latest}: versions only go up "
            "(to go back, roll out the older version explicitly)"
        )
    published = ModelManifest(**{**manifest.model_dump(), "name": name, "version": version, "min_edgefleet": VERSION})
    document = registry.manifest_bytes(published)
    signature = registry.sign(document, private_key)
    # Artifact, then manifest, then the signature that makes the version visible: a publish that dies
    # half-way leaves an incomplete version that nobody lists or installs.
    with model_path.open("rb") as artifact:
        _create(s3, bucket, registry.key(name, version, registry.MODEL_OBJECT), artifact, "application/octet-stream")
    _create(s3, bucket, registry.key(name, version, registry.MANIFEST_OBJECT), document, "application/json")
    _create(s3, bucket, registry.key(name, version, registry.SIGNATURE_OBJECT), signature, "application/json")
    return Published(name, version, published.sha256, registry.key_id(private_key.public_key()),
                     f"{registry.ROOT}/{name}/{version}/")


def _create(s3, bucket: str, key: str, body, content_type: str) -> None:
    """Writes an object only if none is there (S3's conditional PUT, If-None-Match: *, as AWS S3, MinIO
    and moto implement it): of two writers of one key exactly one wins, and nothing is overwritten.

    :raises PublishRefused: if the key already holds an object.
    """
    try:
        s3.put_object(Bucket=bucket, Key=key, Body=body, ContentType=content_type, IfNoneMatch="*")
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in _TAKEN:
            raise PublishRefused(
                f"{key} already exists (another publisher, or a publish that stopped half-way); it was left "
                "untouched and this publish stopped: publish again as a new version"
            ) from None
        raise
