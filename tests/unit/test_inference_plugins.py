"""Plugins in the inference service, in process: the real service threads, the real model on real
photos, real WebAssembly in wasmtime (small modules written here in WAT, so each behaviour is exact),
and the in-memory broker link of test_inference_pipeline.py in place of MQTT. The hostile plugins
built from C run against a real broker in tests/test_plugins_service.py."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import cv2
import numpy as np
import pytest
import wasmtime

from edgefleet import photos
from services.inference.intake import Frame
from services.inference.plugins import PluginRecord
from services.inference.service import InferenceService
from services.inference.swap import ServedModel, warm
from services.inference.wasm import WasmHost
from shared import topics
from shared.codec import WireFormat, encode
from shared.config import CacheSettings, InferenceSettings, PluginSettings
from shared.manifest import MANIFEST_FILE
from shared.plugin import ABI_VERSION, PLUGIN_FILE, ActivePlugin, ActivePlugins, PluginManifest, write_active
from shared.schemas import (
    Encoding,
    ErrorReport,
    FrameEnvelope,
    ModelRef,
    PluginLoad,
    PluginState,
    PluginSwitch,
    PluginSwitched,
    Prediction,
    ServiceState,
)
from tests.support import wait_until
from tests.unit.test_inference_pipeline import DEVICE, LOADER, MemoryLink
from tests.unit.test_inference_pipeline import serving as pipeline_serving

T = TypeVar("T")
CHELSEA = photos.jpeg("chelsea")


@pytest.fixture(scope="module")
def model(model_dir: Path) -> ServedModel:
    served = LOADER(model_dir)
    warm(served)
    return served


# -- plugins in WAT: the ABI (docs/plugins.md) with nothing else ------------------------------------------


def _wat_string(data: bytes) -> str:
    return "".join(f"\\{b:02x}" for b in data)


def plugin_wasm(body: str, data: Sequence[tuple[int, bytes]] = (), pages: int = 64) -> bytes:
    """A plugin whose edgefleet_on_prediction is `body` (locals $ptr, $len), with `data` at fixed offsets
    (below 8192, where its bump allocator starts)."""
    segments = "\n".join(f'(data (i32.const {offset}) "{_wat_string(raw)}")' for offset, raw in data)
    return wasmtime.wat2wasm(f"""
(module
  (import "edgefleet" "emit" (func $emit (param i32 i32 i32 i32) (result i32)))
  (import "edgefleet" "frame" (func $frame (param i32 i32) (result i32)))
  (import "edgefleet" "infer" (func $infer (param i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") {pages})
  (global $heap (mut i32) (i32.const 8192))
  {segments}
  (func (export "edgefleet_abi_version") (result i32) (i32.const 1))
  (func (export "edgefleet_alloc") (param $n i32) (result i32)
    (local $p i32)
    (local.set $p (global.get $heap))
    (global.set $heap (i32.add (global.get $heap) (local.get $n)))
    (local.get $p))
  (func (export "edgefleet_on_prediction") (param $ptr i32) (param $len i32) (result i64)
    (local $n i32)
    {body}))
""")


def returning(document: dict[str, object]) -> bytes:
    """A plugin that answers `document` on every call."""
    raw = json.dumps(document).encode()
    return plugin_wasm(f"(i64.const {(1024 << 32) | len(raw)})", [(1024, raw)])


def emitting(*messages: tuple[str, bytes]) -> bytes:
    """A plugin that emits `messages` (suffix, payload) in order, then keeps the prediction."""
    data, calls, offset = [], [], 1024
    for suffix, payload in messages:
        s, p = suffix.encode(), payload
        data += [(offset, s), (offset + 256, p)]
        calls.append(f"(drop (call $emit (i32.const {offset}) (i32.const {len(s)}) "
                     f"(i32.const {offset + 256}) (i32.const {len(p)})))")
        offset += 512
    return plugin_wasm("\n".join(calls) + "\n(i64.const 0)", data)


KEEP = plugin_wasm("(i64.const 0)")
DROP = returning({"action": "drop"})
TRAP = plugin_wasm("unreachable")
LOOP = plugin_wasm("(loop $forever (br $forever)) (i64.const 0)")


def renaming(label: str) -> bytes:
    return returning({"action": "replace", "top": [{"index": 281, "label": label, "score": 0.5}]})


def inferring(x: int, y: int, w: int, h: int) -> bytes:
    """A plugin (frame and infer granted) that asks the served model about a rectangle of its frame
    and emits the probabilities it got, as little-endian f32s, on "probs"."""
    return plugin_wasm(f"""
    (local.set $n (call $frame (i32.const 65536) (i32.const 2097152)))
    (local.set $n (call $infer (i32.const 65536) (local.get $n) (i32.const {x}) (i32.const {y})
                               (i32.const {w}) (i32.const {h}) (i32.const 3145728) (i32.const 8192)))
    (drop (call $emit (i32.const 1024) (i32.const 5) (i32.const 3145728) (i32.mul (local.get $n) (i32.const 4))))
    (i64.const 0)""", [(1024, b"probs")])


def install(root: Path, name: str, wasm: bytes, version: int = 1, **spec: object) -> PluginLoad:
    """A plugin folder as sync installs one: plugin.wasm and its manifest, under the plugin store; the
    load names it relative to the store's root, as sync sends it."""
    folder = root / name / str(version)
    folder.mkdir(parents=True)
    (folder / PLUGIN_FILE).write_bytes(wasm)
    manifest = PluginManifest.model_validate({
        "name": name, "version": version, "sha256": hashlib.sha256(wasm).hexdigest(), "size_bytes": len(wasm),
        "abi": ABI_VERSION, "created_at": time.time(), **spec})
    (folder / MANIFEST_FILE).write_text(manifest.model_dump_json())
    return PluginLoad(plugin=manifest.ref(), folder=str(folder.relative_to(root)))


# -- the service ----------------------------------------------------------------------------------------------


@contextmanager
def serving(model: ServedModel, store: Path, active: Sequence[PluginLoad] = (), fault_limit: int = 5,
            plugin_settings: dict[str, object] | None = None,
            **changes: object) -> Iterator[tuple[InferenceService, MemoryLink]]:
    """The service on its own threads over a MemoryLink, with a real WasmHost (PluginSettings changed as
    `plugin_settings` says) and `active` as the plugin store's active set at start."""
    if active:
        write_active(store, ActivePlugins(plugins=[
            ActivePlugin(name=p.plugin.name, version=p.plugin.version, sha256=p.plugin.sha256, folder=p.folder)
            for p in active]))
    plugins = PluginSettings.model_validate({"dir": store, "cache_dir": store.parent / "plugin-cache",
                                             "fault_limit": fault_limit, **(plugin_settings or {})})
    with pipeline_serving(model, WasmHost(plugins), plugins=plugins, **changes) as running:
        yield running


def _soon(check: Callable[[], T | None], what: str) -> T:
    return wait_until(check, 10, what, interval=0.002)


def send(link: MemoryLink, frame_id: str, data: bytes = CHELSEA, camera: str = "cam") -> None:
    encoding = Encoding.PNG if data.startswith(b"\x89PNG") else Encoding.JPEG
    link.deliver(topics.frames(DEVICE, camera), encode(
        FrameEnvelope(frame_id=frame_id, encoding=encoding, data=data, captured_at=time.time()), WireFormat.MSGPACK))


def prediction_for(link: MemoryLink, frame_id: str) -> Prediction:
    return _soon(lambda: next((p for _, p in link.messages(topics.all_predictions(DEVICE), Prediction)
                               if p.frame_id == frame_id), None), f"a prediction for {frame_id}")


def errors(link: MemoryLink) -> list[ErrorReport]:
    return [e for _, e in link.messages(topics.errors(DEVICE), ErrorReport)]


def switch(link: MemoryLink, request_id: str, plugins: Sequence[PluginLoad]) -> PluginSwitched:
    link.deliver(topics.plugin_switch(DEVICE), encode(PluginSwitch(request_id=request_id, plugins=list(plugins),
                                                                   at=time.time(), timeout_s=30)),
                 WireFormat.JSON.content_type)
    return _soon(lambda: next((r for _, r in link.messages(topics.plugin_switched(DEVICE), PluginSwitched)
                               if r.request_id == request_id), None), f"the answer to {request_id}")


def plugin_topics(link: MemoryLink) -> list[tuple[str, bytes]]:
    """Every message published outside the service's own topics (predictions, errors, status, answers)."""
    own = (topics.all_predictions(DEVICE), topics.errors(DEVICE), topics.status(DEVICE, "inference"),
           topics.plugin_switched(DEVICE), topics.model_switched(DEVICE))
    return [(p.topic, p.payload) for p in list(link.sent) if not any(_matches(f, p.topic) for f in own)]


def _matches(topic_filter: str, topic: str) -> bool:
    import paho.mqtt.client as paho

    return bool(paho.topic_matches_sub(topic_filter, topic))


# -- keep, replace, drop -----------------------------------------------------------------------------------------


def test_plugins_keep_replace_and_drop_predictions_in_order(model, tmp_path):
    store = tmp_path / "plugins"
    keep, rename, drop = (install(store, "keeper", KEEP), install(store, "site-labels", renaming("site-cat")),
                          install(store, "dropper", DROP))
    with serving(model, store, [keep, rename]) as (service, link):
        send(link, "f1")
        replaced = prediction_for(link, "f1")
        assert switch(link, "s1", [rename, drop]).ok
        send(link, "f2")
        send(link, "f3")
        stats = _soon(lambda: (s := service.stats()).predictions_dropped_by_plugins == 2 and s, "two dropped")
        status = service.status(ServiceState.ONLINE).plugins

    assert [(c.index, c.label, c.score) for c in replaced.top] == [(281, "site-cat", 0.5)]
    assert replaced.changed_by == ["site-labels"] and replaced.model == model.ref
    # Dropped predictions are never published, and counted apart from the published and the lost.
    assert [p.frame_id for _, p in link.messages(topics.all_predictions(DEVICE), Prediction)] == ["f1"]
    assert (stats.predictions_published, stats.predictions_lost, stats.frames_received) == (1, 0, 3)
    # docs/protocol.md: every frame received is counted once, a plugin's drop included.
    assert stats.frames_received == (stats.predictions_published + stats.predictions_lost + stats.frames_dropped
                                     + stats.predictions_dropped_by_plugins + stats.frames_rejected + stats.queue_depth)
    # site-labels ran through the switch unchanged: its counters go on (f1, then f2 and f3).
    assert status is not None and [(s.plugin.name, s.state, s.calls, s.replaced, s.dropped) for s in status] == [
        ("site-labels", PluginState.ACTIVE, 3, 3, 0), ("dropper", PluginState.ACTIVE, 2, 0, 2)]
    assert errors(link) == []


def test_a_cached_answer_meets_the_plugins_and_the_cache_keeps_the_models_own(model, tmp_path):
    store = tmp_path / "plugins"
    rename = install(store, "site-labels", renaming("site-cat"))
    with serving(model, store, [rename], cache=CacheSettings(enabled=True, min_margin=0)) as (service, link):
        send(link, "f1")
        first = prediction_for(link, "f1")
        send(link, "f2")  # the same bytes: an exact hit, no model run
        second = prediction_for(link, "f2")

    assert not first.cached and second.cached
    assert first.changed_by == second.changed_by == ["site-labels"]  # not ["site-labels", "site-labels"]
    assert [c.label for c in second.top] == ["site-cat"]


# -- emits ------------------------------------------------------------------------------------------------------------


def test_a_plugins_messages_appear_on_its_own_topic_only_and_only_when_its_call_succeeds(model, tmp_path):
    store = tmp_path / "plugins"
    summary = install(store, "summary", emitting(("top/label", b"cat"), ("count", b"1")))
    # Queues a message inside its topic, then one outside: the call is a fault and neither is published.
    escape = install(store, "escape", emitting(("fine", b"queued"), ("../../inference/switch", b"evil")))
    with serving(model, store, [escape, summary]) as (service, link):
        send(link, "f1")
        prediction = prediction_for(link, "f1")
        fault = _soon(lambda: next((e for e in errors(link) if e.reason == "plugin_fault"), None), "the fault")
        status = service.status(ServiceState.ONLINE).plugins

    assert plugin_topics(link) == [(topics.plugin_message(DEVICE, "summary", "top/label"), b"cat"),
                                   (topics.plugin_message(DEVICE, "summary", "count"), b"1")]
    assert fault.plugin == escape.plugin and fault.frame_id == "f1" and "topic" in fault.detail
    assert prediction.changed_by is None  # the fault left it as it came in; summary kept it
    assert status is not None and [(s.emitted, s.faults) for s in status] == [(0, 1), (2, 0)]


# -- faults ----------------------------------------------------------------------------------------------------------


def test_a_faulting_plugin_costs_no_answer_is_reported_and_disabled_after_the_limit(model, tmp_path):
    store = tmp_path / "plugins"
    trap, rename = install(store, "trapper", TRAP), install(store, "site-labels", renaming("site-cat"))
    with serving(model, store, [trap, rename], fault_limit=3) as (service, link):
        for i in range(5):
            send(link, f"f{i}")
        answered = [prediction_for(link, f"f{i}") for i in range(5)]
        status = service.status(ServiceState.ONLINE).plugins

    # Every frame answered, by the next plugin too: the prediction went on as it came in.
    assert [p.changed_by for p in answered] == [["site-labels"]] * 5
    reports = errors(link)
    assert [(e.reason, e.frame_id) for e in reports] == [
        ("plugin_fault", "f0"), ("plugin_fault", "f1"), ("plugin_fault", "f2"), ("plugin_disabled", None)]
    assert {e.plugin for e in reports} == {trap.plugin} and all(e.camera == "cam" for e in reports[:3])
    assert "trap" in reports[0].detail and "3 faults" in reports[3].detail
    assert status is not None
    disabled = status[0]
    assert (disabled.state, disabled.calls, disabled.faults) == (PluginState.DISABLED, 3, 3)  # skipped after
    assert disabled.last_fault is not None and disabled.last_fault.startswith("trap")
    assert (status[1].state, status[1].calls) == (PluginState.ACTIVE, 5)


def test_an_endless_loop_runs_out_of_fuel_and_the_frame_is_still_answered(model, tmp_path):
    store = tmp_path / "plugins"
    loop = install(store, "spinner", LOOP, limits={"fuel": 100_000, "deadline_ms": 1000})
    with serving(model, store, [loop]) as (_, link):
        send(link, "f1")
        prediction = prediction_for(link, "f1")
        fault = _soon(lambda: next(iter(errors(link)), None), "the fault")

    assert prediction.top[0].label != "" and prediction.changed_by is None
    assert (fault.reason, fault.plugin) == ("plugin_fault", loop.plugin) and "fuel" in fault.detail


def test_the_fault_window_disables_only_on_faults_close_together():
    ref = ModelRef(name="p", version=1, sha256="0" * 64)
    record = PluginRecord(ref, fault_limit=3, fault_window_s=10)
    # Faults 6 s apart: never 3 within 10 s.
    assert [record.fault("trap: x", called=True, now=t) for t in (0, 6, 12, 18)] == [False] * 4
    assert not record.disabled
    assert [record.fault("trap: y", called=True, now=t) for t in (19, 20, 21)] == [True, False, False]
    status = record.status()
    assert record.disabled and (status.state, status.faults, status.calls) == (PluginState.DISABLED, 7, 7)


# -- switch ------------------------------------------------------------------------------------------------------------


def test_a_switch_installs_between_batches_and_a_bad_one_leaves_the_running_set(model, tmp_path):
    store = tmp_path / "plugins"
    a, b = install(store, "labels-a", renaming("a")), install(store, "labels-b", renaming("b"))
    tampered = install(store, "labels-c", renaming("c"))
    (store / tampered.folder / PLUGIN_FILE).write_bytes(renaming("d"))  # the same size, other bytes
    with serving(model, store, [a], max_batch=2, max_wait_ms=500) as (service, link):
        link.hold.clear()  # the worker will wait in the middle of its batch, publishing f1
        send(link, "f1")
        send(link, "f2")
        _soon(lambda: link.held == 1, "the worker publishing f1, held")
        switched = switch(link, "to-b", [b])  # done while the batch is in progress
        link.hold.set()
        batch = [prediction_for(link, "f1"), prediction_for(link, "f2")]
        send(link, "f3")
        after = prediction_for(link, "f3")

        missing = switch(link, "missing", [b, PluginLoad(plugin=a.plugin, folder="nowhere/1")])
        bad = switch(link, "tampered", [tampered])
        send(link, "f4")
        still = prediction_for(link, "f4")
        none = switch(link, "none", [])
        send(link, "f5")
        plain = prediction_for(link, "f5")
        status = service.status(ServiceState.ONLINE).plugins

    assert switched.ok and switched.serving == [b.plugin]
    # The batch in progress met the set it started with: a switch lands between batches.
    assert [p.timings.batch_size for p in batch] == [2, 2]
    assert [p.changed_by for p in batch] == [["labels-a"], ["labels-a"]] and after.changed_by == ["labels-b"]
    assert not missing.ok and "no manifest.json" in (missing.error or "") and missing.serving == [b.plugin]
    assert not bad.ok and "SHA-256" in (bad.error or "") and bad.serving == [b.plugin]
    assert still.changed_by == ["labels-b"]
    assert none.ok and none.serving == [] and plain.changed_by is None and status == []


def test_at_start_a_plugin_that_does_not_load_is_reported_and_the_rest_run(model, tmp_path):
    store = tmp_path / "plugins"
    good, broken = install(store, "site-labels", renaming("site-cat")), install(store, "broken", KEEP)
    (store / broken.folder / MANIFEST_FILE).write_text("{}")
    with serving(model, store, [broken, good]) as (service, link):
        send(link, "f1")
        prediction = prediction_for(link, "f1")
        status = service.status(ServiceState.ONLINE).plugins

    assert prediction.changed_by == ["site-labels"]
    assert [(e.reason, e.plugin) for e in errors(link)] == [("plugin_fault", broken.plugin)]
    assert status is not None and [s.plugin for s in status] == [good.plugin]


def test_a_malformed_plugin_switch_is_reported_and_frames_are_still_answered(model, tmp_path):
    with serving(model, tmp_path / "plugins") as (_, link):
        link.deliver(topics.plugin_switch(DEVICE), b"{not json", WireFormat.JSON.content_type)
        send(link, "f1")
        prediction_for(link, "f1")

    assert [e.reason for e in errors(link)] == ["malformed_command"]


# -- infer: the served model, asked by the plugin -------------------------------------------------------------------


def test_infer_on_a_crop_of_the_frame_answers_as_the_service_does_for_that_crop(model, tmp_path):
    full = photos.png("chelsea")
    image = cv2.imdecode(np.frombuffer(full, np.uint8), cv2.IMREAD_COLOR)
    x, y, w, h = 100, 20, 200, 180
    ok, crop = cv2.imencode(".png", image[y : y + h, x : x + w])
    assert ok
    store = tmp_path / "plugins"
    asking = install(store, "crop-asker", inferring(x, y, w, h), grants={"frame": True, "infer": True},
                     limits={"infer_calls": 1})
    with serving(model, store, [asking]) as (_, link):
        send(link, "crop", crop.tobytes())
        service_answer = prediction_for(link, "crop")
        send(link, "full", full)
        prediction_for(link, "full")
        messages = plugin_topics(link)

    # On the crop frame itself the rectangle is outside the image: infer answered -2, nothing was emitted.
    assert [t for t, _ in messages] == [topics.plugin_message(DEVICE, "crop-asker", "probs")]
    probabilities = np.frombuffer(messages[0][1], dtype="<f4")
    assert probabilities.shape == (len(model.manifest.labels),)
    assert abs(float(probabilities.sum()) - 1) < 1e-3
    best = int(probabilities.argmax())
    assert best == service_answer.top[0].index
    assert abs(float(probabilities[best]) - service_answer.top[0].score) < 1e-4


def test_infer_refuses_an_image_longer_than_the_services_frame_limit(model, tmp_path):
    # The frame (under max_frame_bytes) is asked about whole; then the same call claims one byte more than
    # any frame may have, then 2 GiB (past the plugin's memory): both refused (-2) before the host reads
    # a byte, so neither is a fault.
    limit = 1 << 20
    asking = plugin_wasm(f"""
    (local.set $n (call $frame (i32.const 65536) (i32.const 2097152)))
    (i32.store (i32.const 4000) (call $infer (i32.const 65536) (local.get $n) (i32.const 0) (i32.const 0)
                                             (i32.const 0) (i32.const 0) (i32.const 3145728) (i32.const 8192)))
    (i32.store (i32.const 4004) (call $infer (i32.const 65536) (i32.const {limit + 1}) (i32.const 0) (i32.const 0)
                                             (i32.const 0) (i32.const 0) (i32.const 3145728) (i32.const 8192)))
    (i32.store (i32.const 4008) (call $infer (i32.const 65536) (i32.const 0x7fffff00) (i32.const 0) (i32.const 0)
                                             (i32.const 0) (i32.const 0) (i32.const 3145728) (i32.const 8192)))
    (drop (call $emit (i32.const 1024) (i32.const 7) (i32.const 4000) (i32.const 12)))
    (i64.const 0)""", [(1024, b"answers")])
    store = tmp_path / "plugins"
    load = install(store, "asker", asking, grants={"frame": True, "infer": True}, limits={"infer_calls": 3})
    with serving(model, store, [load], max_frame_bytes=limit,
                 plugin_settings={"max_infer_calls": 3}) as (_, link):
        send(link, "f1")
        prediction_for(link, "f1")
        messages = _soon(lambda: plugin_topics(link) or errors(link) or None, "the plugin's answers")

    assert errors(link) == []
    assert [t for t, _ in messages] == [topics.plugin_message(DEVICE, "asker", "answers")]
    assert np.frombuffer(messages[0][1], dtype="<i4").tolist() == [len(model.manifest.labels), -2, -2]


# -- a switch carries over what it leaves unchanged ------------------------------------------------------------------


# Counts its calls in its own memory (so per instance) and emits the count on "n".
COUNTER = plugin_wasm("(i32.store (i32.const 4000) (i32.add (i32.load (i32.const 4000)) (i32.const 1)))"
                      "(drop (call $emit (i32.const 1024) (i32.const 1) (i32.const 4000) (i32.const 4)))"
                      "(i64.const 0)", [(1024, b"n")])


def counts(link: MemoryLink) -> list[int]:
    return [int(np.frombuffer(p, dtype="<i4")[0]) for t, p in plugin_topics(link)
            if t == topics.plugin_message(DEVICE, "counter", "n")]


def test_a_switch_keeps_unchanged_plugins_as_they_run_and_a_disabled_one_stays_disabled(model, tmp_path):
    store = tmp_path / "plugins"
    trap, counter = install(store, "trapper", TRAP), install(store, "counter", COUNTER)
    trap_v2 = install(store, "trapper", plugin_wasm("nop unreachable"), version=2)
    with serving(model, store, [trap, counter], fault_limit=2) as (service, link):
        for frame_id in ("f0", "f1"):
            send(link, frame_id)
            prediction_for(link, frame_id)
        _soon(lambda: counts(link) == [1, 2] or None, "two counts")
        before = service.plugins.plugins
        again = switch(link, "again", [counter, trap])  # the same versions, in another order
        after = service.plugins.plugins
        send(link, "f2")
        prediction_for(link, "f2")
        _soon(lambda: len(counts(link)) == 3 or None, "a third count")
        kept = service.status(ServiceState.ONLINE).plugins
        newer = switch(link, "trapper-v2", [trap_v2, counter])
        send(link, "f3")
        prediction_for(link, "f3")
        _soon(lambda: len(counts(link)) == 4 or None, "a fourth count")
        replaced = service.status(ServiceState.ONLINE).plugins

    assert again.ok and newer.ok
    # Neither loaded again: the same modules and records, in the new order.
    assert [(p.compiled, p.record) for p in after] == [(before[1].compiled, before[1].record),
                                                       (before[0].compiled, before[0].record)]
    # The worker kept its instance of the counter (its memory counts on), and the disabled trapper was
    # not called again: its counters and state came through the switch.
    assert counts(link) == [1, 2, 3, 4]
    assert kept is not None and [(s.plugin, s.state, s.calls, s.faults) for s in kept] == [
        (counter.plugin, PluginState.ACTIVE, 3, 0), (trap.plugin, PluginState.DISABLED, 2, 2)]
    # Another version of the trapper (another SHA-256) starts afresh and runs again.
    assert replaced is not None and [(s.plugin, s.state, s.calls, s.faults) for s in replaced] == [
        (trap_v2.plugin, PluginState.ACTIVE, 1, 1), (counter.plugin, PluginState.ACTIVE, 4, 0)]
    assert [(e.reason, e.frame_id) for e in errors(link)] == [
        ("plugin_fault", "f0"), ("plugin_fault", "f1"), ("plugin_disabled", None), ("plugin_fault", "f3")]


def test_a_switch_refuses_a_folder_outside_the_plugin_store(model, tmp_path):
    store = tmp_path / "plugins"
    inside = install(store, "site-labels", renaming("inside"))
    outside = install(tmp_path / "elsewhere", "site-labels", renaming("inside"))  # the same plugin, outside
    (store / "escape").symlink_to(tmp_path / "elsewhere")
    with serving(model, store, [inside]) as (_, link):
        answers = {folder: switch(link, f"r{i}", [PluginLoad(plugin=outside.plugin, folder=folder)])
                   for i, folder in enumerate([str(tmp_path / "elsewhere" / outside.folder),
                                               f"../elsewhere/{outside.folder}", f"escape/{outside.folder}", "."])}

    for folder, answer in answers.items():
        assert not answer.ok and answer.serving == [inside.plugin], folder
        assert "absolute" in (answer.error or "") or "outside the plugin store" in (answer.error or ""), answer.error


def test_the_epoch_ticker_stops_when_the_start_fails_after_it_began(model, tmp_path, monkeypatch):
    def exploding(*args: object) -> object:
        raise RuntimeError("the active set exploded")

    monkeypatch.setattr("services.inference.service.load_active", exploding)
    settings = InferenceSettings(device_id=DEVICE, plugins=PluginSettings(dir=tmp_path / "plugins",
                                                                          cache_dir=tmp_path / "cache"))
    host = WasmHost(settings.plugins)
    service = InferenceService(link=MemoryLink(), model=model, load_model=LOADER, settings=settings, workers=1,
                               plugins=host)
    try:
        with pytest.raises(RuntimeError, match="exploded"):
            service.run()
        tickers = [t for t in threading.enumerate() if t.name == "wasm-epoch" and t.is_alive()]
    finally:
        host.stop()
    assert tickers == []  # a non-daemon ticker left running would keep the process from exiting


def test_a_plugins_inference_reads_the_models_probabilities_and_takes_no_input_summary(model, monkeypatch):
    """infer_tensor answers the served model's softmax over its logits, without the drift summary a
    prediction carries: a plugin publishes no prediction of it, and the summary would spend its deadline."""
    import services.inference.pipeline as pipeline

    def summarised(batch: np.ndarray) -> np.ndarray:
        raise AssertionError("a plugin's inference took an input summary")

    monkeypatch.setattr(pipeline, "summarise", summarised)
    crop = model.manifest.preprocessing.crop
    tensor = np.empty((1, 3, crop, crop), dtype=np.float32)
    model.preprocess(cv2.cvtColor(photos.photo_rgb("coffee"), cv2.COLOR_RGB2BGR), tensor[0])
    context = pipeline.FrameContext(Frame("cam", "f1", b"", None), model, max_pixels=10**7, max_bytes=10**7)
    probabilities = context.infer_tensor(tensor)
    logits = model.session.run(tensor)[0].astype(np.float64)
    softmax = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    assert probabilities.shape == (len(model.manifest.labels),)
    np.testing.assert_allclose(probabilities, softmax, atol=1e-6)
