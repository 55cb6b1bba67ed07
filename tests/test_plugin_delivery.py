"""Plugin delivery end to end: real broker, real S3-compatible server, real wasm modules built from the
repository's sources (var/plugin-builds, scripts/plugins.sh), real `edgefleet sync`, `inference` and
`camera` processes. A plugin ships like a model: signed, installed atomically, canaried, rolled back."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import Path

from shared import registry, topics
from shared.codec import decode
from shared.config import CameraSettings, CommonSettings, InferenceSettings
from shared.mqtt import MqttLink, content_type_of
from shared.plugin import ACTIVE_FILE
from shared.schemas import PluginRollout, RolloutPhase, RolloutTarget, SyncReport
from tests.delivery import BUCKET, Fleet
from tests.support import Device, wait_until

REPO = Path(__file__).resolve().parent.parent


def _built(name: str) -> tuple[Path, Path]:
    """The module and spec scripts/plugins.sh built; the test is skipped, saying so, when they are missing
    (failed under CI=true: tests.plugin_builds)."""
    from tests.plugin_builds import built

    plugin = built(name)
    return plugin.wasm, plugin.spec


class PluginReports:
    """One device's retained reports on its plugin rollouts (topics.plugin_sync_state), as they come."""

    def __init__(self, url: str, device_id: str) -> None:
        self.reports: list[tuple[str, SyncReport]] = []
        self._lock = threading.Lock()
        self.link = MqttLink(CommonSettings(mqtt_url=url, device_id=device_id), "test-plugins", unique=True)
        self.link.subscribe(topics.plugin_sync_state(device_id, "+"), self._on_report, qos=1)
        self.link.start()
        assert self.link.wait_connected(10)

    def _on_report(self, message) -> None:
        with self._lock:
            self.reports.append((topics.plugin_of(message.topic),
                                 decode(SyncReport, message.payload, content_type_of(message))))

    def wait(self, matches: Callable[[SyncReport], bool], what: str, timeout: float = 90) -> SyncReport:
        def find():
            with self._lock:
                return next((r for _, r in self.reports if matches(r)), None)

        return wait_until(find, timeout, what)

    def states(self, rollout_id: str) -> list[str]:
        with self._lock:
            states = [r.state.value for _, r in self.reports if r.rollout_id == rollout_id]
        return [s for i, s in enumerate(states) if i == 0 or states[i - 1] != s]

    def close(self) -> None:
        self.link.stop()


class PluginRig:
    def __init__(self, fleet: Fleet, device_id: str, model_dir: Path, request, camera_rate: float = 10.0,
                 **sync_settings: object) -> None:
        self.plugins = fleet.tmp / device_id / "plugins"
        self.store = fleet.tmp / device_id / "store"
        self.device = Device(fleet.broker.url, device_id)
        request.addfinalizer(self.device.close)
        self.reports = PluginReports(fleet.broker.url, device_id)
        request.addfinalizer(self.reports.close)
        self.sync_settings = {"plugins_dir": self.plugins, "canary_window": 20, "canary_min_samples": 10,
                              "canary_timeout_s": 90, **sync_settings}
        self.sync = fleet.start_sync(device_id, model_dir, **self.sync_settings)
        wait_until(lambda: (s := self.device.latest_status("sync")) is not None and s.state == "online"
                   or not self.sync.alive(), 60, "the sync service's online status")
        assert self.sync.alive(), self.sync.log()
        inference = fleet.service_settings(InferenceSettings, device_id, model_dir=self.store / "current",
                                           plugins_dir=self.plugins,
                                           plugins_cache_dir=fleet.tmp / device_id / "plugin-cache")
        self.inference = fleet.services.start(inference, f"{device_id}-inference", "inference")
        wait_until(lambda: (s := self.device.latest_status()) is not None and s.state == "online"
                   or not self.inference.alive(), 60, "the inference service's online status")
        assert self.inference.alive(), self.inference.log()
        if camera_rate:
            camera = fleet.service_settings(CameraSettings, device_id, cameras="door,yard", rate_hz=camera_rate,
                                            envelope=True)
            fleet.services.start(camera, f"{device_id}-camera", "camera")

    def active(self) -> list[str]:
        path = self.plugins / ACTIVE_FILE
        plugins = json.loads(path.read_text())["plugins"] if path.exists() else []
        return [f"{p['name']} v{p['version']}" for p in plugins]

    def installed(self, name: str) -> list[str]:
        folder = self.plugins / name
        return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []

    def sync_state(self) -> dict:
        return json.loads((self.plugins / ".sync-state.json").read_text())


def _publish(fleet: Fleet, name: str, version: int | None = None):
    from edgefleet.publish import publish_plugin

    wasm, spec = _built(name)
    return publish_plugin(fleet.store, BUCKET, wasm, spec, fleet.keys.private, version=version)


def _rollout(fleet: Fleet, plugin: str, version: int, rollout_id: str, phase=RolloutPhase.PROMOTED) -> None:
    from edgefleet import fleet_rollout as operator

    operator.publish(fleet.settings(), PluginRollout(rollout_id=rollout_id, plugin=plugin, version=version,
                                                     phase=phase, target=RolloutTarget(), issued_at=0.0))


def _state(rollout_id: str, state: str) -> Callable[[SyncReport], bool]:
    return lambda r: r.rollout_id == rollout_id and r.state.value == state


def _verdict(rollout_id: str) -> Callable[[SyncReport], bool]:
    return lambda r: r.rollout_id == rollout_id and r.state.value in ("active", "rolled_back") and r.canary is not None


def test_a_plugin_rollout_changes_the_running_devices_predictions_passes_its_canary_and_abort_removes_it(
        fleet, model_dir, request):
    published = _publish(fleet, "site-labels")
    rig = PluginRig(fleet, "edge-plugin", model_dir, request)
    wait_until(lambda: len(rig.device.predictions) >= 10, 60, "predictions before any plugin")
    assert not any(p.changed_by for p in rig.device.predictions)
    _rollout(fleet, "site-labels", published.version, "r-labels")
    report = rig.reports.wait(_verdict("r-labels"), "the plugin canary's verdict", 120)
    assert report.state.value == "active" and report.canary.passed, report
    assert report.serving.name == "site-labels" and report.serving.sha256 == published.sha256
    assert rig.reports.states("r-labels") == ["received", "downloading", "verified", "installed", "active"]
    assert rig.active() == [f"site-labels v{published.version}"]
    assert rig.installed("site-labels") == [f"{published.version}-{published.sha256[:16]}"]
    # The plugin's effect on the published predictions: cats renamed by the site's rule, and it says so.
    changed = wait_until(lambda: next((p for p in rig.device.predictions if p.changed_by), None), 60,
                         "a prediction the plugin changed")
    labels = {c.label for c in changed.top}
    assert changed.changed_by == ["site-labels"] and "cat" in labels, changed.top
    assert not labels & {"tabby", "tiger cat", "Egyptian cat", "Persian cat"}, labels
    assert {s.plugin.sha256 for s in rig.device.latest_status().plugins} == {published.sha256}

    _rollout(fleet, "site-labels", published.version, "r-labels", phase=RolloutPhase.ABORTED)
    back = rig.reports.wait(_state("r-labels", "rolled_back"), "the abort to remove the plugin")
    assert "aborted" in back.reason and back.serving is None and rig.active() == []
    wait_until(lambda: (s := rig.device.latest_status()) is not None and not s.plugins, 30,
               "inference to run no plugin")
    served = len(rig.device.predictions)
    wait_until(lambda: len(rig.device.predictions) > served + 10, 30, "predictions after the abort")
    assert not any(p.changed_by for p in rig.device.predictions[served + 5:])


def test_a_faulting_plugin_is_rolled_back_by_its_canary_and_never_reinstalled(fleet, model_dir, request):
    trap = _publish(fleet, "hostile-trap")
    rig = PluginRig(fleet, "edge-trap", model_dir, request)
    _rollout(fleet, "hostile-trap", trap.version, "r-trap")
    report = rig.reports.wait(_verdict("r-trap"), "the plugin canary's verdict", 120)
    assert report.state.value == "rolled_back" and not report.canary.passed, report
    assert "canary failed" in report.reason and "disabled" in report.reason, report.reason
    assert report.target.sha256 == trap.sha256 and report.serving is None
    assert rig.active() == [] and trap.sha256 in rig.sync_state()["rejected"]
    assert any(e.reason == "plugin_fault" and e.plugin.sha256 == trap.sha256 for e in rig.device.errors)
    # Promoted again (a new message for the same version): refused before any download or switch.
    _rollout(fleet, "hostile-trap", trap.version, "r-trap-again")
    again = rig.reports.wait(_state("r-trap-again", "rolled_back"), "the retry to be refused")
    assert "already rolled this plugin back" in again.reason
    assert rig.reports.states("r-trap-again") == ["received", "rolled_back"] and rig.active() == []
    served = len(rig.device.predictions)
    wait_until(lambda: len(rig.device.predictions) > served + 10, 30, "predictions to go on")


def test_unsigned_and_tampered_plugins_are_refused_and_nothing_is_installed(fleet, model_dir, request, tmp_path):
    name = "site-labels"
    for version in (1, 2, 3):
        _publish(fleet, name, version)

    def key(version: int, obj: str) -> str:
        return registry.plugin_key(name, version, obj)

    fleet.store.delete_object(Bucket=BUCKET, Key=key(1, registry.SIGNATURE_OBJECT))  # unsigned
    wasm = bytearray(_built(name)[0].read_bytes())
    wasm[-1] ^= 0xFF  # the module changed after signing, its size the same
    fleet.store.put_object(Bucket=BUCKET, Key=key(2, registry.PLUGIN_OBJECT), Body=bytes(wasm))
    stranger = registry.load_private_key(registry.new_key_pair(tmp_path / "stranger").private)
    document = fleet.store.get_object(Bucket=BUCKET, Key=key(3, registry.MANIFEST_OBJECT))["Body"].read()
    fleet.store.put_object(Bucket=BUCKET, Key=key(3, registry.SIGNATURE_OBJECT), Body=registry.sign(document, stranger))

    rig = PluginRig(fleet, "edge-refuse", model_dir, request, camera_rate=2)
    for version, reason in ((1, "no signature"), (2, "tampered or corrupt"), (3, "unknown key")):
        _rollout(fleet, name, version, f"r-{version}")
        report = rig.reports.wait(_state(f"r-{version}", "failed"), f"v{version} to be refused")
        assert reason in report.reason, report.reason
        assert report.serving is None
    assert rig.active() == [] and rig.installed(name) == []
    assert not list((rig.plugins / ".staging").iterdir())
    assert not (s := rig.device.latest_status()).plugins, s.plugins
    # A rollout message that does not parse is reported, and sync goes on.
    rig.device.link.publish(topics.plugin_rollout("junk"), b'{"rollout_id": 1', qos=1).wait_for_publish(10)
    error = wait_until(lambda: next((e for e in rig.device.errors if e.service == "sync"), None), 30,
                       "sync's error report")
    assert error.reason == "malformed_command" and "plugin rollout" in error.detail
    _rollout(fleet, name, 2, "r-2-again")
    rig.reports.wait(_state("r-2-again", "failed"), "sync to go on")


def test_sync_killed_inside_a_plugin_canary_rolls_the_plugin_back_at_restart(fleet, model_dir, request):
    published = _publish(fleet, "site-labels")
    # A canary that cannot end by itself while the test looks: a window of 1000 predictions.
    rig = PluginRig(fleet, "edge-crash", model_dir, request, camera_rate=4, canary_window=1000,
                    canary_timeout_s=600)
    _rollout(fleet, "site-labels", published.version, "r-crash")
    rig.reports.wait(lambda r: r.rollout_id == "r-crash" and r.state.value == "active"
                     and (r.reason or "").startswith("canary: counting"), "the canary to start")
    wait_until(lambda: any(p.changed_by for p in rig.device.predictions), 60, "the plugin to run")
    rig.sync.kill()  # SIGKILL inside the canary: switched, no verdict
    assert rig.sync_state()["pending"]["sha256"] == published.sha256
    assert rig.active() == [f"site-labels v{published.version}"]
    rig.sync = fleet.start_sync("edge-crash", model_dir, **rig.sync_settings)
    report = rig.reports.wait(_state("r-crash", "rolled_back"), "the rollback at restart")
    assert "sync restarted during the canary" in report.reason and report.serving is None
    assert rig.active() == [] and rig.sync_state()["pending"] is None
    assert published.sha256 in rig.sync_state()["rejected"]
    wait_until(lambda: (s := rig.device.latest_status()) is not None and not s.plugins, 30,
               "inference to be switched to the store's set (none)")
    served = len(rig.device.predictions)
    wait_until(lambda: len(rig.device.predictions) > served + 8, 30, "predictions after the restart")
    assert not any(p.changed_by for p in rig.device.predictions[served + 4:])
    # The retained rollout, delivered again to the restarted sync, does not bring the plugin back.
    rig.reports.wait(lambda r: r.rollout_id == "r-crash" and "already rolled" in (r.reason or ""),
                     "the retained rollout to be refused")
    assert rig.active() == []
