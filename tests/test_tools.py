"""The camera simulator and the main job (`edgefleet up`), run as a newcomer runs them."""

from __future__ import annotations

import json
import os
import re
import shlex
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


def _first_rollout() -> list[list[str]]:
    """The README's first-rollout walk-through, one argument list per command (comments dropped)."""
    text = (REPO / "README.md").read_text()
    block = text.split("### First rollout", 1)[1].split("```sh\n", 1)[1].split("```", 1)[0]
    commands = [shlex.split(line, comments=True) for line in block.splitlines()]
    return [command for command in commands if command]


def _judged(row: dict | None) -> dict | None:
    """A device's status row once its canary has a verdict: passed (active) or rolled back."""
    if row is None:
        return None
    passed = row["state"] == "active" and (row["reason"] or "").startswith("canary passed")
    return row if passed or row["state"] == "rolled_back" else None


def _operator_env(path: Path) -> dict[str, str]:
    """What `source operator.env` gives a shell: every `export K=V` line, unquoted as the shell would."""
    pairs = [shlex.split(line.removeprefix("export "), comments=True) for line in path.read_text().splitlines()]
    return dict(pair[0].split("=", 1) for pair in pairs if pair)


def test_the_first_rollout_by_the_readme_reaches_the_fleet_and_its_telemetry_reaches_the_cloud(model_dir, tmp_path):
    """The main job as a newcomer runs it: the fleet live (`./scripts/run.sh`), then the README's
    first-rollout commands typed in another terminal, in order: the env file sourced, the INT8 model built
    and published (as v2: the fleet's registry holds the v1 its devices serve), a one-device canary that
    shows its plan and stays on one device, then promoted to both."""
    folder = tmp_path / "fleet"
    log = (tmp_path / "fleet.out").open("w+")
    fleet = subprocess.Popen([sys.executable, "-m", "edgefleet", "fleet", "--duration", "300", "--devices", "2",
                              "--folder", str(folder)],
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

        def states() -> dict[str, dict]:
            status = _edgefleet("rollout", "status", "--json", env=operator)
            assert status.returncode == 0, status.stderr
            return {row["device"]: row for row in map(json.loads, status.stdout.splitlines())}

        env_file = folder / "operator.env"
        until(lambda: f"operator shell: source {env_file}" in output(), 120, "the fleet to print its env file")
        assert "edgefleet model publish var/models/efficientnet-lite0-int8-static-minmax" in output()
        # Positive evidence that the devices start on v1 (not merely the absence of v2 in the output).
        until(lambda: serving("device-1", 1) and serving("device-2", 1), 60, "both devices serving v1")
        operator: dict[str, str] = {}
        verdict: dict | None = None
        expected = 0
        data, int8 = tmp_path / "data", tmp_path / "int8"
        ran = []
        for command in _first_rollout():
            assert command[0] in ("source", "edgefleet"), command
            ran.append(" ".join(command[:3]))
            if command == ["source", ".venv/bin/activate"]:
                assert (REPO / ".venv" / "bin" / "activate").exists()  # the test runs this venv's python
            elif command[0] == "source":
                assert command[1] == "var/fleet/operator.env", command
                operator = _operator_env(env_file)
            elif command[1:3] == ["model", "dataset"]:  # fewer held-out images (the default: 300), as many to calibrate
                done = _edgefleet(*command[1:], "--out", str(data), "--eval-count", "48")
                assert done.returncode == 0, done.stderr
            elif command[1:3] == ["model", "quantize"]:
                done = _edgefleet(*command[1:], "--eval", str(data / "eval"), "--calibration",
                                  str(data / "calibration"), "--out", str(int8), timeout=300)
                assert done.returncode == 0, done.stderr
            elif command[1:3] == ["model", "publish"]:
                assert command[3] == "var/models/efficientnet-lite0-int8-static-minmax", command
                done = _edgefleet(*command[1:3], str(int8), *command[4:], env=operator)
                assert done.returncode == 0, done.stderr
                assert done.stdout.strip() == "2" and "published efficientnet-lite0 v2 " in done.stderr, done.stderr
            elif command[1:3] == ["rollout", "start"]:
                done = _edgefleet(*command[1:], env=operator)
                assert done.returncode == 0, done.stderr
                canary = re.search(r"canary: 1 of 2 devices \((device-\d)\)", done.stderr)
                assert canary, done.stderr
                first = canary.group(1)
                other = ({"device-1", "device-2"} - {first}).pop()
                until(lambda device=first: serving(device, 2), 120, "the canary device serving v2")
                # The canary's verdict, either way the README says it can go: passed, or rolled back.
                verdict = until(lambda device=first: _judged(states().get(device)), 120, "the canary's verdict")
                assert states()[other]["state"] == "not_targeted" and serving(other, 1)
            elif command[1:3] == ["rollout", "status"]:
                table = _edgefleet(*command[1:], env=operator)
                assert table.returncode == 0 and "device-1" in table.stdout and "device-2" in table.stdout
                if not expected and verdict["state"] == "rolled_back":  # with its reason, for the operator
                    assert verdict["reason"] and "rolled_back" in table.stdout, table.stdout
            elif command[1:3] == ["rollout", "promote"]:
                if verdict["state"] == "rolled_back":  # the README's "else: edgefleet rollout abort"
                    assert _edgefleet("rollout", "abort", env=operator).returncode == 0
                    expected = 1
                else:
                    assert _edgefleet(*command[1:], env=operator).returncode == 0
                    expected = 2
                until(lambda version=expected: serving("device-1", version) and serving("device-2", version), 120,
                      f"both devices serving v{expected}")
            else:
                raise AssertionError(f"the README's first rollout has a command this test does not know: {command}")
        assert ran[:3] == ["source .venv/bin/activate", "source var/fleet/operator.env", "edgefleet model dataset"]
        assert {"edgefleet model publish", "edgefleet rollout start", "edgefleet rollout promote"} <= set(ran)
        if expected == 2:
            until(lambda: {(s["device"], s["state"], s["serving"]["version"], s["stale"]) for s in states().values()
                           if s["serving"]} >= {("device-1", "active", 2, False), ("device-2", "active", 2, False)},
                  60, "both devices' reports: active on v2")
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


def test_a_second_fleet_run_starts_its_devices_fresh_with_its_empty_store(tmp_path):
    """The store is in memory, so its devices' state from an earlier run is cleared at start (outboxes,
    model and plugin stores, broker persistence), while certificates and logs are kept."""
    folder = tmp_path / "fleet"
    device = folder / "device-1"
    leftovers = [device / "outbox.db", device / "outbox.db-wal",
                 *(device / name / "from-an-earlier-run" for name in ("store", "store-plugins", "store-plugin-cache",
                                                                      "broker"))]
    for path in leftovers:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"from an earlier run")
    (folder / "log").mkdir()
    (folder / "log" / "earlier.log").write_text("kept")
    done = _edgefleet("fleet", "--duration", "1", "--devices", "1", "--folder", str(folder), timeout=180,
                      env={"COLUMNS": "160"})
    assert "devices start fresh with the in-memory S3 store" in done.stdout, done.stdout[-3000:] + done.stderr[-3000:]
    assert [p for p in leftovers if p.exists() and p.read_bytes() == b"from an earlier run"] == []
    assert (folder / "log" / "earlier.log").read_text() == "kept" and (folder / "certs" / "ca.crt").exists()
    env = _operator_env(folder / "operator.env")
    assert {"EDGEFLEET_MQTT_URL", "EDGEFLEET_MQTT_CA_FILE", "EDGEFLEET_MQTT_CERT_FILE", "EDGEFLEET_MQTT_KEY_FILE",
            "EDGEFLEET_S3_ENDPOINT_URL", "EDGEFLEET_S3_ACCESS_KEY_ID", "EDGEFLEET_S3_SECRET_ACCESS_KEY",
            "EDGEFLEET_REGISTRY_BUCKET", "EDGEFLEET_TRUSTED_KEYS_DIR"} <= env.keys()
    assert oct((folder / "operator.env").stat().st_mode & 0o777) == "0o600"


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
