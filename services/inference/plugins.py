"""Plugins: the WebAssembly modules the service runs on each prediction before it is published
(docs/plugins.md), and their switch.

    PluginSet       the plugins switched in, in order: one immutable unit, swapped like the model
    PluginRecord    one plugin's counters and fault window, shared by every worker (thread-safe)
    PluginRunner    one worker thread's instances of the set; apply() runs them on a prediction
    PluginSwitcher  the thread that loads a PluginSwitch's plugins off the network thread and installs them

A worker takes the set once per batch, as it takes the model, so every prediction of a batch meets the
same plugins whatever a switch does meanwhile. A plugin can keep, replace or drop a prediction; its
fault never costs a frame its answer: the prediction goes on as it came in, the fault is reported and
counted, the worker's instance is replaced by a fresh one, and after `fault_limit` faults within
`fault_window_s` the plugin is disabled (reported once) and skipped until another version of it is
switched in. A switch carries over every plugin whose version it leaves unchanged: its module (not
compiled again), its record (counters, fault window, disabled state) and the workers' instances.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from pydantic import ValidationError

from services.inference.intake import Frame, clip
from services.inference.publisher import Publisher
from services.inference.swap import ServedModel, SwitchThread, in_time
from services.inference.wasm import CallOutcome, Compiled, HostContext, Instance, PluginFault
from shared.codec import WireFormat, encode
from shared.config import PluginSettings
from shared.logs import fields
from shared.plugin import PluginError, check_emit_suffix, read_active
from shared.schemas import (
    MAX_STR,
    ErrorReason,
    ModelRef,
    PluginState,
    PluginStatus,
    PluginSwitch,
    PluginSwitched,
    Prediction,
)

log = logging.getLogger(__name__)


class PluginHost(Protocol):
    """What the service runs plugins with (wasm.WasmHost): compiles modules; start/stop own its ticker."""

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def load(self, folder: Path, sha256: str | None = None) -> Compiled: ...


# Makes a plugin call's host context (the frame, the served model) for one prediction.
ContextFactory = Callable[[Frame, ServedModel], HostContext]


# -- the set ---------------------------------------------------------------------------------------------


class PluginRecord:
    """One plugin's counters since it was switched in, and its fault window; any worker may update it.

    Args:
        ref: the plugin version (named in reports and the status).
        fault_limit: faults within `fault_window_s` that disable it.
        fault_window_s: the window, in seconds.
    """

    def __init__(self, ref: ModelRef, *, fault_limit: int, fault_window_s: float) -> None:
        self.ref = ref
        self._limit, self._window = fault_limit, fault_window_s
        self._lock = threading.Lock()
        self._calls = self._faults = self._dropped = self._replaced = self._emitted = 0
        self._last_fault: str | None = None
        self._recent: deque[float] = deque()  # monotonic times of the faults within the window
        self._disabled = False

    @property
    def disabled(self) -> bool:
        """Whether the plugin is skipped (read without the lock: one bool, set once)."""
        return self._disabled

    def succeeded(self, *, dropped: bool = False, replaced: bool = False, emitted: int = 0) -> None:
        """Counts a call that ended well, and what it did."""
        with self._lock:
            self._calls += 1
            self._dropped += dropped
            self._replaced += replaced
            self._emitted += emitted

    def fault(self, what: str, *, called: bool, now: float | None = None) -> bool:
        """Counts a fault; returns True for the one fault that disables the plugin.

        Args:
            what: what happened, for the status's last_fault.
            called: the plugin was called (False: its instance could not even be made).
            now: monotonic time of the fault (default: now).
        """
        now = time.monotonic() if now is None else now
        with self._lock:
            self._calls += called
            self._faults += 1
            self._last_fault = what[:MAX_STR]
            self._recent.append(now)
            while self._recent and self._recent[0] < now - self._window:
                self._recent.popleft()
            if self._disabled or len(self._recent) < self._limit:
                return False
            self._disabled = True
            return True

    def status(self) -> PluginStatus:
        with self._lock:
            return PluginStatus(plugin=self.ref, state=PluginState.DISABLED if self._disabled else PluginState.ACTIVE,
                                calls=self._calls, faults=self._faults, dropped=self._dropped,
                                replaced=self._replaced, emitted=self._emitted, last_fault=self._last_fault)


@dataclass(frozen=True)
class LoadedPlugin:
    """A plugin of the set: its module, ready to instantiate, and its record."""

    compiled: Compiled
    record: PluginRecord

    @property
    def name(self) -> str:
        return self.compiled.manifest.name


_generations = itertools.count(1)


@dataclass(frozen=True)
class PluginSet:
    """The plugins a device runs, in order. Never changed: a switch installs another set, whose new
    `generation` tells each worker to look again (it keeps its instances of the modules carried over)."""

    generation: int
    plugins: tuple[LoadedPlugin, ...]

    @classmethod
    def of(cls, compiled: Sequence[Compiled], settings: PluginSettings, running: PluginSet | None = None) -> PluginSet:
        """A new set of these modules, in order: a module of `running` keeps its record (counters, fault
        window, disabled state), any other gets a fresh one.

        Raises:
            PluginError: a name twice (two plugins would share one topic and one record in the status).
        """
        names = [c.manifest.name for c in compiled]
        if len(set(names)) != len(names):
            raise PluginError(f"a plugin set names a plugin twice: {', '.join(names)}")
        kept = {id(p.compiled): p for p in (running or NO_PLUGINS).plugins}
        return cls(next(_generations), tuple(
            kept.get(id(c)) or LoadedPlugin(c, PluginRecord(c.manifest.ref(), fault_limit=settings.fault_limit,
                                                            fault_window_s=settings.fault_window_s))
            for c in compiled))

    def find(self, ref: ModelRef) -> LoadedPlugin | None:
        """The plugin of this set that is exactly `ref` (name, version, SHA-256), if any."""
        return next((p for p in self.plugins if p.record.ref == ref), None)

    def refs(self) -> list[ModelRef]:
        return [p.record.ref for p in self.plugins]

    def status(self) -> list[PluginStatus]:
        """Each plugin's state and counters, in order (ServiceStatus.plugins)."""
        return [p.record.status() for p in self.plugins]


NO_PLUGINS = PluginSet(0, ())


def load_plugin(host: PluginHost, folder: Path, ref: ModelRef) -> Compiled:
    """A plugin folder compiled (the host instantiates it once: a module that cannot run is refused
    before it is switched in, not on the first prediction), checked to be the version `ref` names.

    Args:
        host: compiles it.
        folder: the installed plugin (manifest.json, plugin.wasm).
        ref: the version expected there (the active set's, or a switch request's).

    Raises:
        PluginError: not what `ref` names (name, version, SHA-256), unverifiable, not ABI 1, or its
            instance refused (memory over the limit, edgefleet_init failing).
    """
    compiled = host.load(folder, ref.sha256)
    if (actual := compiled.manifest.ref()) != ref:
        raise PluginError(f"{folder} holds {actual.name} v{actual.version}, expected {ref.name} v{ref.version}")
    return compiled


def plugin_folder(root: Path, folder: str) -> Path:
    """A plugin's folder as the active set or a switch names it (relative to the plugin store's root),
    resolved under `root`.

    Args:
        root: the plugin store (PluginSettings.dir), which inference may see at another path than sync.
        folder: the relative folder, e.g. "night-alert/3-0123456789abcdef".

    Returns:
        The folder with every symlink resolved, strictly inside the resolved root.

    Raises:
        PluginError: an absolute path, or one that leaves the store ('..', a symlink out) or is its root.
    """
    if Path(folder).is_absolute():
        raise PluginError(f"plugin folder {folder!r} is absolute; it must be relative to the plugin store {root}")
    store = root.resolve()
    resolved = (store / folder).resolve()
    if resolved == store or not resolved.is_relative_to(store):
        raise PluginError(f"plugin folder {folder!r} is outside the plugin store {root} (it resolves to {resolved})")
    return resolved


def load_active(host: PluginHost, settings: PluginSettings, publisher: Publisher) -> PluginSet:
    """The active set in the plugin store (shared.plugin.read_active), as the service runs it at start.

    A plugin that does not load is reported (PLUGIN_FAULT), logged and left out; an unreadable active
    set runs none: the service starts either way.
    """
    root = settings.dir
    try:
        active = read_active(root).plugins
    except PluginError as exc:
        log.warning("no plugins: the active set is unreadable", extra=fields(error=str(exc)))
        publisher.report(ErrorReason.PLUGIN_FAULT, f"no plugins run: {exc}")
        return PluginSet.of([], settings)
    loaded: list[Compiled] = []
    for plugin in active:
        try:
            folder = plugin_folder(root, plugin.folder)
            if any(c.manifest.name == plugin.name for c in loaded):
                raise PluginError(f"{plugin.name} is named twice in the active set")
            loaded.append(load_plugin(host, folder, plugin.ref()))
        except Exception as exc:  # one bad plugin must not keep the service (or the other plugins) from starting
            log.warning("plugin not loaded", extra=fields(plugin=plugin.name, version=plugin.version, error=str(exc)))
            publisher.report(ErrorReason.PLUGIN_FAULT, f"{plugin.name} v{plugin.version} not loaded: {exc}",
                             plugin=plugin.ref())
    return PluginSet.of(loaded, settings)


# -- the runner: one per worker thread --------------------------------------------------------------------


class _Refused(Exception):
    """A call's outcome the host accepted but the service will not apply (a fault of kind `kind`)."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind


class PluginRunner:
    """One worker thread's instances of the plugin set; NOT thread-safe (its Instances are not).

    Args:
        plugins: the set running now (read once per batch, by next_batch()).
        publisher: sends the plugins' messages and fault reports.
        context: makes each call's host context (the frame, the served model).
    """

    def __init__(self, *, plugins: Callable[[], PluginSet], publisher: Publisher, context: ContextFactory) -> None:
        self._current, self._publisher, self._context = plugins, publisher, context
        self._set = NO_PLUGINS
        # By module (the object, which a switch carries over while its version is unchanged), not by set
        # or position: an unchanged plugin keeps its instance, and its globals, across switches.
        self._instances: dict[Compiled, Instance] = {}

    def next_batch(self) -> None:
        """Takes the set for the next batch; instances of modules it no longer runs are let go, and its
        new plugins are instantiated as they are first called."""
        current = self._current()
        if current.generation != self._set.generation:
            self._set = current
            self._instances = {p.compiled: i for p in current.plugins if (i := self._instances.get(p.compiled))}

    def apply(self, prediction: Prediction, frame: Frame, model: ServedModel) -> Prediction | None:
        """Runs each active plugin, in order, on the prediction.

        Args:
            prediction: the model's (or the scene cache's) answer for `frame`.
            frame: the frame answered (the `frame` import reads it).
            model: the model that answered (the `infer` imports run it).

        Returns:
            The prediction to publish (changed where a plugin replaced its classes), or None: a plugin
            dropped it. A faulting plugin leaves it as it came in; a disabled one is skipped.
        """
        if not self._set.plugins:
            return prediction
        context = self._context(frame, model)
        wire: bytes | None = None  # the prediction's wire JSON, made again only after a replace
        for plugin in self._set.plugins:
            if plugin.record.disabled:
                continue
            if (instance := self._instance(plugin, prediction)) is None:
                continue
            if wire is None:
                wire = encode(prediction, WireFormat.JSON)
            try:
                outcome = instance.call(wire, context)
                answer = _answer(plugin.name, outcome, prediction)
            except PluginFault as fault:
                self._fault(plugin, prediction, fault.kind, str(fault), called=True)
                continue
            except _Refused as refused:
                self._fault(plugin, prediction, refused.kind, str(refused), called=True)
                continue
            except Exception as exc:  # a host bug must never cost the frame its answer: a fault like any other
                log.exception("plugin call failed in the host", extra=fields(plugin=plugin.name))
                self._fault(plugin, prediction, "host", f"{type(exc).__name__}: {exc}", called=True)
                continue
            for emit in outcome.emits:
                self._publisher.plugin_message(plugin.name, emit.suffix, emit.payload)
            plugin.record.succeeded(dropped=answer is None, replaced=answer is not None and answer is not prediction,
                                    emitted=len(outcome.emits))
            if answer is None:
                return None
            if answer is not prediction:
                prediction, wire = answer, None
        return prediction

    def _instance(self, plugin: LoadedPlugin, prediction: Prediction) -> Instance | None:
        """This worker's instance of the plugin, made when first needed (None: it cannot be made,
        counted as a fault)."""
        if (instance := self._instances.get(plugin.compiled)) is not None:
            return instance
        try:
            instance = self._instances[plugin.compiled] = plugin.compiled.instantiate()
        except Exception as exc:  # e.g. its edgefleet_init failing this time: a fault, the frame goes on
            self._fault(plugin, prediction, "instantiate", f"{type(exc).__name__}: {exc}", called=False)
            return None
        return instance

    def _fault(self, plugin: LoadedPlugin, prediction: Prediction, kind: str, detail: str, *,
               called: bool) -> None:
        """Reports and counts a fault, discards the instance (its memory may be broken), and disables
        the plugin when this fault fills its window."""
        self._instances.pop(plugin.compiled, None)
        what = f"{kind}: {clip(detail)}"
        disabled = plugin.record.fault(what, called=called)
        ref = plugin.record.ref
        log.warning("plugin fault", extra=fields(plugin=ref.name, version=ref.version, kind=kind, detail=clip(detail),
                                                 frame_id=prediction.frame_id))
        self._publisher.report(ErrorReason.PLUGIN_FAULT, f"plugin {ref.name} v{ref.version}: {what}",
                               camera=prediction.camera, frame_id=prediction.frame_id, plugin=ref)
        if disabled:
            status = plugin.record.status()
            log.error("plugin disabled", extra=fields(plugin=ref.name, version=ref.version, faults=status.faults))
            self._publisher.report(ErrorReason.PLUGIN_DISABLED,
                                   f"plugin {ref.name} v{ref.version} disabled after {status.faults} faults; "
                                   f"the last: {what}", plugin=ref)


def _answer(name: str, outcome: CallOutcome, prediction: Prediction) -> Prediction | None:
    """What the call's result makes of the prediction: itself (keep), None (drop) or a new one (replace).

    Raises:
        _Refused: a replace that does not make a valid prediction, or a message outside the plugin's
            topic (the host checks it too; this is the last gate before the broker).
    """
    for emit in outcome.emits:
        try:
            check_emit_suffix(emit.suffix)
        except ValueError as exc:
            raise _Refused("topic", str(exc)) from None
    result = outcome.result
    if result is None or result.action == "keep":
        return prediction
    if result.action == "drop":
        return None
    try:
        # Nested models already validated are taken as they are: this checks the new fields' bounds.
        return Prediction.model_validate({**dict(prediction), "top": result.top,
                                          "changed_by": [*(prediction.changed_by or ()), name]})
    except ValidationError as exc:
        raise _Refused("result", f"the replaced prediction is not valid: {exc}") from None


# -- the switch: off the network thread --------------------------------------------------------------------


class PluginSwitcher(SwitchThread[PluginSwitch]):
    """Owns the plugin-switch thread: takes PluginSwitch requests, loads every listed plugin, installs
    the new set (workers take it at their next batch) and answers; any failure keeps the old set.

    A plugin the running set already runs at the same version (name, version and SHA-256) is carried
    over as it runs: not loaded or compiled again, its counters, fault window and disabled state kept
    (a disabled plugin stays disabled until another version of it is switched in), the workers'
    instances kept. Every folder is still checked to lie in the plugin store.

    Args:
        host: compiles the plugins.
        settings: the plugin store (folders are relative to its dir) and the fault window each new
            plugin record gets.
        install: runs a set from the next batch on.
        serving: the set running now, named in a refusal.
        reply: publishes the answer to each request.
    """

    def __init__(self, *, host: PluginHost, settings: PluginSettings, install: Callable[[PluginSet], object],
                 serving: Callable[[], PluginSet], reply: Callable[[PluginSwitched], None]) -> None:
        super().__init__("plugin-switcher")
        self._host, self._settings, self._install, self._serving, self._reply = host, settings, install, serving, reply

    def _switch(self, switch: PluginSwitch, received: float) -> None:
        started = time.monotonic()
        try:
            in_time(switch, received)
            running = self._serving()
            folders = [plugin_folder(self._settings.dir, load.folder) for load in switch.plugins]
            loaded = []
            for load, folder in zip(switch.plugins, folders, strict=True):
                if (kept := running.find(load.plugin)) is not None:
                    loaded.append(kept.compiled)
                    continue
                loaded.append(load_plugin(self._host, folder, load.plugin))
                in_time(switch, received)  # sync stops waiting at the deadline: never install after it
            new = PluginSet.of(loaded, self._settings, running)
        except Exception as exc:  # a bad plugin must never stop the service: the old set keeps running
            log.warning("plugin switch refused", extra=fields(request=switch.request_id, error=str(exc)))
            self._reply(PluginSwitched(request_id=switch.request_id, ok=False, serving=self._serving().refs(),
                                       error=str(exc)[:MAX_STR], at=time.time()))
            return
        self._install(new)
        load_ms = round((time.monotonic() - started) * 1000, 1)
        log.info("plugins switched", extra=fields(request=switch.request_id, load_ms=load_ms,
                                                  plugins=[f"{r.name} v{r.version}" for r in new.refs()]))
        self._reply(PluginSwitched(request_id=switch.request_id, ok=True, serving=new.refs(), load_ms=load_ms,
                                   at=time.time()))
