"""The operators' side of the model registry: publish a model (signed, immutable, versions only going
up) and list what is published. The layout and signature format are in shared.registry."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from botocore.exceptions import ClientError

from shared import VERSION, registry
from shared.s3 import ensure_bucket
from shared.manifest import ModelManifest, load_verified


class PublishRefused(RuntimeError):
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
    found = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{registry.ROOT}/{name}/"):
        for obj in page.get("Contents", []):
            version = registry.version_of(obj["Key"], name)
            if version is not None:
                found.append(version)
    return sorted(found)


def publish(s3, bucket: str, model_dir: Path, private_key_path: Path, name: str | None = None,
            version: int | None = None) -> Published:
    manifest, model_path = load_verified(model_dir)
    if manifest.quality is not None and not manifest.quality.passed:
        q = manifest.quality
        raise PublishRefused(
            f"{manifest.name} failed its quality gate ({q.metric} {q.value:.4f} < {q.threshold} on {q.samples} "
            f"images of {q.measured_on}); a gate-failed model cannot be published"
        )
    private_key = registry.load_private_key(private_key_path)
    name = name or manifest.name
    ensure_bucket(s3, bucket)
    existing = versions(s3, bucket, name)
    latest = existing[-1] if existing else 0
    version = version if version is not None else latest + 1
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
    s3.upload_file(str(model_path), bucket, registry.key(name, version, registry.MODEL_OBJECT))
    s3.put_object(Bucket=bucket, Key=registry.key(name, version, registry.MANIFEST_OBJECT), Body=document,
                  ContentType="application/json")
    try:
        # If-None-Match: of two operators publishing the same version at once, exactly one wins.
        s3.put_object(Bucket=bucket, Key=registry.key(name, version, registry.SIGNATURE_OBJECT), Body=signature,
                      ContentType="application/json", IfNoneMatch="*")
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") == "PreconditionFailed":
            raise PublishRefused(f"{name} v{version} was published by someone else meanwhile") from None
        raise
    return Published(name, version, published.sha256, registry.key_id(private_key.public_key()),
                     f"{registry.ROOT}/{name}/{version}/")
