"""Model delivery end to end: real broker, real S3-compatible server, real models, real processes."""

from __future__ import annotations

import random

import pytest

from shared.manifest import load_verified
from tests.delivery import current_target, model_variant, store_state
from tests.support import wait_until

NAME = "efficientnet-lite0"


@pytest.fixture
def rebuilt(model_dir, tmp_path):
    """v2: the same network, a new artifact."""
    return model_variant(model_dir, tmp_path / "v2", "rebuilt", version=2)


def _active(report, rollout_id, version):
    return (report.rollout_id == rollout_id and report.state == "active" and report.serving.version == version
            and report.canary is not None)


def test_a_rollout_is_verified_installed_switched_and_kept_by_its_canary(fleet, model_dir, rebuilt):
    fleet.publish(model_dir)
    fleet.publish(rebuilt)
    rig = fleet.start_device("edge-1", model_dir)
    wait_until(lambda: len(rig.device.predictions) >= 25, 60, "predictions from the first model")
    fleet.rollout(NAME, 2, "r-good")
    report = rig.device.sync_report(lambda r: _active(r, "r-good", 2), "the canary's verdict", 120)
    assert report.canary.passed and report.canary.samples_after >= 20 and report.canary.prediction_psi < 0.5
    assert rig.device.sync_states("r-good") == ["received", "downloading", "verified", "installed", "active"]
    assert current_target(rig.store) == f"versions/{NAME}/2"
    wait_until(lambda: rig.device.predictions[-1].model.version == 2, 30, "predictions from v2")
    ids = [p.frame_id for p in rig.device.predictions]
    assert len(ids) == len(set(ids)), "a frame was answered twice"
    assert rig.device.latest_status().inference.frames_dropped == 0


def test_a_canary_that_predicts_badly_is_rolled_back_by_itself(fleet, model_dir, tmp_path):
    manifest, _ = load_verified(model_dir)
    labels = list(manifest.labels)
    random.Random(0).shuffle(labels)
    shuffled = model_variant(model_dir, tmp_path / "shuffled", "shuffled labels", version=2, labels=labels)
    fleet.publish(model_dir)
    bad = fleet.publish(shuffled)
    rig = fleet.start_device("edge-2", model_dir)
    wait_until(lambda: len(rig.device.predictions) >= 25, 60, "predictions from the first model")
    fleet.rollout(NAME, 2, "r-bad")
    report = rig.device.sync_report(lambda r: r.rollout_id == "r-bad" and r.state == "rolled_back", "the rollback", 120)
    assert "predicted classes shifted" in report.reason and not report.canary.passed
    assert report.serving.version == 1 and report.target.sha256 == bad.sha256
    assert current_target(rig.store) == "fallback" and bad.sha256 in store_state(rig.store)["rejected"]
    wait_until(lambda: rig.device.predictions[-1].model.version == 1, 30, "predictions from v1 again")
    # The shuffled model did serve for the canary window, and its predictions say so.
    assert any(p.model.sha256 == bad.sha256 for p in rig.device.predictions)


def _failed(rig, rollout_id, timeout=60):
    return rig.device.sync_report(lambda r: r.rollout_id == rollout_id and r.state == "failed", f"{rollout_id} to fail",
                                  timeout)


def _replace_object(fleet, name, version, obj, data):
    from shared import registry

    fleet.store.put_object(Bucket="edgefleet-models", Key=registry.key(name, version, obj), Body=data)


def test_bad_models_are_refused_and_the_device_keeps_serving(fleet, model_dir, tmp_path):
    """A tampered artifact, a truncated one, a wrong signature, an unknown key, an older version and a
    model that fails its smoke test: each is refused with its reason, nothing half installed is left
    where inference could load it, and predictions never stop."""
    from shared import registry
    from tests.unit.test_quantize import _tiny_model_with

    seed = model_variant(model_dir, tmp_path / "v5", "seed", version=5)
    for version in range(1, 8):
        fleet.publish(model_variant(model_dir, tmp_path / f"m{version}", f"build {version}", version=version),
                      version=version)
    same_size = b"x" * load_verified(tmp_path / "m6")[0].size_bytes
    _replace_object(fleet, NAME, 6, registry.MODEL_OBJECT, same_size)
    _replace_object(fleet, NAME, 7, registry.MODEL_OBJECT, b"truncated")
    stranger = registry.load_private_key(registry.new_key_pair(tmp_path / "stranger").private)
    wrong = registry.sign(b"another manifest", registry.load_private_key(fleet.keys.private))
    from edgefleet.publish import publish

    for version, signature in ((8, wrong), (9, None)):
        publish(fleet.store, "edgefleet-models",
                model_variant(model_dir, tmp_path / f"m{version}", f"b{version}", version=version),
                fleet.keys.private, version=version)
        document = fleet.store.get_object(Bucket="edgefleet-models",
                                          Key=registry.key(NAME, version, registry.MANIFEST_OBJECT))["Body"].read()
        _replace_object(fleet, NAME, version, registry.SIGNATURE_OBJECT, signature or registry.sign(document, stranger))
    tiny = _tiny_model_with("Relu", tmp_path / "tiny")  # 10 classes...
    manifest, _ = load_verified(tmp_path / "tiny" / "model")
    liar = model_variant(tmp_path / "tiny" / "model", tmp_path / "liar", "liar", version=10, name=NAME,
                         labels=load_verified(model_dir)[0].labels,
                         output={**manifest.output.model_dump(), "shape": ["batch", 1000]},
                         preprocessing=manifest.preprocessing)
    assert tiny and liar
    fleet.publish(liar, version=10)

    rig = fleet.start_device("edge-3", seed)
    expectations = {
        6: "tampered or corrupt", 7: "truncated or replaced", 8: "does not match", 9: "unknown key",
        2: "older than the v5 being served", 10: "smoke test failed",
    }
    for version, reason in expectations.items():
        fleet.rollout(NAME, version, f"r-{version}")
        report = _failed(rig, f"r-{version}")
        assert reason in report.reason, report.reason
        assert report.serving.version == 5
    assert current_target(rig.store) == "fallback"
    assert not (rig.store / "versions" / NAME).exists() or not any((rig.store / "versions" / NAME).iterdir())
    assert not list((rig.store / "staging").glob("*.part"))
    served = len(rig.device.predictions)
    wait_until(lambda: len(rig.device.predictions) > served + 10, 30, "predictions to go on")
    assert {p.model.version for p in rig.device.predictions} == {5}


def test_sync_killed_mid_download_resumes_where_it_stopped(fleet, model_dir, rebuilt):
    fleet.publish(model_dir)
    fleet.publish(rebuilt)
    limit = {"download_limit_bytes_s": 3_000_000, "download_chunk_bytes": 262144}
    rig = fleet.start_device("edge-4", model_dir, camera_rate=5, **limit)
    fleet.rollout(NAME, 2, "r-kill")
    rig.device.sync_report(lambda r: r.state == "downloading" and (r.progress_bytes or 0) > 4_000_000,
                           "download progress")
    rig.sync.kill()  # SIGKILL
    parts = list((rig.store / "staging").glob("*.part"))
    assert len(parts) == 1 and 4_000_000 <= parts[0].stat().st_size < load_verified(rebuilt)[0].size_bytes
    kept = parts[0].stat().st_size
    # Resumed at full speed: the throttle only had to hold the first download until the kill.
    rig.sync = fleet.start_sync("edge-4", model_dir, download_chunk_bytes=limit["download_chunk_bytes"])
    resumed = rig.device.sync_report(lambda r: r.state == "downloading" and (r.reason or "").startswith("resuming"),
                                     "a resumed download")
    assert int(resumed.reason.split()[-1]) >= kept
    rig.device.sync_report(lambda r: _active(r, "r-kill", 2), "the model to become active", 120)
    assert current_target(rig.store) == f"versions/{NAME}/2"


def test_store_unreachable_mid_download_is_retried_and_resumed(fleet, model_dir, rebuilt):
    fleet.publish(model_dir)
    fleet.publish(rebuilt)
    rig = fleet.start_device("edge-5", model_dir, camera_rate=8, download_limit_bytes_s=3_000_000,
                             download_chunk_bytes=262144)
    fleet.rollout(NAME, 2, "r-pause")
    rig.device.sync_report(lambda r: r.state == "downloading" and (r.progress_bytes or 0) > 3_000_000,
                           "download progress")
    fleet.s3_server.pause()
    try:
        rig.device.sync_report(lambda r: r.state == "downloading" and "interrupted" in (r.reason or ""),
                               "a retry report", 60)
        served = len(rig.device.predictions)
        wait_until(lambda: len(rig.device.predictions) > served + 5, 30, "predictions while the store is away")
    finally:
        fleet.s3_server.resume()
    rig.device.sync_report(lambda r: _active(r, "r-pause", 2), "the model to become active", 120)


def test_a_device_offline_during_the_rollout_and_a_broker_restart_still_end_on_the_model(fleet, model_dir, rebuilt):
    fleet.publish(model_dir)
    fleet.publish(rebuilt)
    fleet.rollout(NAME, 2, "r-late")  # retained: nobody is listening yet
    rig = fleet.start_device("edge-6", model_dir, camera_rate=8, download_limit_bytes_s=4_000_000,
                             download_chunk_bytes=262144)
    rig.device.sync_report(lambda r: r.rollout_id == "r-late" and r.state == "downloading", "the late device to start")
    fleet.broker.stop()  # a clean restart: the retained rollout is saved and comes back
    fleet.broker.start()
    rig.device.sync_report(lambda r: _active(r, "r-late", 2), "the model to become active after the restart", 120)


def _operator(fleet, *args):
    import os
    import subprocess
    import sys

    # The registry and the keys too: `rollout start` refuses a version the registry does not hold signed.
    env = {**os.environ, **fleet.s3_server.env(), "EDGEFLEET_TRUSTED_KEYS_DIR": str(fleet.keys.public.parent),
           "COLUMNS": "200"}
    result = subprocess.run([sys.executable, "-m", "edgefleet", "rollout", *args, "--mqtt-url", fleet.broker.url],
                            capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 0, result.stderr
    return result


def test_operators_canary_promote_status_and_abort(fleet, model_dir, rebuilt):
    """Through the operator's commands: a 50 % canary of a group reaches the devices the hash picks,
    promote brings in the rest, status shows every device, abort sends them all back."""
    import json

    from services.sync.membership import position

    fleet.publish(model_dir)
    fleet.publish(rebuilt)
    ids = [f"cam-node-{i}" for i in range(40)]
    inside = next(d for d in ids if position("lobby-v2", d) < 0.5)
    outside = next(d for d in ids if position("lobby-v2", d) >= 0.5)
    rigs = {d: fleet.start_device(d, model_dir, camera_rate=8, groups="lobby") for d in (inside, outside)}
    stranger = fleet.start_device("cam-elsewhere", model_dir, camera_rate=0, groups="yard")
    _operator(fleet, "start", NAME, "2", "--group", "lobby", "--canary", "50", "--rollout-id", "lobby-v2")
    rigs[inside].device.sync_report(lambda r: _active(r, "lobby-v2", 2), "the canary device to switch", 120)
    rigs[outside].device.sync_report(lambda r: r.rollout_id == "lobby-v2" and r.state == "not_targeted",
                                     "the other to wait")
    stranger.device.sync_report(lambda r: r.rollout_id == "lobby-v2" and r.state == "not_targeted",
                                "the yard to stay out")
    _operator(fleet, "promote")
    rigs[outside].device.sync_report(lambda r: _active(r, "lobby-v2", 2), "the promoted device to switch", 120)
    states = {json.loads(line)["device"]: json.loads(line)
              for line in _operator(fleet, "status", "--json").stdout.splitlines()}
    assert {states[d]["serving"]["version"] for d in rigs} == {2} and states["cam-elsewhere"]["serving"]["version"] == 1
    assert "cam-elsewhere" in _operator(fleet, "status").stdout
    _operator(fleet, "abort")
    for rig in rigs.values():
        report = rig.device.sync_report(lambda r: r.state == "rolled_back", "the abort to send it back")
        assert "aborted" in report.reason and report.serving.version == 1
        assert current_target(rig.store) == "fallback"


def _shuffled(model_dir, tmp_path):
    manifest, _ = load_verified(model_dir)
    labels = list(manifest.labels)
    random.Random(0).shuffle(labels)
    return model_variant(model_dir, tmp_path / "shuffled", "shuffled labels", version=2, labels=labels)


def _in_canary(report, rollout_id):
    return (report.rollout_id == rollout_id and report.state == "active"
            and (report.reason or "").startswith("canary: comparing"))


def test_a_canary_without_traffic_is_inconclusive_and_never_keeps_the_model(fleet, model_dir, rebuilt):
    from edgefleet import photos

    fleet.publish(model_dir)
    good = fleet.publish(rebuilt)
    rig = fleet.start_device("edge-quiet", model_dir, camera_rate=0, canary_timeout_s=1)
    fleet.rollout(NAME, 2, "r-quiet")
    report = rig.device.sync_report(lambda r: r.rollout_id == "r-quiet" and r.state == "rolled_back",
                                    "the rollback", 120)
    assert "inconclusive: 0 samples before, 0 after, minimum 20" in report.reason, report.reason
    assert not report.canary.passed and not report.canary.conclusive and report.serving.version == 1
    assert current_target(rig.store) == "fallback"
    assert good.sha256 not in store_state(rig.store)["rejected"]  # no evidence against it either
    rig.device.publish_envelope("door", "after-quiet", photos.jpeg("chelsea"))
    assert rig.device.prediction_for("after-quiet").model.version == 1


def test_a_promote_during_a_canary_does_not_pass_it(fleet, model_dir, tmp_path):
    from shared.schemas import RolloutPhase

    fleet.publish(model_dir)
    bad = fleet.publish(_shuffled(model_dir, tmp_path))
    rig = fleet.start_device("edge-promote", model_dir, camera_rate=4)
    fleet.rollout(NAME, 2, "r-promote", phase=RolloutPhase.CANARY)
    rig.device.sync_report(lambda r: _in_canary(r, "r-promote"), "the canary to start", 120)
    fleet.rollout(NAME, 2, "r-promote", phase=RolloutPhase.PROMOTED)
    report = rig.device.sync_report(lambda r: r.rollout_id == "r-promote" and r.state == "rolled_back",
                                    "the rollback", 120)
    assert "predicted classes shifted" in report.reason and report.canary.conclusive and not report.canary.passed
    # The promote is handled after the verdict, and a rejected model stays rolled back.
    again = rig.device.sync_report(lambda r: r.rollout_id == "r-promote" and "already rolled" in (r.reason or ""),
                                   "the promote to be answered", 60)
    assert again.state == "rolled_back" and rig.device.sync_states("r-promote")[-1] == "rolled_back"
    assert current_target(rig.store) == "fallback" and bad.sha256 in store_state(rig.store)["rejected"]


def test_sync_killed_inside_the_canary_rolls_back_at_restart(fleet, model_dir, tmp_path):
    fleet.publish(model_dir)
    bad = fleet.publish(_shuffled(model_dir, tmp_path))
    rig = fleet.start_device("edge-crash", model_dir, camera_rate=4)
    fleet.rollout(NAME, 2, "r-crash")
    rig.device.sync_report(lambda r: _in_canary(r, "r-crash"), "the canary to start", 120)
    rig.sync.kill()  # SIGKILL, inside the canary: the switch is done and no verdict was given
    assert store_state(rig.store)["pending"]["sha256"] == bad.sha256
    assert current_target(rig.store) == f"versions/{NAME}/2"
    rig.sync = fleet.start_sync("edge-crash", model_dir)
    report = rig.device.sync_report(lambda r: r.rollout_id == "r-crash" and r.state == "rolled_back",
                                    "the rollback", 60)
    assert "sync restarted during the canary" in report.reason and report.serving.version == 1
    assert current_target(rig.store) == "fallback" and store_state(rig.store)["pending"] is None
    served = len(rig.device.predictions)
    wait_until(lambda: len(rig.device.predictions) > served + 5, 30, "predictions after the restart")
    assert rig.device.predictions[-1].model.version == 1
    # The retained rollout, delivered again to the restarted sync, does not bring the model back.
    rig.device.sync_report(lambda r: r.rollout_id == "r-crash" and "already rolled" in (r.reason or ""),
                           "the retained rollout")
    assert rig.device.sync_states("r-crash")[-1] == "rolled_back" and current_target(rig.store) == "fallback"


def test_a_switch_that_misses_its_deadline_fails_and_is_discarded_by_inference(fleet, model_dir, rebuilt):
    from shared import topics
    from shared.codec import decode
    from shared.config import CommonSettings
    from shared.mqtt import MqttLink, content_type_of
    from shared.schemas import ModelSwitched

    fleet.publish(model_dir)
    fleet.publish(rebuilt)
    answers: list[ModelSwitched] = []
    link = MqttLink(CommonSettings(mqtt_url=fleet.broker.url, device_id="edge-late"), "test-switched", unique=True)
    link.subscribe(topics.model_switched("edge-late"),
                   lambda m: answers.append(decode(ModelSwitched, m.payload, content_type_of(m))), qos=1)
    link.start()
    try:
        assert link.wait_connected(10)
        rig = fleet.start_device("edge-late", model_dir, camera_rate=4, switch_timeout_s=0.01)
        fleet.rollout(NAME, 2, "r-late-switch")
        report = _failed(rig, "r-late-switch", 120)
        assert "late" in report.reason and report.serving.version == 1, report.reason
        # The sentinel: inference's own answer, sent after it discarded the load. Nothing can land after it.
        late = wait_until(lambda: next((a for a in answers if not a.ok), None), 30, "inference's late answer")
        assert "late" in late.error and late.serving.version == 1
        served = len(rig.device.predictions)
        wait_until(lambda: len(rig.device.predictions) > served + 10, 30, "predictions after the late answer")
        assert {p.model.version for p in rig.device.predictions[served:]} == {1}
        assert current_target(rig.store) == "fallback"
    finally:
        link.stop()
