"""The camera simulator and the main job (`edgefleet up`), run as a newcomer runs them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from edgefleet import photos
from shared import lake
from tests.support import wait_until

REPO = Path(__file__).resolve().parents[1]


def _edgefleet(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "edgefleet", *args], env={**os.environ, **(env or {})},
        capture_output=True, text=True, timeout=timeout,
    )


def test_camera_simulator_enveloped_bundled_photos(broker, start_inference):
    _, device = start_inference(broker)
    env = {"EDGEFLEET_MQTT_URL": broker.url, "EDGEFLEET_DEVICE_ID": device.device_id}
    result = _edgefleet("camera", "--cameras", "front,back", "--rate", "20", "--count", "3", "--envelope", env=env)
    assert result.returncode == 0, result.stderr
    for frame_id in ("front-1", "front-2", "front-3", "back-1", "back-2", "back-3"):
        assert device.prediction_for(frame_id).camera == frame_id.split("-")[0]
    # Cameras are staggered over the bundled photos: front starts on chelsea, back on coffee.
    assert device.prediction_for("front-1").top[0].label in {"tabby", "tiger cat", "Egyptian cat"}
    assert device.prediction_for("back-1").top[0].label in {"espresso", "cup", "coffee mug"}


def test_camera_simulator_raw_frames_from_a_folder(broker, start_inference, tmp_path):
    _, device = start_inference(broker)
    (tmp_path / "a.jpg").write_bytes(photos.jpeg("coffee"))
    (tmp_path / "b.png").write_bytes(photos.png("chelsea"))
    env = {"EDGEFLEET_MQTT_URL": broker.url, "EDGEFLEET_DEVICE_ID": device.device_id}
    result = _edgefleet("camera", "--source", str(tmp_path), "--cameras", "yard", "--count", "2", "--raw", env=env)
    assert result.returncode == 0, result.stderr
    wait_until(lambda: len(device.predictions) >= 2, 30, "two predictions")
    assert {p.camera for p in device.predictions} == {"yard"}


def test_camera_simulator_plays_a_video_file(broker, start_inference, tmp_path):
    import cv2

    video = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 5, (451, 300))
    for _ in range(3):
        writer.write(cv2.cvtColor(photos.photo_rgb("chelsea"), cv2.COLOR_RGB2BGR))
    writer.release()
    _, device = start_inference(broker)
    env = {"EDGEFLEET_MQTT_URL": broker.url, "EDGEFLEET_DEVICE_ID": device.device_id}
    result = _edgefleet("camera", "--source", str(video), "--cameras", "gate", "--count", "4", "--envelope", env=env)
    assert result.returncode == 0, result.stderr
    # Four frames from a three-frame clip: the file loops.
    for n in range(1, 5):
        assert device.prediction_for(f"gate-{n}").top[0].label in {"tabby", "tiger cat", "Egyptian cat"}


def test_camera_simulator_refuses_a_bad_source():
    result = _edgefleet("camera", "--source", "/no/such/thing.mp4", "--count", "1")
    assert result.returncode == 2 and "cannot open" in result.stderr


def test_the_main_job_shows_real_labels(tmp_path):
    result = _edgefleet("up", "--duration", "20", "--cameras", "2", "--rate", "2", timeout=180, env={"COLUMNS": "160"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "predictions shown" in result.stdout
    shown = int(result.stdout.split("stopped;")[1].split()[0])
    assert shown > 5
    assert any(label in result.stdout for label in ("tabby", "tiger cat", "Egyptian cat", "espresso"))


def test_the_whole_fleet_runs_locally_takes_a_rollout_and_its_telemetry_reaches_the_cloud(model_dir, tmp_path):
    """The main job as a user runs it: the fleet live, then a model published and rolled out from
    another terminal with the settings the fleet prints, until every device serves it."""
    import re

    from edgefleet.models.install import resave

    resave(model_dir, tmp_path / "v2", "rebuilt", version=2)
    log = (tmp_path / "fleet.out").open("w+")
    fleet = subprocess.Popen([sys.executable, "-m", "edgefleet", "fleet", "--duration", "240", "--devices", "2",
                              "--folder", str(tmp_path / "fleet")],
                             stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "COLUMNS": "160"})
    try:
        def output() -> str:
            return (tmp_path / "fleet.out").read_text()

        def until(check, timeout: float, what: str):
            def step():
                assert fleet.poll() is None, f"the fleet exited while waiting for {what}:\n{output()[-3000:]}"
                return check()

            try:
                return wait_until(step, timeout, what, interval=0.5)
            except AssertionError as exc:
                raise AssertionError(f"{exc}\n{output()[-3000:]}") from None

        def serving(device: str, version: int) -> bool:
            last = next((line for line in reversed(output().splitlines()) if line.startswith(f"{device} ")), "")
            return last.endswith(f"(model v{version})")

        settings = until(lambda: re.search(r"roll out from another terminal: (.*?) edgefleet model publish", output()),
                         120, "the fleet to print its operator settings").group(1)
        operator = dict(pair.split("=", 1) for pair in settings.split())
        # Positive evidence that the devices start on v1 (not merely the absence of v2 in the output).
        until(lambda: serving("device-1", 1) and serving("device-2", 1), 60, "both devices serving v1")
        for model in (model_dir, tmp_path / "v2"):
            assert _edgefleet("model", "publish", str(model), env=operator).returncode == 0
        assert _edgefleet("rollout", "start", "efficientnet-lite0", "2", "--rollout-id", "main-job",
                          env=operator).returncode == 0
        until(lambda: serving("device-1", 2) and serving("device-2", 2), 120, "both devices serving v2")
        status = _edgefleet("rollout", "status", "--json", env=operator)
        states = [json.loads(line) for line in status.stdout.splitlines()]
        assert {(s["device"], s["state"], s["serving"]["version"], s["stale"]) for s in states} >= {
            ("device-1", "active", 2, False), ("device-2", "active", 2, False)}
        # A plugin rides the same fleet: published and rolled out with the operators' commands, over the
        # bridges, into each device's own plugin store.
        built = REPO / "var" / "plugin-builds"
        assert _edgefleet("plugin", "publish", str(built / "site-labels.wasm"), "--spec",
                          str(built / "site-labels.json"), env=operator).returncode == 0
        assert _edgefleet("rollout", "start", "site-labels", "1", "--plugin", env=operator).returncode == 0

        def plugin_active() -> bool:
            result = _edgefleet("rollout", "status", "--plugin", "site-labels", "--json", env=operator)
            rows = [json.loads(line) for line in result.stdout.splitlines()]
            return {r["device"] for r in rows if r["state"] == "active"} >= {"device-1", "device-2"}

        until(plugin_active, 120, "site-labels active on both devices")
        # Telemetry reached the cloud: read back from S3 itself, through the operators' audit.
        audit = until(lambda: _audited(operator, ("device-1", "device-2")), 90, "both devices' telemetry in S3")
        assert all(row["duplicates"] == 0 and row["missing_count"] == 0 for row in audit.values()), audit
        assert _s3_keys(operator, lake.DEAD_LETTER) == [], "telemetry was dead-lettered"
    finally:
        fleet.terminate()
        assert fleet.wait(60) == 0


def _audited(operator: dict[str, str], devices: tuple[str, ...]) -> dict[str, dict] | None:
    """The audit's rows once every device has records in S3."""
    result = _edgefleet("telemetry", "audit", "--json", env=operator)
    rows = {row["device"]: row for row in map(json.loads, result.stdout.splitlines())}
    return rows if all(rows.get(d, {}).get("received", 0) > 0 for d in devices) else None


def _s3_keys(operator: dict[str, str], prefix: str) -> list[str]:
    from shared import s3
    from shared.config import IngestSettings

    settings = IngestSettings(**{k.removeprefix("EDGEFLEET_").lower(): v for k, v in operator.items()
                                 if k.startswith("EDGEFLEET_S3")})
    listing = s3.client(settings).list_objects_v2(Bucket=settings.telemetry_bucket, Prefix=prefix)
    return [obj["Key"] for obj in listing.get("Contents", [])]


def test_rollout_status_keys_rows_by_topic_and_shows_age_and_staleness(broker):
    """Retained states on a real broker: one device lies about who it is and reports from long ago,
    one has a clock an hour ahead, one has an old sync report but a fresh sync heartbeat."""
    import time

    from shared import topics
    from shared.codec import WireFormat, encode
    from shared.config import CommonSettings
    from shared.mqtt import MqttLink
    from shared.schemas import ServiceState, ServiceStatus, SyncReport, SyncState

    now = time.time()
    link = MqttLink(CommonSettings(mqtt_url=broker.url, device_id="test"), "test", unique=True)
    link.start()
    assert link.wait_connected(10)

    def retain(topic, message):
        link.publish(topic, encode(message), qos=1, retain=True,
                     content_type=WireFormat.JSON.content_type).wait_for_publish(10)

    def report(device, at):
        return SyncReport(device=device, rollout_id="r1", state=SyncState.ACTIVE, at=at)

    def heartbeat(device, at):
        return ServiceStatus(device=device, service=topics.SYNC_SERVICE, state=ServiceState.ONLINE, at=at,
                             edgefleet_version="t")

    retain(topics.sync_state("device-a"), report("device-a", now))
    retain(topics.status("device-a", topics.SYNC_SERVICE), heartbeat("device-a", now))
    retain(topics.sync_state("device-b"), report("device-a", now - 600))  # claims to be device-a
    retain(topics.sync_state("device-c"), report("device-c", now + 3600))  # its clock is an hour ahead
    retain(topics.sync_state("device-d"), report("device-d", now - 600))
    retain(topics.status("device-d", topics.SYNC_SERVICE), heartbeat("device-d", now))
    link.stop()
    env = {"EDGEFLEET_MQTT_URL": broker.url, "EDGEFLEET_STATUS_INTERVAL_S": "5", "COLUMNS": "200"}

    status = _edgefleet("rollout", "status", "--json", "--wait", "1", env=env)
    assert status.returncode == 0, status.stderr
    rows = {row["device"]: row for row in map(json.loads, status.stdout.splitlines())}
    assert sorted(rows) == ["device-a", "device-b", "device-c", "device-d"]
    a, b, c, d = (rows[k] for k in sorted(rows))
    assert (a["stale"], a["claimed_device"], a["clock_ahead"], a["sync"]) == (False, None, False, "online")
    assert 0 <= a["age_s"] < 15
    assert (b["stale"], b["claimed_device"], b["clock_ahead"]) == (True, "device-a", False)
    assert 600 <= b["age_s"] < 615 and b["last_heard_s"] == b["age_s"]
    assert (c["stale"], c["clock_ahead"], c["last_heard_s"]) == (True, True, None)
    assert -3600 <= c["age_s"] < -3585
    assert (d["stale"], d["sync"]) == (False, "online") and 600 <= d["age_s"] < 615 and d["last_heard_s"] < 15

    table = _edgefleet("rollout", "status", "--wait", "1", env=env)
    assert table.returncode == 0, table.stderr
    line = {device: next(row for row in table.stdout.splitlines() if f" {device} " in row) for device in rows}
    assert "ok" in line["device-a"] and "STALE" not in line["device-a"]
    assert "STALE" in line["device-b"] and "payload claims device-a" in line["device-b"]
    assert "STALE" in line["device-c"] and "clock ahead" in line["device-c"]
    assert "STALE" not in line["device-d"]


def test_rollout_start_refuses_a_model_name_that_is_not_a_registry_key(broker):
    env = {"EDGEFLEET_MQTT_URL": broker.url}
    for model in ("../../etc", "a/b"):
        result = _edgefleet("rollout", "start", model, "1", env=env)
        assert result.returncode == 1 and "model name" in result.stderr, result.stderr
    result = _edgefleet("rollout", "start", "ok-model", "1000000001", env=env)
    assert result.returncode == 1 and "model version" in result.stderr, result.stderr
