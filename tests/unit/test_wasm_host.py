"""The plugin sandbox (services/inference/wasm.py) holds its limits: every hostile behaviour is a
PluginFault of the right kind and a fresh instance of the same module works after it; fuel is re-armed
per call; memory stops at its limit; emits leave only with a successful call; WASI reaches nothing but
its grants; the precompiled cache is used only when its recorded SHA-256 matches.

The modules are WebAssembly text written here (wasmtime.wat2wasm), so each test states exactly what
the guest does; the real C plugins built by scripts/plugins.sh run at the end when they are built.
A fake HostContext stands in for the service's frame and model (pure logic: the host copies bytes)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
import struct
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import wasmtime

from services.inference import wasm as wasm_module
from services.inference.wasm import (
    EPOCH_TICK_MS,
    LOG_LINES_PER_S,
    WASMTIME_VERSION,
    CallOutcome,
    Compiled,
    LogBudget,
    PluginFault,
    WasmHost,
)
from shared.config import PluginSettings
from shared.manifest import MANIFEST_FILE
from shared.plugin import ABI_VERSION, PLUGIN_FILE, DirGrant, PluginError, PluginGrants, PluginLimits, PluginManifest
from tests.plugin_builds import BUILDS, needs
from tests.support import wait_until

HOSTILE = b"!"  # a prediction that starts with '!' makes the conditional modules misbehave
PREDICTION = b'{"frame_id":"f1","top":[{"index":1,"label":"cat","score":0.9}]}'
REPLACE = b'{"action":"replace","top":[{"index":7,"label":"dog","score":0.5}]}'
REPLACE_AT = 1024
ESCAPE = b"../x"


def wat_string(data: bytes) -> str:
    return "".join(f"\\{byte:02x}" for byte in data)


def module(body: str, *, extra: str = "", memory: int = 2, abi: int = ABI_VERSION) -> bytes:
    """A plugin in WebAssembly text: a bump allocator from 64 KiB up, `$out`/`$out_i32` emitting on
    topic 'out', page 0 as scratch (data below), and `body` as edgefleet_on_prediction($p, $n)."""
    return wasmtime.wat2wasm(f"""(module
  (import "edgefleet" "log" (func $log (param i32 i32 i32)))
  (import "edgefleet" "now_ms" (func $now (result i64)))
  (import "edgefleet" "emit" (func $emit (param i32 i32 i32 i32) (result i32)))
  (import "edgefleet" "frame" (func $frame (param i32 i32) (result i32)))
  (import "edgefleet" "infer" (func $infer (param i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
  (import "edgefleet" "infer_tensor" (func $infer_tensor (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "path_open"
    (func $path_open (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "environ_sizes_get" (func $environ_sizes_get (param i32 i32) (result i32)))
  (memory (export "memory") {memory})
  (global $heap (mut i32) (i32.const 65536))
  (global $cfglen (mut i32) (i32.const 0))
  (data (i32.const 200) "out")
  (data (i32.const 300) "{wat_string(ESCAPE)}")
  (data (i32.const 310) "ok")
  (data (i32.const 320) "hello")
  (data (i32.const 600) "IMG")
  (data (i32.const {REPLACE_AT}) "{wat_string(REPLACE)}")
  (func (export "edgefleet_abi_version") (result i32) (i32.const {abi}))
  (func (export "edgefleet_alloc") (param $n i32) (result i32) (local $at i32)
    (local.set $at (global.get $heap))
    (global.set $heap (i32.add (global.get $heap) (local.get $n)))
    (local.get $at))
  (func $out (param $ptr i32) (param $len i32)
    (drop (call $emit (i32.const 200) (i32.const 3) (local.get $ptr) (local.get $len))))
  (func $out_i32 (param $v i32)
    (i32.store (i32.const 192) (local.get $v)) (call $out (i32.const 192) (i32.const 4)))
  (func $hostile (param $p i32) (result i32) (i32.eq (i32.load8_u (local.get $p)) (i32.const 33)))
  (func (export "edgefleet_on_prediction") (param $p i32) (param $n i32) (result i64) {body})
  {extra})""")


def when_hostile(action: str) -> str:
    """A body that keeps a normal prediction and does `action` for one starting with '!'."""
    return f"(if (call $hostile (local.get $p)) (then {action})) (i64.const 0)"


def manifest(wasm: bytes, *, grants: PluginGrants | None = None, config: dict[str, str] | None = None,
             **limits: int) -> PluginManifest:
    return PluginManifest(name="test-plugin", version=1, sha256=hashlib.sha256(wasm).hexdigest(),
                          size_bytes=len(wasm), abi=ABI_VERSION, limits=PluginLimits(**limits),
                          grants=grants or PluginGrants(), config=config or {}, created_at=0.0)


def ints(outcome: CallOutcome) -> list[int]:
    return [struct.unpack("<i", emit.payload)[0] for emit in outcome.emits]


class FakeContext:
    """The service's side of frame/infer: a fixed frame and fixed probabilities, recording what it saw."""

    def __init__(self, frame: bytes | None = b"JPEGDATA!", probabilities: tuple[float, ...] = (0.25, 0.75),
                 max_image_bytes: int = 1 << 20, tensor_bytes: int = 4 * 3 * 2 * 2) -> None:
        self._frame = frame
        self.max_image_bytes = max_image_bytes
        self.tensor_bytes = tensor_bytes  # a model of crop 2
        self.probabilities = np.array(probabilities, dtype=np.float32)
        self.images: list[tuple[bytes, int, int, int, int]] = []
        self.tensors: list[np.ndarray] = []

    def frame(self) -> bytes | None:
        return self._frame

    def infer_image(self, data: bytes, x: int, y: int, w: int, h: int) -> np.ndarray | None:
        self.images.append((data, x, y, w, h))
        return self.probabilities

    def infer_tensor(self, tensor: np.ndarray) -> np.ndarray:
        self.tensors.append(tensor)
        return self.probabilities


NO_CONTEXT = FakeContext(frame=None)


@pytest.fixture
def host(tmp_path):
    wasm_host = WasmHost(PluginSettings(cache_dir=tmp_path / "cache"))
    wasm_host.start()
    yield wasm_host
    wasm_host.stop()


def compiled(host: WasmHost, wasm: bytes, **kwargs) -> Compiled:
    return host.compile(wasm, manifest(wasm, **kwargs))


def allowing(tmp_path: Path, *allowed: Path) -> WasmHost:
    """A host (no ticker: fuel bounds its calls) whose device allows these folders to be granted."""
    return WasmHost(PluginSettings(cache_dir=tmp_path / "cache", allowed_dirs=list(allowed)))


# The answers


def test_a_plugin_that_returns_zero_keeps_and_a_result_document_is_parsed(host):
    keep = compiled(host, module("(i64.const 0)")).instantiate()
    assert keep.call(PREDICTION, NO_CONTEXT) == CallOutcome(result=None, emits=())
    replace = compiled(host, module(f"(i64.const {(REPLACE_AT << 32) | len(REPLACE)})")).instantiate()
    result = replace.call(PREDICTION, NO_CONTEXT).result
    assert result is not None and result.action == "replace"
    assert [(c.index, c.label, c.score) for c in result.top or []] == [(7, "dog", 0.5)]


def test_the_prediction_arrives_whole_even_when_larger_than_the_first_buffer(host):
    echo = compiled(host, module("(call $out (local.get $p) (local.get $n)) (i64.const 0)", memory=4),
                    emit_bytes=64 << 10).instantiate()
    for size in (10, 5000, 40_000, 100):  # the buffer grows for 5000 and 40000 and serves 100 from the last
        document = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
        assert echo.call(document, NO_CONTEXT).emits[0].payload == document


# Hostile behaviour: a fault of the right kind, and a fresh instance of the same module works after it

HOSTILE_CASES = {
    "infinite loop": ("(loop $spin (br $spin))", {}, "fuel"),
    "trap": ("(unreachable)", {}, "trap"),
    "out-of-bounds load": ("(drop (i32.load (i32.const 0x7ffffff0)))", {}, "memory"),
    "a 2 GB result": ("(return (i64.const 0x000004007fffffff))", {}, "result"),
    "a result outside memory": ("(return (i64.const 0x7fff000000000040))", {}, "result"),
    "a malformed result": (f"(return (i64.const {(REPLACE_AT << 32) | (len(REPLACE) - 1)}))", {}, "result"),
    "its own failure": ("(return (i64.const -7))", {}, "result"),
    "an emit outside its topic": (
        "(drop (call $emit (i32.const 310) (i32.const 2) (i32.const 0) (i32.const 0)))"
        f"(drop (call $emit (i32.const 300) (i32.const {len(ESCAPE)}) (i32.const 0) (i32.const 0)))", {}, "topic"),
    "an emit whose payload is outside memory": (
        "(drop (call $emit (i32.const 310) (i32.const 2) (i32.const 0x7ffffff0) (i32.const 100)))", {}, "memory"),
    "a memory bomb that traps when memory.grow fails": (
        "(loop $grow (br_if $grow (i32.ne (memory.grow (i32.const 1)) (i32.const -1)))) (unreachable)",
        {"memory_pages": 8}, "trap"),
}


@pytest.mark.parametrize("case", HOSTILE_CASES)
def test_a_hostile_call_is_a_fault_of_its_kind_and_a_fresh_instance_works(host, case):
    action, limits, kind = HOSTILE_CASES[case]
    plugin = compiled(host, module(when_hostile(action)), **limits)
    instance = plugin.instantiate()
    assert instance.call(PREDICTION, NO_CONTEXT).result is None
    with pytest.raises(PluginFault) as fault:
        instance.call(HOSTILE + PREDICTION, NO_CONTEXT)
    assert fault.value.kind == kind, str(fault.value)
    assert "test-plugin" in str(fault.value)
    assert plugin.instantiate().call(PREDICTION, NO_CONTEXT) == CallOutcome(result=None, emits=())


def test_the_fault_texts_say_what_happened(host):
    def fault(action: str, **limits: int) -> str:
        with pytest.raises(PluginFault) as raised:
            compiled(host, module(when_hostile(action)), **limits).instantiate().call(HOSTILE, NO_CONTEXT)
        return str(raised.value)

    assert "fuel" in fault("(loop $spin (br $spin))")
    assert "unreachable" in fault("(unreachable)")
    assert "1073741824-byte result" in fault("(return (i64.const 0x0000040040000000))")
    assert "limit is 65536" in fault("(return (i64.const 0x0000040040000000))")
    assert "outside" in fault("(return (i64.const 0x7fff000000000040))")
    assert "code -7" in fault("(return (i64.const -7))")


def test_a_call_past_its_deadline_is_interrupted_even_with_fuel_to_spare(tmp_path):
    host = WasmHost(PluginSettings(cache_dir=tmp_path / "cache", max_fuel=1_000_000_000))
    host.start()
    try:
        plugin = compiled(host, module(when_hostile("(loop $spin (br $spin))")), fuel=1_000_000_000, deadline_ms=10)
        assert plugin.deadline_ticks == 10 // EPOCH_TICK_MS + 1
        with pytest.raises(PluginFault) as fault:
            plugin.instantiate().call(HOSTILE, NO_CONTEXT)
        assert fault.value.kind == "deadline", str(fault.value)
        assert plugin.instantiate().call(PREDICTION, NO_CONTEXT).result is None
    finally:
        host.stop()


def test_the_devices_ceilings_clamp_the_manifest(tmp_path):
    host = WasmHost(PluginSettings(cache_dir=tmp_path / "c", max_memory_pages=4, max_fuel=5000, max_deadline_ms=7,
                                   max_result_bytes=32, max_emits=1, max_emit_bytes=4, max_infer_calls=1))
    plugin = compiled(host, module("(i64.const 0)"), memory_pages=64, fuel=1_000_000, deadline_ms=500,
                      result_bytes=1 << 20, emits=64, emit_bytes=256 << 10, infer_calls=8)
    assert (plugin.memory_pages, plugin.fuel) == (4, 5000)
    assert plugin.deadline_ticks == -(-7 // EPOCH_TICK_MS) + 1
    limits = plugin.limits
    assert (limits.result_bytes, limits.emits, limits.emit_bytes, limits.infer_calls) == (32, 1, 4, 1)
    below = compiled(host, module("(i64.const 0)"), result_bytes=16, emits=0, emit_bytes=2, infer_calls=0)
    assert (below.limits.result_bytes, below.limits.emits, below.limits.emit_bytes, below.limits.infer_calls) == (
        16, 0, 2, 0)  # a manifest under the ceilings keeps its own


def test_the_ceilings_hold_for_results_emits_and_infer_calls(tmp_path):
    host = WasmHost(PluginSettings(cache_dir=tmp_path / "c", max_result_bytes=32, max_emits=2, max_emit_bytes=4,
                                   max_infer_calls=1))
    generous = {"result_bytes": 1 << 20, "emits": 64, "emit_bytes": 256 << 10, "infer_calls": 8}
    replace = compiled(host, module(f"(i64.const {(REPLACE_AT << 32) | len(REPLACE)})"), **generous)
    with pytest.raises(PluginFault, match=f"{len(REPLACE)}-byte result; the limit is 32"):
        replace.instantiate().call(PREDICTION, NO_CONTEXT)
    infer = ("(call $out_i32 (call $infer (i32.const 600) (i32.const 3) (i32.const 0) (i32.const 0) (i32.const 0)"
             " (i32.const 0) (i32.const 2048) (i32.const 64)))")
    busy = compiled(host, module(
        infer + infer + "(call $out_i32 (call $emit (i32.const 310) (i32.const 2) (i32.const 0) (i32.const 5)))"
        "(i64.const 0)"), grants=PluginGrants(infer=True), **generous)
    context = FakeContext()
    # Two emits at most: the infer answers (2 classes, then -4 past one call); the third emit never queued.
    assert ints(busy.instantiate().call(PREDICTION, context)) == [2, -4]
    assert len(context.images) == 1
    oversized = compiled(host, module(
        "(call $out_i32 (call $emit (i32.const 310) (i32.const 2) (i32.const 0) (i32.const 5))) (i64.const 0)"),
        **generous)
    assert ints(oversized.instantiate().call(PREDICTION, NO_CONTEXT)) == [-2]  # 5 bytes over the 4-byte ceiling


# Fuel and memory


def spin(iterations: int) -> str:
    # 5 fuel an iteration: local.get, i32.const, i32.sub, local.tee, br_if (loop itself costs none)
    return (f"(local $i i32) (local.set $i (i32.const {iterations}))"
            "(loop $l (br_if $l (local.tee $i (i32.sub (local.get $i) (i32.const 1))))) (i64.const 0)")


def test_fuel_is_rearmed_before_every_call(host):
    sixty_percent = compiled(host, module(spin(12_000)), fuel=100_000).instantiate()
    for _ in range(3):  # without a re-arm the second call would have 40 % left
        assert sixty_percent.call(PREDICTION, NO_CONTEXT).result is None
    with pytest.raises(PluginFault) as fault:  # and the budget is what we think it is
        compiled(host, module(spin(24_000)), fuel=100_000).instantiate().call(PREDICTION, NO_CONTEXT)
    assert fault.value.kind == "fuel"


def test_memory_grow_fails_at_the_limit(host):
    bomb = compiled(host, module(
        "(loop $grow (br_if $grow (i32.ne (memory.grow (i32.const 1)) (i32.const -1))))"
        "(call $out_i32 (memory.size)) (i64.const 0)"), memory_pages=8).instantiate()
    assert ints(bomb.call(PREDICTION, NO_CONTEXT)) == [8]
    assert ints(bomb.call(PREDICTION, NO_CONTEXT)) == [8]  # still at the limit, still answering


def test_a_module_that_starts_over_the_memory_limit_is_refused(host):
    wasm = module("(i64.const 0)", memory=64)
    with pytest.raises(PluginError, match="64 pages, over its limit of 16 pages"):
        host.compile(wasm, manifest(wasm, memory_pages=16))


def test_a_module_with_a_huge_table_is_refused(host):
    wasm = module("(i64.const 0)", extra="(table 1000000 funcref)")
    with pytest.raises(PluginError, match="cannot be instantiated"):
        host.compile(wasm, manifest(wasm))


# Emits


def test_emits_come_back_in_order_with_a_successful_call_only(host):
    plugin = compiled(host, module(
        "(call $out_i32 (i32.const 1)) (call $out_i32 (i32.const 2))"
        "(if (call $hostile (local.get $p)) (then (unreachable))) (i64.const 0)"))
    instance = plugin.instantiate()
    outcome = instance.call(PREDICTION, NO_CONTEXT)
    assert [emit.suffix for emit in outcome.emits] == ["out", "out"] and ints(outcome) == [1, 2]
    with pytest.raises(PluginFault):
        instance.call(HOSTILE, NO_CONTEXT)
    assert ints(plugin.instantiate().call(PREDICTION, NO_CONTEXT)) == [1, 2]  # nothing left over from the fault


def test_emits_over_the_count_or_the_size_are_refused_with_minus_two(host):
    def emit(length: int, expected: int) -> str:
        return (f"(if (i32.ne (call $emit (i32.const 310) (i32.const 2) (i32.const 0) (i32.const {length}))"
                f" (i32.const {expected})) (then (return (i64.const -{100 + length}))))")

    plugin = compiled(host, module(emit(5, 0) + emit(9, -2) + emit(8, 0) + emit(1, -2) + "(i64.const 0)"),
                      emits=2, emit_bytes=8)
    outcome = plugin.instantiate().call(PREDICTION, NO_CONTEXT)
    assert [(emit.suffix, len(emit.payload)) for emit in outcome.emits] == [("ok", 5), ("ok", 8)]


def test_log_lines_reach_the_services_log(host, caplog):
    plugin = compiled(host, module("(call $log (i32.const 30) (i32.const 320) (i32.const 5)) (i64.const 0)"))
    with caplog.at_level(logging.DEBUG, logger="services.inference.wasm"):
        plugin.instantiate().call(PREDICTION, NO_CONTEXT)
    assert any(r.levelno == logging.WARNING and r.getMessage() == "plugin test-plugin: hello" for r in caplog.records)


def test_log_levels_are_clamped_to_debug_through_error(host, caplog):
    plugin = compiled(host, module("(call $log (i32.const 50) (i32.const 320) (i32.const 5))"
                                   "(call $log (i32.const 1) (i32.const 320) (i32.const 5))"
                                   "(call $log (i32.const -7) (i32.const 320) (i32.const 5)) (i64.const 0)"))
    with caplog.at_level(logging.DEBUG, logger="services.inference.wasm"):
        plugin.instantiate().call(PREDICTION, NO_CONTEXT)
    assert [r.levelno for r in caplog.records if r.getMessage() == "plugin test-plugin: hello"] == [
        logging.ERROR, logging.DEBUG, logging.DEBUG]


SIXTEEN_LINES = ("(local $i i32) (loop $l (call $log (i32.const 20) (i32.const 320) (i32.const 5))"
                 " (br_if $l (i32.lt_u (local.tee $i (i32.add (local.get $i) (i32.const 1))) (i32.const 16))))"
                 " (i64.const 0)")


def test_a_plugins_log_lines_are_rate_limited_across_calls_and_instances_and_the_rest_summed_up(host, caplog):
    now = [100.0]
    plugin = compiled(host, module(SIXTEEN_LINES))
    plugin.log_budget = LogBudget(LOG_LINES_PER_S, clock=lambda: now[0])
    lines = lambda: [r.getMessage() for r in caplog.records if r.name == "services.inference.wasm"]  # noqa: E731
    with caplog.at_level(logging.DEBUG, logger="services.inference.wasm"):
        # 16 lines a call (the per-call cap), three calls on two instances (two workers): 48 lines in one second.
        first, second = plugin.instantiate(), plugin.instantiate()
        for instance in (first, second, first):
            instance.call(PREDICTION, NO_CONTEXT)
        assert lines() == ["plugin test-plugin: hello"] * LOG_LINES_PER_S
        now[0] += 0.99
        second.call(PREDICTION, NO_CONTEXT)
        assert len(lines()) == LOG_LINES_PER_S  # still the same second
        caplog.clear()
        now[0] += 0.01
        first.call(PREDICTION, NO_CONTEXT)
    assert lines() == [f"plugin test-plugin: {48 + 16 - LOG_LINES_PER_S} log lines not written (over "
                       f"{LOG_LINES_PER_S} a second)"] + ["plugin test-plugin: hello"] * 16


# frame and infer


FRAME_AND_INFER = (
    "(call $out_i32 (call $frame (i32.const 1024) (i32.const 64)))"
    "(call $out_i32 (call $infer_tensor (i32.const 512) (i32.const 48) (i32.const 2048) (i32.const 64)))"
    "(call $out_i32 (call $infer (i32.const 600) (i32.const 3) (i32.const 0) (i32.const 0) (i32.const 0)"
    " (i32.const 0) (i32.const 2048) (i32.const 64)))"
    "(i64.const 0)")


def test_frame_and_infer_answer_minus_one_when_not_granted(host):
    context = FakeContext()
    plugin = compiled(host, module(FRAME_AND_INFER), infer_calls=8)
    assert ints(plugin.instantiate().call(PREDICTION, context)) == [-1, -1, -1]
    assert context.images == [] and context.tensors == []


def test_frame_copies_the_encoded_frame_or_says_the_size_it_needs(host):
    plugin = compiled(host, module(
        "(call $out_i32 (call $frame (i32.const 2048) (i32.const 4)))"
        "(call $out_i32 (call $frame (i32.const 2048) (i32.const 64)))"
        "(call $out (i32.const 2048) (i32.const 9)) (i64.const 0)"), grants=PluginGrants(frame=True))
    outcome = plugin.instantiate().call(PREDICTION, FakeContext(frame=b"JPEGDATA!"))
    assert ints(CallOutcome(None, outcome.emits[:2])) == [9, 9]
    assert outcome.emits[2].payload == b"JPEGDATA!"


def test_infer_writes_the_models_probabilities_and_counts_its_calls(host):
    plugin = compiled(host, module(
        "(call $out_i32 (call $infer_tensor (i32.const 512) (i32.const 48) (i32.const 2048) (i32.const 64)))"
        "(call $out (i32.const 2048) (i32.const 8))"
        "(call $out_i32 (call $infer (i32.const 600) (i32.const 3) (i32.const 1) (i32.const 2) (i32.const 3)"
        " (i32.const 4) (i32.const 2048) (i32.const 4)))"  # 4 bytes: too small for two classes
        "(call $out_i32 (call $infer (i32.const 600) (i32.const 3) (i32.const 0) (i32.const 0) (i32.const 0)"
        " (i32.const 0) (i32.const 2048) (i32.const 64)))"  # the third call of a limit of 2
        "(i64.const 0)"), grants=PluginGrants(infer=True), infer_calls=2, emits=8)
    context = FakeContext(probabilities=(0.25, 0.75))
    outcome = plugin.instantiate().call(PREDICTION, context)
    assert struct.unpack("<i", outcome.emits[0].payload)[0] == 2
    assert np.frombuffer(outcome.emits[1].payload, dtype="<f4").tolist() == [0.25, 0.75]
    assert [struct.unpack("<i", emit.payload)[0] for emit in outcome.emits[2:]] == [-3, -4]
    assert [t.shape for t in context.tensors] == [(1, 3, 2, 2)] and context.tensors[0].dtype == np.float32
    assert context.images == [(b"IMG", 1, 2, 3, 4)]


def test_infer_tensor_refuses_a_tensor_that_is_not_three_square_planes(host):
    plugin = compiled(host, module(
        "(call $out_i32 (call $infer_tensor (i32.const 512) (i32.const 44) (i32.const 2048) (i32.const 64)))"
        "(i64.const 0)"), grants=PluginGrants(infer=True), infer_calls=1)
    context = FakeContext()
    assert ints(plugin.instantiate().call(PREDICTION, context)) == [-2] and context.tensors == []


def test_infer_tensor_refuses_another_models_input_before_reading_it(host):
    # Three square planes of 4x4 (192 bytes), well inside memory: not the served model's 2x2 (48 bytes).
    # Measured against the context's tensor_bytes, before a byte is copied; nothing reaches the model.
    plugin = compiled(host, module(
        "(call $out_i32 (call $infer_tensor (i32.const 512) (i32.const 192) (i32.const 2048) (i32.const 64)))"
        "(call $out_i32 (call $infer_tensor (i32.const 0x7ffffff0) (i32.const 0x7fffff00) (i32.const 2048)"
        " (i32.const 64)))"  # a length near 2 GiB at a pointer outside memory: refused, not a memory fault
        "(i64.const 0)"), grants=PluginGrants(infer=True), infer_calls=2)
    context = FakeContext(tensor_bytes=48)
    assert ints(plugin.instantiate().call(PREDICTION, context)) == [-2, -2] and context.tensors == []


def test_infer_refuses_an_image_over_the_services_frame_limit_before_reading_it(tmp_path):
    host = WasmHost(PluginSettings(cache_dir=tmp_path / "cache", max_infer_calls=3))
    infer = ("(call $out_i32 (call $infer (i32.const 600) (i32.const {length}) (i32.const 0) (i32.const 0)"
             " (i32.const 0) (i32.const 0) (i32.const 2048) (i32.const 64)))")
    plugin = compiled(host, module(infer.format(length=3) + infer.format(length=4) + infer.format(length=0x7fffff00)
                                   + "(i64.const 0)"), grants=PluginGrants(infer=True), infer_calls=3)
    context = FakeContext(max_image_bytes=3)
    # 3 bytes pass; 4 (inside memory) and ~2 GiB (outside it: without the cap, a memory fault) are refused.
    assert ints(plugin.instantiate().call(PREDICTION, context)) == [2, -2, -2]
    assert context.images == [(b"IMG", 0, 0, 0, 0)]


# WASI: nothing but the grants


def open_path(oflags: int = 0, rights: int = 2) -> str:
    # path_open(preopen fd 3, no dirflags, the prediction as the path, ...) -> errno; fd_read is right 1<<1
    return (f"(call $out_i32 (call $path_open (i32.const 3) (i32.const 0) (local.get $p) (local.get $n)"
            f" (i32.const {oflags}) (i64.const {rights}) (i64.const 0) (i32.const 0) (i32.const 180)))"
            "(i64.const 0)")


# WASI's answers to a path outside the preopened folder: wasmtime 51 says EPERM (63); older WASI
# implementations said ENOTCAPABLE (76). Either way the plugin gets an error and no file.
REFUSED = {63, 76}
EBADF = 8


def test_a_granted_folder_is_readable_and_nothing_outside_it(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "labels.txt").write_text("cat=feline")
    (tmp_path / "secret.txt").write_text("do not read")
    grants = PluginGrants(dirs=[DirGrant(guest="/site", host=str(site))])
    host = allowing(tmp_path, site)
    reader = compiled(host, module(open_path()), grants=grants).instantiate()
    assert ints(reader.call(b"labels.txt", NO_CONTEXT)) == [0]
    assert ints(reader.call(b"../secret.txt", NO_CONTEXT))[0] in REFUSED
    assert ints(reader.call(str(tmp_path / "secret.txt").encode(), NO_CONTEXT))[0] in REFUSED
    (site / "link").symlink_to(tmp_path / "secret.txt")
    assert ints(reader.call(b"link", NO_CONTEXT)) != [0]  # a symlink out of the folder is no way out
    creator = compiled(host, module(open_path(oflags=1, rights=64)), grants=grants).instantiate()  # O_CREAT, fd_write
    assert ints(creator.call(b"new.txt", NO_CONTEXT)) != [0]
    assert not (site / "new.txt").exists()


def test_a_folder_is_granted_only_inside_the_devices_allowed_folders(tmp_path):
    allowed, elsewhere = tmp_path / "allowed", tmp_path / "elsewhere"
    (allowed / "site").mkdir(parents=True)
    elsewhere.mkdir()
    (allowed / "out").symlink_to(elsewhere)  # inside by its name, outside once resolved
    wasm = module(open_path())

    def grant(folder: Path) -> PluginManifest:
        return manifest(wasm, grants=PluginGrants(dirs=[DirGrant(guest="/site", host=str(folder))]))

    assert allowing(tmp_path, allowed).compile(wasm, grant(allowed / "site")).instantiate().call(
        b".", NO_CONTEXT).emits  # inside: compiled, instantiated, the folder opens
    for host, folder in ((allowing(tmp_path), allowed / "site"),  # no allowed folder: nothing can be granted
                         (allowing(tmp_path, allowed), elsewhere),
                         (allowing(tmp_path, allowed), allowed / "out"),
                         (allowing(tmp_path, allowed), allowed / "site" / ".." / ".." / "elsewhere")):
        with pytest.raises(PluginError, match="EDGEFLEET_PLUGINS_ALLOWED_DIRS") as refused:
            host.compile(wasm, grant(folder))
        assert f"the grant of {folder}" in str(refused.value)
    # Checked again at every instance: a link turned outside after the load is refused then.
    (allowed / "turn").symlink_to(allowed / "site")
    plugin = allowing(tmp_path, allowed).compile(wasm, grant(allowed / "turn"))
    (allowed / "turn").unlink()
    (allowed / "turn").symlink_to(elsewhere)
    with pytest.raises(PluginError, match="not inside a folder the device allows"):
        plugin.instantiate()


def test_without_a_grant_there_is_no_folder_and_no_environment(host, monkeypatch):
    monkeypatch.setenv("EDGEFLEET_SECRET", "hunter2")
    assert ints(compiled(host, module(open_path())).instantiate().call(b"etc/passwd", NO_CONTEXT)) == [EBADF]
    count = ("(drop (call $environ_sizes_get (i32.const 180) (i32.const 184)))"
             "(call $out_i32 (i32.load (i32.const 180)))")
    assert ints(compiled(host, module(count + "(i64.const 0)")).instantiate().call(PREDICTION, NO_CONTEXT)) == [0]
    granted = compiled(host, module(count + "(i64.const 0)"), grants=PluginGrants(env={"SITE": "dock-4"}))
    assert ints(granted.instantiate().call(PREDICTION, NO_CONTEXT)) == [1]


# Loading: ABI, exports, init


def test_a_wrong_abi_version_is_refused_naming_both(host):
    wasm = module("(i64.const 0)", abi=2)
    with pytest.raises(PluginError, match=f"ABI 2; this host speaks ABI {ABI_VERSION}"):
        host.compile(wasm, manifest(wasm))


@pytest.mark.parametrize("missing", ["edgefleet_on_prediction", "edgefleet_alloc", "edgefleet_abi_version"])
def test_a_module_without_a_required_export_is_refused(host, missing):
    # Rename the export rather than remove the function: the module stays valid wasm.
    source = module("(i64.const 0)")
    wasm = source.replace(missing.encode(), missing.replace("edgefleet", "edgefleeX").encode())
    assert wasm != source
    with pytest.raises(PluginError, match=f"does not export the function {missing}"):
        host.compile(wasm, manifest(wasm))


def test_an_export_of_the_wrong_type_is_refused(host):
    wasm = wasmtime.wat2wasm(wasmtime_text_with(
        '(func (export "edgefleet_on_prediction") (param i32) (result i32) (i32.const 0))'))
    with pytest.raises(PluginError, match="edgefleet_on_prediction has type"):
        host.compile(wasm, manifest(wasm))


def wasmtime_text_with(extra: str) -> str:
    """The smallest module with the ABI's other exports and `extra`."""
    return f"""(module (memory (export "memory") 1)
      (func (export "edgefleet_abi_version") (result i32) (i32.const 1))
      (func (export "edgefleet_alloc") (param i32) (result i32) (i32.const 1024))
      {extra})"""


def test_a_module_importing_what_the_host_lacks_is_refused(host):
    wasm = wasmtime.wat2wasm('(module (import "edgefleet" "socket" (func)) (memory (export "memory") 1)'
                             ' (func (export "edgefleet_abi_version") (result i32) (i32.const 1))'
                             ' (func (export "edgefleet_alloc") (param i32) (result i32) (i32.const 1024))'
                             ' (func (export "edgefleet_on_prediction") (param i32 i32) (result i64) (i64.const 0)))')
    with pytest.raises(PluginError, match="does not provide"):
        host.compile(wasm, manifest(wasm))


INIT = ("(func (export \"edgefleet_init\") (param $p i32) (param $n i32) (result i32)"
        " (memory.copy (i32.const 4096) (local.get $p) (local.get $n)) (global.set $cfglen (local.get $n))"
        " (i32.const {answer}))")


def test_init_gets_the_config_as_json_and_may_refuse(host):
    echo = "(call $out (i32.const 4096) (global.get $cfglen)) (i64.const 0)"
    config = {"classes": "person,pedestrian", "from_hour": "22"}
    plugin = compiled(host, module(echo, extra=INIT.format(answer=0)), config=config)
    assert json.loads(plugin.instantiate().call(PREDICTION, NO_CONTEXT).emits[0].payload) == config
    refusing = module(echo, extra=INIT.format(answer=3))
    with pytest.raises(PluginError, match="refused its config: edgefleet_init returned 3"):
        host.compile(refusing, manifest(refusing))


def test_bytes_that_are_not_the_manifests_are_refused(host):
    wasm = module("(i64.const 0)")
    with pytest.raises(PluginError, match="SHA-256"):
        host.compile(wasm + b"\x00", manifest(wasm))


def test_load_verifies_a_plugin_folder(host, tmp_path):
    wasm = module("(i64.const 0)")
    folder = tmp_path / "night-alert" / "1"
    folder.mkdir(parents=True)
    (folder / PLUGIN_FILE).write_bytes(wasm)
    (folder / MANIFEST_FILE).write_text(manifest(wasm).model_dump_json())
    assert host.load(folder).instantiate().call(PREDICTION, NO_CONTEXT).result is None
    with pytest.raises(PluginError, match="expected"):
        host.load(folder, sha256="0" * 64)
    (folder / PLUGIN_FILE).write_bytes(wasm[:-1] + b"\x01")
    with pytest.raises(PluginError, match="SHA-256"):
        host.load(folder)


# The precompiled cache


def test_the_second_load_deserializes_and_a_corrupted_cache_is_compiled_again(tmp_path):
    cache = tmp_path / "cache"
    host = WasmHost(PluginSettings(cache_dir=cache))
    wasm = module("(i64.const 0)")
    first = host.compile(wasm, manifest(wasm))
    assert not first.compiled_from_cache
    digest = hashlib.sha256(wasm).hexdigest()
    cwasm = cache / f"{WASMTIME_VERSION}-{digest}.cwasm"
    sidecar = cache / f"{cwasm.name}.sha256"
    assert stat.S_IMODE(os.stat(cache).st_mode) == 0o700
    assert sidecar.read_text().strip() == hashlib.sha256(cwasm.read_bytes()).hexdigest()
    assert sorted(p.name for p in cache.iterdir()) == [cwasm.name, sidecar.name]  # no temporary left

    second = host.compile(wasm, manifest(wasm))
    assert second.compiled_from_cache
    assert second.instantiate().call(PREDICTION, NO_CONTEXT).result is None

    blob = bytearray(cwasm.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    cwasm.write_bytes(bytes(blob))
    third = host.compile(wasm, manifest(wasm))
    assert not third.compiled_from_cache
    assert third.instantiate().call(PREDICTION, NO_CONTEXT).result is None
    assert sidecar.read_text().strip() == hashlib.sha256(cwasm.read_bytes()).hexdigest()  # rewritten
    assert host.compile(wasm, manifest(wasm)).compiled_from_cache


def test_uncached_compiles_write_nothing(tmp_path):
    host = WasmHost(PluginSettings(cache_dir=tmp_path / "cache"))
    wasm = module("(i64.const 0)")
    assert not host.compile(wasm, manifest(wasm), cached=False).compiled_from_cache
    assert not (tmp_path / "cache").exists()


# The epoch ticker


def test_the_ticker_has_one_start_and_one_stop(tmp_path):
    host = WasmHost(PluginSettings(cache_dir=tmp_path / "cache"))
    host.start()
    host.start()
    tickers = [t for t in threading.enumerate() if t.name == "wasm-epoch"]
    assert len(tickers) == 1 and not tickers[0].daemon
    host.stop()
    host.stop()
    assert not tickers[0].is_alive()


SPIN = "(loop $spin (br $spin))"
PAUSED_S = 5  # how long a test waits for the ticker to pause: only a broken count makes it wait this long


@pytest.fixture
def ticks(monkeypatch) -> list[float]:
    """The monotonic time of every epoch tick while the test runs (each test runs one host)."""
    times: list[float] = []
    tick = wasmtime.Engine.increment_epoch

    def counted(engine: wasmtime.Engine) -> None:
        times.append(time.monotonic())
        tick(engine)

    monkeypatch.setattr(wasmtime.Engine, "increment_epoch", counted)
    return times


@pytest.fixture
def ticker(tmp_path, monkeypatch):
    """A started host whose ticker pauses after 20 ms without plugin code (PAUSE_AFTER_S)."""
    monkeypatch.setattr(wasm_module, "PAUSE_AFTER_S", 0.02)
    host = WasmHost(PluginSettings(cache_dir=tmp_path / "cache", max_fuel=1_000_000_000))
    host.start()
    yield host
    host.stop()


def assert_paused(host: WasmHost, ticks: list[float]) -> None:
    """The ticker pauses (so no call is counted running) and then ticks no more for ten ticks' time."""
    wait_until(lambda: not host.ticking, PAUSED_S, "the ticker to pause", interval=0.002)
    before = len(ticks)
    threading.Event().wait(10 * EPOCH_TICK_MS / 1000)
    assert len(ticks) == before and not host.ticking


def assert_spaced(ticks: list[float]) -> None:
    """No two ticks closer than EPOCH_TICK_MS: a closer pair would cut a deadline short. (A lower bound
    the ticker's own wait guarantees; load only widens the gaps. 0.1 ms for the clock's rounding.)"""
    assert len(ticks) >= 2
    assert min(np.diff(ticks)) >= (EPOCH_TICK_MS - 0.1) / 1000, np.diff(ticks)


def test_an_idle_host_never_ticks(tmp_path, ticks):
    host = WasmHost(PluginSettings(cache_dir=tmp_path / "cache"))
    host.start()
    try:
        assert_paused(host, ticks)
        assert ticks == []
    finally:
        host.stop()


def test_the_ticker_lingers_after_calls_and_pauses_once_idle_after_a_normal_call_and_a_fault(
        ticker, ticks, monkeypatch):
    assert_paused(ticker, ticks)
    plugin = compiled(ticker, module(when_hostile(SPIN)), fuel=1_000_000_000, deadline_ms=20)
    instance = plugin.instantiate()
    assert instance.call(PREDICTION, NO_CONTEXT).result is None
    assert_paused(ticker, ticks)  # the count is back to 0 after a normal call
    with pytest.raises(PluginFault) as fault:  # the call wakes the paused ticker, and its deadline holds
        instance.call(HOSTILE, NO_CONTEXT)
    assert fault.value.kind == "deadline", str(fault.value)
    assert_paused(ticker, ticks)  # ... and after a fault

    monkeypatch.setattr(wasm_module, "PAUSE_AFTER_S", 60.0)
    plugin.instantiate().call(PREDICTION, NO_CONTEXT)
    ended = len(ticks)  # no plugin code runs from here on; the ticker goes on ticking
    wait_until(lambda: len(ticks) >= ended + 3, PAUSED_S, "ticks after the last call", interval=0.002)
    assert ticker.ticking
    monkeypatch.setattr(wasm_module, "PAUSE_AFTER_S", 0.02)
    assert_paused(ticker, ticks)
    assert_spaced(ticks)  # wakes from a pause included


class Signalling(FakeContext):
    """A context whose frame import tells the test the call is inside the plugin."""

    def __init__(self) -> None:
        super().__init__()
        self.inside = threading.Event()

    def frame(self) -> bytes | None:
        self.inside.set()
        return super().frame()


def test_another_threads_calls_ending_leave_a_runaways_deadline_armed(ticker, ticks, monkeypatch):
    # The runaway's 40 ms need 9 ticks; the other thread's calls end long before, and the ticker pauses
    # 10 ms after the last call ended unless it counts the runaway as running. Paused, the runaway would
    # burn its 1e9 fuel (~0.5 s here) and fault with "fuel", not "deadline".
    monkeypatch.setattr(wasm_module, "PAUSE_AFTER_S", 0.01)
    runaway = compiled(ticker, module(when_hostile(f"(drop (call $frame (i32.const 4096) (i32.const 64))) {SPIN}")),
                       fuel=1_000_000_000, deadline_ms=40, grants=PluginGrants(frame=True)).instantiate()
    short = compiled(ticker, module("(i64.const 0)")).instantiate()
    context = Signalling()
    faults: list[PluginFault] = []

    def run_away() -> None:
        try:
            runaway.call(HOSTILE, context)
        except PluginFault as fault:
            faults.append(fault)

    thread = threading.Thread(target=run_away)
    thread.start()
    try:
        assert context.inside.wait(PAUSED_S), "the runaway never started"
        for _ in range(5):  # each one's end must not count the runaway's call as ended
            assert short.call(PREDICTION, NO_CONTEXT).result is None
    finally:
        thread.join(PAUSED_S)
    assert not thread.is_alive()
    assert [fault.kind for fault in faults] == ["deadline"], faults
    assert_paused(ticker, ticks)
    assert_spaced(ticks)


def test_a_start_function_that_never_returns_is_interrupted_at_its_deadline(ticker, ticks):
    assert_paused(ticker, ticks)  # its call has to wake the ticker: the start function is counted as plugin code
    wasm_bytes = module("(i64.const 0)", extra="(func $start (loop $l (br $l))) (start $start)")
    with pytest.raises(PluginError, match="interrupt"):
        compiled(ticker, wasm_bytes, fuel=1_000_000_000, deadline_ms=20).instantiate()
    assert_paused(ticker, ticks)


# The real hostile plugins (tests/plugins/*.c), when scripts/plugins.sh has built them

needs_builds = needs()  # skipped without the builds (var/plugin-builds), failed under CI=true


def real(host: WasmHost, name: str, *, grants: PluginGrants | None = None, **config: str) -> Compiled:
    from edgefleet.plugin_builds import module_and_manifest

    wasm, spec_manifest = module_and_manifest(name, config=config, build_dir=BUILDS)
    if grants is not None:
        spec_manifest = spec_manifest.model_copy(update={"grants": grants})
    return host.compile(wasm, spec_manifest)


def wire_prediction(labels: tuple[str, ...] = ("tabby", "cat")) -> bytes:
    from shared.schemas import ClassScore, ModelRef, Prediction, Timings

    timings = Timings.model_validate({name: 1.0 for name in Timings.model_fields})
    return Prediction(device="dev-1", camera="cam-1", frame_id="f-1", captured_at=1.0, provider="cpu",
                      top=[ClassScore(index=i, label=label, score=0.5 - i / 10) for i, label in enumerate(labels)],
                      model=ModelRef(name="m", version=1, sha256="0" * 64), timings=timings,
                      published_at=2.0).model_dump_json().encode()


REAL_HOSTILE = {
    "hostile-loop": ({}, {"fuel", "deadline"}),
    "hostile-trap": ({}, {"trap"}),
    "hostile-huge-result": ({}, {"result"}),
    "hostile-malformed json": ({"kind": "json"}, {"result"}),
    "hostile-malformed action": ({"kind": "action"}, {"result"}),
    "hostile-malformed top": ({"kind": "top"}, {"result"}),
    "hostile-malformed extra": ({"kind": "extra"}, {"result"}),
    "hostile-malformed negative": ({"kind": "negative"}, {"result"}),
    "hostile-memory": ({"then": "trap"}, {"memory", "trap"}),
    "hostile-topic": ({}, {"topic"}),
}


@needs_builds
@pytest.mark.parametrize("case", REAL_HOSTILE)
def test_the_real_hostile_plugins_are_contained(host, case):
    config, kinds = REAL_HOSTILE[case]
    plugin = real(host, case.split()[0], **config)
    with pytest.raises(PluginFault) as fault:
        plugin.instantiate().call(wire_prediction(), NO_CONTEXT)
    assert fault.value.kind in kinds, str(fault.value)
    with pytest.raises(PluginFault):  # a fresh instance starts (and misbehaves again)
        plugin.instantiate().call(wire_prediction(), NO_CONTEXT)


@needs_builds
def test_the_real_memory_bomb_stops_at_its_pages_and_the_topic_control_gets_out(host):
    grown = real(host, "hostile-memory", then="keep").instantiate().call(wire_prediction(), NO_CONTEXT)
    assert grown.result is None and [emit.suffix for emit in grown.emits] == ["grown"]
    control = real(host, "hostile-topic", only="ok").instantiate().call(wire_prediction(), NO_CONTEXT)
    assert [emit.suffix for emit in control.emits] == ["ok"]


@needs_builds
def test_the_real_abi_liar_is_refused(host):
    with pytest.raises(PluginError, match=f"ABI 2; this host speaks ABI {ABI_VERSION}"):
        real(host, "hostile-abi")


@needs_builds
def test_the_real_file_reader_reads_inside_its_grant_only(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "hello.txt").write_text("hello")
    grants = PluginGrants(dirs=[DirGrant(guest="/site", host=str(site))])
    plugin = real(allowing(tmp_path, site), "hostile-file", grants=grants)
    outcome = plugin.instantiate().call(wire_prediction(), NO_CONTEXT)
    reads = {message["path"]: message for message in (json.loads(emit.payload) for emit in outcome.emits)}
    assert not reads["/etc/passwd"]["ok"] and reads["/etc/passwd"]["bytes"] == 0
    assert not reads["/site/../../../etc/passwd"]["ok"] and reads["/site/../../../etc/passwd"]["bytes"] == 0
    assert reads["/site/hello.txt"]["ok"] and reads["/site/hello.txt"]["bytes"] == 5


@needs_builds
@pytest.mark.parametrize("name", ["night-alert", "site-labels", "crop-check"])
def test_the_example_plugins_load_and_answer(host, name):
    outcome = real(host, name).instantiate().call(wire_prediction(), FakeContext(frame=None))
    assert outcome.result is None or outcome.result.action in {"keep", "drop", "replace"}


@needs_builds
def test_site_labels_merges_classes_for_the_site(host):
    outcome = real(host, "site-labels").instantiate().call(wire_prediction(("tabby", "tiger cat", "dog")), NO_CONTEXT)
    assert outcome.result is not None and outcome.result.action == "replace"
    assert outcome.result.top is not None and outcome.result.top[0].label == "cat"


def test_a_host_import_that_fails_traps_the_call_instead_of_answering_a_made_up_value():
    """The raw import path (wasm._define_import) must never hand the plugin a value it did not compute."""
    from services.inference import wasm as host_module

    engine = wasmtime.Engine()
    linker = wasmtime.Linker(engine)

    def failing(_caller, _value):
        raise RuntimeError("a host bug")

    host_module._define_import(linker, "t", 1, host_module._I32, failing)
    module = wasmtime.Module(engine, wasmtime.wat2wasm(
        '(module (import "edgefleet" "t" (func $t (param i32) (result i32)))'
        ' (func (export "f") (result i32) i32.const 5 call $t))'))
    store = wasmtime.Store(engine)
    call = linker.instantiate(store, module).exports(store)["f"]
    with pytest.raises((wasmtime.Trap, wasmtime.WasmtimeError), match="failed in the host"):
        call(store)
