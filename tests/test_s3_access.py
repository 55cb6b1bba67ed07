"""Least privilege in the S3 store: a device's key, made by `edgefleet s3 device-key`,
reads the model registry as the sync service does and can do nothing else. Against a real moto server
process with keys enforced and a fixed root pair (the MinIO stand-in, edgefleet.s3server)."""

from __future__ import annotations

import json
import os
import secrets
import stat
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from edgefleet.ports import free_port, wait_listening
from edgefleet.publish import publish, versions
from edgefleet.s3access import POLICY_NAME, device_policy, user_name
from edgefleet.s3server import S3Server
from services.sync.download import download
from shared import registry, s3
from shared.config import IngestSettings, StoreSettings
from shared.manifest import load_verified

REPO = Path(__file__).resolve().parent.parent
BUCKET = StoreSettings.model_fields["registry_bucket"].default
TELEMETRY = IngestSettings.model_fields["telemetry_bucket"].default
TELEMETRY_KEY = "telemetry/predictions/date=2026-11-25/device=dev-a/batch-1.jsonl.gz"
OUTSIDE_KEY = "operators/notes.txt"  # an object of the registry bucket outside models/
DEVICE = "dev-a"


def _cli(*args: str, env: dict[str, str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgefleet", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env}, cwd=cwd)


def _client(service: str, url: str, key_id: str, secret: str):
    return boto3.client(service, endpoint_url=url, region_name="us-east-1", aws_access_key_id=key_id,
                        aws_secret_access_key=secret,
                        config=Config(retries={"max_attempts": 1}, s3={"addressing_style": "path"}))


def _code(exc: pytest.ExceptionInfo) -> str:
    return exc.value.response["Error"]["Code"]


@pytest.fixture(scope="module")
def store():
    root = (f"root{secrets.token_hex(4)}", secrets.token_urlsafe(24))
    with S3Server(root_credentials=root) as server:
        yield server


@pytest.fixture(scope="module")
def root(store):
    return s3.client(store.settings())


@pytest.fixture(scope="module")
def published(store, root, model_dir, tmp_path_factory):
    """The root key publishes the real model with the registry code, and writes telemetry and an
    object outside models/ for the device key to be refused."""
    keys = registry.new_key_pair(tmp_path_factory.mktemp("keys"))
    before = [b["Name"] for b in root.list_buckets()["Buckets"]]
    done = publish(root, BUCKET, model_dir, keys.private)
    root.create_bucket(Bucket=TELEMETRY)
    root.put_object(Bucket=TELEMETRY, Key=TELEMETRY_KEY, Body=b"telemetry")
    root.put_object(Bucket=BUCKET, Key=OUTSIDE_KEY, Body=b"not a model")
    return done, keys, before


@pytest.fixture(scope="module")
def device_key(store, published, tmp_path_factory):
    """`edgefleet s3 device-key` run for real, as an operator would, with the root pair."""
    folder = tmp_path_factory.mktemp("s3") / DEVICE
    result = _cli("s3", "device-key", DEVICE, "--out", str(folder), env=store.env())
    assert result.returncode == 0, result.stderr
    return folder, result, ((folder / "access-key").read_text(), (folder / "secret-key").read_text())


@pytest.fixture(scope="module")
def device(store, device_key):
    return s3.client(store.settings(s3_access_key_id=device_key[2][0], s3_secret_access_key=device_key[2][1]))


def test_root_key_creates_the_bucket_and_publishes_a_real_model(root, published, model_dir):
    done, _, before = published
    assert BUCKET not in before
    assert BUCKET in [b["Name"] for b in root.list_buckets()["Buckets"]]
    assert versions(root, BUCKET, done.name) == [1]
    size = root.head_object(Bucket=BUCKET, Key=registry.key(done.name, 1, registry.MODEL_OBJECT))["ContentLength"]
    assert size == load_verified(model_dir)[0].size_bytes


def test_device_key_command_writes_the_key_as_private_files(store, root, device_key):
    folder, result, (key_id, secret) = device_key
    assert f"created key {key_id} for {user_name(DEVICE)}" in result.stderr
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    for name in ("access-key", "secret-key"):
        assert stat.S_IMODE((folder / name).stat().st_mode) == 0o600
    assert key_id and secret and key_id != store.env()["EDGEFLEET_S3_ACCESS_KEY_ID"]
    iam = _client("iam", store.url, *store.root_credentials)
    keys = iam.list_access_keys(UserName=user_name(DEVICE))["AccessKeyMetadata"]
    assert [k["AccessKeyId"] for k in keys] == [key_id]
    granted = iam.get_user_policy(UserName=user_name(DEVICE), PolicyName=POLICY_NAME)["PolicyDocument"]
    assert (json.loads(granted) if isinstance(granted, str) else granted) == device_policy(BUCKET)
    assert iam.list_user_policies(UserName=user_name(DEVICE))["PolicyNames"] == [POLICY_NAME]


def test_device_key_command_keeps_a_key_that_still_works(store, device_key):
    folder, _, pair = device_key
    again = _cli("s3", "device-key", DEVICE, "--out", str(folder), env=store.env())
    assert again.returncode == 0, again.stderr
    assert f"kept: the key {pair[0]}" in again.stderr
    assert ((folder / "access-key").read_text(), (folder / "secret-key").read_text()) == pair


def test_device_key_command_replaces_a_dead_key_and_revokes_it(store, published, tmp_path):
    folder = tmp_path / "dev-b"
    first = _cli("s3", "device-key", "dev-b", "--out", str(folder), env=store.env())
    assert first.returncode == 0, first.stderr
    old_id = (folder / "access-key").read_text()
    (folder / "secret-key").write_text("a secret the store never issued")
    second = _cli("s3", "device-key", "dev-b", "--out", str(folder), env=store.env())
    assert second.returncode == 0, second.stderr
    new_id, new_secret = (folder / "access-key").read_text(), (folder / "secret-key").read_text()
    assert new_id != old_id and f"revoked its older keys {old_id}" in second.stderr
    done = published[0]
    key = registry.key(done.name, done.version, registry.MANIFEST_OBJECT)
    assert _client("s3", store.url, new_id, new_secret).head_object(Bucket=BUCKET, Key=key)["ContentLength"] > 0
    with pytest.raises(ClientError) as refused:
        _client("s3", store.url, old_id, "anything").head_object(Bucket=BUCKET, Key=key)
    assert refused.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403


def test_device_key_command_refuses_an_unsafe_device_id_and_a_non_admin_key(store, device_key, tmp_path):
    bad = _cli("s3", "device-key", "../x", "--out", str(tmp_path / "x"), env=store.env())
    assert bad.returncode == 1 and "device id '../x'" in bad.stderr
    key_id, secret = device_key[2]
    weak = _cli("s3", "device-key", "dev-c", "--out", str(tmp_path / "c"),
                env=store.env(s3_access_key_id=key_id, s3_secret_access_key=secret))
    assert weak.returncode == 1 and "AccessDenied" in weak.stderr, weak.stderr
    assert not (tmp_path / "c").exists()


def test_device_key_reads_a_published_model_as_sync_does(device, published, tmp_path):
    done, keys, _ = published
    # fetch_manifest: the manifest and its signature, each read whole but bounded (a ranged GET).
    document = registry.read_bounded(device, BUCKET, registry.key(done.name, 1, registry.MANIFEST_OBJECT),
                                     registry.MAX_MANIFEST_BYTES)
    signature = registry.read_bounded(device, BUCKET, registry.key(done.name, 1, registry.SIGNATURE_OBJECT),
                                      registry.MAX_SIGNATURE_BYTES)
    manifest = registry.verify(document, signature, registry.load_public_keys(keys.public.parent))
    # download: HeadObject, then ranged GETs of 1 MiB, as SyncSettings.download_chunk_bytes defaults to.
    chunk, offsets = 1 << 20, []
    part = download(device, BUCKET, registry.key(done.name, 1, registry.MODEL_OBJECT), tmp_path / "model.part",
                    manifest.size_bytes, manifest.sha256, chunk, 0, offsets.append, lambda: False)
    assert part.stat().st_size == manifest.size_bytes
    assert len(offsets) == -(-manifest.size_bytes // chunk) > 1
    # The registry's listing, under models/ only.
    assert versions(device, BUCKET, done.name) == [1]


def _forbidden(device, published):
    """What a device key must not do, by name (the names parametrize the test; nothing runs until called)."""

    def model() -> str:
        return registry.key(published[0].name, published[0].version, registry.MODEL_OBJECT)

    return {
        "put a new model": lambda: device.put_object(Bucket=BUCKET, Key=registry.key("rogue", 1, registry.MODEL_OBJECT),
                                                     Body=b"x"),
        "overwrite a published model": lambda: device.put_object(Bucket=BUCKET, Key=model(), Body=b"x"),
        "delete a published model": lambda: device.delete_object(Bucket=BUCKET, Key=model()),
        "write telemetry": lambda: device.put_object(Bucket=TELEMETRY, Key=TELEMETRY_KEY, Body=b"forged"),
        "read telemetry": lambda: device.get_object(Bucket=TELEMETRY, Key=TELEMETRY_KEY),
        "head telemetry": lambda: device.head_object(Bucket=TELEMETRY, Key=TELEMETRY_KEY),
        "list telemetry": lambda: device.list_objects_v2(Bucket=TELEMETRY, Prefix="telemetry/"),
        "read outside models/": lambda: device.get_object(Bucket=BUCKET, Key=OUTSIDE_KEY),
        "list the whole registry bucket": lambda: device.list_objects_v2(Bucket=BUCKET),
        "list another prefix": lambda: device.list_objects_v2(Bucket=BUCKET, Prefix="operators/"),
        "list a prefix that only starts like models": lambda: device.list_objects_v2(Bucket=BUCKET, Prefix="models"),
        "create a bucket": lambda: device.create_bucket(Bucket="rogue-bucket"),
        "delete the registry bucket": lambda: device.delete_bucket(Bucket=BUCKET),
    }


@pytest.mark.parametrize("attempt", list(_forbidden(None, None)))
def test_device_key_is_refused(attempt, device, published, root):
    with pytest.raises(ClientError) as refused:
        _forbidden(device, published)[attempt]()
    assert _code(refused) == "AccessDenied" or refused.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    # What the root sees afterwards is untouched.
    done = published[0]
    model = registry.key(done.name, done.version, registry.MODEL_OBJECT)
    assert root.head_object(Bucket=BUCKET, Key=model)["ContentLength"] > 1
    assert root.get_object(Bucket=TELEMETRY, Key=TELEMETRY_KEY)["Body"].read() == b"telemetry"
    assert versions(root, BUCKET, "rogue") == []


def test_device_key_cannot_delete_in_bulk(device, published, root):
    # DeleteObjects answers 200 and refuses key by key (AWS and MinIO alike).
    model = registry.key(published[0].name, published[0].version, registry.MODEL_OBJECT)
    answer = device.delete_objects(Bucket=BUCKET, Delete={"Objects": [{"Key": model}, {"Key": OUTSIDE_KEY}]})
    assert answer.get("Deleted", []) == []
    assert sorted((e["Key"], e["Code"]) for e in answer["Errors"]) == sorted([(model, "AccessDenied"),
                                                                              (OUTSIDE_KEY, "AccessDenied")])
    assert root.head_object(Bucket=BUCKET, Key=model)["ContentLength"] > 1
    assert root.get_object(Bucket=BUCKET, Key=OUTSIDE_KEY)["Body"].read() == b"not a model"


def test_device_key_cannot_make_itself_more_keys_or_rights(store, device_key):
    iam = _client("iam", store.url, *device_key[2])
    for attempt in (lambda: iam.create_access_key(UserName=user_name(DEVICE)),
                    lambda: iam.put_user_policy(UserName=user_name(DEVICE), PolicyName="more",
                                                PolicyDocument=json.dumps({"Version": "2012-10-17", "Statement": [
                                                    {"Effect": "Allow", "Action": "*", "Resource": "*"}]})),
                    lambda: iam.create_user(UserName="rogue")):
        with pytest.raises(ClientError) as refused:
            attempt()
        assert _code(refused) == "AccessDenied"


def test_an_unknown_key_is_refused(store, published):
    stranger = _client("s3", store.url, "AKIA" + secrets.token_hex(8).upper(), secrets.token_urlsafe(30))
    done = published[0]
    with pytest.raises(ClientError) as refused:
        stranger.get_object(Bucket=BUCKET, Key=registry.key(done.name, done.version, registry.MANIFEST_OBJECT))
    assert _code(refused) == "InvalidAccessKeyId"


def test_a_wrong_secret_is_refused(store, published, device_key):
    done = published[0]
    for key_id in (device_key[2][0], store.root_credentials[0]):
        impostor = _client("s3", store.url, key_id, secrets.token_urlsafe(30))
        with pytest.raises(ClientError) as refused:
            impostor.get_object(Bucket=BUCKET, Key=registry.key(done.name, done.version, registry.MANIFEST_OBJECT))
        assert _code(refused) == "SignatureDoesNotMatch"


def test_the_control_api_cannot_switch_enforcement_off(store, device, published):
    for path, body in (("/moto-api/reset-auth", b"inf"), ("/moto-api/reset", b"")):
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(urllib.request.Request(store.url + path, data=body, method="POST"),  # noqa: S310 our loopback http store
                                   timeout=10)
        assert refused.value.code == 403
    with pytest.raises(ClientError) as still:
        device.put_object(Bucket=BUCKET, Key=registry.key("rogue", 1, registry.MODEL_OBJECT), Body=b"x")
    assert _code(still) == "AccessDenied"
    assert versions(device, BUCKET, published[0].name) == [1]


def test_the_policy_file_is_the_policy_the_command_grants():
    assert json.loads((REPO / "deploy/s3/device-policy.json").read_text()) == device_policy(BUCKET)


def test_the_stand_in_takes_minios_command_line_and_health_check(tmp_path):
    (tmp_path / "user").write_text("minio-root\n")
    (tmp_path / "password").write_text("a-long-root-password\n")
    port = free_port()
    env = {**os.environ, "MINIO_ROOT_USER_FILE": str(tmp_path / "user"),
           "MINIO_ROOT_PASSWORD_FILE": str(tmp_path / "password")}
    env.pop("MINIO_ROOT_USER", None), env.pop("MINIO_ROOT_PASSWORD", None)
    ready = [sys.executable, "-m", "edgefleet.s3server", "mc", "ready", "local"]
    health = {**env, "MC_HOST_local": f"http://minio-root:secret@127.0.0.1:{port}"}
    assert subprocess.run(ready, env=health, capture_output=True, timeout=60).returncode == 1  # nothing listens yet
    server = subprocess.Popen([sys.executable, "-m", "edgefleet.s3server", "server", str(tmp_path / "data"),
                               "--console-address", ":9001", "--address", f"127.0.0.1:{port}"],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_listening(server, port, 30, "the S3 stand-in")
        assert subprocess.run(ready, env=health, capture_output=True, timeout=60).returncode == 0
        url = f"http://127.0.0.1:{port}"
        _client("s3", url, "minio-root", "a-long-root-password").create_bucket(Bucket=BUCKET)
        with pytest.raises(ClientError) as refused:
            _client("s3", url, "minio-root", "not-the-password").list_objects_v2(Bucket=BUCKET)
        assert _code(refused) == "SignatureDoesNotMatch"
    finally:
        server.terminate()
        server.wait(10)


def test_the_stand_in_refuses_root_credentials_minio_would_refuse(tmp_path):
    env = {**os.environ, "MINIO_ROOT_USER": "minio-root", "MINIO_ROOT_PASSWORD": "short"}
    env.pop("MINIO_ROOT_USER_FILE", None), env.pop("MINIO_ROOT_PASSWORD_FILE", None)
    result = subprocess.run([sys.executable, "-m", "edgefleet.s3server", "server", str(tmp_path),
                             "--address", f"127.0.0.1:{free_port()}"],
                            env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "at least 8" in result.stderr
