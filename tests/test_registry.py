"""The signed model registry on a real S3-compatible server (moto_server, its own process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from edgefleet.registry import PublishRefused, publish, versions
from shared import VERSION, registry, s3
from shared.manifest import load_verified, sha256_of

BUCKET = "edgefleet-models"


@pytest.fixture
def store(s3_server):
    return s3.client(s3_server.settings())


@pytest.fixture
def keys(tmp_path):
    return registry.new_key_pair(tmp_path / "keys")


def _get(store, name, version, obj):
    return store.get_object(Bucket=BUCKET, Key=registry.key(name, version, obj))["Body"].read()


def test_published_model_is_signed_complete_and_verifiable(store, keys, model_dir):
    done = publish(store, BUCKET, model_dir, keys.private)
    local, local_path = load_verified(model_dir)
    assert (done.name, done.version, done.sha256) == (local.name, 1, local.sha256)
    document, signature = _get(store, done.name, 1, registry.MANIFEST_OBJECT), _get(store, done.name, 1, registry.SIGNATURE_OBJECT)
    manifest = registry.verify(document, signature, registry.load_public_keys(keys.public.parent))
    assert manifest.sha256 == sha256_of(local_path) and manifest.min_edgefleet == VERSION
    artifact = _get(store, done.name, 1, registry.MODEL_OBJECT)
    assert len(artifact) == manifest.size_bytes == local.size_bytes


def test_versions_only_go_up_and_never_change(store, keys, model_dir):
    assert publish(store, BUCKET, model_dir, keys.private, name="door-model").version == 1
    assert publish(store, BUCKET, model_dir, keys.private, name="door-model", version=3).version == 3
    with pytest.raises(PublishRefused, match="already published"):
        publish(store, BUCKET, model_dir, keys.private, name="door-model", version=3)
    with pytest.raises(PublishRefused, match="older than the registry's latest, v3"):
        publish(store, BUCKET, model_dir, keys.private, name="door-model", version=2)
    assert publish(store, BUCKET, model_dir, keys.private, name="door-model").version == 4
    assert versions(store, BUCKET, "door-model") == [1, 3, 4]


def test_a_version_without_its_signature_is_not_listed(store, keys, model_dir):
    publish(store, BUCKET, model_dir, keys.private, name="half")
    store.put_object(Bucket=BUCKET, Key=registry.key("half", 2, registry.MODEL_OBJECT), Body=b"partial")
    store.put_object(Bucket=BUCKET, Key=registry.key("half", 2, registry.MANIFEST_OBJECT), Body=b"{}")
    assert versions(store, BUCKET, "half") == [1]


def test_tampering_an_unknown_key_and_a_wrong_signature_are_refused(store, keys, model_dir, tmp_path):
    done = publish(store, BUCKET, model_dir, keys.private)
    document, signature = _get(store, done.name, 1, registry.MANIFEST_OBJECT), _get(store, done.name, 1, registry.SIGNATURE_OBJECT)
    trusted = registry.load_public_keys(keys.public.parent)
    tampered = document.replace(b'"version": 1', b'"version": 9')
    with pytest.raises(registry.SignatureError, match="does not match"):
        registry.verify(tampered, signature, trusted)
    stranger = registry.new_key_pair(tmp_path / "stranger")
    with pytest.raises(registry.SignatureError, match="unknown key"):
        registry.verify(document, registry.sign(document, registry.load_private_key(stranger.private)), trusted)
    forged = json.loads(signature)
    forged["signature"] = json.loads(registry.sign(b"something else", registry.load_private_key(keys.private)))["signature"]
    with pytest.raises(registry.SignatureError, match="does not match"):
        registry.verify(document, json.dumps(forged).encode(), trusted)
    with pytest.raises(registry.SignatureError, match="malformed"):
        registry.verify(document, b"not json", trusted)


def test_publish_command_signs_and_uploads(s3_server, keys, model_dir):
    result = subprocess.run(
        [sys.executable, "-m", "edgefleet", "model", "publish", str(model_dir), "--key", str(keys.private)],
        capture_output=True, text=True, timeout=120, env={**os.environ, **s3_server.env()},
    )
    assert result.returncode == 0, result.stderr
    assert f"signed by key {keys.key_id}" in result.stderr and "v1" in result.stderr
