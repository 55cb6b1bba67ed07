"""The operators' side of the registry: publish a model, a cascade or a plugin (signed, immutable,
versions only going up) and list what is published. The layout and signature format are in shared.registry."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, TypeVar

from botocore.exceptions import ClientError
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edgefleet.errors import ToolError
from edgefleet.plugin_spec import check_module, load_spec
from shared import VERSION, registry
from shared.cascade import MAX_CASCADE_BYTES, CascadeMember, CascadeSpec, is_cascade, load_members
from shared.manifest import MODEL_FILE, ModelManifest, load_verified
from shared.plugin import PluginManifest
from shared.s3 import ensure_bucket

if TYPE_CHECKING:  # boto3-stubs, a dev dependency
    from mypy_boto3_s3 import S3Client

M = TypeVar("M", ModelManifest, PluginManifest)

_OBJECT_KEY = re.compile(r"(?P<version>[1-9][0-9]{0,8})/(?P<object>[^/]+)")
# One PUT is how an object is created conditionally; S3 caps a single PUT at 5 GiB, far above an edge model.
MAX_SINGLE_PUT_BYTES = 5 * 1024**3
# 412 from a PUT If-None-Match: *; 409 when another conditional write of the key is in flight (AWS).
_TAKEN = ("PreconditionFailed", "ConditionalRequestConflict", "412", "409")
# A publish that chose its version itself and lost it to a racing publisher takes the next free one, at
# most this many times: each loss means another publish succeeded, so more is a registry under a storm.
RACED_RETRIES = 5
_MISSING = ("NoSuchKey", "404", "NotFound")


class PublishRefused(ToolError, RuntimeError):
    """A model that must not reach the fleet: failed gate, stale or taken version."""


class _Raced(PublishRefused):
    """The first object of a version (the artifact) already existed: another publisher claimed the version."""


@dataclass(frozen=True)
class Published:
    name: str
    version: int
    sha256: str
    key_id: str
    prefix: str
    # A cascade's members this publish wrote (those the registry already held are not repeated).
    members: tuple[Published, ...] = ()


def versions(s3: S3Client, bucket: str, name: str, root: str = registry.ROOT) -> list[int]:
    """Every complete (signed) version of a model (or, with root=registry.PLUGIN_ROOT, a plugin), oldest first."""
    return sorted(v for v, obj in _objects(s3, bucket, name, root) if obj == registry.SIGNATURE_OBJECT)


def _objects(s3: S3Client, bucket: str, name: str, root: str = registry.ROOT) -> list[tuple[int, str]]:
    """(version, object) for every registry object of a model (or a plugin), complete versions or not."""
    prefix = f"{root}/{registry.check_name(name)}/"
    found = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            match = _OBJECT_KEY.fullmatch(obj["Key"].removeprefix(prefix))
            if match:
                found.append((int(match["version"]), match["object"]))
    return found


# Told (object key, bytes sent so far, bytes in all) as an artifact uploads: a progress bar's feed.
Progress = Callable[[str, int, int], None]


class _Reported:
    """The artifact as botocore reads it, telling `progress` how far the furthest read got while it is
    being sent. botocore also reads it whole for a checksum and a signature before sending: like
    s3transfer's ReadFileChunk, it counts only while _watch_sends's handlers say it is being sent, and
    a retry that rereads from the start is not counted twice."""

    def __init__(self, file: BinaryIO, key: str, total: int, progress: Progress) -> None:
        self._file, self._key, self._total, self._progress = file, key, total, progress
        self._furthest = 0
        self._sending = False

    def signal_transferring(self) -> None:
        self._sending = True

    def signal_not_transferring(self) -> None:
        self._sending = False

    def read(self, size: int = -1) -> bytes:
        data = self._file.read(size)
        if self._sending and (at := self._file.tell()) > self._furthest:
            self._furthest = at
            self._progress(self._key, at, self._total)
        return data

    def done(self) -> None:
        """Reports the whole artifact sent (where botocore wrapped the body, no read was counted)."""
        self._progress(self._key, self._total, self._total)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._file.seek(offset, whence)

    def tell(self) -> int:
        return self._file.tell()


def _body_sending(sending: bool) -> Callable[..., None]:
    def handler(request: Any, **_: Any) -> None:
        signal = "signal_transferring" if sending else "signal_not_transferring"
        if hasattr(request.body, signal):
            getattr(request.body, signal)()
    return handler


def _watch_sends(s3: S3Client) -> None:
    """Marks a _Reported body as being sent from botocore's before-send event on, after the checksum and
    signing passes (and off again when a retry creates the request anew); registered once per client."""
    events = s3.meta.events
    events.register_first("request-created.s3.PutObject", _body_sending(False), unique_id="edgefleet-publish-off")
    events.register_last("before-send.s3.PutObject", _body_sending(True), unique_id="edgefleet-publish-on")


def publish(s3: S3Client, bucket: str, model_dir: Path, private_key_path: Path, name: str | None = None,
            version: int | None = None, progress: Progress | None = None) -> Published:
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
        version: default one past every version that has any object (the next one again where a racing
            publisher claims it first, RACED_RETRIES times at most; a given version is never changed).
        progress: told (key, bytes sent, bytes in all) as each artifact uploads.

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
    published_members = tuple(_publish_one(s3, bucket, model_dir / pin.folder, private_key, pin.name, pin.version,
                                            progress) for pin in members)
    published = _publish_one(s3, bucket, model_dir, private_key, name, version, progress)
    return replace(published, members=published_members)


def _publish_one(s3: S3Client, bucket: str, model_dir: Path, private_key: Ed25519PrivateKey, name: str | None,
                 version: int | None, progress: Progress | None = None) -> Published:
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

    def write(chosen: int) -> Published:
        published = ModelManifest(**{**manifest.model_dump(), "name": name, "version": chosen,
                                     "min_edgefleet": VERSION})
        document = registry.manifest_bytes(published)
        signature = registry.sign(document, private_key)
        # Artifact, then manifest, then the signature that makes the version visible: a publish that dies
        # half-way leaves an incomplete version that nobody lists or installs.
        artifact_key = registry.key(name, chosen, manifest.file)
        with model_path.open("rb") as artifact:
            if progress is None:
                _claim(s3, bucket, artifact_key, artifact, "application/octet-stream")
            else:
                _watch_sends(s3)
                reported = _Reported(artifact, artifact_key, model_path.stat().st_size, progress)
                _claim(s3, bucket, artifact_key, reported, "application/octet-stream")
                reported.done()
        _create(s3, bucket, registry.key(name, chosen, registry.MANIFEST_OBJECT), document, "application/json")
        _create(s3, bucket, registry.key(name, chosen, registry.SIGNATURE_OBJECT), signature, "application/json")
        return Published(name, chosen, published.sha256, registry.key_id(private_key.public_key()),
                         f"{registry.ROOT}/{name}/{chosen}/")

    return _claiming(s3, bucket, name, version, registry.ROOT, write)


def _check_gate(manifest: ModelManifest) -> None:
    if manifest.quality is not None and not manifest.quality.passed:
        q = manifest.quality
        raise PublishRefused(
            f"{manifest.name} failed its quality gate ({q.metric} {q.value:.4f} < {q.threshold} on {q.samples} "
            f"images of {q.measured_on}); a gate-failed model cannot be published"
        )


def _claiming(s3: S3Client, bucket: str, name: str, version: int | None, root: str,
              write: Callable[[int], Published]) -> Published:
    """Writes a new version of `name` with `write`, at `version` or at the next free one.

    Two publishers that chose the same free version both PUT its artifact conditionally: one wins, the
    other's PUT is refused before it wrote anything (_Raced), and that one, if it chose the version itself,
    takes the next free version (RACED_RETRIES times at most). An explicit version is never changed.

    :param write: writes every object of the given version, the artifact first (through _claim).
    :raises PublishRefused: as _new_version; the explicit version raced; RACED_RETRIES races lost in a row.
    """
    for _ in range(RACED_RETRIES + 1):
        chosen = _new_version(s3, bucket, name, version, root)
        try:
            return write(chosen)
        except _Raced:
            if version is not None:
                raise
    raise PublishRefused(f"{name}: other publishers took each of the next {RACED_RETRIES + 1} free versions "
                         "before this publish could; nothing of it was written: publish again")


def _new_version(s3: S3Client, bucket: str, name: str, version: int | None, root: str = registry.ROOT) -> int:
    """The version to publish `name` as: `version`, or one past every version that has any object.

    :raises PublishRefused: the version is published already, or not above the latest.
    """
    found = _objects(s3, bucket, name, root)
    existing = sorted(v for v, obj in found if obj == registry.SIGNATURE_OBJECT)
    latest = existing[-1] if existing else 0
    # Past any version that has objects, signed or not: an unsigned one is a half-finished or racing
    # publish whose objects are never overwritten, so its number is spent.
    free = max((v for v, _ in found), default=0) + 1
    version = version if version is not None else free
    if version in existing:
        raise PublishRefused(f"{name} v{version} is already published; a published version never changes "
                             f"(the next free version is v{free}: publish without --version to take it)")
    if version <= latest:
        raise PublishRefused(
            f"{name} v{version} is older than the registry's latest, v{latest}: versions only go up "
            "(to go back, roll out the older version explicitly)"
        )
    return version


def _members_to_publish(s3: S3Client, bucket: str, cascade_dir: Path, cascade: ModelManifest) -> list[CascadeMember]:
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


def _published_manifest(s3: S3Client, bucket: str, name: str, version: int) -> ModelManifest | None:
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


def _claim(s3: S3Client, bucket: str, key: str, body: Any, content_type: str) -> None:
    """_create for a version's first object: its existing means another publisher claimed the version.

    :raises _Raced: if the key already holds an object.
    """
    try:
        _create(s3, bucket, key, body, content_type)
    except PublishRefused as exc:
        raise _Raced(str(exc)) from None


def _create(s3: S3Client, bucket: str, key: str, body: Any, content_type: str) -> None:
    """Writes an object only if none is there (S3's conditional PUT, If-None-Match: *, as AWS S3, MinIO
    and moto implement it): of two writers of one key exactly one wins, and nothing is overwritten.

    The store is asked to check and keep the object's SHA-256 (x-amz-checksum-sha256): a HEAD returns it,
    so `rollout start` can tell a replaced artifact from the signed one without downloading it.

    :raises PublishRefused: if the key already holds an object.
    """
    try:
        s3.put_object(Bucket=bucket, Key=key, Body=body, ContentType=content_type, IfNoneMatch="*",
                      ChecksumAlgorithm="SHA256")
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in _TAKEN:
            raise PublishRefused(
                f"{key} already exists (another publisher, or a publish that stopped half-way); it was left "
                "untouched and this publish stopped: publish again as a new version"
            ) from None
        raise


# -- plugins (docs/plugins.md) ---------------------------------------------------------------------------


class NotPublished(ToolError, LookupError):
    """A model or plugin version the registry does not hold, complete and signed by a trusted key."""


@dataclass(frozen=True)
class PluginVersion:
    """One listed plugin version: its manifest's figures and the key its signature names (None where
    the stored manifest or signature cannot be read; `problem` says why)."""

    name: str
    version: int
    sha256: str | None = None
    size_bytes: int | None = None
    abi: int | None = None
    key_id: str | None = None
    created_at: float | None = None
    problem: str | None = None

    def as_json(self) -> dict[str, object]:
        return {"name": self.name, "version": self.version, "sha256": self.sha256, "size_bytes": self.size_bytes,
                "abi": self.abi, "key_id": self.key_id, "created_at": self.created_at, "problem": self.problem}


def plugin_versions(s3: S3Client, bucket: str, name: str) -> list[int]:
    """Every complete (signed) version of a plugin, oldest first."""
    return versions(s3, bucket, name, registry.PLUGIN_ROOT)


def publish_plugin(s3: S3Client, bucket: str, wasm: Path, spec: Path, private_key_path: Path,
                   version: int | None = None) -> Published:
    """Checks, signs and uploads a plugin as a new version: plugin.wasm, manifest.json, then manifest.sig.

    The module is checked as a device will load it (edgefleet.plugin_spec.check_module) before anything is
    written; every write is conditional (If-None-Match: *), as for a model, so nothing is overwritten.

    Args:
        s3: a boto3 S3 client for the registry.
        bucket: the registry's bucket (created if missing).
        wasm: the module (wasm32-wasi reactor).
        spec: its plugin.json (name, description, limits, grants, config; nothing else).
        private_key_path: the operator's Ed25519 signing key.
        version: default one past every version of the plugin that has any object (past a racing
            publisher's, as for a model).

    Returns:
        What was published (prefix: plugins/<name>/<version>/).

    Raises:
        PluginRefused: the spec is invalid, or the device's loader refuses the module with it (the reason named).
        PublishRefused: the version is taken or not above the latest, or an object is already there.
        ValueError: an invalid version; SignatureError (a ValueError) or OSError: an unusable key.
    """
    plugin = load_spec(spec)
    module = check_module(wasm, plugin)
    if version is not None:
        registry.check_version(version)
    private_key = registry.load_private_key(private_key_path)
    ensure_bucket(s3, bucket)

    def write(chosen: int) -> Published:
        manifest = PluginManifest(
            name=plugin.name, version=chosen, sha256=hashlib.sha256(module.data).hexdigest(),
            size_bytes=len(module.data), abi=module.abi, description=plugin.description, limits=plugin.limits,
            grants=plugin.grants, config=plugin.config, recipe={"source": spec.name}, min_edgefleet=VERSION,
            created_at=time.time(),
        )
        document = registry.manifest_bytes(manifest)
        signature = registry.sign(document, private_key)
        # Module, manifest, then the signature that makes the version visible (as for a model).
        _claim(s3, bucket, registry.plugin_key(plugin.name, chosen, registry.PLUGIN_OBJECT), module.data,
               "application/wasm")
        for obj, body in ((registry.MANIFEST_OBJECT, document), (registry.SIGNATURE_OBJECT, signature)):
            _create(s3, bucket, registry.plugin_key(plugin.name, chosen, obj), body, "application/json")
        return Published(plugin.name, chosen, manifest.sha256, registry.key_id(private_key.public_key()),
                         f"{registry.PLUGIN_ROOT}/{plugin.name}/{chosen}/")

    return _claiming(s3, bucket, plugin.name, version, registry.PLUGIN_ROOT, write)


def plugin_names(s3: S3Client, bucket: str) -> list[str]:
    """Every plugin name with any object in the registry, sorted (an empty list if the bucket is missing)."""
    names: list[str] = []
    try:
        for page in s3.get_paginator("list_objects_v2").paginate(
                Bucket=bucket, Prefix=f"{registry.PLUGIN_ROOT}/", Delimiter="/"):
            names.extend(p["Prefix"].removeprefix(f"{registry.PLUGIN_ROOT}/").rstrip("/")
                         for p in page.get("CommonPrefixes", []))
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") == "NoSuchBucket":
            return []
        raise
    return sorted(names)


def list_plugins(s3: S3Client, bucket: str, name: str | None = None) -> list[PluginVersion]:
    """Every complete version of one plugin, or of every plugin, with its manifest's figures and the key
    id its signature names (read, not verified: signed_plugin() verifies).

    :raises ValueError: an invalid name.
    """
    listed: list[PluginVersion] = []
    for plugin in [registry.check_name(name)] if name is not None else plugin_names(s3, bucket):
        try:
            found = plugin_versions(s3, bucket, plugin)
        except ValueError:  # a prefix that is no plugin name: nothing a device would install
            continue
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == "NoSuchBucket":
                return []
            raise
        listed.extend(_listed(s3, bucket, plugin, version) for version in found)
    return listed


def _listed(s3: S3Client, bucket: str, name: str, version: int) -> PluginVersion:
    try:
        document = registry.read_bounded(s3, bucket, registry.plugin_key(name, version, registry.MANIFEST_OBJECT),
                                         registry.MAX_MANIFEST_BYTES)
        signature = registry.read_bounded(s3, bucket, registry.plugin_key(name, version, registry.SIGNATURE_OBJECT),
                                          registry.MAX_SIGNATURE_BYTES)
        manifest = PluginManifest.model_validate_json(document)
        signer = json.loads(signature).get("key_id")
    except (ValueError, AttributeError, ClientError) as exc:  # too large, not JSON, not a manifest, gone
        return PluginVersion(name, version, problem=f"unreadable: {str(exc).splitlines()[0]}")
    return PluginVersion(name, version, manifest.sha256, manifest.size_bytes, manifest.abi,
                         signer if isinstance(signer, str) else None, manifest.created_at)


def trusted_keys(folder: Path) -> dict[str, Ed25519PublicKey]:
    """The operators' public keys (*.pub in folder, as devices trust them) a plugin's signature is checked against.

    :raises NotPublished: the folder holds none, so nothing could be shown to be signed.
    :raises SignatureError, ValueError, OSError: as registry.load_public_keys (a file that is no Ed25519 key).
    """
    keys = registry.load_public_keys(folder)
    if not keys:
        raise NotPublished(f"no operator public key (*.pub) in {folder} to check the signature against")
    return keys


def signed_plugin(s3: S3Client, bucket: str, name: str, version: int,
                  trusted: dict[str, Ed25519PublicKey]) -> PluginManifest:
    """A plugin version's manifest, if the registry holds it signed by a trusted key and its module as
    signed: what a rollout may name (a device would refuse anything else, one by one).

    The module is not downloaded: its size, and its SHA-256 where the store keeps one (publish asks it
    to), are compared with the signed manifest's.

    :param trusted: the operators' public keys by key id (registry.load_public_keys()).
    :returns: the verified manifest.
    :raises NotPublished: no such complete version, an unreadable manifest or signature, a signature
        by no trusted key or not over these bytes, a manifest that names another plugin or version, or
        a module missing or of another size or SHA-256 than the manifest says.
    :raises ValueError: an invalid name or version.
    :raises ClientError, BotoCoreError: the registry unreachable or refusing (other than a missing object).
    """
    manifest = _signed(s3, bucket, name, version, trusted, registry.verify_plugin)
    _check_held(s3, bucket, registry.plugin_key(name, version, registry.PLUGIN_OBJECT), manifest.size_bytes,
                manifest.sha256, f"the plugin {name} v{version}'s {registry.PLUGIN_OBJECT}")
    return manifest


def signed_model(s3: S3Client, bucket: str, name: str, version: int,
                 trusted: dict[str, Ed25519PublicKey]) -> ModelManifest:
    """A model version's manifest, if the registry holds it signed by a trusted key and its artifact as
    signed (as signed_plugin(): what a model's rollout may name; every device would otherwise fail it
    with the same reason). A cascade's cascade.json is read (it is small) and held to its manifest, and
    each member must be a signed version whose manifest is the member's pin and whose model.onnx is held.

    :raises NotPublished: as signed_plugin(); for a cascade also a member missing, unsigned, other than
        its pin, or whose artifact is missing or replaced.
    :raises ValueError, ClientError, BotoCoreError: as signed_plugin().
    """
    manifest = _signed(s3, bucket, name, version, trusted, registry.verify)
    if is_cascade(manifest):
        _check_cascade(s3, bucket, manifest, trusted)
    else:
        _check_held(s3, bucket, registry.key(name, version, manifest.file), manifest.size_bytes, manifest.sha256,
                    f"{name} v{version}'s {manifest.file}")
    return manifest


def _check_cascade(s3: S3Client, bucket: str, cascade: ModelManifest, trusted: dict[str, Ed25519PublicKey]) -> None:
    """A signed cascade's document and members, held as sync will hold them before installing.

    :raises NotPublished: cascade.json missing, too large, other than its manifest says or no cascade
        document; a member unsigned, missing, not its pin or with its artifact missing or replaced.
    """
    key = registry.key(cascade.name, cascade.version, cascade.file)
    what = f"{cascade.name} v{cascade.version}'s {cascade.file}"
    try:
        document = registry.read_bounded(s3, bucket, key, MAX_CASCADE_BYTES)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") not in _MISSING:
            raise
        raise NotPublished(_missing(what, bucket, key)) from None
    except registry.ObjectTooLarge as exc:
        raise NotPublished(f"{what} is unusable: {exc}") from None
    _check_figures(what, len(document), hashlib.sha256(document).hexdigest(), cascade.size_bytes, cascade.sha256)
    try:
        spec = CascadeSpec.model_validate_json(document)
    except ValueError as exc:
        raise NotPublished(f"{what} is not a cascade document: {str(exc).splitlines()[0]}") from None
    for pin in spec.stages:
        member_of = f"the cascade's {pin.folder} member {pin.name} v{pin.version}"
        try:
            member = _signed(s3, bucket, pin.name, pin.version, trusted, registry.verify)
        except NotPublished as exc:
            raise NotPublished(f"{member_of}: {exc}") from None
        if (member.file, member.sha256, member.size_bytes) != (MODEL_FILE, pin.sha256, pin.size_bytes):
            raise NotPublished(f"{member_of}: the registry's signed manifest is {member.file} with SHA-256 "
                               f"{member.sha256[:16]}… ({member.size_bytes} bytes), the cascade pins {MODEL_FILE} "
                               f"with {pin.sha256[:16]}… ({pin.size_bytes} bytes)")
        _check_held(s3, bucket, registry.key(pin.name, pin.version, member.file), member.size_bytes, member.sha256,
                    f"{member_of}'s {member.file}")


def _check_held(s3: S3Client, bucket: str, key: str, size_bytes: int, sha256: str, what: str) -> None:
    """An artifact is in the registry with the size and, where the store kept one, the SHA-256 its
    signed manifest gives (one HEAD, nothing downloaded). A store that kept no SHA-256 (a version
    published before publish asked for one, or a store without checksums) is held to the size alone.

    :raises NotPublished: the object is missing or another size or SHA-256.
    :raises ClientError, BotoCoreError: the registry unreachable or refusing.
    """
    try:
        head = s3.head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") not in _MISSING:
            raise
        raise NotPublished(_missing(what, bucket, key)) from None
    stored = head.get("ChecksumSHA256")
    # A multipart upload's checksum is over its parts' checksums ("…-N"), not comparable with the file's.
    whole = stored is not None and "-" not in stored and head.get("ChecksumType", "FULL_OBJECT") == "FULL_OBJECT"
    _check_figures(what, head["ContentLength"], base64.b64decode(stored).hex() if stored and whole else None,
                   size_bytes, sha256)


def _check_figures(what: str, size: int, sha256: str | None, signed_size: int, signed_sha256: str) -> None:
    """:raises NotPublished: the stored size, or SHA-256 where known, is not the signed manifest's."""
    if size != signed_size:
        found = f"is {size} bytes, its signed manifest says {signed_size}"
    elif sha256 is not None and sha256 != signed_sha256:
        found = f"has SHA-256 {sha256[:16]}…, its signed manifest says {signed_sha256[:16]}…"
    else:
        return
    raise NotPublished(f"{what} in the registry {found}: it was replaced or damaged after it was published, and "
                       "every device would refuse it; publish it again (as a new version) and roll that out")


def _missing(what: str, bucket: str, key: str) -> str:
    return (f"{what} is missing from the registry (s3://{bucket}/{key}): every device would fail to download it; "
            "publish it again (as a new version) and roll that out")


def _signed(s3: S3Client, bucket: str, name: str, version: int, trusted: dict[str, Ed25519PublicKey],
            verify: Callable[[bytes, bytes, dict[str, Ed25519PublicKey]], M]) -> M:
    plugin = verify is registry.verify_plugin
    registry.check_name(name)
    registry.check_version(version)
    key_of = registry.plugin_key if plugin else registry.key
    keys = [key_of(name, version, obj) for obj in (registry.MANIFEST_OBJECT, registry.SIGNATURE_OBJECT)]
    try:
        document = registry.read_bounded(s3, bucket, keys[0], registry.MAX_MANIFEST_BYTES)
        signature = registry.read_bounded(s3, bucket, keys[1], registry.MAX_SIGNATURE_BYTES)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") not in ("NoSuchKey", "404", "NoSuchBucket"):
            raise
        held = versions(s3, bucket, name, registry.PLUGIN_ROOT if plugin else registry.ROOT) if exc.response.get(
            "Error", {}).get("Code") != "NoSuchBucket" else []
        raise NotPublished(
            f"the registry (s3://{bucket}) holds no signed {name} v{version} "
            f"({'it holds ' + ', '.join(f'v{v}' for v in held) if held else 'it holds no version of it'}): publish "
            f"it with `edgefleet {'plugin' if plugin else 'model'} publish` first") from None
    except registry.ObjectTooLarge as exc:
        raise NotPublished(f"{name} v{version} in the registry is unusable: {exc}") from None
    try:
        manifest = verify(document, signature, trusted)
    except ValueError as exc:  # SignatureError, pydantic's ValidationError
        raise NotPublished(f"{name} v{version} in the registry is not trusted: {str(exc).splitlines()[0]}") from None
    if (manifest.name, manifest.version) != (name, version):
        raise NotPublished(f"the manifest stored as {name} v{version} is signed for {manifest.name} "
                           f"v{manifest.version}; refusing it")
    return manifest
