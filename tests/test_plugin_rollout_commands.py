"""`edgefleet rollout start|promote|abort|status --plugin NAME` on a real Mosquitto and a real S3 registry
(moto_server): a plugin's rollout is retained on its own topic beside the model's, only a version the
registry holds signed by a trusted key can be rolled out, and status reads the devices' plugin states."""

from __future__ import annotations

import json
import time

import pytest
from typer.testing import CliRunner

from edgefleet import cli
from edgefleet.publish import publish_plugin
from shared import registry, s3, topics
from shared.codec import WireFormat, encode
from shared.schemas import ModelRef, PluginRollout, Rollout, RolloutPhase, SyncReport, SyncState
from tests import wat_plugins as wat
from tests.support import client_link, retained

NAME = wat.SPEC["name"]
BUCKET = "edgefleet-models"


@pytest.fixture
def operator(s3_server, broker, tmp_path):
    """The environment of an operator whose registry holds door-rule v1, signed by their key."""
    keys = registry.new_key_pair(tmp_path / "keys")
    module, spec = wat.write(tmp_path / "plugin")
    publish_plugin(s3.client(s3_server.settings()), BUCKET, module, spec, keys.private)
    return {**s3_server.env(), "EDGEFLEET_MQTT_URL": broker.url, "EDGEFLEET_TRUSTED_KEYS_DIR": str(keys.public.parent)}


def _edgefleet(env, *args):
    return CliRunner().invoke(cli.app, list(args), env=env)


def test_a_plugin_rollout_is_retained_on_its_own_topic_and_promote_and_abort_change_its_phase(operator, broker):
    started = _edgefleet(operator, "rollout", "start", NAME, "1", "--plugin", "--group", "dock", "--canary", "25",
                         "--rollout-id", "door-1")
    assert started.exit_code == 0, started.output
    assert started.stdout.strip() == "door-1" and f"the plugin {NAME} v1, canary" in started.stderr
    rollout = retained(broker.url, topics.plugin_rollout(NAME), PluginRollout)
    assert isinstance(rollout, PluginRollout)
    assert (rollout.rollout_id, rollout.plugin, rollout.version, rollout.phase) == ("door-1", NAME, 1,
                                                                                     RolloutPhase.CANARY)
    assert (rollout.target.groups, rollout.target.share, rollout.allow_downgrade) == (["dock"], 0.25, False)
    # Beside the model's rollout, never in its place: the model's topic holds nothing.
    assert retained(broker.url, topics.rollout(), Rollout, wait_s=0.5) is None
    assert _edgefleet(operator, "rollout", "promote").exit_code == 1  # no model rollout to promote

    for command, phase in (("promote", RolloutPhase.PROMOTED), ("abort", RolloutPhase.ABORTED)):
        changed = _edgefleet(operator, "rollout", command, "--plugin", NAME)
        assert changed.exit_code == 0, changed.output
        now = retained(broker.url, topics.plugin_rollout(NAME), PluginRollout)
        assert (now.rollout_id, now.version, now.phase, now.target) == ("door-1", 1, phase, rollout.target)
        assert now.issued_at > rollout.issued_at

    missing = _edgefleet(operator, "rollout", "abort", "--plugin", "gate-labels")
    assert missing.exit_code == 1 and "no rollout of the plugin gate-labels" in missing.stderr


def test_only_a_version_in_the_registry_signed_by_a_trusted_key_can_be_rolled_out(operator, s3_server, broker,
                                                                                   tmp_path):
    unpublished = _edgefleet(operator, "rollout", "start", NAME, "2", "--plugin")
    assert unpublished.exit_code == 2
    assert unpublished.stderr.startswith("edgefleet rollout start: refused: ")
    assert f"holds no signed {NAME} v2" in unpublished.stderr

    stranger = registry.new_key_pair(tmp_path / "stranger")
    untrusted = _edgefleet({**operator, "EDGEFLEET_TRUSTED_KEYS_DIR": str(stranger.public.parent)},
                           "rollout", "start", NAME, "1", "--plugin")
    assert untrusted.exit_code == 2 and "not trusted" in untrusted.stderr and "unknown key" in untrusted.stderr

    (tmp_path / "empty").mkdir()
    no_keys = _edgefleet(operator, "rollout", "start", NAME, "1", "--plugin", "--trusted-keys", str(tmp_path / "empty"))
    assert no_keys.exit_code == 2 and "no operator public key" in no_keys.stderr

    # v1's manifest and signature copied to v3: a genuine signature, but for another version.
    store = s3.client(s3_server.settings())
    for obj in (registry.MANIFEST_OBJECT, registry.SIGNATURE_OBJECT):
        body = store.get_object(Bucket=BUCKET, Key=registry.plugin_key(NAME, 1, obj))["Body"].read()
        store.put_object(Bucket=BUCKET, Key=registry.plugin_key(NAME, 3, obj), Body=body)
    replayed = _edgefleet(operator, "rollout", "start", NAME, "3", "--plugin")
    assert replayed.exit_code == 2 and f"signed for {NAME} v1" in replayed.stderr

    assert retained(broker.url, topics.plugin_rollout(NAME), PluginRollout, wait_s=0.5) is None, \
        "a refused rollout published nothing"
    bad_name = _edgefleet(operator, "rollout", "start", "../etc", "1", "--plugin")
    assert bad_name.exit_code == 1 and "model name" in bad_name.stderr


def test_plugin_status_lists_the_devices_retained_plugin_states(operator, broker):
    now = time.time()
    ref = ModelRef(name=NAME, version=1, sha256="a" * 64)
    link = client_link(broker.url)
    link.start()
    assert link.wait_connected(10)

    def retain(topic, message):
        link.publish(topic, encode(message), qos=1, retain=True,
                     content_type=WireFormat.JSON.content_type).wait_for_publish(10)

    retain(topics.plugin_sync_state("dev-a", NAME),
           SyncReport(device="dev-a", rollout_id="door-1", state=SyncState.ACTIVE, target=ref, serving=ref, at=now))
    retain(topics.plugin_sync_state("dev-b", NAME),
           SyncReport(device="dev-b", rollout_id="door-1", state=SyncState.FAILED, target=ref, reason="trap", at=now))
    # Another plugin's state and the model's state are other rollouts.
    retain(topics.plugin_sync_state("dev-c", "gate-labels"),
           SyncReport(device="dev-c", rollout_id="gate-1", state=SyncState.ACTIVE, at=now))
    retain(topics.sync_state("dev-d"), SyncReport(device="dev-d", rollout_id="model-1", state=SyncState.ACTIVE, at=now))
    link.stop()

    status = _edgefleet(operator, "rollout", "status", "--plugin", NAME, "--json", "--wait", "1")
    assert status.exit_code == 0, status.output
    rows = {row["device"]: row for row in map(json.loads, status.stdout.splitlines())}
    assert sorted(rows) == ["dev-a", "dev-b"]
    assert (rows["dev-a"]["state"], rows["dev-a"]["serving"]["name"], rows["dev-a"]["target"]["version"]) == (
        "active", NAME, 1)
    assert (rows["dev-b"]["state"], rows["dev-b"]["serving"], rows["dev-b"]["reason"]) == ("failed", None, "trap")

    table = _edgefleet({**operator, "COLUMNS": "200"}, "rollout", "status", "--plugin", NAME, "--wait", "1")
    assert table.exit_code == 0 and f"--plugin {NAME}" in table.stdout
    assert f"{NAME} v1" in next(line for line in table.stdout.splitlines() if " dev-a " in line)
    model = _edgefleet(operator, "rollout", "status", "--json", "--wait", "1")
    assert [json.loads(line)["device"] for line in model.stdout.splitlines()] == ["dev-d"]
