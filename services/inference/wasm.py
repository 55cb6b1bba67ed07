"""The WebAssembly sandbox that runs plugins (docs/plugins.md, ABI v1) in wasmtime.

One WasmHost per service owns the Engine (fuel and epoch interruption on), the thread that ticks the
engine's epoch, the Linker that provides the `edgefleet` imports and an empty WASI, and the cache of
precompiled modules. `load` turns a verified plugin folder into a Compiled module (compiled, or read
from the cache after its recorded SHA-256 matches); each worker instantiates its own Instance from it
(a Store with the plugin's limits) and calls it once per prediction. Whatever the plugin does (trap,
loop, grow memory, hand back a bad pointer, emit outside its topic), `Instance.call` answers a
CallOutcome or raises PluginFault, and the caller replaces the instance.

Host functions never raise: wasmtime-py hands an exception from a host function back through a
module-global slot (`LAST_EXCEPTION`) that every thread shares, so an import that finds the plugin at
fault records it in the call's state, answers an error code, and the host raises after the call.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import math
import os
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
from pydantic import ValidationError
from wasmtime import (
    Caller,
    Config,
    Engine,
    ExportType,
    Func,
    FuncType,
    InstancePre,
    Linker,
    Memory,
    MemoryType,
    Module,
    Store,
    Trap,
    TrapCode,
    ValType,
    WasiConfig,
    WasmtimeError,
)
from wasmtime import _ffi as ffi  # the call fast path, _Export

from services.inference.errors import InferenceError
from shared.config import PluginSettings
from shared.plugin import (
    ABI_VERSION,
    WASM_PAGE,
    PluginError,
    PluginLimits,
    PluginManifest,
    PluginResult,
    check_emit_suffix,
    load_verified_plugin,
)

log = logging.getLogger(__name__)

# The epoch ticker's period: a call's deadline holds to within one tick, and each tick wakes a Python
# thread. Measured on this 2-core box, the ticker costs 0.49 % of one core at 5 ms (2.0 % at 1 ms), and
# a pure-Python loop beside it ran no slower beyond noise; at 5 ms a 20 ms deadline fires within
# 20-25 ms (measured 23-25 ms), well inside a frame's budget. It pauses once no plugin code has run
# for PAUSE_AFTER_S: ticking always, it woke a service that runs no plugin 200 times a second on the
# worker's core (0.08-0.16 ms of CPU per image at ~90 images/s, bench pipeline's device core, 2026-12-07).
EPOCH_TICK_MS = 5
# How long the ticker goes on ticking after the last plugin call ended. A service that runs plugins per
# prediction calls them far more often than this, so its ticker never pauses and no call has to wake it
# (woken from inside every call, it put a thread switch on the call path: per-call p99 1.7-2.9 ms
# against 0.12-0.23 ms ticking always, at 90 calls/s here, 2026-12-07); a service with no plugin never
# ticks after start.
PAUSE_AFTER_S = 1.0
WASMTIME_VERSION = version("wasmtime")
# The input buffer an instance allocates at start; a larger prediction re-allocates (power of two).
INPUT_BUFFER_BYTES = 4096
# Suffixes longer than this cannot pass check_emit_suffix (8 levels of 64 characters and 7 slashes):
# refused before a byte is copied.
_MAX_SUFFIX_BYTES = 8 * 64 + 7
# A table element costs the host 8 bytes outside the memory limit: C and Rust plugins need a few
# hundred (function pointers); a module that declares more is refused at instantiate.
_TABLE_ELEMENTS = 1 << 16
_TABLES = 4
_LOG_LINE_BYTES = 1024
_LOG_LINES_PER_CALL = 16
# A plugin's lines per second into the service's log, whatever its calls and workers: the rest are
# counted and summed up in one line when its lines are let through again.
LOG_LINES_PER_S = 20
_LOG_LEVELS = (logging.DEBUG, logging.ERROR)  # docs/plugins.md: level 10 debug ... 40 error
_U32 = 0xFFFFFFFF

FaultKind = Literal["trap", "fuel", "deadline", "result", "topic", "memory", "abi"]

_I32 = ValType.i32()
_I64 = ValType.i64()
_REQUIRED_FUNCS: dict[str, tuple[list[ValType], list[ValType]]] = {
    "edgefleet_abi_version": ([], [_I32]),
    "edgefleet_alloc": ([_I32], [_I32]),
    "edgefleet_on_prediction": ([_I32, _I32], [_I64]),
}
_OPTIONAL_FUNCS: dict[str, tuple[list[ValType], list[ValType]]] = {
    "edgefleet_init": ([_I32, _I32], [_I32]),
    "_initialize": ([], []),  # a WASI reactor's constructors (C's static initialisers), run first
}
_SIGNATURES = {**_REQUIRED_FUNCS, **_OPTIONAL_FUNCS}


class PluginFault(InferenceError):
    """One call of a plugin went wrong; the instance must be discarded.

    Attributes:
        kind: "trap", "fuel" (out of fuel), "deadline" (epoch interruption), "result" (a bad result or
            a negative return), "topic" (an emit outside its topic), "memory" (a pointer outside the
            plugin's memory, or no memory to be had) or "abi".
        detail: what happened, for a person (also the exception's message).
    """

    def __init__(self, kind: FaultKind, detail: str) -> None:
        super().__init__(detail)
        self.kind: FaultKind = kind
        self.detail = detail


@dataclass(frozen=True)
class Emit:
    """A message the plugin queued: published on edgefleet/<device>/plugins/<name>/<suffix>."""

    suffix: str
    payload: bytes


@dataclass(frozen=True)
class CallOutcome:
    """What one successful call answered.

    Attributes:
        result: the plugin's result document; None when it returned 0 (keep, nothing read).
        emits: the messages it queued, in order (only ever those of a call that succeeded).
    """

    result: PluginResult | None
    emits: tuple[Emit, ...]


class HostContext(Protocol):
    """What one call's imports can reach (the prediction's frame, the served model).

    Attributes:
        max_image_bytes: the largest encoded image `infer` takes (the service's max_frame_bytes): a
            longer image_len is refused before a byte of the plugin's memory is read.
        tensor_bytes: the served model's input tensor in bytes (4 x 3 x crop x crop): `infer_tensor`
            refuses any other length before reading.
    """

    max_image_bytes: int
    tensor_bytes: int

    def frame(self) -> bytes | None:
        """The prediction's encoded frame (JPEG/PNG), or None when the service did not keep it."""
        ...

    def infer_image(self, data: bytes, x: int, y: int, w: int, h: int) -> np.ndarray | None:
        """Probabilities (float32, one per class) for a crop of an encoded image (w = h = 0: all of it);
        None when the image is undecodable or the rectangle is outside it."""
        ...

    def infer_tensor(self, tensor: np.ndarray) -> np.ndarray:
        """Probabilities for a (1, 3, crop, crop) float32 input; raises ValueError for a wrong shape."""
        ...


class _CallState:
    """One call's imports' state: what it queued, what it spent, and the fault it committed."""

    __slots__ = ("context", "emits", "infers", "logs", "fault")

    def __init__(self, context: HostContext | None) -> None:
        self.context = context
        self.emits: list[Emit] = []
        self.infers = 0
        self.logs = 0
        self.fault: PluginFault | None = None

    def blame(self, kind: FaultKind, detail: str) -> None:
        if self.fault is None:  # the first fault is the one worth reporting
            self.fault = PluginFault(kind, detail)


class _Running:
    """Which instance runs a call on this thread: host functions are shared by every store (one Linker),
    and a worker runs one call at a time, so the thread says whose imports these are."""

    def __init__(self) -> None:
        self._local = threading.local()

    def get(self) -> tuple[Instance, _CallState] | None:
        current: tuple[Instance, _CallState] | None = getattr(self._local, "current", None)
        return current

    def set(self, current: tuple[Instance, _CallState] | None) -> None:
        self._local.current = current


_RUNNING = _Running()


def _address(memory: Memory, store: Store | Caller) -> tuple[int, int]:
    """The host address of a linear memory's byte 0 and its size (it may move when it grows)."""
    base = ctypes.cast(memory.data_ptr(store), ctypes.c_void_p).value or 0
    return base, memory.data_len(store)


class _Export:
    """One exported function of i32 parameters and at most one result, called without Func.__call__'s
    per-call type lookup and value boxing: measured here, Func.__call__ costs 22 µs and this 2 µs for
    the same two-argument call. It is wasmtime-py's own call (wasmtime_func_call through its ctypes
    bindings) with the argument and result arrays made once; traps and errors surface exactly as
    Func.__call__ raises them (Trap, WasmtimeError). Our host functions never raise, so the shared
    LAST_EXCEPTION slot that Func.__call__ also checks is never ours to collect."""

    def __init__(self, store: Store, func: Func, name: str) -> None:
        # The signature the ABI table gives (_check_exports held the module to it at load): asking the
        # function for its type through the C API cost ~40 µs an instance, five exports each.
        params, results = _SIGNATURES[name]
        self._arity = len(params)
        self._results = len(results)
        i32 = ffi.WASMTIME_I32.value
        self._params = (ffi.wasmtime_val_t * max(self._arity, 1))(
            *(ffi.wasmtime_val_t(kind=i32) for _ in range(max(self._arity, 1))))
        self._answer = (ffi.wasmtime_val_t * max(self._results, 1))()
        self._context = store._context()
        self._func = ctypes.byref(func._func)
        self._i64 = bool(results) and results[0] == _I64

    def __call__(self, *args: int) -> int:
        params = self._params
        for index, arg in enumerate(args):
            params[index].of.i32 = arg
        trap = ctypes.POINTER(ffi.wasm_trap_t)()
        error = ffi.wasmtime_func_call(self._context, self._func, params, self._arity, self._answer,
                                       self._results, ctypes.byref(trap))
        if error:
            raise WasmtimeError._from_ptr(error)
        if trap:
            raise Trap._from_ptr(trap)
        if not self._results:
            return 0
        answer = self._answer[0].of
        return int(answer.i64 if self._i64 else answer.i32)


def _inside(ptr: int, length: int, size: int) -> bool:
    """Whether [ptr, ptr+length) lies in a memory of `size` bytes (guest i32s read as unsigned)."""
    return 0 <= length and (ptr & _U32) + length <= size


class WasmHost:
    """The plugins' engine, epoch ticker and compile cache; one per service.

    Calls are bounded by fuel whether or not the ticker runs; their wall-clock deadlines hold only
    between start() and stop().
    """

    def __init__(self, settings: PluginSettings) -> None:
        self.settings = settings
        config = Config()
        config.consume_fuel = True
        config.epoch_interruption = True
        self.engine = Engine(config)
        self._linker = _linker(self.engine)
        self._lock = threading.Lock()  # compile and the ticker's start/stop
        self._ticker: threading.Thread | None = None
        self._stopping = threading.Event()
        # Under _calls_changed: plugin code running now (a count: calls on several threads overlap), when
        # the last one ended (monotonic; -inf: none yet, so an idle service never ticks), whether the
        # ticker waits paused for the next call.
        self._calls_changed = threading.Condition()
        self._calls = 0
        self._last_left = -math.inf
        self._paused = False

    def start(self) -> None:
        """Starts the epoch ticker (idempotent)."""
        with self._lock:
            if self._ticker is not None:
                return
            self._stopping.clear()
            self._ticker = threading.Thread(target=self._tick, name="wasm-epoch", daemon=False)
            self._ticker.start()

    def stop(self) -> None:
        """Stops the epoch ticker and waits for it (idempotent). Calls after this have fuel, no deadline."""
        with self._lock:
            ticker, self._ticker = self._ticker, None
        if ticker is not None:
            self._stopping.set()
            with self._calls_changed:  # a ticker paused for want of calls hears it too
                self._calls_changed.notify_all()
            ticker.join()

    @property
    def ticking(self) -> bool:
        """Whether the epoch ticker is ticking now (started, and not paused for want of plugin calls)."""
        with self._calls_changed:
            return self._ticker is not None and not self._paused

    def enter_call(self) -> None:
        """Plugin code starts running on this thread (its deadline armed): the ticker ticks until at least
        PAUSE_AFTER_S after leave_call(). Wakes the ticker only if it is paused."""
        with self._calls_changed:
            self._calls += 1
            if self._paused:  # cleared here, not by the ticker: a call that has ended by the time the
                self._paused = False  # ticker runs again still wakes it, and starts its linger
                self._calls_changed.notify()

    def leave_call(self) -> None:
        """The plugin code enter_call() announced has returned (or failed)."""
        with self._calls_changed:
            self._calls -= 1
            self._last_left = time.monotonic()

    def _tick(self) -> None:
        # One tick every EPOCH_TICK_MS while a call runs or one ended under PAUSE_AFTER_S ago, then a
        # pause. A call armed with deadline_ticks (one more than its deadline needs) gets at least its
        # deadline: it is armed before enter_call(), and ticks are never closer than EPOCH_TICK_MS (a wait
        # follows every tick, and a pause begins only after that wait). A call that finds the ticker
        # running gets at most one tick more. The first call after a pause wakes it (enter_call), and it
        # ticks at once: that call's deadline fires at its deadline rounded up to whole ticks, plus the
        # wake's latency.
        while True:
            with self._calls_changed:
                if self._calls == 0 and time.monotonic() - self._last_left >= PAUSE_AFTER_S:
                    self._paused = True
                    self._calls_changed.wait_for(lambda: not self._paused or self._stopping.is_set())
                    self._paused = False
            if self._stopping.is_set():
                return
            self.engine.increment_epoch()
            if self._stopping.wait(EPOCH_TICK_MS / 1000):
                return

    def load(self, folder: Path, sha256: str | None = None) -> Compiled:
        """A plugin folder, verified against its manifest (size, SHA-256, ABI), compiled and checked.

        :param folder: holds manifest.json and plugin.wasm (shared.plugin.load_verified_plugin).
        :param sha256: the module digest the caller expects (the active set's); None: the manifest's.
        :returns: the module, ready to instantiate; its first instance has already run (ABI, init).
        :raises PluginError: anything that keeps it from running, worded for a person.
        """
        manifest, module = load_verified_plugin(folder)
        if sha256 is not None and sha256 != manifest.sha256:
            raise PluginError(f"{folder}: the manifest says SHA-256 {manifest.sha256}, expected {sha256}")
        try:
            wasm = module.read_bytes()
        except OSError as exc:
            raise PluginError(f"{module} cannot be read: {exc}") from exc
        return self.compile(wasm, manifest)

    def compile(self, wasm: bytes, manifest: PluginManifest, *, cached: bool = True) -> Compiled:
        """The same as load() for a module in memory (benches, tests). Re-measured on this 2-core box
        (busy with other work, wasmtime-py 51), the first instance included: 75-95 ms compiling the C
        examples (45-51 KB), 170-180 ms the Rust one (123 KB); from the cache, medians 0.8-1.2 ms.

        :param wasm: the module's bytes; their SHA-256 must be the manifest's.
        :param manifest: the plugin's manifest (limits, grants, config).
        :param cached: look in and write to settings.cache_dir; False compiles every time.
        :raises PluginError: the bytes are not the manifest's, not valid wasm, or not ABI v1.
        """
        digest = hashlib.sha256(wasm).hexdigest()
        if digest != manifest.sha256:
            raise PluginError(f"{manifest.name} v{manifest.version}: module SHA-256 {digest}, its manifest "
                              f"says {manifest.sha256}")
        with self._lock:
            module, from_cache = self._module(wasm, digest) if cached else (self._fresh_module(wasm), False)
            try:
                pre = self._linker.instantiate_pre(module)
            except WasmtimeError as exc:
                raise PluginError(f"{manifest.name}: imports what this host does not provide: {exc}") from exc
        compiled = Compiled(self, module, pre, manifest, from_cache)
        compiled.instantiate()  # the ABI version and init, answered once before anyone relies on it
        return compiled

    def _fresh_module(self, wasm: bytes) -> Module:
        try:
            return Module(self.engine, wasm)
        except WasmtimeError as exc:
            raise PluginError(f"not a valid WebAssembly module: {exc}") from exc

    def _module(self, wasm: bytes, digest: str) -> tuple[Module, bool]:
        """From the cache when the .cwasm's SHA-256 matches its sidecar, else compiled and cached.

        The checked bytes are the ones deserialized (read once, hashed, deserialized from memory), so a
        file swapped between the check and the load cannot slip in.
        """
        folder = self.settings.cache_dir
        path = folder / f"{WASMTIME_VERSION}-{digest}.cwasm"
        sidecar = path.with_name(path.name + ".sha256")
        try:
            blob = path.read_bytes()
            recorded = sidecar.read_text().strip()
        except OSError:
            blob, recorded = None, ""
        if blob is not None:
            if hashlib.sha256(blob).hexdigest() == recorded:
                try:
                    return Module.deserialize(self.engine, blob), True
                except WasmtimeError as exc:  # another engine's settings, or wasmtime refuses it
                    log.warning("precompiled %s refused by wasmtime (%s); compiling again", path, exc)
            else:
                log.warning("precompiled %s does not match its recorded SHA-256; compiling again", path)
        module = self._fresh_module(wasm)
        try:
            _write_cache(folder, path, sidecar, bytes(module.serialize()))
        except (OSError, WasmtimeError) as exc:  # a cache that cannot be written costs compile time only
            log.warning("cannot cache the precompiled module in %s: %s", folder, exc)
        return module, False


def _write_cache(folder: Path, path: Path, sidecar: Path, blob: bytes) -> None:
    """Writes the .cwasm then its sidecar, each atomically (temporary file, fsync, rename): a crash in
    between leaves a sidecar that does not match, which means compile again."""
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(folder, 0o700)  # native code is loaded from here: nobody else may write it
    for target, data in ((path, blob), (sidecar, hashlib.sha256(blob).hexdigest().encode() + b"\n")):
        fd, temporary = tempfile.mkstemp(dir=folder, prefix=f".{target.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temporary, target)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise


class Compiled:
    """One plugin module, ready to instantiate many times (one Instance per worker).

    Attributes:
        manifest: the plugin's manifest.
        host: the WasmHost that compiled it (its calls tell the host's epoch ticker that they run).
        limits: the manifest's limits clamped to the device's ceilings (PluginSettings.max_*): what
            every instance runs under.
        compiled_from_cache: whether the module was deserialized from the precompiled cache.
        memory_pages, memory_bytes, fuel, deadline_ticks: the clamped limits as the Store takes them.
        log_budget: the plugin's lines per second into the service's log, shared by its instances.

    Raises (at construction):
        PluginError: a granted folder outside PluginSettings.allowed_dirs.
    """

    def __init__(self, host: WasmHost, module: Module, pre: InstancePre, manifest: PluginManifest,
                 compiled_from_cache: bool) -> None:
        self.manifest = manifest
        self.compiled_from_cache = compiled_from_cache
        self.host = host
        self._pre = pre
        self.limits = clamp(manifest.limits, host.settings)
        self.memory_pages = self.limits.memory_pages
        self.memory_bytes = self.memory_pages * WASM_PAGE
        self.fuel = self.limits.fuel
        self.deadline_ticks = math.ceil(self.limits.deadline_ms / EPOCH_TICK_MS) + 1
        self.log_budget = LogBudget(LOG_LINES_PER_S)
        self._initial_pages, self._has_init, self._has_initialize = _check_exports(manifest, module.exports)
        self._config = json.dumps(manifest.config, separators=(",", ":")).encode()
        granted_dirs(manifest, host.settings.allowed_dirs)  # refused at load, not at the first instance

    def instantiate(self) -> Instance:
        """A fresh instance in its own Store with the limits; runs `_initialize`, checks the ABI version,
        allocates the input buffer and calls `edgefleet_init` with the manifest's config. Measured here:
        170-180 µs p50 for the C and Rust examples, 85 µs for a bare module.

        :raises PluginError: the module needs more memory than the limit, is not ABI v1, traps while
            starting, or its init refuses.
        """
        name = self.manifest.name
        if self._initial_pages > self.memory_pages:
            raise PluginError(f"{name}: its memory starts at {self._initial_pages} pages, over its limit of "
                              f"{self.memory_pages} pages ({self.memory_bytes} bytes)")
        store = Store(self.host.engine)
        store.set_limits(memory_size=self.memory_bytes, table_elements=_TABLE_ELEMENTS, instances=1, tables=_TABLES,
                         memories=1)
        try:
            # Resolved again: a symlink on the way may have been turned since the load.
            store.set_wasi(_wasi(self.manifest, granted_dirs(self.manifest, self.host.settings.allowed_dirs)))
            self._arm(store)
            self.host.enter_call()  # a start function runs plugin code
            try:
                instance = self._pre.instantiate(store)
            finally:
                self.host.leave_call()
        except (Trap, WasmtimeError) as exc:
            raise PluginError(f"{name} cannot be instantiated: {exc}") from exc
        exports = instance.exports(store)
        memory = exports["memory"]
        if not isinstance(memory, Memory):
            raise PluginError(f"{name}: its export 'memory' is not a memory")
        started = Instance(self, store, memory, _func(exports["edgefleet_alloc"]),
                           _func(exports["edgefleet_on_prediction"]))
        try:
            if self._has_initialize:
                started.run(started.export(exports, "_initialize"))
            if (abi := started.run(started.export(exports, "edgefleet_abi_version"))) != ABI_VERSION:
                raise PluginError(f"{name} speaks plugin ABI {abi}; this host speaks ABI {ABI_VERSION}")
            started.reserve(INPUT_BUFFER_BYTES)
            if self._has_init:
                config = started.place(self._config)
                if (answer := started.run(started.export(exports, "edgefleet_init"), config, len(self._config))) != 0:
                    raise PluginError(f"{name} refused its config: edgefleet_init returned {answer}")
        except PluginFault as fault:
            raise PluginError(f"{name} failed while starting ({fault.kind}): {fault}") from fault
        return started

    def _arm(self, store: Store) -> None:
        store.set_fuel(self.fuel)
        store.set_epoch_deadline(self.deadline_ticks)


class Instance:
    """One worker's instance of a plugin: its own Store, memory and globals. Not thread-safe."""

    def __init__(self, compiled: Compiled, store: Store, memory: Memory, alloc: Func, on_prediction: Func) -> None:
        """Made by Compiled.instantiate()."""
        self.compiled = compiled
        self.name = compiled.manifest.name
        self.limits = compiled.limits
        self.grants = compiled.manifest.grants
        self.memory = memory
        self._store = store
        self._alloc = _Export(store, alloc, "edgefleet_alloc")
        self._on_prediction = _Export(store, on_prediction, "edgefleet_on_prediction")
        self._input = 0
        self._capacity = 0

    def call(self, prediction_json: bytes, context: HostContext) -> CallOutcome:
        """Runs the plugin on one prediction (its wire JSON) with fresh fuel and deadline.

        Cost, measured on this 2-core box (wasmtime-py 51, a 611-byte prediction): 7.5 µs p50 for a
        module that only returns 0; night-alert (C, returns 0) 16.5 µs against 11.3 µs for its export
        called bare, so 5 µs of host over the plugin's own code; site-labels (Rust, a replace result)
        27 µs against 13 µs, the difference mostly the result's validation.

        :param prediction_json: the Prediction as published.
        :param context: what the frame and infer imports reach for this prediction.
        :returns: the result (None: keep) and the messages it queued.
        :raises PluginFault: anything the plugin did wrong; discard this instance afterwards.
        """
        size = len(prediction_json)
        if size > self._capacity:
            self.reserve(size)
        base, _ = _address(self.memory, self._store)
        # reserve() checked the buffer lies in memory, and linear memory never shrinks.
        ctypes.memmove(base + self._input, prediction_json, size)
        state = _CallState(context)
        packed = self.run(self._on_prediction, self._input, size, state=state)
        if state.fault is not None:
            raise state.fault
        return CallOutcome(self._result(packed), tuple(state.emits))

    def run(self, func: _Export, *args: int, state: _CallState | None = None) -> int:
        """Calls one export with re-armed fuel and deadline; every failure becomes a PluginFault."""
        store = self._store
        store.set_fuel(self.compiled.fuel)
        store.set_epoch_deadline(self.compiled.deadline_ticks)
        state = state or _CallState(None)
        host = self.compiled.host
        _RUNNING.set((self, state))
        host.enter_call()
        try:
            answer = func(*args)
        except Trap as exc:
            raise state.fault or _trap_fault(self.name, exc) from None
        except WasmtimeError as exc:
            raise state.fault or _trap_fault(self.name, exc) from None
        except Exception as exc:  # a host bug must still not escape as anything but a fault
            raise PluginFault("trap", f"{self.name}: the call failed in the host: {exc!r}") from exc
        finally:
            host.leave_call()
            _RUNNING.set(None)
        if state.fault is not None:
            raise state.fault
        return answer

    def export(self, exports: Any, name: str) -> _Export:
        """One of the ABI's exported functions (`exports`: the instance's exports), ready to run."""
        return _Export(self._store, _func(exports[name]), name)

    def reserve(self, size: int) -> None:
        """Makes the input buffer hold `size` bytes, asking the plugin's allocator for a new one."""
        capacity = max(INPUT_BUFFER_BYTES, 1 << (size - 1).bit_length())
        self._input = self.place_empty(capacity)
        self._capacity = capacity

    def place(self, data: bytes) -> int:
        """Copies `data` into a fresh allocation in the plugin's memory and returns its pointer."""
        ptr = self.place_empty(len(data))
        base, _ = _address(self.memory, self._store)
        ctypes.memmove(base + ptr, data, len(data))
        return ptr

    def place_empty(self, size: int) -> int:
        ptr = self.run(self._alloc, size) & _U32
        if ptr == 0:
            raise PluginFault("memory", f"{self.name}: edgefleet_alloc({size}) found no memory")
        if not _inside(ptr, size, self.memory.data_len(self._store)):
            raise PluginFault("memory", f"{self.name}: edgefleet_alloc({size}) answered {ptr}, outside its memory")
        return ptr

    def _result(self, packed: int) -> PluginResult | None:
        if packed == 0:
            return None
        if packed < 0:
            raise PluginFault("result", f"{self.name} reported its own failure: code {packed}")
        ptr, length = (packed >> 32) & _U32, packed & _U32
        if length > self.limits.result_bytes:
            raise PluginFault("result", f"{self.name} returned a {length}-byte result; the limit is "
                                        f"{self.limits.result_bytes}")
        base, memory_size = _address(self.memory, self._store)
        if not _inside(ptr, length, memory_size):
            raise PluginFault("result", f"{self.name} returned a result at {ptr}+{length}, outside its "
                                        f"{memory_size}-byte memory")
        document = ctypes.string_at(base + ptr, length)
        try:
            return PluginResult.model_validate_json(document)
        except ValidationError as exc:
            raise PluginFault("result", f"{self.name} returned a malformed result: "
                                        f"{exc.errors(include_url=False, include_input=False)[:3]}") from None


def _func(extern: object) -> Func:
    if not isinstance(extern, Func):  # _check_exports saw the types; this keeps the checker honest
        raise PluginError(f"an export is a {type(extern).__name__}, not a function")
    return extern


def _trap_fault(name: str, exc: Trap | WasmtimeError) -> PluginFault:
    """The fault a trap or engine error stands for, its text the trap's causes and top frame."""
    code = exc.trap_code if isinstance(exc, Trap) else None
    text = _trap_text(exc)
    if code is TrapCode.OUT_OF_FUEL or "all fuel consumed" in text:
        return PluginFault("fuel", f"{name} ran out of fuel: {text}")
    if code is TrapCode.INTERRUPT or "epoch deadline" in text or "interrupt" in text:
        return PluginFault("deadline", f"{name} ran past its deadline: {text}")
    if code in (TrapCode.MEMORY_OUT_OF_BOUNDS, TrapCode.HEAP_MISALIGNED, TrapCode.ALLOCATION_TOO_LARGE):
        return PluginFault("memory", f"{name} faulted on memory: {text}")
    return PluginFault("trap", f"{name} trapped: {text}")


def _trap_text(exc: Exception) -> str:
    """'wasm trap: …' and the frame it happened in, out of wasmtime's multi-line report."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if "Caused by:" not in lines:
        return "; ".join(lines)[:500] or type(exc).__name__
    at = lines.index("Caused by:")
    causes = [line.split(": ", 1)[1] if line[:1].isdigit() else line for line in lines[at + 1:]]
    frames = [line.split(" - ", 1)[-1] for line in lines[1:at] if line[:1].isdigit()]
    return ("; ".join(causes) + (f" (in {frames[0]})" if frames else ""))[:500]


def _check_exports(manifest: PluginManifest, exports: list[ExportType]) -> tuple[int, bool, bool]:
    """The required exports with their types (docs/plugins.md).

    :returns: the memory's initial pages, whether edgefleet_init and _initialize are exported.
    :raises PluginError: an export missing or of the wrong type.
    """
    by_name = {export.name: export.type for export in exports}
    memory = by_name.get("memory")
    if not isinstance(memory, MemoryType):
        raise PluginError(f"{manifest.name} exports no memory named 'memory'")
    for name, (params, results) in (_REQUIRED_FUNCS | _OPTIONAL_FUNCS).items():
        kind = by_name.get(name)
        if kind is None and name in _OPTIONAL_FUNCS:
            continue
        if not isinstance(kind, FuncType):
            raise PluginError(f"{manifest.name} does not export the function {name} (plugin ABI {ABI_VERSION})")
        if list(kind.params) != params or list(kind.results) != results:
            raise PluginError(f"{manifest.name}: {name} has type {kind.params} -> {kind.results}, ABI "
                              f"{ABI_VERSION} wants {params} -> {results}")
    return memory.limits.min, "edgefleet_init" in by_name, "_initialize" in by_name


def clamp(limits: PluginLimits, settings: PluginSettings) -> PluginLimits:
    """A manifest's limits, each lowered to the device's ceiling (PluginSettings.max_*)."""
    return limits.model_copy(update={
        "memory_pages": min(limits.memory_pages, settings.max_memory_pages),
        "fuel": min(limits.fuel, settings.max_fuel),
        "deadline_ms": min(limits.deadline_ms, settings.max_deadline_ms),
        "result_bytes": min(limits.result_bytes, settings.max_result_bytes),
        "emits": min(limits.emits, settings.max_emits),
        "emit_bytes": min(limits.emit_bytes, settings.max_emit_bytes),
        "infer_calls": min(limits.infer_calls, settings.max_infer_calls),
    })


def granted_dirs(manifest: PluginManifest, allowed: list[Path]) -> list[tuple[str, str]]:
    """The manifest's granted folders as (host folder with its symlinks resolved, guest path), each
    checked to lie inside one of the device's allowed folders (themselves resolved).

    :param manifest: the plugin's manifest (grants.dirs).
    :param allowed: PluginSettings.allowed_dirs; empty: no folder can be granted.
    :raises PluginError: a grant outside every allowed folder, named with the setting.
    """
    roots = [Path(os.path.realpath(folder)) for folder in allowed]
    resolved = []
    for grant in manifest.grants.dirs:
        host = Path(os.path.realpath(grant.host))
        if not any(host.is_relative_to(root) for root in roots):
            raise PluginError(
                f"{manifest.name}: the grant of {grant.host} (at {grant.guest}; {host} with its links resolved) "
                f"is not inside a folder the device allows (EDGEFLEET_PLUGINS_ALLOWED_DIRS: "
                f"{', '.join(str(r) for r in roots) or 'none'})")
        resolved.append((str(host), grant.guest))
    return resolved


def _wasi(manifest: PluginManifest, dirs: list[tuple[str, str]]) -> WasiConfig:
    """WASI with nothing behind it but the grants: no argv, the granted environment only, granted
    folders (`dirs`: checked, resolved) read-only, stdin empty, stdout and stderr discarded (wasmtime's
    defaults)."""
    wasi = WasiConfig()
    if manifest.grants.env:
        wasi.env = list(manifest.grants.env.items())
    for host, guest in dirs:
        wasi.preopen_dir(host, guest, fs_mutable=False)
    return wasi


class LogBudget:
    """At most `per_second` lines a second (fixed one-second windows), shared by a plugin's instances
    across worker threads; the lines refused meanwhile are counted, to be summed up in the window that
    lets lines through again.

    Args:
        per_second: lines let through per window.
        clock: monotonic seconds (tests pass their own).
    """

    def __init__(self, per_second: int, clock: Callable[[], float] = time.monotonic) -> None:
        self._per_second, self._clock = per_second, clock
        self._lock = threading.Lock()
        self._window = -math.inf
        self._used = 0
        self._suppressed = 0

    def take(self) -> tuple[bool, int]:
        """One line's turn.

        :returns: whether the line may be logged, and (only on a line let through) how many were
            refused since the last line let through (0 mostly).
        """
        now = self._clock()
        with self._lock:
            if now - self._window >= 1.0:
                self._window, self._used = now, 0
            if self._used >= self._per_second:
                self._suppressed += 1
                return False, 0
            self._used += 1
            suppressed, self._suppressed = self._suppressed, 0
            return True, suppressed


# The edgefleet imports. Each finds its instance and call through _RUNNING, checks every pointer against
# the memory before touching it, and answers an error code (never an exception) when the plugin errs.

def _running(name: str) -> tuple[Instance, _CallState]:
    current = _RUNNING.get()
    if current is None:  # only reachable by a host bug: a call not made through Instance.run
        raise RuntimeError(f"edgefleet.{name} called outside a plugin call")
    return current


def _read(caller: Caller, instance: Instance, state: _CallState, ptr: int, length: int, what: str) -> bytes | None:
    base, size = _address(instance.memory, caller)
    if not _inside(ptr, length, size):
        state.blame("memory", f"{instance.name}: {what} at {ptr & _U32}+{length} is outside its {size}-byte memory")
        return None
    return ctypes.string_at(base + (ptr & _U32), length)


def _write(caller: Caller, instance: Instance, state: _CallState, ptr: int, data: bytes, what: str) -> bool:
    base, size = _address(instance.memory, caller)
    if not _inside(ptr, len(data), size):
        state.blame("memory", f"{instance.name}: {what} at {ptr & _U32}+{len(data)} is outside its {size}-byte memory")
        return False
    ctypes.memmove(base + (ptr & _U32), data, len(data))
    return True


def _host_log(caller: Caller, level: int, ptr: int, length: int) -> None:
    try:
        instance, state = _running("log")
        state.logs += 1
        if state.logs > _LOG_LINES_PER_CALL:
            return
        line = _read(caller, instance, state, ptr, min(max(length, 0), _LOG_LINE_BYTES), "a log line")
        if line is None:
            return
        allowed, suppressed = instance.compiled.log_budget.take()
        if not allowed:
            return
        if suppressed:
            log.warning("plugin %s: %d log lines not written (over %d a second)", instance.name, suppressed,
                        LOG_LINES_PER_S)
        log.log(min(max(level, _LOG_LEVELS[0]), _LOG_LEVELS[1]), "plugin %s: %s", instance.name,
                line.decode("utf-8", "replace"))
    except Exception:
        log.exception("edgefleet.log failed in the host")


def _host_now_ms() -> int:
    return time.time_ns() // 1_000_000


def _host_emit(caller: Caller, suffix_ptr: int, suffix_len: int, payload_ptr: int, payload_len: int) -> int:
    try:
        instance, state = _running("emit")
        if not 0 < suffix_len <= _MAX_SUFFIX_BYTES:
            state.blame("topic", f"{instance.name} emitted on a {suffix_len}-byte topic suffix")
            return -1
        raw = _read(caller, instance, state, suffix_ptr, suffix_len, "an emit's topic suffix")
        if raw is None:
            return -1
        try:
            suffix = check_emit_suffix(raw.decode("utf-8"))
        except ValueError as exc:  # UnicodeDecodeError included
            state.blame("topic", f"{instance.name} emitted outside its topic: {exc}")
            return -1
        if len(state.emits) >= instance.limits.emits or not 0 <= payload_len <= instance.limits.emit_bytes:
            return -2
        payload = _read(caller, instance, state, payload_ptr, payload_len, "an emit's payload")
        if payload is None:
            return -1
        state.emits.append(Emit(suffix, payload))
        return 0
    except Exception as exc:
        return _host_failed("emit", exc)


def _host_frame(caller: Caller, ptr: int, cap: int) -> int:
    try:
        instance, state = _running("frame")
        if not instance.grants.frame or state.context is None:
            return -1
        frame = state.context.frame()
        if frame is None:
            return -2
        if len(frame) > (cap & _U32):
            return len(frame)
        return len(frame) if _write(caller, instance, state, ptr, frame, "frame's buffer") else -1
    except Exception as exc:
        return _host_failed("frame", exc)


def _host_infer(caller: Caller, image_ptr: int, image_len: int, x: int, y: int, w: int, h: int,
                out_ptr: int, out_cap: int) -> int:
    try:
        instance, state = _running("infer")
        context = _infer_context(instance, state)
        if isinstance(context, int):
            return context
        if not 0 < image_len <= context.max_image_bytes or min(x, y, w, h) < 0:
            return -2  # before a byte is copied: image_len may be the whole memory
        image = _read(caller, instance, state, image_ptr, image_len, "infer's image")
        if image is None:
            return -2
        probabilities = context.infer_image(image, x, y, w, h)
        if probabilities is None:
            return -2
        return _answer(caller, instance, state, probabilities, out_ptr, out_cap)
    except Exception as exc:
        return _host_failed("infer", exc)


def _host_infer_tensor(caller: Caller, ptr: int, length: int, out_ptr: int, out_cap: int) -> int:
    try:
        instance, state = _running("infer_tensor")
        context = _infer_context(instance, state)
        if isinstance(context, int):
            return context
        if length != context.tensor_bytes:  # the served model's input, checked before a byte is copied
            return -2
        values = length // 4
        crop = math.isqrt(values // 3) if length > 0 and length % 4 == 0 and values % 3 == 0 else 0
        if crop == 0 or 3 * crop * crop != values:
            return -2
        raw = _read(caller, instance, state, ptr, length, "infer_tensor's tensor")
        if raw is None:
            return -2
        tensor = np.frombuffer(raw, dtype="<f4").astype(np.float32).reshape(1, 3, crop, crop)
        try:
            probabilities = context.infer_tensor(tensor)
        except ValueError:  # not the served model's input shape
            return -2
        return _answer(caller, instance, state, probabilities, out_ptr, out_cap)
    except Exception as exc:
        return _host_failed("infer_tensor", exc)


def _infer_context(instance: Instance, state: _CallState) -> HostContext | int:
    """The context an infer import may use, or its refusal: -1 not granted, -4 over limits.infer_calls."""
    if not instance.grants.infer or state.context is None:
        return -1
    state.infers += 1
    if state.infers > instance.limits.infer_calls:
        return -4
    return state.context


def _answer(caller: Caller, instance: Instance, state: _CallState, probabilities: np.ndarray, out_ptr: int,
            out_cap: int) -> int:
    data = np.ascontiguousarray(probabilities, dtype="<f4").reshape(-1).tobytes()
    if len(data) > (out_cap & _U32):
        return -3
    if not _write(caller, instance, state, out_ptr, data, "infer's output"):
        return -3
    return len(data) // 4


def _host_failed(name: str, exc: Exception) -> int:
    current = _RUNNING.get()
    if current is not None:
        current[1].blame("trap", f"{current[0].name}: edgefleet.{name} failed in the host: {exc!r}")
    log.warning("edgefleet.%s failed in the host", name, exc_info=exc)
    return -1


def _linker(engine: Engine) -> Linker:
    """WASI preview 1 (per-store config: the grants) and the edgefleet imports, shared by every store."""
    linker = Linker(engine)
    linker.define_wasi()
    _define_import(linker, "log", 3, None, _host_log)
    _define_import(linker, "now_ms", 0, _I64, lambda _caller: _host_now_ms())
    _define_import(linker, "emit", 4, _I32, _host_emit)
    _define_import(linker, "frame", 2, _I32, _host_frame)
    _define_import(linker, "infer", 8, _I32, _host_infer)
    _define_import(linker, "infer_tensor", 4, _I32, _host_infer_tensor)
    return linker


# The raw callbacks the linker holds: ctypes frees a callback's thunk with its last Python reference.
_IMPORTS: list[object] = []
_NO_FINALIZER = ctypes.CFUNCTYPE(None, ctypes.c_void_p)()  # a null pointer: the callbacks live as long as the module


def _define_import(linker: Linker, name: str, params: int, result: ValType | None,
                   host: Callable[..., int | None]) -> None:
    """Defines edgefleet.<name> (all parameters i32) through wasmtime's unchecked host-function API.

    Why not Linker.define_func: its trampoline converts every argument and result through Val objects and
    compares value types through the C API, which measured 10-12 µs per import call here (night-alert's two
    imports doubled its cost); reading and writing the raw values costs about 2 µs. The host functions
    never raise (module docstring), so the callback never returns a trap.
    """
    is_i64 = result is not None and result == _I64

    def call(_env: object, caller_ptr: object, values: Any, _count: int) -> int:
        caller = Caller(caller_ptr)  # type: ignore[arg-type]
        try:
            answer = host(caller, *[values[i].i32 for i in range(params)])
            if result is not None:
                if is_i64:
                    values[0].i64 = answer
                else:
                    values[0].i32 = answer
            return 0
        except BaseException:  # unreachable by design; a trap, never a made-up result, if it ever happens
            log.exception("plugin import edgefleet.%s failed", name)
            return ctypes.cast(Trap(f"edgefleet.{name} failed in the host")._consume(), ctypes.c_void_p).value or 0
        finally:
            caller._invalidate()

    callback = ffi.wasmtime_func_unchecked_callback_t(call)
    _IMPORTS.append(callback)
    module, field = b"edgefleet", name.encode()
    ty = FuncType([_I32] * params, [] if result is None else [result])
    error = ffi.wasmtime_linker_define_func_unchecked(
        linker.ptr(), ctypes.create_string_buffer(module), len(module), ctypes.create_string_buffer(field),
        len(field), ty.ptr(), callback, None, _NO_FINALIZER)
    if error:
        raise WasmtimeError._from_ptr(error)
