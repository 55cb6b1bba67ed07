"""The operators' side of the model registry: publish a model or a cascade (signed, immutable, versions
only going up) and list what is published. The layout and signature format are in shared.registry."""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path

from botocore.exceptions import ClientError
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgefleet.errors import ToolError
from shared import VERSION, registry
from shared.cascade import CascadeMember, is_cascade, load_members
from shared.manifest import MODEL_FILE, ModelManifest, load_verified
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
    # A cascade's members this publish wrote (those the registry already held are not repeated).
    members: tuple[Published, ...] = ()


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
    """Signs a built model (or a cascade) and writes it as a new version: artifact, manifest, then signature.

    Every write is conditional (If-None-Match: *), so nothing that exists is ever overwritten: not a
    published version, not the objects a racing publisher or a half-finished publish left behind.

    A cascade folder (shared.cascade) publishes each member first, as a model of its own under the name
    and version its pin gives, unless the registry already holds that version with the pinned SHA-256;
    then cascade.json, its manifest and its signature. Everything refusable is checked before the first
    write, so a refused cascade leaves the registry as it was.

    Args:
        s3: a boto3 S3 client for the registry.
        bucket: the registry's bucket (created if missing).
        model_dir: a model folder (model.onnx, manifest.json) or a cascade folder (cascade.json, stage1/, stage2/).
        private_key_path: the operator's Ed25519 signing key.
        name: the registry name (default: the manifest's); members keep the names their pins give.
        version: default one past every version that has any object.

    Returns:
        What was published, with the members this call published (none already in the registry).

    Raises:
        PublishRefused: the gate failed (for a cascade its own; its members' are not checked), the version
            is taken or not above the latest, an object is already there, or the registry holds a member
            version with another SHA-256.
        ModelError: the folder (or a member) is not what its manifest says.
        ValueError: an invalid name or version.
    """
    manifest, _ = load_verified(model_dir)
    _check_gate(manifest)
    private_key = registry.load_private_key(private_key_path)
    ensure_bucket(s3, bucket)
    members = _members_to_publish(s3, bucket, model_dir, manifest) if is_cascade(manifest) else []
    if members:
        _new_version(s3, bucket, name or manifest.name, version)  # a taken cascade version: refused before any write
    published_members = tuple(_publish_one(s3, bucket, model_dir / pin.folder, private_key, pin.name, pin.version)
                              for pin in members)
    published = _publish_one(s3, bucket, model_dir, private_key, name, version)
    return replace(published, members=published_members)


def _publish_one(s3, bucket: str, model_dir: Path, private_key: Ed25519PrivateKey, name: str | None,
                 version: int | None) -> Published:
    """Writes one model folder as a new version: artifact, manifest, then the signature.

    :raises PublishRefused: the version is taken or not above the latest, an object is already there,
        or the artifact is over MAX_SINGLE_PUT_BYTES.
    :raises ValueError: an invalid name or version.
    """
    manifest, model_path = load_verified(model_dir)
    name = registry.check_name(name or manifest.name)
    if version is not None:
        registry.check_version(version)
    if model_path.stat().st_size > MAX_SINGLE_PUT_BYTES:
        raise PublishRefused(f"{model_path} is over {MAX_SINGLE_PUT_BYTES} bytes, the most one conditional PUT writes")
    version = _new_version(s3, bucket, name, version)
    published = ModelManifest(**{**manifest.model_dump(), "name": name, "version": version, "min_edgefleet": VERSION})
    document = registry.manifest_bytes(published)
    signature = registry.sign(document, private_key)
    # Artifact, then manifest, then the signature that makes the version visible: a publish that dies
    # half-way leaves an incomplete version that nobody lists or installs.
    with model_path.open("rb") as artifact:
        _create(s3, bucket, registry.key(name, version, manifest.file), artifact, "application/octet-stream")
    _create(s3, bucket, registry.key(name, version, registry.MANIFEST_OBJECT), document, "application/json")
    _create(s3, bucket, registry.key(name, version, registry.SIGNATURE_OBJECT), signature, "application/json")
    return Published(name, version, published.sha256, registry.key_id(private_key.public_key()),
                     f"{registry.ROOT}/{name}/{version}/")


def _check_gate(manifest: ModelManifest) -> None:
    if manifest.quality is not None and not manifest.quality.passed:
        q = manifest.quality
        raise PublishRefused(
            f"{manifest.name} failed its quality gate ({q.metric} {q.value:.4f} < {q.threshold} on {q.samples} "
            f"images of {q.measured_on}); a gate-failed model cannot be published"
        )


def _new_version(s3, bucket: str, name: str, version: int | None) -> int:
    """The version to publish `name` as: `version`, or one past every version that has any object.

    :raises PublishRefused: the version is published already, or not above the latest.
    """
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
    return version


def _members_to_publish(s3, bucket: str, cascade_dir: Path, cascade: ModelManifest) -> list[CascadeMember]:
    """A cascade's members the registry does not hold yet, each checked as it will be published.

    :raises PublishRefused: a member that is itself a cascade, that failed its gate, whose pinned
        version the registry holds with another SHA-256 or size, or is below the member's latest.
    """
    spec, members = load_members(cascade_dir, cascade)
    todo: list[CascadeMember] = []
    for pin, (member, _) in zip(spec.stages, members, strict=True):
        if member.file != MODEL_FILE:
            raise PublishRefused(f"the cascade's {pin.folder} is {member.file}: a member is one ONNX model")
        held = _published_manifest(s3, bucket, pin.name, pin.version)
        if held is not None and (held.sha256, held.size_bytes) != (pin.sha256, pin.size_bytes):
            raise PublishRefused(
                f"the cascade's {pin.folder} pins {pin.name} v{pin.version} with SHA-256 {pin.sha256[:16]}…, but the "
                f"registry's {pin.name} v{pin.version} is {held.sha256[:16]}…: a published version never changes "
                "(rebuild the cascade from the published member, or give the member a new version)"
            )
        if held is None and all((p.name, p.version) != (pin.name, pin.version) for p in todo):
            # A member's own gate is not checked: a cascade's small model is worse than the large one by
            # design and the cascade's gate (checked above) is what its answers must meet. Published with
            # a failed gate, the member can still never be served alone: sync refuses to roll it out.
            _new_version(s3, bucket, pin.name, pin.version)
            todo.append(pin)
    return todo


def _published_manifest(s3, bucket: str, name: str, version: int) -> ModelManifest | None:
    """The manifest of a complete (signed) version, or None if the registry holds none.

    :raises PublishRefused: the stored manifest is too large or not a manifest.
    """
    if version not in versions(s3, bucket, name):
        return None
    key = registry.key(name, version, registry.MANIFEST_OBJECT)
    try:
        return ModelManifest.model_validate_json(registry.read_bounded(s3, bucket, key, registry.MAX_MANIFEST_BYTES))
    except ValueError as exc:  # ObjectTooLarge, pydantic's ValidationError
        raise PublishRefused(f"s3://{bucket}/{key} is not a readable manifest: {exc}") from None


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
