"""The model registry's layout in S3 and its signatures: the one contract between the operators' tools
(which publish) and the devices' sync service (which installs).

    models/<name>/<version>/model.onnx      the artifact
    models/<name>/<version>/manifest.json   its manifest (SHA-256 and size of the artifact, parent,
                                            preprocessing, labels, least edgefleet version)
    models/<name>/<version>/manifest.sig    {"algorithm": "ed25519", "key_id": ..., "signature": ...}
                                            over the exact bytes of manifest.json

The signature is written last: a version without one is incomplete and is neither listed nor
installed. A published version is never overwritten.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from shared.manifest import ModelManifest

ROOT = "models"
MODEL_OBJECT, MANIFEST_OBJECT, SIGNATURE_OBJECT = "model.onnx", "manifest.json", "manifest.sig"
ALGORITHM = "ed25519"
PUBLIC_KEY_SUFFIX = ".pub"
_VERSION_KEY = re.compile(rf"^{ROOT}/(?P<name>[^/]+)/(?P<version>\d+)/{re.escape(SIGNATURE_OBJECT)}$")


def key(name: str, version: int, obj: str) -> str:
    return f"{ROOT}/{name}/{version}/{obj}"


def version_of(object_key: str, name: str) -> int | None:
    """The version a signature object's key names, if it belongs to `name`."""
    match = _VERSION_KEY.match(object_key)
    return int(match["version"]) if match and match["name"] == name else None


class SignatureError(ValueError):
    """A manifest that must not be trusted: no signature, an unknown key, or a signature that does not verify."""


def key_id(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def sign(manifest_bytes: bytes, private_key: Ed25519PrivateKey) -> bytes:
    document = {
        "algorithm": ALGORITHM,
        "key_id": key_id(private_key.public_key()),
        "signature": base64.b64encode(private_key.sign(manifest_bytes)).decode(),
    }
    return json.dumps(document).encode()


def verify(manifest_bytes: bytes, signature: bytes, trusted: dict[str, Ed25519PublicKey]) -> ModelManifest:
    """The manifest, if `signature` is a valid signature over exactly these bytes by a trusted key."""
    try:
        document = json.loads(signature)
        algorithm, signer, raw = document["algorithm"], document["key_id"], base64.b64decode(document["signature"], validate=True)
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
    return ModelManifest.model_validate_json(manifest_bytes)


def manifest_bytes(manifest: ModelManifest) -> bytes:
    """The bytes that are signed and stored: one canonical rendering, so the same manifest signs the same."""
    return json.dumps(manifest.model_dump(mode="json"), sort_keys=True, indent=1).encode()


def load_public_keys(folder: Path) -> dict[str, Ed25519PublicKey]:
    """Every operator public key (PEM, *.pub) in a folder, by key id."""
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
    """An operator's signing key (PEM, readable by its owner only) and the public half devices trust."""
    folder.mkdir(parents=True, exist_ok=True)
    private_key = Ed25519PrivateKey.generate()
    private, public = folder / f"{name}.key", folder / f"{name}{PUBLIC_KEY_SUFFIX}"
    if private.exists():
        raise FileExistsError(f"{private} exists; a signing key is never overwritten")
    private.touch(mode=0o600)
    private.write_bytes(private_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()))
    public.write_bytes(private_key.public_key().public_bytes(serialization.Encoding.PEM,
                                                             serialization.PublicFormat.SubjectPublicKeyInfo))
    return KeyPair(private, public, key_id(private_key.public_key()))


def load_private_key(path: Path) -> Ed25519PrivateKey:
    private_key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(private_key, Ed25519PrivateKey):
        raise SignatureError(f"{path} is not an Ed25519 private key")
    return private_key
