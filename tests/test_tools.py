"""The camera simulator and the main job (`edgefleet up`), run as a newcomer runs them."""

from __future__ import annotations

import json
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


def test_the_whole_fleet_runs_locally_takes_a_rollout_and_its_telemetry_reaches_the_cloud(model_dir, tmp_path):
    """The main job as a user runs it: the fleet live, then a model published and rolled out from
    another terminal with the settings the fleet prints, until every device serves it."""
    import re
    import time

    from edgefleet.models.store import resave

    resave(model_dir, tmp_path / "v2", "rebuilt", version=2)
    log = (tmp_path / "fleet.out").open("w+")
    fleet = subprocess.Popen([sys.executable, "-m", "edgefleet", "fleet", "--duration", "150", "--devices", "2",
                              "--folder", str(tmp_path / "fleet")],
                             stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "COLUMNS": "160"})
    try:
        def output() -> str:
            return (tmp_path / "fleet.out").read_text()

        deadline = time.monotonic() + 120
        while "roll out from another terminal" not in output() and time.monotonic() < deadline:
            time.sleep(0.5)
        settings = re.search(r"roll out from another terminal: (.*?) edgefleet model publish", output()).group(1)
        operator = dict(pair.split("=", 1) for pair in settings.split())
        deadline = time.monotonic() + 60
        while not all(f"{d} " in output() for d in ("device-1", "device-2")):
            assert time.monotonic() < deadline, output()[-3000:]
            time.sleep(0.5)
        assert "(model v2)" not in output(), "the devices must start on v1"
        for model in (model_dir, tmp_path / "v2"):
            assert _edgefleet("model", "publish", str(model), env=operator).returncode == 0
        assert _edgefleet("rollout", "start", "efficientnet-lite0", "2", "--rollout-id", "main-job", env=operator).returncode == 0
        def serving_v2(device: str) -> bool:
            last = next((line for line in reversed(output().splitlines()) if line.startswith(f"{device} ")), "")
            return last.endswith("(model v2)")

        deadline = time.monotonic() + 120
        while not (serving_v2("device-1") and serving_v2("device-2")):
            assert time.monotonic() < deadline, output()[-3000:]
            assert fleet.poll() is None, output()[-3000:]
            time.sleep(1)
        status = _edgefleet("rollout", "status", "--json", env=operator)
        states = [json.loads(line) for line in status.stdout.splitlines()]
        assert {(s["device"], s["state"], s["serving"]["version"]) for s in states} >= {("device-1", "active", 2), ("device-2", "active", 2)}
    finally:
        fleet.terminate()
        assert fleet.wait(60) == 0
    ingest_log = (tmp_path / "fleet" / "log" / "cloud-ingest.log").read_text()
    assert "dead-lettered" not in ingest_log and "ingesting" in ingest_log
