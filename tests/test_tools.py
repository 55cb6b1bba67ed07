"""The camera simulator and the main job (`edgefleet up`), run as a newcomer runs them."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from edgefleet import photos
from edgefleet.ports import free_port
from shared import lake
from tests.browser import ConsolePage, console_page, needs_chromium
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


def test_the_main_job_shows_real_labels_and_hands_the_operator_its_registry(tmp_path):
    """`edgefleet up` shows live predictions, and hands the operator's shell what `rollout start` needs:
    its env file reaches the registry, seeded with the served v1 (accepted), where v2 is not (refused)."""
    out = tmp_path / "up.out"
    # 12 s of live view (counted from the env file's line): the operator's two commands below take ~5 s
    # on a loaded 2-core machine, and 2 cameras at 2 frames/s show ~40 predictions.
    with out.open("w") as log:
        up = subprocess.Popen([sys.executable, "-m", "edgefleet", "up", "--duration", "12", "--cameras", "2",
                               "--rate", "2"], cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                              env={**os.environ, "COLUMNS": "160"})
    try:
        line = wait_until(lambda: up.poll() is not None or re.search(r"operator shell: source (\S+)", out.read_text()),
                          120, "up to print its env file")
        assert up.poll() is None, out.read_text()[-3000:]
        operator = _operator_env(REPO / line.group(1))
        assert oct((REPO / line.group(1)).stat().st_mode & 0o777) == "0o600"  # it holds the S3 secret
        assert {"EDGEFLEET_MQTT_URL", "EDGEFLEET_S3_ENDPOINT_URL", "EDGEFLEET_REGISTRY_BUCKET",
                "EDGEFLEET_TRUSTED_KEYS_DIR"} <= operator.keys()
        missing = _edgefleet("rollout", "start", "efficientnet-lite0", "2", env=operator)
        assert missing.returncode == 2 and "refused" in missing.stderr, missing.stderr
        seeded = _edgefleet("rollout", "start", "efficientnet-lite0", "1", env=operator)
        assert seeded.returncode == 0, seeded.stderr
        assert up.wait(120) == 0, out.read_text()[-3000:]
    finally:
        if up.poll() is None:
            up.terminate()
            up.wait(60)
    stdout = out.read_text()
    assert "predictions shown" in stdout
    shown = int(stdout.split("stopped;")[1].split()[0])
    assert shown > 5
    assert any(label in stdout for label in ("tabby", "tiger cat", "Egyptian cat", "espresso"))


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


@needs_chromium
def test_the_first_rollout_by_the_readme_reaches_the_fleet_and_its_telemetry_reaches_the_cloud(model_dir, tmp_path,
                                                                                            page):
    """The main job as a newcomer runs it: the fleet live (`./scripts/run.sh`) and its printed console
    address open in a real browser (chromium), then the README's first-rollout commands typed in another
    terminal, in order: the env file sourced, the INT8 model built and published (as v2: the fleet's
    registry holds the v1 its devices serve), a one-device canary that shows its plan and stays on one
    device, then promoted to both. The page, never reloaded, follows it all: the canary phase, the canary
    device's steps, its verdict (or its rollback with the canary's reasons), both devices on v2."""
    folder = tmp_path / "fleet"
    log = (tmp_path / "fleet.out").open("w+")
    # --rate 5 (the README's option; 2 by default): each canary's 50 predictions in 5 s, not 12.5.
    fleet = subprocess.Popen([sys.executable, "-m", "edgefleet", "fleet", "--duration", "300", "--devices", "2",
                              "--rate", "5", "--folder", str(folder)], stdout=log, stderr=subprocess.STDOUT,
                             env={**os.environ, "COLUMNS": "160", "EDGEFLEET_CONSOLE_PORT": str(free_port())})
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
        # The console the fleet printed, opened as the newcomer opens it; never reloaded from here on.
        page.open(until(lambda: re.search(r"^console: (http://127\.0\.0\.1:\d+/)$", output(), re.M), 30,
                        "the fleet to print its console's address").group(1))
        page.shown(lambda: all(page.devices().get(d, {}).get("model") == "efficientnet-lite0 v1"
                               for d in ("device-1", "device-2")), 30, "both devices serving v1")
        page.screenshot("fleet-on-v1")
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
            elif command[1:3] == ["model", "dataset"]:  # fewer images (the defaults: 300 held out, 128 to calibrate)
                done = _edgefleet(*command[1:], "--out", str(data), "--eval-count", "48", "--calibration-count", "32")
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
                rollout_id = done.stdout.strip().splitlines()[-1]
                # On the page within seconds: v2 in its canary phase, the canary device taking it.
                shown = page.shown(lambda rid=rollout_id, device=first: (r := page.rollout()) and r["rollout_id"] == rid
                                   and device in r["devices"] and r, 15, f"rollout {rollout_id} with {first}")
                assert (shown["model"], shown["version"], shown["phase"]) == ("efficientnet-lite0", "2", "canary")
                page.screenshot("canary-started")
                until(lambda device=first: serving(device, 2), 120, "the canary device serving v2")
                # The canary's verdict, either way the README says it can go: passed, or rolled back.
                verdict = until(lambda device=first: _judged(states().get(device)), 120, "the canary's verdict")
                assert states()[other]["state"] == "not_targeted" and serving(other, 1)
                _verdict_on_the_page(page, rollout_id, first, other, verdict)
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
                _outcome_on_the_page(page, rollout_id, expected)
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
        # Nothing missing, nothing lost (acknowledged by this store and not in it), and nothing "sent before
        # this store existed": the devices started fresh with it.
        assert all(row["duplicates"] == 0 and row["missing_count"] == 0 and row["lost_count"] == 0
                   and row["before_store_count"] == 0 for row in audit.values()), audit
        assert _s3_keys(operator, lake.DEAD_LETTER) == [], "telemetry was dead-lettered"
    finally:
        fleet.terminate()
        assert fleet.wait(60) == 0


@pytest.fixture
def page(request, tmp_path):
    """The fleet console's page in chromium (tests/browser.py)."""
    with console_page(request, tmp_path) as opened:
        yield opened


def _verdict_on_the_page(page: ConsolePage, rollout_id: str, canary: str, other: str, verdict: dict) -> None:
    """The canary's verdict as the page shows it, live: the canary device's steps up to the verdict the CLI
    read (active, "canary passed …", or rolled back with the canary's reasons listed), the other device
    not targeted."""
    def judged() -> dict | None:
        r = page.rollout()
        device = page.devices().get(canary, {})
        return r if r and r["rollout_id"] == rollout_id and r["devices"].get(canary) == verdict["state"] \
            and r["devices"].get(other) == "not_targeted" and device.get("sync_reason") == (verdict["reason"] or "") \
            else None

    page.shown(judged, 20, f"the canary's verdict ({verdict['state']}) and {other} not targeted")
    steps = page.seen(rollout_id, canary)
    # It progressed on the page (no reload): more than one step seen, ending at the verdict.
    assert len({step[1:] for step in steps}) >= 2, steps
    assert steps[-1][1:] == (verdict["state"], verdict["reason"] or ""), steps
    if verdict["state"] == "rolled_back":
        reasons = (verdict["canary"] or {}).get("reasons") or [verdict["reason"]]
        listed = page.shown(lambda: next((b for b in page.rollbacks() if b["device"] == canary
                                          and b["rollout_id"] == rollout_id), None), 10, "the rollback listed")
        assert all(reason in listed["verdict"] for reason in reasons), (listed, reasons)
    assert page.not_reloaded(), "the page was reloaded"
    page.screenshot(f"canary-{verdict['state']}")


def _outcome_on_the_page(page: ConsolePage, rollout_id: str, version: int) -> None:
    """After promote, both devices active on v2 in a promoted rollout; after an abort, the rollout aborted
    and both devices back on v1."""
    phase = "promoted" if version == 2 else "aborted"

    def done() -> bool:
        r, devices = page.rollout(), page.devices()
        return bool(r and r["rollout_id"] == rollout_id and r["phase"] == phase
                    and all(devices.get(d, {}).get("model") == f"efficientnet-lite0 v{version}"
                            for d in ("device-1", "device-2"))
                    and (version == 1 or all(r["devices"].get(d) == "active" for d in ("device-1", "device-2"))))

    page.shown(done, 30, f"the rollout {phase}, both devices on v{version}")
    if version == 2:  # promoted: the whole fleet, whatever the canary's share was
        assert "target: all devices ·" in (page.rollout() or {})["text"], page.rollout()
    assert page.not_reloaded(), "the page was reloaded"
    page.screenshot(f"rollout-{phase}")


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
    # A free console port: 8080, the fleet's default, is the compose console's, whose tests may run meanwhile.
    done = _edgefleet("fleet", "--duration", "1", "--devices", "1", "--folder", str(folder), timeout=180,
                      env={"COLUMNS": "160", "EDGEFLEET_CONSOLE_PORT": str(free_port())})
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
