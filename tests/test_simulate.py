"""`edgefleet simulate run`, real: simulated devices on a TLS fleet broker with the committed cloud config
and ACL (each device its own certificate), the signed registry on a real S3 server, a rollout published by
the operator, a late joiner in a second process, a silently cut link, a tampered model, and SIGTERM."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from edgefleet.bench.fleet_rig import make_model
from edgefleet.broker import Broker
from edgefleet.brokerconf import cloud_listener
from edgefleet.certs import issue, new_ca
from edgefleet.fleet_rollout import publish as publish_rollout
from edgefleet.publish import publish
from edgefleet.simulate import stats as sim_stats
from edgefleet.simulate.cuts import cut_devices
from shared import registry, s3, topics
from shared.codec import decode
from shared.config import CommonSettings, environment
from shared.mqtt import MqttLink, content_type_of
from shared.schemas import Rollout, RolloutPhase, RolloutTarget, ServiceStatus, SyncReport, SyncState
from tests import s3pool
from tests.support import wait_until

BUCKET = "edgefleet-models"
# The versions rolled out are small real ONNX models (the bench's), published as efficientnet-lite0: the
# simulated devices verify, download and install them but run no inference (they draw the recorded
# predictions), so the real model's 18 MB would only add download time. The seed is the real model.
ROLLOUT_MODEL_BYTES = 64 * 1024


class Watcher:
    """The operator's view of the fleet broker: every device's retained statuses and sync state."""

    def __init__(self, url: str, certs: Path) -> None:
        self.statuses: dict[tuple[str, str], ServiceStatus] = {}
        self.states: dict[str, SyncReport] = {}
        self.late: dict[str, float] = {}  # per device: the most seconds a sync status arrived after its `at`
        self._lock = threading.Lock()
        self.settings = CommonSettings(mqtt_url=url, device_id="operator", mqtt_reconnect_max_s=1,
                                       mqtt_ca_file=certs / "ca.crt", mqtt_cert_file=certs / "operator.crt",
                                       mqtt_key_file=certs / "operator.key")
        self.link = MqttLink(self.settings, "watch", unique=True)
        self.link.subscribe(topics.every_device_status("+"), self._on_status)
        self.link.subscribe(topics.all_sync_states(), self._on_state)
        self.link.start()

    def _on_status(self, message) -> None:
        status = decode(ServiceStatus, message.payload, content_type_of(message))
        with self._lock:
            self.statuses[(status.device, status.service)] = status
            if status.service == topics.SYNC_SERVICE and not message.retain:
                self.late[status.device] = max(self.late.get(status.device, 0.0), time.time() - status.at)

    def _on_state(self, message) -> None:
        report = decode(SyncReport, message.payload, content_type_of(message))
        with self._lock:
            self.states[report.device] = report

    def online(self, devices: list[str]) -> bool:
        with self._lock:
            return all((s := self.statuses.get((d, service))) is not None and s.state == "online"
                       for d in devices for service in topics.DEVICE_SERVICES)

    def active(self, devices: list[str], rollout_id: str, version: int) -> bool:
        with self._lock:
            return all((r := self.states.get(d)) is not None and r.rollout_id == rollout_id
                       and r.state is SyncState.ACTIVE and r.canary is not None and r.canary.passed
                       and r.serving is not None and r.serving.version == version for d in devices)

    def close(self) -> None:
        self.link.stop()


def retained_topics(rig: dict, devices: list[str]) -> set[str]:
    """The topics a fresh subscriber gets as retained messages for these devices' statuses and sync state."""
    got: set[str] = set()
    lock = threading.Lock()

    def note(message) -> None:
        if message.retain:
            with lock:
                got.add(message.topic)

    settings = rig["watcher"].settings
    link = MqttLink(settings, "retained", unique=True)
    link.subscribe(topics.every_device_status("+"), note)
    link.subscribe(topics.all_sync_states(), note)
    link.start()
    want = {topics.status(d, service) for d in devices for service in topics.DEVICE_SERVICES}
    want |= {topics.sync_state(d) for d in devices}
    try:
        wait_until(lambda: want <= got, 10, "the retained statuses and sync states")
    finally:
        link.stop()
    return got & want


def tamper(rig: dict, version: int) -> None:
    """Version `version` published signed, then its model object replaced by other bytes (the SHA-256 and
    the signature no longer match what is downloaded)."""
    client = s3.client(rig["store"].settings())
    variant = make_model(rig["tmp"] / f"v{version}", ROLLOUT_MODEL_BYTES, version)
    publish(client, BUCKET, variant, rig["private"], name="efficientnet-lite0", version=version)
    body = bytearray((variant / registry.MODEL_OBJECT).read_bytes())
    body[len(body) // 2] ^= 0xFF
    client.put_object(Bucket=BUCKET, Key=registry.key("efficientnet-lite0", version, registry.MODEL_OBJECT),
                      Body=bytes(body))


@pytest.fixture
def rig(tmp_path, model_dir):
    certs = tmp_path / "certs"
    new_ca(certs)
    issue(certs, "cloud-broker", server=True)
    issue(certs, "operator")
    with contextlib.ExitStack() as stack:
        broker = stack.enter_context(Broker(security=cloud_listener(certs)))
        store = stack.enter_context(contextlib.closing(s3pool.take()))
        keys = registry.new_key_pair(tmp_path / "keys")
        private = keys.private
        client = s3.client(store.settings())
        s3.ensure_bucket(client, BUCKET)
        variant = make_model(tmp_path / "v2", ROLLOUT_MODEL_BYTES, 2)
        publish(client, BUCKET, variant, keys.private, name="efficientnet-lite0", version=2)
        url = f"mqtts://127.0.0.1:{broker.port}"
        watcher = Watcher(url, certs)
        stack.callback(watcher.close)
        yield {"certs": certs, "url": url, "store": store, "keys": keys.public.parent, "watcher": watcher,
               "tmp": tmp_path, "model_dir": model_dir, "private": private}


def simulate(rig: dict, first: int, devices: int, *extra: str) -> subprocess.Popen:
    env = {**os.environ, **environment(rig["store"].settings()), "EDGEFLEET_STATUS_INTERVAL_S": "1",
           "EDGEFLEET_CANARY_WINDOW": "20", "EDGEFLEET_CANARY_TIMEOUT_S": "20", "EDGEFLEET_DOWNLOAD_TIMEOUT_S": "5",
           "EDGEFLEET_DOWNLOAD_RETRY_MAX_S": "2", "EDGEFLEET_LOG_FORMAT": "text"}
    log = (rig["tmp"] / f"sim-{first}.log").open("ab")
    return subprocess.Popen(
        [sys.executable, "-m", "edgefleet", "simulate", "run", "--devices", str(devices), "--first", str(first),
         "--fleet-url", rig["url"], "--certs", str(rig["certs"]), "--trusted-keys", str(rig["keys"]),
         "--seed-model", str(rig["model_dir"]), "--records-per-s", "0", "--predictions-per-s", "50",
         "--connect-spread-s", "1", "--state-dir", str(rig["tmp"] / f"state-{first}"), *extra],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )


def stopped(process: subprocess.Popen) -> int:
    process.send_signal(signal.SIGTERM)
    return process.wait(60)


def test_simulated_devices_report_take_a_rollout_a_late_joiner_too_refuse_a_tampered_model_and_queue_through_a_cut(
        rig):
    watcher, tmp = rig["watcher"], rig["tmp"]
    early = [f"sim-{i:05d}" for i in range(4)]
    stats_file = tmp / "stats.json"
    # Cut for 3 s with statuses every 0.8-1.2 s: one is published at least 1.8 s before the cut ends.
    first = simulate(rig, 0, 4, "--stats", str(stats_file), "--cut-share", "0.25", "--cut-at-s", "0",
                     "--cut-for-s", "3")
    late = None
    try:
        wait_until(lambda: watcher.online(early) or first.poll() is not None, 60, "4 devices' retained statuses")
        assert first.poll() is None, (tmp / "sim-0.log").read_text()

        # One device's link was cut (silently) once all were connected; it came back on its persistent
        # session; statuses published during the cut (queued, or the last retained one re-sent at the
        # reconnect, as the bridge does) arrived after it, with their own `at`.
        [cut] = cut_devices(early, 0.25)

        def reconnected() -> bool:
            if not stats_file.exists():
                return False
            s = sim_stats.read(stats_file)
            return s.link.cut == 1 and s.link.losses >= 1 and s.connected == 4 and s.link.queued == 0
        wait_until(reconnected, 30, "the cut link back")
        # Only the cut device must show it: another device's lateness would measure this machine's load.
        wait_until(lambda: watcher.late.get(cut, 0) >= 1.0, 10, "a status from during the cut, delivered after it")

        rollout = Rollout(rollout_id="sim-v2", model="efficientnet-lite0", version=2, phase=RolloutPhase.PROMOTED,
                          target=RolloutTarget(), issued_at=0.0)
        publish_rollout(watcher.settings, rollout)
        wait_until(lambda: watcher.active(early, "sim-v2", 2), 90, "the rollout active on the 4 devices")

        # A device that connects after the rollout was published acts on the retained one.
        late = simulate(rig, 4, 1)
        wait_until(lambda: watcher.active(["sim-00004"], "sim-v2", 2), 90, "the late joiner active")

        s = sim_stats.read(stats_file)
        assert s.registry.requests.get("GetObject", 0) >= 4 * 3  # manifest, signature, model chunks
        assert s.registry.bytes >= 4 * (tmp / "v2" / "model.onnx").stat().st_size
        assert s.rollouts.states == {"active": 4}
        assert s.per_device_bytes > 0 and s.per_device_peak_bytes >= s.per_device_bytes
        assert s.per_device_state_bytes > 0 and s.failed == 0 and s.link.refused == 0

        # A fresh subscriber (none of the above) gets every device's statuses and sync state as retained.
        everyone = [*early, "sim-00004"]
        assert len(retained_topics(rig, everyone)) == 4 * len(everyone)

        # A model whose bytes were changed after signing: every device reports FAILED and keeps v2.
        tamper(rig, 3)
        bad = Rollout(rollout_id="sim-v3", model="efficientnet-lite0", version=3, phase=RolloutPhase.PROMOTED,
                      target=RolloutTarget(), issued_at=0.0)
        publish_rollout(watcher.settings, bad)

        def refused() -> bool:
            with watcher._lock:
                return all((r := watcher.states.get(d)) is not None and r.rollout_id == "sim-v3"
                           and r.state is SyncState.FAILED and r.serving is not None and r.serving.version == 2
                           for d in everyone)
        wait_until(refused, 60, "the tampered model refused everywhere")
    finally:
        codes = [stopped(p) for p in (first, late) if p is not None]
    assert codes == [0] * len(codes), (tmp / "sim-0.log").read_text()[-3000:]
    # SIGTERM: every service of every device says offline, "shutdown", as the real services' last word.
    wait_until(lambda: all(s.state == "offline" and s.reason == "shutdown" for s in watcher.statuses.values()), 10,
               "offline statuses")
    assert {d for d, _ in watcher.statuses} == {*early, "sim-00004"}
    assert json.loads(stats_file.read_text())["devices"] == 4


def test_record_keeps_the_real_models_answer_and_latencies_for_every_bundled_photo(tmp_path, model_dir):
    from edgefleet.photos import BUNDLED
    from edgefleet.simulate.predictions import load, record
    from shared.manifest import load_verified

    manifest, _ = load_verified(model_dir)
    out = tmp_path / "predictions.json"
    recording = record(model_dir, out, runs=2)
    assert load(out) == recording  # what simulate run draws from is what was recorded
    assert (recording.model, recording.sha256) == (manifest.name, manifest.sha256)
    assert [row.photo for row in recording.predictions] == list(BUNDLED)
    for row in recording.predictions:
        assert row.label in manifest.labels
        assert 0 < row.confidence <= 1
        assert len(row.latencies_ms) == 2 and all(ms > 0 for ms in row.latencies_ms)
    assert len({row.label for row in recording.predictions}) > 1  # the photos are told apart
