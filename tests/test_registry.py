"""The signed model registry on a real S3-compatible server (moto_server, its own process)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest

from edgefleet.publish import PublishRefused, publish, versions
from shared import VERSION, registry, s3
from shared.manifest import ModelManifest, load_verified, sha256_of

BUCKET = "edgefleet-models"


@pytest.fixture
def store(s3_server):
    return s3.client(s3_server.settings())


@pytest.fixture
def keys(tmp_path):
    return registry.new_key_pair(tmp_path / "keys")


def _sha256(data):
    return hashlib.sha256(data).hexdigest()


def _get(store, name, version, obj):
    return store.get_object(Bucket=BUCKET, Key=registry.key(name, version, obj))["Body"].read()


def test_published_model_is_signed_complete_and_verifiable(store, keys, model_dir):
    done = publish(store, BUCKET, model_dir, keys.private)
    local, local_path = load_verified(model_dir)
    assert (done.name, done.version, done.sha256) == (local.name, 1, local.sha256)
    document, signature = (_get(store, done.name, 1, registry.MANIFEST_OBJECT),
                           _get(store, done.name, 1, registry.SIGNATURE_OBJECT))
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
    document, signature = (_get(store, done.name, 1, registry.MANIFEST_OBJECT),
                           _get(store, done.name, 1, registry.SIGNATURE_OBJECT))
    trusted = registry.load_public_keys(keys.public.parent)
    tampered = document.replace(b'"version": 1', b'"version": 9')
    with pytest.raises(registry.SignatureError, match="does not match"):
        registry.verify(tampered, signature, trusted)
    stranger = registry.new_key_pair(tmp_path / "stranger")
    with pytest.raises(registry.SignatureError, match="unknown key"):
        registry.verify(document, registry.sign(document, registry.load_private_key(stranger.private)), trusted)
    forged = json.loads(signature)
    forged["signature"] = json.loads(registry.sign(b"something else",
                                                   registry.load_private_key(keys.private)))["signature"]
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


def _state(store, name, version):
    """Every object of a version: key -> (ETag, bytes)."""
    objects = {}
    for obj in (registry.MODEL_OBJECT, registry.MANIFEST_OBJECT, registry.SIGNATURE_OBJECT):
        response = store.get_object(Bucket=BUCKET, Key=registry.key(name, version, obj))
        objects[obj] = (response["ETag"], response["Body"].read())
    return objects


def test_publishing_a_version_twice_leaves_the_first_untouched(store, keys, model_dir, tmp_path):
    from edgefleet.models.install import resave

    publish(store, BUCKET, model_dir, keys.private, name="twice", version=1)
    before = _state(store, "twice", 1)
    other = resave(model_dir, tmp_path / "other", "rebuilt", version=2)
    assert other.sha256 != load_verified(model_dir)[0].sha256
    with pytest.raises(PublishRefused, match="already published"):
        publish(store, BUCKET, tmp_path / "other", keys.private, name="twice", version=1)
    assert _state(store, "twice", 1) == before


def test_a_racing_publishers_artifact_is_never_overwritten(store, keys, model_dir):
    # Another publisher got as far as the artifact of v1 (no signature yet, so no listing sees v1).
    s3.ensure_bucket(store, BUCKET)
    racer = registry.key("raced", 1, registry.MODEL_OBJECT)
    store.put_object(Bucket=BUCKET, Key=racer, Body=b"the other publisher's bytes")
    etag = store.head_object(Bucket=BUCKET, Key=racer)["ETag"]
    assert versions(store, BUCKET, "raced") == []
    with pytest.raises(PublishRefused, match=f"{racer} already exists"):
        publish(store, BUCKET, model_dir, keys.private, name="raced", version=1)
    response = store.get_object(Bucket=BUCKET, Key=racer)
    assert (response["ETag"], response["Body"].read()) == (etag, b"the other publisher's bytes")
    listed = store.list_objects_v2(Bucket=BUCKET, Prefix="models/raced/")["Contents"]
    assert [o["Key"] for o in listed] == [racer], "publish stopped at the first object that existed"
    # Unnumbered, the next publish goes past the spent version.
    assert publish(store, BUCKET, model_dir, keys.private, name="raced").version == 2



def _racing(store, race):
    """Runs race(key) once, just before `store`'s first artifact PUT: after publish chose its version,
    before it claimed it (botocore's before-parameter-build event: the real client, a real request)."""
    raced = []

    def on_put(params, **_):
        if not raced and params["Key"].endswith(registry.MODEL_OBJECT):
            raced.append(race(params["Key"]))

    store.meta.events.register("before-parameter-build.s3.PutObject", on_put)
    return raced


def test_two_publishes_racing_for_the_next_free_version_both_publish_one_after_the_other(
        s3_server, store, keys, model_dir, tmp_path):
    from edgefleet.models.install import resave

    publish(store, BUCKET, model_dir, keys.private, name="busy")
    theirs = resave(model_dir, tmp_path / "theirs", "the other publisher's build")
    # Both chose v2: the other publisher (its own client) publishes v2 whole between this one's choice and its PUT.
    other = s3.client(s3_server.settings())
    raced = _racing(store, lambda _: publish(other, BUCKET, tmp_path / "theirs", keys.private, name="busy"))
    mine = publish(store, BUCKET, model_dir, keys.private, name="busy")
    assert [p.version for p in raced] == [2] and mine.version == 3, "the loser took the next free version"
    assert versions(store, BUCKET, "busy") == [1, 2, 3]
    trusted = registry.load_public_keys(keys.public.parent)
    signed = {v: registry.verify(_get(store, "busy", v, registry.MANIFEST_OBJECT),
                                 _get(store, "busy", v, registry.SIGNATURE_OBJECT), trusted) for v in (2, 3)}
    assert (signed[2].sha256, signed[3].sha256) == (theirs.sha256, load_verified(model_dir)[0].sha256)
    assert _sha256(_get(store, "busy", 2, registry.MODEL_OBJECT)) == theirs.sha256, "v2 is theirs, untouched"


def test_an_explicit_version_that_a_racing_publisher_took_is_refused(s3_server, store, keys, model_dir):
    other = s3.client(s3_server.settings())
    raced = _racing(store, lambda _: publish(other, BUCKET, model_dir, keys.private, name="busy", version=5))
    with pytest.raises(PublishRefused, match=r"models/busy/5/model.onnx already exists"):
        publish(store, BUCKET, model_dir, keys.private, name="busy", version=5)
    assert [p.version for p in raced] == [5] and versions(store, BUCKET, "busy") == [5]


def test_a_publish_that_loses_every_race_stops_after_a_bounded_number_of_tries(store, keys, model_dir):
    from edgefleet.publish import RACED_RETRIES

    s3.ensure_bucket(store, BUCKET)
    claimed = []

    def claim_first(params, **_):  # another publisher's artifact lands on each version just before this PUT
        if params["Key"].endswith(registry.MODEL_OBJECT) and params.get("IfNoneMatch"):
            store.put_object(Bucket=BUCKET, Key=params["Key"], Body=b"theirs")
            claimed.append(params["Key"])

    store.meta.events.register("before-parameter-build.s3.PutObject", claim_first)
    with pytest.raises(PublishRefused, match=f"took each of the next {RACED_RETRIES + 1} free versions"):
        publish(store, BUCKET, model_dir, keys.private, name="stormy")
    assert claimed == [registry.key("stormy", v, registry.MODEL_OBJECT) for v in range(1, RACED_RETRIES + 2)]
    assert versions(store, BUCKET, "stormy") == [], "nothing of this publish was written"

def test_a_racing_publishers_manifest_is_never_overwritten(store, keys, model_dir):
    s3.ensure_bucket(store, BUCKET)
    racer = registry.key("raced", 1, registry.MANIFEST_OBJECT)
    store.put_object(Bucket=BUCKET, Key=racer, Body=b'{"theirs": true}')
    with pytest.raises(PublishRefused, match=f"{racer} already exists"):
        publish(store, BUCKET, model_dir, keys.private, name="raced", version=1)
    assert store.get_object(Bucket=BUCKET, Key=racer)["Body"].read() == b'{"theirs": true}'
    with pytest.raises(store.exceptions.ClientError):
        store.head_object(Bucket=BUCKET, Key=registry.key("raced", 1, registry.SIGNATURE_OBJECT))


def test_read_bounded_reads_what_fits_and_refuses_what_does_not(store):
    s3.ensure_bucket(store, BUCKET)
    store.put_object(Bucket=BUCKET, Key="fits", Body=b"x" * 1000)
    store.put_object(Bucket=BUCKET, Key="empty", Body=b"")
    assert registry.read_bounded(store, BUCKET, "fits", 1000) == b"x" * 1000
    assert registry.read_bounded(store, BUCKET, "empty", 10) == b""
    with pytest.raises(registry.ObjectTooLarge, match=r"fits is 1000 bytes, over the cap of 999"):
        registry.read_bounded(store, BUCKET, "fits", 999)
    huge = registry.MAX_MANIFEST_BYTES * 4
    store.put_object(Bucket=BUCKET, Key="huge", Body=b"{" * huge)
    with pytest.raises(registry.ObjectTooLarge, match=f"huge is {huge} bytes"):
        registry.read_bounded(store, BUCKET, "huge", registry.MAX_MANIFEST_BYTES)
    with pytest.raises(store.exceptions.NoSuchKey):
        registry.read_bounded(store, BUCKET, "missing", 10)


def test_read_bounded_never_reads_past_the_cap_whatever_the_headers_say(store):
    """A server that ignores the Range and sends no Content-Length: the stream itself is cut at cap + 1."""
    s3.ensure_bucket(store, BUCKET)
    store.put_object(Bucket=BUCKET, Key="liar", Body=b"y" * 5000)
    real_get = store.get_object

    class Stream:
        def __init__(self, body):
            self.body, self.asked = body, []

        def read(self, amount=None):
            self.asked.append(amount)
            return self.body.read(amount)

        def close(self):
            self.body.close()

    streams = []

    def ignoring_range(**kwargs):
        kwargs.pop("Range")
        response = real_get(**kwargs)
        streams.append(Stream(response["Body"]))
        return {"Body": streams[-1]}

    store.get_object = ignoring_range
    with pytest.raises(registry.ObjectTooLarge, match="more than 100 bytes"):
        registry.read_bounded(store, BUCKET, "liar", 100)
    assert streams[0].asked == [101]


def test_a_manifest_or_key_with_a_path_traversal_name_is_refused(model_dir):
    manifest, _ = load_verified(model_dir)
    document = json.loads(registry.manifest_bytes(manifest))
    for name in ("../../etc", "a/b", "..", "x..y", ".hidden", "", "a" * 65, "new\nline"):
        with pytest.raises(ValueError, match="model name"):
            registry.check_name(name)
        with pytest.raises(ValueError, match="model name"):
            ModelManifest.model_validate_json(json.dumps({**document, "name": name}))
        with pytest.raises(ValueError, match="model name"):
            registry.key(name, 1, registry.MODEL_OBJECT)
    for version in (0, -1, 10**9 + 1, True):
        with pytest.raises(ValueError, match="model version"):
            registry.check_version(version)
        with pytest.raises(ValueError):
            registry.key("ok", version, registry.MODEL_OBJECT)
    with pytest.raises(ValueError):
        ModelManifest.model_validate_json(json.dumps({**document, "version": 10**9 + 1}))
    assert registry.check_name("efficientnet-lite0.int8_v2") == "efficientnet-lite0.int8_v2"
    assert len(registry.manifest_bytes(manifest)) * 10 < registry.MAX_MANIFEST_BYTES


def test_a_signed_manifest_naming_a_path_is_refused_at_verification(keys, model_dir):
    manifest, _ = load_verified(model_dir)
    document = json.loads(registry.manifest_bytes(manifest))
    evil = json.dumps({**document, "name": "../../etc"}, sort_keys=True).encode()
    signature = registry.sign(evil, registry.load_private_key(keys.private))
    with pytest.raises(ValueError, match="model name"):
        registry.verify(evil, signature, registry.load_public_keys(keys.public.parent))


def test_publish_refuses_an_unsafe_name_before_writing(store, keys, model_dir):
    with pytest.raises(ValueError, match="model name"):
        publish(store, BUCKET, model_dir, keys.private, name="../escape")
