"""The plugin rollout state machine (services/sync/plugins.py) on a real plugin store on disk, with the
world (registry, inference, the fault watch) a fake: pure logic, so tested as such. The same machine
against real processes is tests/test_plugin_delivery.py."""

from __future__ import annotations

import hashlib
import os
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path

import paho.mqtt.client as paho
import pytest

from services.sync.membership import supersedes
from services.sync.plugin_canary import PluginWindow
from services.sync.plugin_io import PluginDelivery
from services.sync.plugin_store import (
    PendingPluginCanary,
    PluginStore,
    PluginStoreStateError,
    entry_of,
    with_plugin,
)
from services.sync.plugins import PluginMachine
from services.sync.rollout import StepFailed, Superseded
from shared import registry
from shared.codec import decode, encode
from shared.config import SyncSettings, load
from shared.plugin import ABI_VERSION, ActivePlugins, PluginManifest, read_active, write_active
from shared.schemas import ModelRef, PluginRollout, PluginSwitch, PluginSwitched, RolloutPhase, RolloutTarget, SyncState

# load_verified_plugin checks size, SHA-256 and ABI; compiling is inference's job, so any bytes will do.
MODULE = b"\0asm\x01\0\0\0"


def _manifest(name: str, version: int, abi: int = ABI_VERSION) -> tuple[PluginManifest, bytes]:
    wasm = MODULE + f"{name} v{version}".encode()
    manifest = PluginManifest(name=name, version=version, sha256=hashlib.sha256(wasm).hexdigest(),
                              size_bytes=len(wasm), abi=abi, created_at=time.time())
    return manifest, wasm


class FakeIo:
    """The registry holds what `publish` put there; inference answers every switch as `switch_ok` says,
    refusing a set with a plugin it cannot load (`unloadable`: all-or-nothing, as inference's switch is).
    `latest` is the newest rollout message of each plugin, as the service's is: a different one supersedes."""

    def __init__(self, store: PluginStore) -> None:
        self.store = store
        self.registry: dict[tuple[str, int], tuple[PluginManifest, bytes]] = {}
        self.reports: list[tuple[str, SyncState, str | None, ModelRef | None, str | None]] = []
        self.verdicts: list[object] = []
        self.switches: list[list[str]] = []
        self.switch_ok = True
        self.window = PluginWindow()
        self.watched: list[str | None] = []
        self.running: list[ModelRef] | None = None
        self.unloadable: set[str] = set()  # SHA-256s inference cannot load (a granted folder missing, say)
        self.refuse_after_canary = False  # inference stops answering once the canary is judged
        self.latest: dict[str, PluginRollout] = {}
        self.on_download: Callable[[], None] | None = None
        self.on_canary: Callable[[], None] | None = None

    def publish(self, name: str, version: int, abi: int = ABI_VERSION) -> PluginManifest:
        manifest, wasm = _manifest(name, version, abi)
        self.registry[(name, version)] = (manifest, wasm)
        return manifest

    def report(self, plugin, state, rollout_id, target=None, reason=None, canary=None) -> None:
        self.reports.append((plugin, state, rollout_id, target, reason))
        self.verdicts.append(canary)

    def fetch_manifest(self, rollout):
        if (rollout.plugin, rollout.version) not in self.registry:
            raise StepFailed("NoSuchKey")
        manifest, _ = self.registry[(rollout.plugin, rollout.version)]
        return manifest, registry.manifest_bytes(manifest), b"{}"

    def download(self, rollout, manifest):
        part = self.store.part_file(manifest.name, manifest.version, manifest.sha256)
        part.write_bytes(self.registry[(manifest.name, manifest.version)][1])
        if self.on_download:
            self.on_download()
        return part

    def switch(self, active: ActivePlugins) -> None:
        if not self.switch_ok:
            raise StepFailed("inference refused the plugin set: it does not compile")
        if cannot := [p for p in active.plugins if p.sha256 in self.unloadable]:
            raise StepFailed(f"inference refused the plugin set: {cannot[0].name} cannot load")
        self.switches.append([f"{p.name} v{p.version}" for p in active.plugins])
        self.running = [p.ref() for p in active.plugins]

    def watch(self, sha256):
        self.watched.append(sha256)

    def wait_for_canary(self, rollout, sha256, count, timeout_s):
        if self.on_canary:
            self.on_canary()
        if self.refuse_after_canary:
            self.switch_ok = False
        if self.superseded(rollout):  # the service's wait ends early: the window so far
            return PluginWindow(predictions=3)
        return self.window

    def inference_plugins(self):
        return self.running

    def superseded(self, rollout) -> bool:
        return supersedes(self.latest.get(rollout.plugin), rollout)

    def states(self, rollout_id: str) -> list[str]:
        return [r[1].value for r in self.reports if r[2] == rollout_id]

    def last(self, rollout_id: str):
        return next(r for r in reversed(self.reports) if r[2] == rollout_id)


@pytest.fixture
def settings(tmp_path) -> SyncSettings:
    return load(SyncSettings, None, device_id="edge-1", plugins_dir=tmp_path / "plugins", canary_window=20,
                canary_min_samples=10, canary_max_error_rate=0.05, keep_versions=2)


@pytest.fixture
def store(settings) -> PluginStore:
    return PluginStore(settings.plugins.dir, settings.keep_versions)


@pytest.fixture
def io(store) -> FakeIo:
    return FakeIo(store)


@pytest.fixture
def machine(store, settings, io) -> PluginMachine:
    return PluginMachine(store, settings, io, "edge-1")


def _rollout(plugin: str, version: int, rollout_id: str, phase=RolloutPhase.PROMOTED, **fields) -> PluginRollout:
    return PluginRollout(rollout_id=rollout_id, plugin=plugin, version=version, phase=phase, target=RolloutTarget(),
                         issued_at=0, **fields)


HEALTHY = PluginWindow(predictions=20, faults=0)
FAULTY = PluginWindow(predictions=12, faults=5, disabled=True)


def _running(store: PluginStore) -> dict[str, int]:
    return {p.name: p.version for p in read_active(store.root).plugins}


def test_a_plugin_that_passes_its_canary_is_installed_active_and_kept(machine, io, store):
    io.publish("site-labels", 1)
    io.publish("night-alert", 1)
    io.window = HEALTHY
    machine.handle(_rollout("night-alert", 1, "r-night"))
    machine.handle(_rollout("site-labels", 1, "r-labels"))
    assert io.states("r-labels") == ["received", "verified", "installed", "active", "active"]
    verdict = io.verdicts[-1]
    assert verdict.passed and verdict.samples_after == 20 and io.last("r-labels")[4].startswith("canary passed")
    # The switch carried the whole set, the other plugin unchanged, in the store's one order.
    assert io.switches[-1] == ["night-alert v1", "site-labels v1"]
    assert _running(store) == {"night-alert": 1, "site-labels": 1}
    assert store.pending_canary() is None
    folder = store.root / store.running("site-labels").folder
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json", "manifest.sig", "plugin.wasm"]
    assert not list((store.root / ".staging").iterdir())


def test_a_faulting_plugin_is_rolled_back_to_the_version_before_and_never_returns(machine, io, store):
    io.publish("site-labels", 1)
    bad = io.publish("site-labels", 2)
    io.window = HEALTHY
    machine.handle(_rollout("site-labels", 1, "r-1"))
    io.window = FAULTY
    machine.handle(_rollout("site-labels", 2, "r-2"))
    plugin, state, _, target, reason = io.last("r-2")
    assert state is SyncState.ROLLED_BACK and target.sha256 == bad.sha256
    assert "disabled" in reason and "fault rate" in reason and not io.verdicts[-1].passed
    assert _running(store) == {"site-labels": 1} and io.switches[-1] == ["site-labels v1"]
    assert store.is_rejected(bad.sha256) and store.pending_canary() is None
    # The same version again (the retained rollout after a restart, a promote): refused before download.
    switches = len(io.switches)
    machine.handle(_rollout("site-labels", 2, "r-2-again"))
    assert io.last("r-2-again")[1] is SyncState.ROLLED_BACK and "already rolled" in io.last("r-2-again")[4]
    assert len(io.switches) == switches and _running(store) == {"site-labels": 1}


def test_a_faulting_first_version_is_removed(machine, io, store):
    io.publish("hostile-trap", 1)
    io.window = FAULTY
    machine.handle(_rollout("hostile-trap", 1, "r-trap"))
    assert io.last("r-trap")[1] is SyncState.ROLLED_BACK
    assert _running(store) == {} and io.switches == [["hostile-trap v1"], []]


def test_an_inconclusive_canary_rolls_back_without_rejecting_or_holds(machine, io, store, settings):
    quiet = io.publish("site-labels", 1)
    io.window = PluginWindow(predictions=3)
    machine.handle(_rollout("site-labels", 1, "r-quiet"))
    assert io.last("r-quiet")[1] is SyncState.ROLLED_BACK and "inconclusive: 3 predictions" in io.last("r-quiet")[4]
    assert not io.verdicts[-1].conclusive and not store.is_rejected(quiet.sha256) and _running(store) == {}

    held = PluginMachine(store, settings.model_copy(update={"canary": settings.canary.model_copy(
        update={"inconclusive": "hold"})}), io, "edge-1")
    held.handle(_rollout("site-labels", 1, "r-hold"))
    assert io.last("r-hold")[1] is SyncState.ACTIVE and "holding" in io.last("r-hold")[4]
    assert not io.verdicts[-1].passed and _running(store) == {"site-labels": 1}


def test_abort_goes_back_and_an_aborted_first_version_is_removed(machine, io, store):
    io.publish("site-labels", 1)
    io.publish("site-labels", 2)
    io.window = HEALTHY
    machine.handle(_rollout("site-labels", 1, "r-1"))
    machine.handle(_rollout("site-labels", 2, "r-2"))
    machine.handle(_rollout("site-labels", 2, "r-2", RolloutPhase.ABORTED))
    assert io.last("r-2")[1] is SyncState.ROLLED_BACK and "aborted" in io.last("r-2")[4]
    assert _running(store) == {"site-labels": 1}
    machine.handle(_rollout("site-labels", 1, "r-1", RolloutPhase.ABORTED))
    assert io.last("r-1")[1] is SyncState.ROLLED_BACK and _running(store) == {}
    assert io.last("r-1")[0] == "site-labels"
    # A device that does not run the aborted version has nothing to undo.
    machine.handle(_rollout("site-labels", 7, "r-7", RolloutPhase.ABORTED))
    assert io.last("r-7")[1] is SyncState.IDLE


def test_a_downgrade_is_refused_unless_allowed_and_a_wrong_abi_always(machine, io, store):
    for version in (1, 2):
        io.publish("night-alert", version)
    io.publish("night-alert", 3, abi=ABI_VERSION + 1)
    io.window = HEALTHY
    machine.handle(_rollout("night-alert", 2, "r-2"))
    machine.handle(_rollout("night-alert", 1, "r-down"))
    assert io.last("r-down")[1] is SyncState.FAILED and "older than the v2" in io.last("r-down")[4]
    machine.handle(_rollout("night-alert", 3, "r-abi"))
    assert io.last("r-abi")[1] is SyncState.FAILED and f"ABI {ABI_VERSION + 1}" in io.last("r-abi")[4]
    assert _running(store) == {"night-alert": 2}
    machine.handle(_rollout("night-alert", 1, "r-back", allow_downgrade=True))
    assert io.last("r-back")[1] is SyncState.ACTIVE and _running(store) == {"night-alert": 1}


def test_a_switch_inference_refuses_fails_and_changes_nothing(machine, io, store):
    io.publish("night-alert", 1)
    io.switch_ok = False
    machine.handle(_rollout("night-alert", 1, "r-refused"))
    assert io.last("r-refused")[1] is SyncState.FAILED and "does not compile" in io.last("r-refused")[4]
    assert _running(store) == {} and store.pending_canary() is None


def test_not_targeted_devices_install_nothing(machine, io, store):
    io.publish("night-alert", 1)
    rollout = PluginRollout(rollout_id="r-other", plugin="night-alert", version=1, phase=RolloutPhase.PROMOTED,
                            target=RolloutTarget(devices=["edge-2"]), issued_at=0)
    machine.handle(rollout)
    assert io.states("r-other") == ["not_targeted"] and not (store.root / "night-alert").exists()


def test_a_canary_pending_at_start_is_rolled_back_and_inference_switched_to_the_store(machine, io, store):
    v1 = io.publish("site-labels", 1)
    trial = io.publish("site-labels", 2)
    io.window = HEALTHY
    machine.handle(_rollout("site-labels", 1, "r-1"))
    # What a crash inside v2's canary leaves: v2 installed, active and switched in, the pending record.
    part = io.download(None, trial)
    entry = store.install(part, registry.manifest_bytes(trial), b"{}", trial)
    store.begin_canary(PendingPluginCanary(rollout_id="r-2", name="site-labels", version=2, sha256=trial.sha256,
                                           folder=entry.folder, previous=store.running("site-labels").folder))
    store.set_active(with_plugin(store.active(), "site-labels", entry), "site-labels")
    io.running = [trial.ref()]
    machine.recover()
    plugin, state, rollout_id, target, reason = io.last("r-2")
    assert state is SyncState.ROLLED_BACK and "sync restarted during the canary" in reason
    assert target.sha256 == trial.sha256 and store.is_rejected(trial.sha256) and store.pending_canary() is None
    assert _running(store) == {"site-labels": 1} and io.running == [v1.ref()]


def test_at_start_inference_is_switched_to_the_stores_set_only_when_it_runs_another(machine, io, store):
    io.publish("night-alert", 1)
    io.window = HEALTHY
    machine.handle(_rollout("night-alert", 1, "r-1"))
    switches = len(io.switches)
    machine.recover()
    assert len(io.switches) == switches, "inference already runs the store's set"
    io.running = []
    machine.recover()
    assert io.switches[-1] == ["night-alert v1"]


def test_repair_drops_a_damaged_or_rejected_active_plugin_and_half_written_installs(store, io):
    good, bad = io.publish("night-alert", 1), io.publish("site-labels", 1)
    entries = []
    for manifest in (good, bad):
        part = io.download(None, manifest)
        entries.append(store.install(part, registry.manifest_bytes(manifest), b"{}", manifest))
    store.set_active(ActivePlugins(plugins=entries), "night-alert")
    (store.root / entries[1].folder / "plugin.wasm").write_bytes(b"\0asm damaged")
    half = store.root / "night-alert" / "2-0123456789abcdef.tmp"
    half.mkdir()
    notes = store.repair()
    assert not half.exists() and any("half-written" in n for n in notes)
    assert _running(store) == {"night-alert": 1} and any("stopped site-labels v1" in n for n in notes)
    store.reject(good.sha256)
    store.repair()
    assert _running(store) == {}


def test_old_versions_are_pruned_but_never_the_running_or_previous_one(machine, io, store):
    for version in (1, 2, 3, 4):
        io.publish("night-alert", version)
    io.window = HEALTHY
    for version in (1, 2, 3, 4):
        machine.handle(_rollout("night-alert", version, f"r-{version}"))
        time.sleep(0.01)  # distinct mtimes: pruning keeps the newest
    kept = sorted(p.name.split("-")[0] for p in (store.root / "night-alert").iterdir())
    assert kept == ["3", "4"]


def test_unsafe_names_never_become_paths(store):
    manifest, _ = _manifest("night-alert", 1)
    with pytest.raises(ValueError):
        store.version_dir("../escape", 1, manifest.sha256)
    with pytest.raises(ValueError):
        store.version_dir("active.json", 1, manifest.sha256)
    with pytest.raises(ValueError):
        store.part_file("night-alert", 1, "../../x")
    assert entry_of(manifest, "night-alert/1-x").ref() == manifest.ref()


def test_a_new_store_runs_no_plugin(tmp_path: Path):
    assert PluginStore(tmp_path / "p", 1).active() == ActivePlugins()


def test_the_watch_counts_predictions_after_the_switch_and_only_this_plugins_faults():
    from services.sync.plugin_canary import PluginWatch
    from shared.schemas import ErrorReason, ErrorReport, Prediction, Timings

    def prediction(published_at: float) -> Prediction:
        return Prediction(device="d", camera="c", frame_id="f", captured_at=None, top=[],
                          model=ModelRef(name="m", version=1, sha256="0" * 64), provider="cpu",
                          timings=Timings(queued_ms=0, preprocess_ms=0, inference_ms=1, total_ms=1, batch_size=1),
                          published_at=published_at)

    def fault(sha256: str, reason=ErrorReason.PLUGIN_FAULT) -> ErrorReport:
        return ErrorReport(device="d", service="inference", reason=reason, detail="trap", at=0,
                           plugin=ModelRef(name="p", version=1, sha256=sha256))

    watch = PluginWatch()
    watch.start("a" * 64, since=100.0)
    for at in (99.0, 100.0, 101.0):
        watch.on_prediction(prediction(at))
    watch.on_error(fault("a" * 64))
    watch.on_error(fault("b" * 64))  # another plugin's fault
    assert watch.snapshot("a" * 64) == PluginWindow(predictions=2, faults=1)
    watch.on_error(fault("a" * 64, ErrorReason.PLUGIN_DISABLED))
    assert watch.snapshot("a" * 64).disabled and watch.snapshot("b" * 64) == PluginWindow()


# -- review fixes: a plugin inference cannot load, a failed going back, the store's state, supersedes ------


def _installed_active(machine, io, *versions: tuple[str, int]) -> dict[str, PluginManifest]:
    """Rolls each (name, version) out with a passing canary; returns their manifests by name."""
    io.window = HEALTHY
    published = {}
    for name, version in versions:
        published[name] = io.publish(name, version)
        machine.handle(_rollout(name, version, f"r-{name}-{version}"))
    return published


def test_a_plugin_inference_could_not_load_is_left_out_of_every_other_switch_and_stays_in_the_store(
        machine, io, store):
    stuck = _installed_active(machine, io, ("night-alert", 1), ("site-labels", 1))["night-alert"]
    # Inference restarted on a device where night-alert's granted folder is missing: it left it out.
    io.unloadable = {stuck.sha256}
    io.running = [p.ref() for p in store.active().plugins if p.name != "night-alert"]
    switches = len(io.switches)
    machine.recover()  # reconcile: inference runs what it can of the store's set, so no switch (no refusal)
    assert len(io.switches) == switches

    io.publish("site-labels", 2)
    machine.handle(_rollout("site-labels", 2, "r-labels-2"))
    _, state, _, _, reason = io.last("r-labels-2")
    assert state is SyncState.ACTIVE and "canary passed" in reason, reason
    assert io.switches[-1] == ["site-labels v2"]
    assert "left out of the switch" in io.reports[-2][4] and "night-alert v1" in io.reports[-2][4]
    assert _running(store) == {"night-alert": 1, "site-labels": 2}, "the store keeps it: inference retries at start"

    machine.handle(_rollout("site-labels", 2, "r-labels-2", RolloutPhase.ABORTED))
    _, state, _, _, reason = io.last("r-labels-2")
    assert state is SyncState.ROLLED_BACK and "aborted" in reason and "night-alert v1" in reason, reason
    assert io.switches[-1] == ["site-labels v1"] and _running(store) == {"night-alert": 1, "site-labels": 1}

    # The plugin this rollout is about is always sent, even though inference runs no version of it.
    io.unloadable = set()
    io.publish("night-alert", 2)
    machine.handle(_rollout("night-alert", 2, "r-night-2"))
    assert io.last("r-night-2")[1] is SyncState.ACTIVE and io.switches[-1] == ["night-alert v2", "site-labels v1"]


def test_with_inference_status_unknown_the_stores_whole_set_is_sent(machine, io, store):
    _installed_active(machine, io, ("night-alert", 1))
    io.running = None  # inference offline: what it runs is not known
    io.publish("site-labels", 1)
    machine.handle(_rollout("site-labels", 1, "r-labels"))
    assert io.switches[-1] == ["night-alert v1", "site-labels v1"]
    assert "left out" not in (io.reports[-2][4] or "")


def test_a_failed_going_back_leaves_the_store_gone_back_and_reconcile_brings_inference_to_it(
        machine, io, store):
    v1 = _installed_active(machine, io, ("site-labels", 1))["site-labels"]
    bad = io.publish("site-labels", 2)
    io.window = FAULTY
    io.refuse_after_canary = True  # the switch back fails
    machine.handle(_rollout("site-labels", 2, "r-2"))
    _, state, _, target, reason = io.last("r-2")
    assert state is SyncState.FAILED and target.sha256 == bad.sha256
    assert "canary failed" in reason and "going back to v1 failed too" in reason and "does not compile" in reason
    # Fail closed: the store (what inference loads at its next start) has gone back, the rejection is kept.
    assert _running(store) == {"site-labels": 1} and store.is_rejected(bad.sha256)
    assert store.pending_canary() is None and io.running == [bad.ref()]

    # Before the next rollout of any plugin, inference is brought to the store's set first.
    io.switch_ok = True
    io.publish("night-alert", 1)
    io.window = HEALTHY
    machine.handle(_rollout("night-alert", 1, "r-night"))
    assert io.switches[-2:] == [["site-labels v1"], ["night-alert v1", "site-labels v1"]]
    assert io.last("r-night")[1] is SyncState.ACTIVE and _running(store) == {"night-alert": 1, "site-labels": 1}
    assert {r.sha256 for r in io.running} >= {v1.sha256}


def test_a_failed_going_back_is_reconciled_at_the_next_start(machine, io, store):
    _installed_active(machine, io, ("night-alert", 1))
    io.publish("night-alert", 2)
    io.window = HEALTHY
    machine.handle(_rollout("night-alert", 2, "r-2"))
    io.switch_ok = False
    machine.handle(_rollout("night-alert", 2, "r-2", RolloutPhase.ABORTED))
    assert io.last("r-2")[1] is SyncState.FAILED and "aborted" in io.last("r-2")[4]
    assert _running(store) == {"night-alert": 1} and [r.version for r in io.running] == [2]
    io.switch_ok = True
    machine.recover()
    assert io.switches[-1] == ["night-alert v1"] and [r.version for r in io.running] == [1]


def test_a_canary_left_pending_is_rolled_back_before_the_next_rollout_never_overwritten(machine, io, store):
    _installed_active(machine, io, ("site-labels", 1))
    trial = io.publish("site-labels", 2)
    # An earlier rollout that ended without a verdict (a bug, an interrupted worker): v2 switched in, pending.
    entry = store.install(io.download(None, trial), registry.manifest_bytes(trial), b"{}", trial)
    store.begin_canary(PendingPluginCanary(rollout_id="r-2", name="site-labels", version=2, sha256=trial.sha256,
                                           folder=entry.folder, previous=store.running("site-labels").folder))
    store.set_active(with_plugin(store.active(), "site-labels", entry), "site-labels")
    io.running = [trial.ref()]
    with pytest.raises(ValueError, match="still pending"):
        store.begin_canary(PendingPluginCanary(rollout_id="r-x", name="night-alert", version=1, sha256="a" * 64,
                                               folder="night-alert/1-x", previous=None))

    io.publish("night-alert", 1)
    machine.handle(_rollout("night-alert", 1, "r-night"))
    _, state, _, target, reason = io.last("r-2")
    assert state is SyncState.ROLLED_BACK and target.sha256 == trial.sha256 and "without a verdict" in reason
    assert store.is_rejected(trial.sha256) and store.pending_canary() is None
    assert io.last("r-night")[1] is SyncState.ACTIVE
    assert _running(store) == {"night-alert": 1, "site-labels": 1}
    assert io.switches[-1] == ["night-alert v1", "site-labels v1"]


@pytest.mark.parametrize("damage", [b"{not json", b'{"rejected": "not a list"}'])
def test_an_unreadable_store_state_refuses_plugin_rollouts_and_is_never_reset(machine, io, store, damage, caplog):
    rejected = io.publish("site-labels", 1)
    io.window = FAULTY
    machine.handle(_rollout("site-labels", 1, "r-bad"))
    assert store.is_rejected(rejected.sha256)
    state_file = store.root / ".sync-state.json"
    state_file.write_bytes(damage)

    notes = store.repair()  # at start: said so, the active set kept, the file left for the operator
    assert any("unreadable or invalid" in n for n in notes)
    with pytest.raises(PluginStoreStateError):
        machine.recover()
    io.window = HEALTHY
    switches = len(io.switches)
    for rollout in (_rollout("site-labels", 1, "r-again"), _rollout("night-alert", 1, "r-night"),
                    _rollout("site-labels", 1, "r-bad", RolloutPhase.ABORTED)):
        io.publish(rollout.plugin, rollout.version)
        machine.handle(rollout)
        _, state, _, _, reason = io.last(rollout.rollout_id)
        assert state is SyncState.FAILED and "plugin rollouts are refused until an operator repairs" in reason
    assert len(io.switches) == switches and _running(store) == {}
    assert state_file.read_bytes() == damage, "never silently reset"
    assert any(r.levelname == "ERROR" and "unreadable" in r.getMessage() for r in caplog.records)
    # Repaired by the operator (here: the rejection written back by hand), rollouts go on.
    state_file.write_text(f'{{"rejected": ["{rejected.sha256}"]}}')
    machine.handle(_rollout("site-labels", 1, "r-after"))
    assert io.last("r-after")[1] is SyncState.ROLLED_BACK and "already rolled" in io.last("r-after")[4]


def test_a_rollout_superseded_by_a_newer_one_of_the_same_plugin_while_downloading_installs_nothing(
        machine, io, store):
    io.publish("site-labels", 1)
    io.publish("site-labels", 2)
    first, newer = _rollout("site-labels", 1, "r-1"), _rollout("site-labels", 2, "r-2")
    io.latest["site-labels"] = first
    io.on_download = lambda: io.latest.update({"site-labels": newer})
    with pytest.raises(Superseded):
        machine.handle(first)
    assert io.states("r-1") == ["received", "verified"] and io.switches == [] and _running(store) == {}
    assert store.pending_canary() is None and not (store.root / "site-labels").exists()
    io.on_download = None
    io.window = HEALTHY
    machine.handle(newer)
    assert io.last("r-2")[1] is SyncState.ACTIVE and _running(store) == {"site-labels": 2}


def test_a_rollout_superseded_during_its_canary_goes_back_and_the_newer_one_runs(machine, io, store):
    _installed_active(machine, io, ("site-labels", 1))
    io.publish("site-labels", 2)
    io.publish("site-labels", 3)
    second, third = _rollout("site-labels", 2, "r-2"), _rollout("site-labels", 3, "r-3")
    io.latest["site-labels"] = second
    io.on_canary = lambda: io.latest.update({"site-labels": third})
    machine.handle(second)  # the canary's wait ends with 3 predictions: no verdict, so v2 is not kept
    _, state, _, _, reason = io.last("r-2")
    assert state is SyncState.ROLLED_BACK and "inconclusive: 3 predictions" in reason
    assert _running(store) == {"site-labels": 1} and store.pending_canary() is None
    io.on_canary = None
    machine.handle(third)
    assert io.last("r-3")[1] is SyncState.ACTIVE and _running(store) == {"site-labels": 3}


def test_the_active_set_is_written_readable_by_all_whatever_the_umask(tmp_path):
    old = os.umask(0o077)
    try:
        write_active(tmp_path / "plugins", ActivePlugins())
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "plugins" / "active.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "plugins").stat().st_mode) == 0o755
    assert read_active(tmp_path / "plugins") == ActivePlugins()


class _Service:
    """What PluginDelivery uses of the sync service for a switch; inference's answers come as MQTT messages
    through PluginDelivery.on_switched, as paho's thread delivers them."""

    def __init__(self, settings: SyncSettings) -> None:
        self.settings = settings
        self.changed = threading.Condition()
        self.stopping = False
        self.requests: list[PluginSwitch] = []
        self.delivery: PluginDelivery | None = None

    def error(self, reason, detail) -> None:
        raise AssertionError(detail)

    def ask_inference(self, topic, request_id, request, answers, progress):
        switch = decode(PluginSwitch, request)
        self.requests.append(switch)
        late = PluginSwitched(request_id="an-earlier-request", ok=False, serving=[], error="late", at=time.time())
        self.delivery.on_switched(_message(late))
        self.delivery.on_switched(_message(PluginSwitched(request_id=request_id, ok=True, at=time.time(),
                                                          serving=[p.plugin for p in switch.plugins])))
        with self.changed:
            return answers.pop(request_id, None)


def _message(answer: PluginSwitched) -> paho.MQTTMessage:
    message = paho.MQTTMessage(topic=b"edgefleet/edge-1/plugins/_switched")
    message.payload = encode(answer)
    return message


def test_switches_name_folders_relative_to_the_store_and_answers_nobody_waits_for_are_dropped(settings, io, store):
    service = _Service(settings)
    delivery = service.delivery = PluginDelivery(service)
    manifest = io.publish("night-alert", 1)
    entry = store.install(io.download(None, manifest), registry.manifest_bytes(manifest), b"{}", manifest)
    delivery.switch(ActivePlugins(plugins=[entry]))
    load = service.requests[-1].plugins[0]
    assert load.folder == entry.folder and not Path(load.folder).is_absolute()
    assert load.folder == f"night-alert/1-{manifest.sha256[:16]}" and load.plugin == manifest.ref()
    assert delivery._answers == {}, "the late answer to an earlier request is not kept"
    delivery.on_switched(_message(PluginSwitched(request_id="x", ok=True, serving=[], at=time.time())))
    assert delivery._answers == {}
