"""`edgefleet rollout start` on a real Mosquitto and a real S3 registry (moto_server): a canary of a small
fleet is an exact number of devices, shown before it starts, and a version the registry does not hold
signed by a trusted key is refused with nothing published on the broker."""

from __future__ import annotations

import json
import time

import pytest
from typer.testing import CliRunner

from edgefleet import cli
from edgefleet.publish import publish
from services.sync.membership import is_member
from shared import registry, s3, topics
from shared.codec import DecodeError, WireFormat, decode, encode
from shared.config import CommonSettings
from shared.manifest import ModelManifest
from shared.mqtt import MqttLink, content_type_of
from shared.schemas import Rollout, RolloutPhase, ServiceState, ServiceStatus

NAME = "efficientnet-lite0"
BUCKET = "edgefleet-models"
FLEET = ("device-1", "device-2")


@pytest.fixture
def operator(s3_server, broker, tmp_path, model_dir):
    """An operator's environment: a registry holding the real model as v1, signed by their key, and a
    fleet broker where two devices' sync services have said they are online (retained, as sync does)."""
    keys = registry.new_key_pair(tmp_path / "keys")
    publish(s3.client(s3_server.settings()), BUCKET, model_dir, keys.private, version=1)
    link = _link(broker.url)
    link.start()
    assert link.wait_connected(10)
    for device in FLEET:
        status = ServiceStatus(device=device, service=topics.SYNC_SERVICE, state=ServiceState.ONLINE,
                               at=time.time(), edgefleet_version="test")
        link.publish(topics.status(device, topics.SYNC_SERVICE), encode(status), qos=1, retain=True,
                     content_type=WireFormat.JSON.content_type).wait_for_publish(10)
    link.stop()
    return {**s3_server.env(), "EDGEFLEET_MQTT_URL": broker.url, "EDGEFLEET_TRUSTED_KEYS_DIR": str(keys.public.parent)}


def _link(url):
    return MqttLink(CommonSettings(mqtt_url=url, device_id="test"), "test", unique=True)


def _edgefleet(env, *args):
    return CliRunner().invoke(cli.app, list(args), env=env)


def _retained_rollout(url, wait_s=2.0):
    got = []

    def on_message(message):
        if message.payload:
            try:
                got.append(decode(Rollout, message.payload, content_type_of(message)))
            except DecodeError:
                got.append(message.payload)

    link = _link(url)
    link.subscribe(topics.rollout(), on_message)
    link.start()
    try:
        assert link.wait_connected(10)
        deadline = time.monotonic() + wait_s
        while not got and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        link.stop()
    return got[-1] if got else None


def _members(rollout: Rollout) -> list[str]:
    """The devices that install it, each deciding by the rollout message alone (as sync does)."""
    return [device for device in FLEET if is_member(rollout, device, [])]


@pytest.mark.parametrize("canary", [("--canary", "50"), ("--canary-devices", "1")], ids=["share", "count"])
def test_a_canary_of_a_two_device_fleet_targets_exactly_one_and_promote_takes_both(operator, broker, canary):
    started = _edgefleet(operator, "rollout", "start", NAME, "1", *canary, "--rollout-id", "first")
    assert started.exit_code == 0, started.output
    rollout = _retained_rollout(broker.url)
    assert isinstance(rollout, Rollout) and rollout.phase is RolloutPhase.CANARY
    assert len(_members(rollout)) == 1 and rollout.target.canary_devices == _members(rollout)
    assert f"canary: 1 of 2 devices ({_members(rollout)[0]})" in started.stderr
    assert started.stderr.index("canary: 1 of 2") < started.stderr.index("rollout first:"), "the plan comes first"

    assert _edgefleet(operator, "rollout", "promote").exit_code == 0
    promoted = _retained_rollout(broker.url)
    assert promoted.phase is RolloutPhase.PROMOTED and _members(promoted) == list(FLEET)


def test_more_canary_devices_than_the_fleet_has_is_refused(operator, broker):
    refused = _edgefleet(operator, "rollout", "start", NAME, "1", "--canary-devices", "3")
    assert refused.exit_code == 2 and "holds only 2 devices" in refused.stderr
    assert _retained_rollout(broker.url, wait_s=0.5) is None


def test_a_version_the_registry_does_not_hold_is_refused_and_nothing_is_published(operator, broker):
    missing = _edgefleet(operator, "rollout", "start", NAME, "2")
    assert missing.exit_code == 2, missing.output
    assert missing.stderr.startswith("edgefleet rollout start: refused: ")
    assert f"holds no signed {NAME} v2 (it holds v1)" in missing.stderr
    assert _retained_rollout(broker.url, wait_s=0.5) is None, "a refused rollout published nothing"


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
    assert _retained_rollout(broker.url, wait_s=0.5) is None, "a refused rollout published nothing"
