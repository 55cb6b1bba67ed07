"""The plugin rollout state machine (services/sync/plugins.py) on a real plugin store on disk, with the
world (registry, inference, the fault watch) a fake: pure logic, so tested as such. The same machine
against real processes is tests/test_plugin_delivery.py."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pytest

from services.sync.plugin_canary import PluginWindow
from services.sync.plugin_store import PendingPluginCanary, PluginStore, entry_of, with_plugin
from services.sync.plugins import PluginMachine
from services.sync.rollout import StepFailed
from shared import registry
from shared.config import SyncSettings, load
from shared.plugin import ABI_VERSION, ActivePlugins, PluginManifest, read_active
from shared.schemas import ModelRef, PluginRollout, RolloutPhase, RolloutTarget, SyncState

# load_verified_plugin checks size, SHA-256 and ABI; compiling is inference's job, so any bytes will do.
MODULE = b"\0asm\x01\0\0\0"


def _manifest(name: str, version: int, abi: int = ABI_VERSION) -> tuple[PluginManifest, bytes]:
    wasm = MODULE + f"{name} v{version}".encode()
    manifest = PluginManifest(name=name, version=version, sha256=hashlib.sha256(wasm).hexdigest(),
                              size_bytes=len(wasm), abi=abi, created_at=time.time())
    return manifest, wasm


class FakeIo:
    """The registry holds what `publish` put there; inference answers every switch as `switch_ok` says."""

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
        return part

    def switch(self, active: ActivePlugins) -> None:
        if not self.switch_ok:
            raise StepFailed("inference refused the plugin set: it does not compile")
        self.switches.append([f"{p.name} v{p.version}" for p in active.plugins])
        self.running = [p.ref() for p in active.plugins]

    def watch(self, sha256):
        self.watched.append(sha256)

    def wait_for_canary(self, rollout, sha256, count, timeout_s):
        return self.window

    def inference_plugins(self):
        return self.running

    def superseded(self, rollout) -> bool:
        return False

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
