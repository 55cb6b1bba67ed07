"""The model registry's layout in S3 and its signatures: the one contract between the operators' tools
(which publish) and the devices' sync service (which installs).

    models/<name>/<version>/model.onnx      the artifact, named by the manifest's `file`: model.onnx, or
                                            cascade.json for a cascade (shared.cascade), whose members
                                            are published versions of their own
    models/<name>/<version>/manifest.json   its manifest (SHA-256 and size of the artifact, parent,
                                            preprocessing, labels, least edgefleet version)
    models/<name>/<version>/manifest.sig    {"algorithm": "ed25519", "key_id": ..., "signature": ...}
                                            over the exact bytes of manifest.json

    plugins/<name>/<version>/plugin.wasm    a plugin (shared.plugin, docs/plugins.md), the same way:
    plugins/<name>/<version>/manifest.json  its PluginManifest, signed by the same operators' keys
    plugins/<name>/<version>/manifest.sig

The signature is written last: a version without one is incomplete and is neither listed nor
installed. Every object is created with a conditional PUT (If-None-Match: *): nothing is ever
overwritten. Everything read back is untrusted until verified: names and versions are checked before
they become keys or paths, and manifest and signature are read only up to their caps (read_bounded).
"""

from __future__ import annotations

import base64
import errno
import hashlib
import json
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from botocore.exceptions import ClientError, IncompleteReadError
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from shared.errors import EdgefleetError
from shared.manifest import ARTIFACT_FILES, ModelManifest, check_model_name, check_model_version
from shared.plugin import PluginManifest

if TYPE_CHECKING:  # boto3-stubs, a dev dependency
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_s3.type_defs import GetObjectOutputTypeDef

ROOT = "models"
MODEL_OBJECT, MANIFEST_OBJECT, SIGNATURE_OBJECT = "model.onnx", "manifest.json", "manifest.sig"
ALGORITHM = "ed25519"
PUBLIC_KEY_SUFFIX = ".pub"
PLUGIN_ROOT, PLUGIN_OBJECT = "plugins", "plugin.wasm"
_VERSION_KEY = re.compile(rf"^(?P<root>{ROOT}|{PLUGIN_ROOT})/(?P<name>[^/]+)/(?P<version>\d+)/"
                          rf"{re.escape(SIGNATURE_OBJECT)}$")


# Caps on what is read whole before it is verified. A real manifest is ~16-40 KB (the labels list
# dominates), a signature ~150 bytes: the caps leave a wide margin and still bound the memory a hostile
# or corrupted registry can make a device spend.
MAX_MANIFEST_BYTES = 1 << 20
MAX_SIGNATURE_BYTES = 16 << 10
# A version's artifact is the object its manifest's `file` names (ARTIFACT_FILES: model.onnx or cascade.json).
_OBJECTS = (*ARTIFACT_FILES, MANIFEST_OBJECT, SIGNATURE_OBJECT)
_PLUGIN_OBJECTS = (PLUGIN_OBJECT, MANIFEST_OBJECT, SIGNATURE_OBJECT)


class ObjectTooLarge(EdgefleetError, ValueError):
    """A registry object larger than the cap for its kind; it was not read."""


def check_name(name: str) -> str:
    """A model name safe to become an S3 key level and a folder name.

    :param name: the name, from a rollout, a manifest or an operator.
    :returns: the name unchanged.
    :raises ValueError: if it is not 1-64 letters, digits, '_', '.', '-' starting with a letter or digit,
        or contains '..'.
    """
    return check_model_name(name)


def check_version(version: int) -> int:
    """A model version: an int 1..10**9 (bool refused).

    :returns: the version unchanged.
    :raises ValueError: otherwise.
    """
    return check_model_version(version)


def key(name: str, version: int, obj: str) -> str:
    """The S3 key of one object of a version; name and version are validated first.

    :raises ValueError: for an invalid name, version or object.
    """
    if obj not in _OBJECTS:
        raise ValueError(f"unknown registry object {obj!r}; expected one of {_OBJECTS}")
    return f"{ROOT}/{check_name(name)}/{check_version(version)}/{obj}"


def plugin_key(name: str, version: int, obj: str) -> str:
    """The S3 key of one object of a plugin version; name and version are validated first.

    :raises ValueError: for an invalid name, version or object.
    """
    if obj not in _PLUGIN_OBJECTS:
        raise ValueError(f"unknown plugin registry object {obj!r}; expected one of {_PLUGIN_OBJECTS}")
    return f"{PLUGIN_ROOT}/{check_name(name)}/{check_version(version)}/{obj}"


def read_bounded(s3: S3Client, bucket: str, key: str, max_bytes: int) -> bytes:
    """An object's whole body, if it is at most `max_bytes`; never reads more than max_bytes + 1 bytes.

    Asks for `Range: bytes=0-max_bytes` and refuses when the object's total size (Content-Range, or
    Content-Length if the server ignored the range) is over the cap, or when the stream carries more
    than the cap whatever the headers said.

    :param s3: a boto3 S3 client (shared.s3.client).
    :param str bucket: the registry's bucket.
    :param str key: the object's key (key()).
    :param int max_bytes: the largest size accepted.
    :returns: the body.
    :raises ObjectTooLarge: if the object is larger than `max_bytes`.
    :raises ClientError, BotoCoreError: unchanged (missing object, network), for the caller's retries;
        a body shorter than its announced size raises botocore's IncompleteReadError (a BotoCoreError).
    """
    try:
        response = s3.get_object(Bucket=bucket, Key=key, Range=f"bytes=0-{max_bytes}")
    except ClientError as exc:
        # Only an empty object cannot satisfy bytes=0-N (416).
        if exc.response.get("Error", {}).get("Code") == "InvalidRange":
            return b""
        raise
    body = response["Body"]
    try:
        total = _total_size(response)
        if total is not None and total > max_bytes:
            raise ObjectTooLarge(f"{key} is {total} bytes, over the cap of {max_bytes}")
        data = body.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise ObjectTooLarge(f"{key} is more than {max_bytes} bytes (the cap), whatever its headers say")
        if total is not None and len(data) != total:
            # A cut connection: a transient error the caller retries, not a verdict on the object.
            raise IncompleteReadError(actual_bytes=len(data), expected_bytes=total)
        return data
    finally:
        body.close()


def _total_size(response: GetObjectOutputTypeDef) -> int | None:
    content_range = response.get("ContentRange")  # "bytes 0-1023/4096"
    if content_range and "/" in content_range:
        total = content_range.rsplit("/", 1)[1]
        if total.isascii() and total.isdigit():
            return int(total)
    length = response.get("ContentLength")
    return int(length) if length is not None and not content_range else None


def version_of(object_key: str, name: str, root: str = ROOT) -> int | None:
    """The version a signature object's key names, if it belongs to `name`.

    :param str object_key: a key from a listing of models/<name>/ (or plugins/<name>/).
    :param str name: the model (or plugin) name the caller lists.
    :param str root: ROOT for models, PLUGIN_ROOT for plugins.
    :returns: the version; None for any other key (another object, another model, not a version).
    """
    match = _VERSION_KEY.match(object_key)
    return int(match["version"]) if match and match["name"] == name and match["root"] == root else None


class SignatureError(EdgefleetError, ValueError):
    """A manifest that must not be trusted: no signature, an unknown key, or a signature that does not verify."""


def key_id(public_key: Ed25519PublicKey) -> str:
    """A public key's id: the first 16 hex digits of the SHA-256 of its raw bytes (what a signature names)."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def sign(manifest_bytes: bytes, private_key: Ed25519PrivateKey) -> bytes:
    """The signature object (manifest.sig) for these exact manifest bytes.

    :param bytes manifest_bytes: the manifest as stored (manifest_bytes()).
    :param private_key: the operator's signing key (load_private_key()).
    :returns: the JSON document {"algorithm", "key_id", "signature" (base64)}, encoded.
    """
    document = {
        "algorithm": ALGORITHM,
        "key_id": key_id(private_key.public_key()),
        "signature": base64.b64encode(private_key.sign(manifest_bytes)).decode(),
    }
    return json.dumps(document).encode()


def verify(manifest_bytes: bytes, signature: bytes, trusted: dict[str, Ed25519PublicKey]) -> ModelManifest:
    """The manifest, if `signature` is a valid signature over exactly these bytes by a trusted key.

    :param bytes manifest_bytes: manifest.json as read from the registry (read_bounded()).
    :param bytes signature: manifest.sig as read from the registry.
    :param trusted: the public keys this device trusts, by key id (load_public_keys()).
    :returns: the validated manifest.
    :raises SignatureError: if the signature is malformed, of another algorithm, by an untrusted key,
        or does not match the bytes.
    :raises pydantic.ValidationError: (a ValueError) if the signed bytes are not a valid manifest.
    """
    check_signature(manifest_bytes, signature, trusted)
    return ModelManifest.model_validate_json(manifest_bytes)


def verify_plugin(manifest_bytes: bytes, signature: bytes, trusted: dict[str, Ed25519PublicKey]) -> PluginManifest:
    """A plugin's manifest, if `signature` is a trusted signature over exactly these bytes (as verify()).

    :raises SignatureError: as verify().
    :raises pydantic.ValidationError: (a ValueError) if the signed bytes are not a valid plugin manifest.
    """
    check_signature(manifest_bytes, signature, trusted)
    return PluginManifest.model_validate_json(manifest_bytes)


def check_signature(manifest_bytes: bytes, signature: bytes, trusted: dict[str, Ed25519PublicKey]) -> None:
    """Raises SignatureError unless `signature` is a valid ed25519 signature by a trusted key over the bytes."""
    try:
        document = json.loads(signature)
        algorithm, signer = document["algorithm"], document["key_id"]
        raw = base64.b64decode(document["signature"], validate=True)
    except (ValueError, KeyError, TypeError) as exc:
        raise SignatureError(f"the signature file is malformed: {exc}") from None
    if algorithm != ALGORITHM:
        raise SignatureError(f"unsupported signature algorithm {algorithm!r}")
    if signer not in trusted:
        raise SignatureError(f"signed by unknown key {signer}; this device trusts {sorted(trusted) or 'no keys'}")
    try:
        trusted[signer].verify(raw, manifest_bytes)
    except InvalidSignature:
        raise SignatureError(f"the signature by key {signer} does not match the manifest") from None


def manifest_bytes(manifest: ModelManifest | PluginManifest) -> bytes:
    """The bytes that are signed and stored: one canonical rendering (sorted keys), so the same
    manifest always signs the same."""
    return json.dumps(manifest.model_dump(mode="json"), sort_keys=True, indent=1).encode()


def load_public_keys(folder: Path) -> dict[str, Ed25519PublicKey]:
    """Every operator public key (PEM, *.pub) in a folder, by key id.

    :param Path folder: the trusted keys' folder; a missing folder trusts no key.
    :returns: the keys by key id (key_id()); empty if there are none.
    :raises SignatureError: for a file that is a public key of another kind than Ed25519.
    :raises ValueError: for a file that is not a PEM public key.
    :raises OSError: for a file that cannot be read.
    """
    keys = {}
    for path in sorted(folder.glob(f"*{PUBLIC_KEY_SUFFIX}")) if folder.is_dir() else []:
        public_key = serialization.load_pem_public_key(path.read_bytes())
        if not isinstance(public_key, Ed25519PublicKey):
            raise SignatureError(f"{path} is not an Ed25519 public key")
        keys[key_id(public_key)] = public_key
    return keys


@dataclass(frozen=True)
class KeyPair:
    private: Path
    public: Path
    key_id: str


def new_key_pair(folder: Path, name: str = "operator") -> KeyPair:
    """An operator's signing key (PEM, readable by its owner only) and the public half devices trust.

    :param Path folder: where both are written (created if missing).
    :param str name: the files' name: `<name>.key` and `<name>.pub`.
    :returns: the two paths and the key id.
    :raises FileExistsError: if `<name>.key` exists: a signing key is never overwritten.
    """
    folder.mkdir(parents=True, exist_ok=True)
    private_key = Ed25519PrivateKey.generate()
    private, public = folder / f"{name}.key", folder / f"{name}{PUBLIC_KEY_SUFFIX}"
    if private.exists():
        raise _refused(private)
    # Written whole beside its place, then linked in: a link fails if the name exists, so of two processes
    # making the key at once (two `edgefleet fleet` started together) one is refused and the key both then
    # read is the other's, whole; a check-then-write let the later one overwrite it.
    pending = _pending(private)
    try:
        pending.touch(mode=0o600)
        pending.write_bytes(private_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                      serialization.NoEncryption()))
        _create_from(pending, private)
    finally:
        pending.unlink(missing_ok=True)
    _write_whole(public, _public_pem(private_key))
    return KeyPair(private, public, key_id(private_key.public_key()))


def ensure_key_pair(folder: Path, name: str = "operator") -> KeyPair:
    """The operator's key pair, made on first use (new_key_pair), else the one there: its public half
    written again from the private key where it is missing or another key's (a maker stopped between
    the two files, or a second maker reading before the first wrote it).

    :param Path folder: where the pair is or goes.
    :param str name: the files' name: `<name>.key` and `<name>.pub`.
    :returns: the two paths and the key id.
    :raises ValueError: if `<name>.key` is not a PEM private key.
    :raises SignatureError: if it is a private key of another kind than Ed25519.
    """
    try:
        return new_key_pair(folder, name)
    except FileExistsError:
        pass
    private, public = folder / f"{name}.key", folder / f"{name}{PUBLIC_KEY_SUFFIX}"
    private_key = load_private_key(private)
    pem = _public_pem(private_key)
    if not public.is_file() or public.read_bytes() != pem:
        _write_whole(public, pem)
    return KeyPair(private, public, key_id(private_key.public_key()))


def _refused(key: Path) -> FileExistsError:
    return FileExistsError(f"{key} exists; a signing key is never overwritten")


def _public_pem(private_key: Ed25519PrivateKey) -> bytes:
    return private_key.public_key().public_bytes(serialization.Encoding.PEM,
                                                 serialization.PublicFormat.SubjectPublicKeyInfo)


def _pending(path: Path) -> Path:
    """A hidden name beside `path` for its next content (never *.pub: load_public_keys would read it)."""
    return path.with_name(f".{path.name}.{secrets.token_hex(8)}.pending")


def _write_whole(path: Path, data: bytes) -> None:
    """Replaces `path` with `data` at once: a reader sees the old file or the new one, never a part."""
    pending = _pending(path)
    try:
        pending.write_bytes(data)
        os.replace(pending, path)
    finally:
        pending.unlink(missing_ok=True)


def _create_from(pending: Path, target: Path) -> None:
    """Makes `target` with `pending`'s content, raising FileExistsError if it exists: a hard link, whole at
    once; on a filesystem without hard links (vfat, some network mounts), an exclusive create."""
    try:
        os.link(pending, target)
    except FileExistsError:
        raise _refused(target) from None
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS):
            raise
        try:
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise _refused(target) from None
        with os.fdopen(fd, "wb") as out:
            out.write(pending.read_bytes())


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """An operator's signing key from its PEM file (unencrypted PKCS#8, as new_key_pair() writes it).

    :raises SignatureError: if it is a private key of another kind than Ed25519.
    :raises ValueError: if the file is not a PEM private key.
    :raises TypeError: if the key is encrypted.
    :raises OSError: if it cannot be read.
    """
    private_key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(private_key, Ed25519PrivateKey):
        raise SignatureError(f"{path} is not an Ed25519 private key")
    return private_key
