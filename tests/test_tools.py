"""The camera simulator and the main job (`edgefleet up`), run as a newcomer runs them."""

from __future__ import annotations

import os
import subprocess
import sys

from edgefleet import photos
from tests.support import wait_until


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


def test_the_whole_fleet_runs_locally_and_its_telemetry_reaches_the_cloud(tmp_path):
    result = _edgefleet("fleet", "--duration", "25", "--devices", "2", timeout=240, env={"COLUMNS": "160"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    shown = int(result.stdout.split("stopped;")[1].split()[0])
    assert shown > 20
    assert "device-1" in result.stdout and "device-2" in result.stdout
    ingest_log = open("var/fleet/log/cloud-ingest.log").read()
    assert "dead-lettered" not in ingest_log and "ingesting" in ingest_log
