"""The one spawner that the launchers (`edgefleet up`, `edgefleet fleet`) and the tests share, and the
live view's end when a child dies: real `edgefleet camera` children on a real broker. (The wait loop
and the rate, pure logic, are tested in tests/unit.)"""

from __future__ import annotations

import io
import os
import signal
import threading

from rich.console import Console

from edgefleet.liveview import show_live
from edgefleet.spawner import Spawner
from edgefleet.waiting import wait_until
from shared import topics
from shared.config import CameraSettings, CommonSettings, load
from shared.mqtt import MqttLink


def _camera(broker, **keys) -> CameraSettings:
    return load(CameraSettings, None, **{"mqtt_url": broker.url, "device_id": "spawned", "rate_hz": 20, **keys})


def test_a_child_gets_its_typed_settings_and_stops_cleanly_on_sigterm(broker, tmp_path):
    frames: list[str] = []
    link = MqttLink(load(CommonSettings, None, mqtt_url=broker.url, device_id="spawned"), "test", unique=True)
    link.subscribe(topics.all_frames("spawned"), lambda m: frames.append(m.topic), qos=0)
    link.start()
    spawner = Spawner(tmp_path / "logs")
    try:
        camera = spawner.start("cam", "camera", _camera(broker, cameras=["porch"]))
        # Its camera id and device id came from the settings object, through the environment.
        wait_until(lambda: frames or not camera.alive(), 60, "a frame from the spawned camera")
        assert frames[0] == topics.frames("spawned", "porch"), camera.log()
    finally:
        spawner.stop()
        link.stop()
    assert camera.proc.returncode == 0, camera.log()  # SIGTERM: the camera's own clean exit, not a kill
    assert (tmp_path / "logs" / "cam.log").exists()


def test_a_child_that_does_not_stop_is_killed_after_the_grace(broker, tmp_path):
    spawner = Spawner(tmp_path, grace_s=1)
    camera = spawner.start("frozen", "camera", _camera(broker))
    wait_until(lambda: "camera" in camera.log() or not camera.alive(), 60, "the camera to log", interval=0.2)
    os.kill(camera.proc.pid, signal.SIGSTOP)  # frozen: the SIGTERM stays pending
    spawner.stop()
    assert camera.proc.returncode == -signal.SIGKILL


def test_the_live_view_ends_when_a_child_exits_and_names_it(tmp_path):
    out = io.StringIO()
    spawner = Spawner(tmp_path)
    # No such source: the camera exits at once (status 2), as a crashed service would.
    spawner.start("bad-cam", "camera", load(CameraSettings, None, source=str(tmp_path / "nothing.mp4")))
    show_live(Console(file=out, width=200), lambda: "table", spawner, threading.Event(), duration_s=60, period_s=0.1)
    assert f"a service exited (bad-cam); see {tmp_path}/" in out.getvalue()
    assert spawner.exited()[0].proc.returncode == 2
