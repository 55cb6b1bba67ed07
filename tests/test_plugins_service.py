"""Plugins in the real `edgefleet inference` process: a real Mosquitto, the real model, real photos, and
the plugins built from this repository's C sources by scripts/plugins.sh (var/plugin-builds), installed
in a plugin store as sync installs them (plugin.wasm, manifest.json, active.json)."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import paho.mqtt.client as paho
import pytest

from edgefleet import photos
from shared import topics
from shared.config import CommonSettings
from shared.manifest import MANIFEST_FILE
from shared.mqtt import MqttLink
from shared.plugin import ABI_VERSION, PLUGIN_FILE, ActivePlugin, ActivePlugins, PluginManifest, write_active
from shared.schemas import ModelRef, PluginState
from tests.plugin_builds import built
from tests.support import Device, wait_until

HOSTILE = ["hostile-loop", "hostile-memory", "hostile-huge-result", "hostile-topic", "hostile-trap",
           "hostile-malformed"]
FAULT_LIMIT = 3


def plugin_store(root: Path, plugins: dict[str, dict[str, object]]) -> list[ModelRef]:
    """A plugin store holding the built plugins named (in order), each with its spec changed as given
    (e.g. {"config": {...}}), and an active set that runs them all."""
    active = []
    for name, changes in plugins.items():
        plugin = built(name)  # skipped without the build, failed under CI=true
        wasm = plugin.wasm.read_bytes()
        spec = json.loads(plugin.spec.read_text()) | changes
        manifest = PluginManifest.model_validate({**spec, "version": 1, "abi": ABI_VERSION, "created_at": time.time(),
                                                  "sha256": hashlib.sha256(wasm).hexdigest(), "size_bytes": len(wasm)})
        folder = root / name / "1"
        folder.mkdir(parents=True)
        (folder / PLUGIN_FILE).write_bytes(wasm)
        (folder / MANIFEST_FILE).write_text(manifest.model_dump_json())
        active.append(ActivePlugin(name=name, version=1, sha256=manifest.sha256, folder=f"{name}/1"))
    write_active(root, ActivePlugins(plugins=active))
    return [p.ref() for p in active]


@pytest.fixture
def start(broker, start_inference, tmp_path, request):
    """start(plugins, allowed_dirs): the service running these built plugins (folders may be granted only
    inside `allowed_dirs`), a test device, and everything the broker carries under edgefleet/ from then on
    (seen by a client of its own: Mosquitto sends a client one copy per matching subscription, and the
    device's own would overlap)."""

    def start(plugins: dict[str, dict[str, object]],
              allowed_dirs: tuple[Path, ...] = ()) -> tuple[list[ModelRef], Device, list[tuple[str, bytes]]]:
        refs = plugin_store(tmp_path / "plugins", plugins)
        service, device = start_inference(broker, inference_workers=1, plugins={
            "dir": tmp_path / "plugins", "cache_dir": tmp_path / "plugin-cache", "fault_limit": FAULT_LIMIT,
            "fault_window_s": 600, "allowed_dirs": list(allowed_dirs)})
        seen = everything(broker.url, device.device_id, request)
        wait_until(lambda: any(t == topics.status(device.device_id, "inference") for t, _ in list(seen)), 30,
                   "the retained status through the edgefleet/# subscription")
        assert service.alive()
        return refs, device, seen

    return start


def everything(url: str, device_id: str, request: pytest.FixtureRequest) -> list[tuple[str, bytes]]:
    """Every message under edgefleet/ from now on, as (topic, payload), in arrival order."""
    seen: list[tuple[str, bytes]] = []
    lock = threading.Lock()

    def record(message: paho.MQTTMessage) -> None:
        with lock:
            seen.append((message.topic, bytes(message.payload)))

    link = MqttLink(CommonSettings(mqtt_url=url, device_id=device_id, mqtt_reconnect_max_s=1), "test-all", unique=True)
    link.subscribe(f"{topics.ROOT}/#", record)
    link.start()
    request.addfinalizer(link.stop)
    assert link.wait_connected(10), "the recording client could not connect"
    return seen


def plugin_messages(seen: list[tuple[str, bytes]], device: Device) -> list[tuple[str, bytes]]:
    """The messages on any plugin's topic (edgefleet/<device>/plugins/...)."""
    root = topics.all_plugin_messages(device.device_id)
    return [(t, p) for t, p in list(seen) if paho.topic_matches_sub(root, t)]


def test_hostile_plugins_are_contained_reported_and_disabled_and_every_frame_is_answered(start):
    refs, device, seen = start({name: {} for name in HOSTILE})
    frames = [f"f{i}" for i in range(FAULT_LIMIT + 2)]
    for frame_id in frames:
        device.publish_envelope("cam", frame_id, photos.jpeg("chelsea"))
    answered = [device.prediction_for(frame_id) for frame_id in frames]
    status = wait_until(lambda: (s := device.latest_status()) and s.plugins and all(
        p.state == PluginState.DISABLED for p in s.plugins) and s, 30, "every hostile plugin disabled")
    errors = list(device.errors)

    # Every frame answered as the model answered it: no hostile plugin changed or cost a prediction.
    assert [p.frame_id for p in answered] == frames
    assert all(p.changed_by is None and p.top[0].label for p in answered)
    for ref in refs:
        faults = [e for e in errors if e.plugin == ref and e.reason == "plugin_fault"]
        disabled = [e for e in errors if e.plugin == ref and e.reason == "plugin_disabled"]
        assert [e.frame_id for e in faults] == frames[:FAULT_LIMIT], (ref.name, [e.detail for e in faults])
        assert len(disabled) == 1, ref.name  # reported once, then skipped
    assert [(p.plugin, p.state, p.faults, p.calls) for p in status.plugins] == [
        (ref, PluginState.DISABLED, FAULT_LIMIT, FAULT_LIMIT) for ref in refs]
    kinds = {p.plugin.name: (p.last_fault or "").split(":")[0] for p in status.plugins}
    assert kinds["hostile-topic"] == "topic" and kinds["hostile-trap"] == "trap"
    assert kinds["hostile-huge-result"] == kinds["hostile-malformed"] == "result"
    assert kinds["hostile-loop"] in {"fuel", "deadline"}
    # hostile-topic queued a valid message before each escape: none of it was published, anywhere.
    assert plugin_messages(seen, device) == []
    assert not [t for t, p in list(seen) if b"escaped" in p]


def test_a_plugins_messages_appear_on_its_own_topic_and_nowhere_else(start):
    _, device, seen = start({"hostile-topic": {"config": {"only": "ok"}}})
    for frame_id in ("f1", "f2"):
        device.publish_envelope("cam", frame_id, photos.jpeg("chelsea"))
    device.prediction_for("f2")
    wait_until(lambda: len(plugin_messages(seen, device)) == 2, 10, "the plugin's two messages")

    carrying = [t for t, p in list(seen) if b"escaped" in p]
    assert carrying == [topics.plugin_message(device.device_id, "hostile-topic", "ok")] * 2
    assert [json.loads(p) for _, p in plugin_messages(seen, device)] == [{"escaped": False}] * 2
    assert device.errors == []


def test_the_infer_import_answers_as_the_service_does_for_the_same_crop(start):
    full = photos.png("chelsea")
    image = cv2.imdecode(np.frombuffer(full, np.uint8), cv2.IMREAD_COLOR)
    x, y, w, h = 120, 30, 220, 200
    ok, crop = cv2.imencode(".png", image[y : y + h, x : x + w])  # PNG: the service sees the same pixels
    assert ok
    config = {"x": str(x), "y": str(y), "w": str(w), "h": str(h)}
    _, device, seen = start({"crop-check": {"config": config}})
    device.publish_envelope("cam", "crop", crop.tobytes())
    service_answer = device.prediction_for("crop")
    device.publish_envelope("cam", "full", full)
    whole = device.prediction_for("full")
    top1 = wait_until(lambda: next((json.loads(p) for t, p in plugin_messages(seen, device)
                                    if json.loads(p)["frame_id"] == "full"), None), 10, "the plugin's top1")

    assert top1["index"] == service_answer.top[0].index, (top1, service_answer.top[:2])
    assert abs(top1["score"] - service_answer.top[0].score) < 1e-3
    assert abs(top1["score"] - whole.top[0].score) > 1e-2  # the plugin's answer is the crop's, not the frame's
    # On the crop frame itself the rectangle lies outside the image: the plugin kept it and said nothing.
    assert [t for t, _ in plugin_messages(seen, device)] == [
        topics.plugin_message(device.device_id, "crop-check", "top1")]
    assert device.errors == []


def test_a_plugin_reads_inside_its_granted_folder_and_nothing_outside_it(start, tmp_path):
    site, secret = tmp_path / "site", tmp_path / "secret.txt"
    site.mkdir()
    (site / "hello.txt").write_text("hello from the site\n")
    secret.write_text("not for plugins\n")  # readable by the service's own user, outside the grant
    changes = {"grants": {"dirs": [{"guest": "/site", "host": str(site)}]},
               "config": {"path": str(secret), "escape": "/site/../secret.txt", "inside": "/site/hello.txt"}}
    _, device, seen = start({"hostile-file": changes}, allowed_dirs=(site,))
    device.publish_envelope("cam", "f1", photos.jpeg("chelsea"))
    device.prediction_for("f1")
    reads = wait_until(lambda: len(m := plugin_messages(seen, device)) == 3 and m, 10, "three reads reported")

    by_path = {r["path"]: r for r in (json.loads(p) for _, p in reads)}
    assert by_path["/site/hello.txt"] == {"path": "/site/hello.txt", "ok": True, "bytes": 20, "errno": 0}
    for path in (str(secret), "/site/../secret.txt"):
        assert not by_path[path]["ok"] and by_path[path]["bytes"] == 0 and by_path[path]["errno"] != 0, by_path[path]
    assert by_path[str(secret)]["errno"] == 76  # ENOTCAPABLE: no preopened folder holds it
    assert not [p for _, p in list(seen) if b"not for plugins" in p]
    assert device.errors == []
