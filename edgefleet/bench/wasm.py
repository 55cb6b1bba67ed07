"""`edgefleet bench wasm`: what a WebAssembly plugin costs the device (docs/plugins.md).

- Cold start: a real plugin (night-alert, C) from its module's bytes to an instance that has answered
  its ABI version and run its init, compiled from source (Cranelift) against read from the precompiled
  cache (wasmtime's serialized module, as the service does after the first load); and a fresh instance
  from the compiled module alone (what a worker pays after a fault).
- Per prediction: the plugin's whole path in the service's process (the prediction's JSON encoding,
  the call with fuel and deadline armed, the result) against the same rule written in Python on the
  Prediction object, in the same process, alternating so both see the same machine. The rule runs
  in full on every call (its night window set to the whole day), twice: on a prediction it reads and
  lets pass (the common case) and on one that fires an alert every time (the plugin's worst case).
- Memory: the resident memory each further instance adds, and each further compiled module.
- The service's throughput with the plugin against without: two devices side by side on the device's
  core (edgefleet.bench.pipeline's pairing: saturated in turns, each side's best round).

Goals: cold start from a precompiled module ≤ 1 ms p50; per-call overhead (plugin minus Python) ≤ 50 µs
p50; the service's throughput with one plugin ≥ 0.97 × without.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from edgefleet import plugin_builds
from edgefleet.bench import pipeline
from edgefleet.bench.harness import Harness, device, pin_process, split_cores
from edgefleet.bench.report import Goal, emit
from edgefleet.progress import QUIET, Reporter
from services.inference.wasm import Compiled, WasmHost
from shared.codec import WireFormat, encode
from shared.config import PluginSettings
from shared.manifest import load_verified
from shared.plugin import PluginManifest
from shared.schemas import ClassScore, ModelRef, PluginStatus, Prediction, Timings

PLUGIN = "night-alert"
# The whole day: the rule reads every prediction in full. With the classes it looks for by default the
# bench's prediction (top-1 "suit") fires an alert on every call; with NO_MATCH it reads and lets pass.
ALL_DAY = {"from_hour": "0", "to_hour": "24"}
NO_MATCH = {**ALL_DAY, "classes": "scuba diver"}
SERVICE_BATCH = 8


class _NoFrame:
    """The bench's calls carry no frame and ask the model nothing (night-alert has neither grant)."""

    max_image_bytes = 0
    tensor_bytes = 0

    def frame(self) -> bytes | None:
        return None

    def infer_image(self, data: bytes, x: int, y: int, w: int, h: int) -> None:
        return None

    def infer_tensor(self, tensor: Any) -> Any:
        raise RuntimeError("not granted")


def run(quick: bool, json_out: Path | None, model_dir: Path, *, progress: Reporter = QUIET) -> int:
    """Measures and prints the table; writes JSON with the goals to `json_out`; `progress` shows each step."""
    repeats = 300 if quick else 2000
    calls = 3000 if quick else 30000
    with tempfile.TemporaryDirectory(prefix="edgefleet-bench-wasm-") as work:
        root = Path(work)
        host = WasmHost(PluginSettings(dir=root / "store", cache_dir=root / "cache"))
        host.start()
        try:
            wasm, manifest = plugin_builds.module_and_manifest(PLUGIN, config=ALL_DAY)
            with progress.task(f"cold starts, {repeats} repeats"):
                start_rows, cold_p50 = _cold_start(host, wasm, manifest, repeats)
            prediction = _prediction(model_dir)
            with progress.task(f"per-call cost against Python, 2 x {calls} calls", 2) as per_call:
                passing_row, passing = _per_call(host, *plugin_builds.module_and_manifest(PLUGIN, config=NO_MATCH),
                                                 prediction, calls, "reads it, lets it pass")
                per_call.advance()
                firing_row, firing = _per_call(host, wasm, manifest, prediction, calls, "fires an alert")
                per_call.advance()
            with progress.task("memory per plugin instance"):
                memory_row = _memory(host, wasm, manifest, 20 if quick else 100)
        finally:
            host.stop()
        with progress.task("the service's throughput with the plugin against without"):
            service_row, ratio = _service(model_dir, root / "plugins", quick)
    rows = [*start_rows, passing_row, firing_row, memory_row, service_row]
    goals = [Goal("cold start from a precompiled module, p50", cold_p50, 1.0, "ms", "max"),
             Goal("per-call overhead (plugin minus Python), p50, a prediction it lets pass", passing, 50.0, "µs",
                  "max"),
             Goal("per-call overhead (plugin minus Python), p50, an alert on every call", firing, 50.0, "µs",
                  "max")]
    # No answers on either side is a failed measure, never a goal left out.
    goals.append(Goal("service throughput with one plugin", ratio or 0.0, 0.97, "x without"))
    return emit("wasm", quick, rows, goals, json_out, progress=progress)


# -- cold start ----------------------------------------------------------------------------------------


def _cold_start(host: WasmHost, wasm: bytes, manifest: PluginManifest,
                repeats: int) -> tuple[list[dict[str, Any]], float]:
    host.compile(wasm, manifest, cached=True)  # the cache holds the module from here on
    source = _timed(lambda: host.compile(wasm, manifest, cached=False), max(20, repeats // 10))
    cached = _timed(lambda: host.compile(wasm, manifest, cached=True), repeats)
    compiled = host.compile(wasm, manifest, cached=True)
    fresh = _timed(compiled.instantiate, repeats)
    kb = len(wasm) / 1024
    rows = [
        {"run": f"cold start from source ({kb:.0f} KiB module)", "p50": f"{_p(source, 50):.3f} ms",
         "p90": f"{_p(source, 90):.3f} ms", "n": len(source),
         "note": "Cranelift compile, instantiate, ABI version, init"},
        {"run": "cold start from the precompiled module", "p50": f"{_p(cached, 50):.3f} ms",
         "p90": f"{_p(cached, 90):.3f} ms", "n": len(cached),
         "note": "module and cache file hashed, deserialized, instantiated, ABI version, init"},
        {"run": "a fresh instance of a loaded module", "p50": f"{_p(fresh, 50):.3f} ms",
         "p90": f"{_p(fresh, 90):.3f} ms", "n": len(fresh), "note": "what a worker pays after a fault"},
    ]
    return rows, _p(cached, 50)


def _timed(action: Callable[[], object], repeats: int) -> list[float]:
    """Milliseconds per run of `action`, garbage collection out of the way."""
    times = []
    gc.disable()
    try:
        for _ in range(repeats):
            start = time.perf_counter()
            action()
            times.append((time.perf_counter() - start) * 1000)
    finally:
        gc.enable()
    return times


# -- per prediction ------------------------------------------------------------------------------------


def _prediction(model_dir: Path) -> Prediction:
    """A prediction as the service publishes it, with the model's real labels (top 5)."""
    manifest, _ = load_verified(model_dir)
    top = [ClassScore(index=i, label=manifest.labels[i], score=s)
           for i, s in ((834, 0.41), (610, 0.2), (841, 0.1), (869, 0.05), (400, 0.02))]
    return Prediction(device="bench", camera="door", frame_id="door-1", captured_at=time.time(), top=top,
                      model=ModelRef(name=manifest.name, version=manifest.version, sha256=manifest.sha256),
                      provider="CPUExecutionProvider",
                      timings=Timings(queued_ms=0.2, preprocess_ms=1.3, inference_ms=5.6, total_ms=7.4, batch_size=1),
                      published_at=time.time(), features=[0.1, -0.2, 0.3, 0.9, 1.0, 1.1, 0.05])


def _python_rule(config: dict[str, str]) -> Callable[[Prediction], str | None]:
    """night-alert's rule on the Prediction object: the alert's JSON when it fires, else None."""
    names = [c.strip() for c in config["classes"].split(",") if c.strip()]
    min_score, start, end = float(config["min_score"]), int(config["from_hour"]), int(config["to_hour"])
    offset = int(config["utc_offset_min"])

    def rule(prediction: Prediction) -> str | None:
        now_ms = int(time.time() * 1000)
        hour = (now_ms // 60000 + offset) // 60 % 24
        if not (start <= hour < end if start <= end else hour >= start or hour < end):
            return None
        best = max((c for c in prediction.top if c.score >= min_score and any(n in c.label for n in names)),
                   key=lambda c: c.score, default=None)
        if best is None:
            return None
        return json.dumps({"camera": prediction.camera, "frame_id": prediction.frame_id, "label": best.label,
                           "score": best.score, "at_ms": now_ms})

    return rule


def _per_call(host: WasmHost, wasm: bytes, manifest: PluginManifest, prediction: Prediction,
              calls: int, case: str) -> tuple[dict[str, Any], float]:
    instance = host.compile(wasm, manifest).instantiate()
    context = _NoFrame()
    rule = _python_rule(manifest.config)
    fired = {"plugin": 0, "python": 0}

    def plugin_once() -> None:
        outcome = instance.call(encode(prediction, WireFormat.JSON), context)
        fired["plugin"] += bool(outcome.emits)

    def python_once() -> None:
        fired["python"] += rule(prediction) is not None

    plugin_ms, python_ms = [], []
    for _ in range(10):  # alternating blocks: load from elsewhere falls on both alike
        plugin_ms += _timed(plugin_once, calls // 10)
        python_ms += _timed(python_once, calls // 10)
    plugin_us, python_us = _p(plugin_ms, 50) * 1000, _p(python_ms, 50) * 1000
    overhead = plugin_us - python_us
    row = {"run": f"per prediction, the rule {case}: plugin against the same rule in Python",
           "p50": f"{plugin_us:.1f} µs",
           "p90": f"{_p(plugin_ms, 90) * 1000:.1f} µs", "n": len(plugin_ms),
           "note": f"Python rule p50 {python_us:.1f} µs (p90 {_p(python_ms, 90) * 1000:.1f}); overhead "
                   f"{overhead:.1f} µs; alerts fired: plugin {fired['plugin']}, Python {fired['python']}"}
    return row, overhead


# -- memory --------------------------------------------------------------------------------------------


def _memory(host: WasmHost, wasm: bytes, manifest: PluginManifest, count: int) -> dict[str, Any]:
    process = psutil.Process()
    compiled = host.compile(wasm, manifest)
    gc.collect()
    before = process.memory_info().rss
    instances = [compiled.instantiate() for _ in range(count)]
    per_instance = (process.memory_info().rss - before) / count
    gc.collect()
    before = process.memory_info().rss
    modules: list[Compiled] = [host.compile(wasm, manifest, cached=False) for _ in range(count // 5 or 1)]
    per_module = (process.memory_info().rss - before) / len(modules)
    pages = min(manifest.limits.memory_pages, host.settings.max_memory_pages)
    note = (f"{len(instances)} instances, {len(modules)} modules compiled apart; the plugin's memory limit "
            f"is {pages} pages ({pages * 64} KiB), of which it touches what it uses")
    return {"run": "resident memory per loaded plugin", "p50": f"{per_instance / 1024:.0f} KiB per instance",
            "p90": f"{per_module / 1024:.0f} KiB per module", "n": count, "note": note}


# -- the service ---------------------------------------------------------------------------------------


def _service(model_dir: Path, store: Path, quick: bool) -> tuple[dict[str, Any], float | None]:
    plugin_builds.install(store, PLUGIN, config=ALL_DAY)
    cores = split_cores()
    if cores.world is not None:
        pin_process(os.getpid(), cores.world)  # the harnesses' threads, made later, inherit it
    # The plugin costs ~25 µs of a prediction's ~11 ms here, so the rounds must be long: at the pipeline
    # bench's 2 s rounds (~180 answers a window) one batch of 8 was 4 % and the ratio swung 0.93-1.04.
    scale = pipeline.QUICK if quick else dataclasses.replace(pipeline.FULL, rounds=7, round_s=6.0)
    # The same status interval on both sides: the status is how the bench proves the plugin ran.
    with device(model_dir, cores, max_batch=SERVICE_BATCH, status_interval_s=1) as without, \
            device(model_dir, cores, max_batch=SERVICE_BATCH, plugins_dir=store, status_interval_s=1) as with_plugin:
        off, on = pipeline.in_turns(without, with_plugin, cores, SERVICE_BATCH, scale)
        ran = _plugin_status(with_plugin[0])
    ratio = on.rate / off.rate if off.rate else None
    proof = (f"{PLUGIN} v{ran.plugin.version} {ran.state.value}: {ran.calls} calls, {ran.faults} faults, "
             f"{ran.emitted} alerts") if ran else f"{PLUGIN} not in the service's status"
    row = {"run": f"the service with {PLUGIN} against without, saturated, batch ≤ {SERVICE_BATCH}",
           "p50": f"{on.run.per_s:.1f} img/s", "p90": f"{off.run.per_s:.1f} img/s without", "n": len(on.run.done),
           "plugin calls": ran.calls if ran else 0,
           "note": (f"x without {ratio:.3f}, each on the whole of the device's core ({cores.label()}); best of "
                    f"rounds in turns; {proof}") if ratio else "no answers"}
    return row, ratio


def _plugin_status(harness: Harness, wait_s: float = 5.0) -> PluginStatus | None:
    """The plugin as the service's status reports it, once it has counted calls: proof that the device
    measured with the plugin really ran it."""
    deadline = time.monotonic() + wait_s
    while True:
        status = harness.status
        found = next((p for p in (status.plugins or []) if p.plugin.name == PLUGIN), None) if status else None
        if (found is not None and found.calls) or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def _p(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")

