"""`edgefleet rollout start` on a real Mosquitto and a real S3 registry (moto_server): a canary of a small
fleet is an exact number of devices, shown before it starts, and a version the registry does not hold
signed by a trusted key, or whose artifact (or a cascade member's) is missing or replaced, is refused
with nothing published on the broker."""

from __future__ import annotations

import json
import time

import pytest
from typer.testing import CliRunner

from edgefleet import cli
from edgefleet.models.cascade import assemble
from edgefleet.publish import NotPublished, publish, signed_model
from services.sync.membership import is_member
from shared import registry, s3, topics
from shared.codec import WireFormat, encode
from shared.manifest import ModelManifest
from shared.schemas import Rollout, RolloutPhase, ServiceState, ServiceStatus
from tests.delivery import model_variant
from tests.support import client_link, retained

NAME = "efficientnet-lite0"
BUCKET = "edgefleet-models"
FLEET = ("device-1", "device-2")


@pytest.fixture
def operator(s3_server, broker, tmp_path, model_dir):
    """An operator's environment: a registry holding the real model as v1, signed by their key, and a
    fleet broker where two devices' sync services have said they are online (retained, as sync does)."""
    keys = registry.new_key_pair(tmp_path / "keys")
    publish(s3.client(s3_server.settings()), BUCKET, model_dir, keys.private, version=1)
    link = client_link(broker.url)
    link.start()
    assert link.wait_connected(10)
    for device in FLEET:
        status = ServiceStatus(device=device, service=topics.SYNC_SERVICE, state=ServiceState.ONLINE,
                               at=time.time(), edgefleet_version="test")
        link.publish(topics.status(device, topics.SYNC_SERVICE), encode(status), qos=1, retain=True,
                     content_type=WireFormat.JSON.content_type).wait_for_publish(10)
    link.stop()
    return {**s3_server.env(), "EDGEFLEET_MQTT_URL": broker.url, "EDGEFLEET_TRUSTED_KEYS_DIR": str(keys.public.parent)}


def _edgefleet(env, *args):
    return CliRunner().invoke(cli.app, list(args), env=env)


def _members(rollout: Rollout) -> list[str]:
    """The devices that install it, each deciding by the rollout message alone (as sync does)."""
    return [device for device in FLEET if is_member(rollout, device, [])]


@pytest.mark.parametrize("canary", [("--canary", "50"), ("--canary-devices", "1")], ids=["share", "count"])
def test_a_canary_of_a_two_device_fleet_targets_exactly_one_and_promote_takes_both(operator, broker, canary):
    started = _edgefleet(operator, "rollout", "start", NAME, "1", *canary, "--rollout-id", "first")
    assert started.exit_code == 0, started.output
    rollout = retained(broker.url, topics.rollout(), Rollout)
    assert isinstance(rollout, Rollout) and rollout.phase is RolloutPhase.CANARY
    assert len(_members(rollout)) == 1 and rollout.target.canary_devices == _members(rollout)
    assert f"canary: 1 of 2 devices ({_members(rollout)[0]})" in started.stderr
    assert started.stderr.index("canary: 1 of 2") < started.stderr.index("rollout first:"), "the plan comes first"

    assert _edgefleet(operator, "rollout", "promote").exit_code == 0
    promoted = retained(broker.url, topics.rollout(), Rollout)
    assert promoted.phase is RolloutPhase.PROMOTED and _members(promoted) == list(FLEET)


def test_a_share_with_no_device_online_is_refused_unless_the_devices_are_let_draw_it(operator, broker):
    link = client_link(broker.url)
    link.start()
    assert link.wait_connected(10)
    for device in FLEET:  # the devices' retained statuses cleared: the broker knows no device
        link.publish(topics.status(device, topics.SYNC_SERVICE), b"", qos=1, retain=True).wait_for_publish(10)
    link.stop()

    refused = _edgefleet(operator, "rollout", "start", NAME, "1", "--canary", "50")
    assert refused.exit_code == 2, refused.output
    assert "no device has a fresh online status" in refused.stderr and "--let-devices-draw" in refused.stderr
    assert retained(broker.url, topics.rollout(), Rollout, wait_s=0.5) is None, "a refused rollout published"

    drawn = _edgefleet(operator, "rollout", "start", NAME, "1", "--canary", "50", "--let-devices-draw")
    assert drawn.exit_code == 0, drawn.output
    assert "canary: 50% of the devices (none has a fresh status on the fleet broker yet), each device deciding " \
           "by itself" in drawn.stderr
    rollout = retained(broker.url, topics.rollout(), Rollout)
    assert (rollout.target.share, rollout.target.canary_devices, rollout.phase) == (0.5, [], RolloutPhase.CANARY)

def test_more_canary_devices_than_the_fleet_has_is_refused(operator, broker):
    refused = _edgefleet(operator, "rollout", "start", NAME, "1", "--canary-devices", "3")
    assert refused.exit_code == 2 and "holds only 2 devices" in refused.stderr
    assert retained(broker.url, topics.rollout(), Rollout, wait_s=0.5) is None


def test_a_version_the_registry_does_not_hold_is_refused_and_nothing_is_published(operator, broker):
    missing = _edgefleet(operator, "rollout", "start", NAME, "2")
    assert missing.exit_code == 2, missing.output
    assert missing.stderr.startswith("edgefleet rollout start: refused: ")
    assert f"holds no signed {NAME} v2 (it holds v1)" in missing.stderr
    assert retained(broker.url, topics.rollout(), Rollout, wait_s=0.5) is None, "a refused rollout published"


def test_a_tampered_manifest_or_an_untrusted_key_is_refused_and_nothing_is_published(operator, s3_server, broker,
                                                                                    tmp_path):
    store = s3.client(s3_server.settings())
    manifest = json.loads(store.get_object(Bucket=BUCKET, Key=registry.key(NAME, 1, registry.MANIFEST_OBJECT))[
        "Body"].read())
    signature = store.get_object(Bucket=BUCKET, Key=registry.key(NAME, 1, registry.SIGNATURE_OBJECT))["Body"].read()
    # v1's genuine signature beside a manifest that says v2 and names another artifact.
    tampered = {**manifest, "version": 2, "sha256": "0" * 64}
    store.put_object(Bucket=BUCKET, Key=registry.key(NAME, 2, registry.MANIFEST_OBJECT),
                     Body=registry.manifest_bytes(ModelManifest(**tampered)))
    store.put_object(Bucket=BUCKET, Key=registry.key(NAME, 2, registry.SIGNATURE_OBJECT), Body=signature)
    refused = _edgefleet(operator, "rollout", "start", NAME, "2")
    assert refused.exit_code == 2 and "not trusted" in refused.stderr and "does not match" in refused.stderr

    stranger = registry.new_key_pair(tmp_path / "stranger")
    untrusted = _edgefleet({**operator, "EDGEFLEET_TRUSTED_KEYS_DIR": str(stranger.public.parent)},
                           "rollout", "start", NAME, "1")
    assert untrusted.exit_code == 2 and "unknown key" in untrusted.stderr
    assert retained(broker.url, topics.rollout(), Rollout, wait_s=0.5) is None, "a refused rollout published"


def test_a_published_model_whose_artifact_was_replaced_or_removed_is_refused_and_nothing_is_published(
        operator, s3_server, broker):
    store = s3.client(s3_server.settings())
    artifact = registry.key(NAME, 1, registry.MODEL_OBJECT)
    genuine = store.get_object(Bucket=BUCKET, Key=artifact)["Body"].read()
    # Another model's bytes of another size where v1's model.onnx was: the signed manifest is untouched.
    store.put_object(Bucket=BUCKET, Key=artifact, Body=genuine[: len(genuine) // 2])
    resized = _edgefleet(operator, "rollout", "start", NAME, "1")
    assert resized.exit_code == 2, resized.output
    assert resized.stderr.startswith("edgefleet rollout start: refused: ")
    assert f"{NAME} v1's model.onnx in the registry is {len(genuine) // 2} bytes, its signed manifest says " \
           f"{len(genuine)}" in resized.stderr

    # The same size, other bytes: the SHA-256 the store keeps (publish asks for it) tells them apart.
    store.put_object(Bucket=BUCKET, Key=artifact, Body=bytes(len(genuine)), ChecksumAlgorithm="SHA256")
    same_size = _edgefleet(operator, "rollout", "start", NAME, "1")
    assert same_size.exit_code == 2 and "has SHA-256" in same_size.stderr, same_size.output

    store.delete_object(Bucket=BUCKET, Key=artifact)
    removed = _edgefleet(operator, "rollout", "start", NAME, "1")
    assert removed.exit_code == 2, removed.output
    assert f"{NAME} v1's model.onnx is missing from the registry (s3://{BUCKET}/{artifact})" in removed.stderr
    assert retained(broker.url, topics.rollout(), Rollout, wait_s=0.5) is None, "a refused rollout published"


def test_a_cascade_whose_member_artifact_is_missing_is_refused_and_nothing_is_published(
        operator, s3_server, broker, model_dir, tmp_path):
    store = s3.client(s3_server.settings())
    small = model_variant(model_dir, tmp_path / "small", "stage 1", name="lite0-small")
    assemble(small, model_dir, tmp_path / "cascade", name="lite0-cascade", version=1, metric="margin", threshold=0.5)
    publish(store, BUCKET, tmp_path / "cascade", tmp_path / "keys" / "operator.key")  # the operator fixture's key
    trusted = registry.load_public_keys(tmp_path / "keys")
    assert signed_model(store, BUCKET, "lite0-cascade", 1, trusted).file == "cascade.json", "whole, it is accepted"

    store.delete_object(Bucket=BUCKET, Key=registry.key("lite0-small", 1, registry.MODEL_OBJECT))
    with pytest.raises(NotPublished, match="the cascade's stage1 member lite0-small v1's model.onnx is missing"):
        signed_model(store, BUCKET, "lite0-cascade", 1, trusted)
    refused = _edgefleet(operator, "rollout", "start", "lite0-cascade", "1")
    assert refused.exit_code == 2 and "stage1 member lite0-small v1's model.onnx is missing" in refused.stderr
    assert retained(broker.url, topics.rollout(), Rollout, wait_s=0.5) is None, "a refused rollout published"
