"""The plugin rollout state machine, top to bottom: what sync does with one plugin rollout message, what
it persists before the step a crash could interrupt, and what a restart does with what it finds. It is
the model machine's (rollout.py) twin for WebAssembly plugins (docs/plugins.md); plugins roll out
beside the model, one plugin at a time, and a plugin's switch leaves every other plugin as it runs.

    received ── not a member ───────────────────────────────────────────────────→ not_targeted
       │ manifest.json + manifest.sig (size-capped, signature by a trusted key, the rollout's name
       │ and version, our ABI) ── refused, or older without allow_downgrade ────→ failed
       │                       ── rejected here before ────────────────────────→ rolled_back
    downloading (ranged GETs into a resumable .part) → verified (size, SHA-256)
    installed (atomic: <name>/<version>-<sha16>/ in one rename)
       │ PERSIST "canary pending: sha X (folder), previous Y or none"   ← from here a crash rolls back
       │ inference told to run the new set (this plugin replaced, the others unchanged), with a
       │ deadline ── refused/late ──────────────────────────────────────────────→ failed
    active (active.json names it) → canary, up to canary_timeout_s, for canary_window predictions
       ├ passed (≥ min_samples predictions, fault rate ≤ max_error_rate, not disabled) → active, kept
       ├ failed ─────────────→ rolled_back: the version before (or none), the plugin rejected for ever
       └ inconclusive (too few predictions) ──→ rolled_back, or held (active, reported not passed)
    each verdict clears the pending record

    aborted: a device running the aborted version goes back to the version before it (or, for the
    plugin's first version, to none: the plugin is removed); any other device has nothing to undo.

At start, recover(): a pending canary means sync died inside it. No verdict, no keep: the plugin on trial
is rejected, the version before it (or none) goes back into the active set, and the rollout is reported
rolled_back "sync restarted during the canary". Then the store's active set is the one truth: if
inference's retained status names another set of plugins, inference is switched to the store's.

Every outcome is a SyncReport on the plugin's own sync-state topic: target is the plugin version the
rollout asks for, serving the version of that plugin this device runs (None: it runs none).
All I/O (MQTT, S3, the fault watch) sits behind `PluginIo`, passed in; the store is the on-disk truth.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Protocol

from services.sync import plugin_canary
from services.sync.membership import is_member, requested
from services.sync.plugin_store import PendingPluginCanary, PluginStore, with_plugin
from services.sync.rollout import RESTARTED_IN_CANARY, Rejected, StepFailed, Superseded
from shared.config import SyncSettings
from shared.logs import fields
from shared.plugin import ABI_VERSION, ActivePlugin, ActivePlugins, PluginError, PluginManifest
from shared.schemas import CanaryVerdict, ModelRef, PluginRollout, RolloutPhase, SyncState

log = logging.getLogger(__name__)


class PluginIo(Protocol):
    """What the plugin machine needs from the outside world; the sync service provides it."""

    def report(self, plugin: str, state: SyncState, rollout_id: str | None, target: ModelRef | None = None,
               reason: str | None = None, canary: CanaryVerdict | None = None) -> None:
        """Publishes the device's state in one plugin's rollout (retained)."""

    def fetch_manifest(self, rollout: PluginRollout) -> tuple[PluginManifest, bytes, bytes]:
        """The manifest, signed by a trusted key and naming the rollout's plugin and version; its bytes
        and its signature. Raises StepFailed, Superseded."""

    def download(self, rollout: PluginRollout, manifest: PluginManifest) -> Path:
        """The verified module (size and SHA-256 as the manifest says) in a staging file. Raises
        StepFailed, Superseded."""

    def switch(self, active: ActivePlugins) -> None:
        """Has inference run exactly this set, within the switch deadline. Raises StepFailed."""

    def watch(self, sha256: str | None) -> None:
        """Starts counting predictions and faults for the plugin `sha256` from now (None: stops)."""

    def wait_for_canary(self, rollout: PluginRollout, sha256: str, count: int,
                        timeout_s: float) -> plugin_canary.PluginWindow:
        """The plugin's window once it holds `count` predictions, the plugin is disabled, the timeout
        passes or `rollout` is superseded (whichever comes first). Raises Superseded on shutdown."""

    def inference_plugins(self) -> list[ModelRef] | None:
        """The plugins inference's retained status names, or None if it is not online."""

    def superseded(self, rollout: PluginRollout) -> bool:
        """Whether shutdown or a newer rollout message for this plugin ends this one."""






class PluginMachine:
    def __init__(self, store: PluginStore, settings: SyncSettings, io: PluginIo, device_id: str) -> None:
        self.store, self.settings, self.io, self.device = store, settings, io, device_id

    # -- at start ----------------------------------------------------------------------------------

    def recover(self) -> None:
        """Undoes a plugin canary a crash interrupted, then makes inference run the store's active set."""
        pending = self.store.pending_canary()
        if pending is not None:
            self._undo_pending(pending)
        problem = self._reconcile()
        if pending is not None:
            trial = ModelRef(name=pending.name, version=pending.version, sha256=pending.sha256)
            if problem:
                self.io.report(pending.name, SyncState.FAILED, pending.rollout_id, target=trial,
                               reason=f"{RESTARTED_IN_CANARY}; going back failed: {problem}")
            else:
                self.io.report(pending.name, SyncState.ROLLED_BACK, pending.rollout_id, target=trial,
                               reason=f"{RESTARTED_IN_CANARY}: no verdict, so the plugin is not kept")

    def _undo_pending(self, pending: PendingPluginCanary) -> None:
        self.store.reject(pending.sha256)
        back = self.store.verified(pending.previous)
        self.store.set_active(with_plugin(self.store.active(), pending.name, back), pending.name,
                              remember_previous=False)
        self.store.end_canary()
        log.warning("a plugin canary was pending at start: rolled back",
                    extra=fields(rollout=pending.rollout_id, plugin=pending.name, sha256=pending.sha256[:16],
                                 to=back.folder if back else "none"))

    def _reconcile(self) -> str | None:
        """Switches inference to the store's active set if its status names another; the problem, if any."""
        active = self.store.active()
        running = self.io.inference_plugins()
        if running is None or {r.sha256 for r in running} == {p.sha256 for p in active.plugins}:
            return None
        log.warning("inference runs other plugins than the store's active set: switching it",
                    extra=fields(running=_names(running), active=_names([p.ref() for p in active.plugins])))
        try:
            self.io.switch(active)
        except StepFailed as exc:
            log.warning("switching inference to the store's plugins failed", extra=fields(error=str(exc)))
            return str(exc)
        return None

    # -- one rollout message -----------------------------------------------------------------------

    def handle(self, rollout: PluginRollout) -> None:
        """Takes one plugin rollout message as far as it goes; every outcome is reported. Raises Superseded."""
        running = self.store.running(rollout.plugin)
        if rollout.phase is RolloutPhase.ABORTED:
            self._abort(rollout, running)
            return
        if not is_member(rollout, self.device, self.settings.groups):
            self._report(SyncState.NOT_TARGETED, rollout)
            return
        if running is not None and running.version == rollout.version:
            self._report(SyncState.ACTIVE, rollout, target=running.ref(), reason="already running it")
            return
        self._report(SyncState.RECEIVED, rollout)
        try:
            manifest, entry = self._install(rollout, running)
            self._switch_to(rollout, entry, running)
        except Rejected as exc:
            self._report(SyncState.ROLLED_BACK, rollout, target=exc.args[1], reason=exc.args[0])
            return
        except StepFailed as exc:
            log.warning("plugin rollout step failed", extra=fields(rollout=rollout.rollout_id, reason=str(exc)))
            self._report(SyncState.FAILED, rollout, reason=str(exc))
            return
        self._judge(rollout, manifest)

    def _abort(self, rollout: PluginRollout, running: ActivePlugin | None) -> None:
        if running is not None and running.version == rollout.version:
            self._go_back(rollout, running.ref(), "the operator aborted the rollout", None, reject=False)
        else:
            self._report(SyncState.IDLE, rollout, reason="rollout aborted; this device did not run it")

    def _install(self, rollout: PluginRollout, running: ActivePlugin | None) -> tuple[PluginManifest, ActivePlugin]:
        manifest, document, signature = self.io.fetch_manifest(rollout)
        self._admit(rollout, manifest, running)
        part = self.io.download(rollout, manifest)
        self._report(SyncState.VERIFIED, rollout, target=manifest.ref())
        self._check(rollout)
        try:
            entry = self.store.install(part, document, signature, manifest)
        except PluginError as exc:
            raise StepFailed(f"the downloaded plugin does not verify as a whole: {exc}") from None
        self._report(SyncState.INSTALLED, rollout, target=manifest.ref())
        self._check(rollout)
        return manifest, entry

    def _admit(self, rollout: PluginRollout, manifest: PluginManifest, running: ActivePlugin | None) -> None:
        if self.store.is_rejected(manifest.sha256):
            raise Rejected("a canary on this device already rolled this plugin back", manifest.ref())
        if manifest.abi != ABI_VERSION:
            raise StepFailed(f"{manifest.name} v{manifest.version} speaks plugin ABI {manifest.abi}; "
                             f"this device speaks {ABI_VERSION}")
        if running is not None and manifest.version < running.version and not rollout.allow_downgrade:
            raise StepFailed(f"v{manifest.version} is older than the v{running.version} running "
                             "(an explicit rollback must allow the downgrade)")

    def _switch_to(self, rollout: PluginRollout, entry: ActivePlugin, running: ActivePlugin | None) -> None:
        self.store.begin_canary(PendingPluginCanary(
            rollout_id=rollout.rollout_id, name=entry.name, version=entry.version, sha256=entry.sha256,
            folder=entry.folder, previous=running.folder if running else None,
        ))
        active = with_plugin(self.store.active(), entry.name, entry)
        try:
            self.io.switch(active)
        except StepFailed:
            self.store.end_canary()  # inference refused it or gave up on it: it runs the set it ran
            raise
        self.io.watch(entry.sha256)
        self.store.set_active(active, entry.name)
        c = self.settings.canary
        self._report(SyncState.ACTIVE, rollout, target=entry.ref(),
                     reason=f"canary: counting faults over {c.window} predictions (at least {c.min_samples})")

    def _judge(self, rollout: PluginRollout, manifest: PluginManifest) -> None:
        c = self.settings.canary
        window = self.io.wait_for_canary(rollout, manifest.sha256, c.window, c.timeout_s)
        self.io.watch(None)
        verdict = plugin_canary.judge(window, c)
        if verdict.passed:
            self.store.end_canary()
            self.store.prune(manifest.name)
            self._report(SyncState.ACTIVE, rollout, target=manifest.ref(), canary=verdict,
                         reason=f"canary passed on {verdict.samples_after} predictions")
        elif not verdict.conclusive and c.inconclusive == "hold":
            self.store.end_canary()
            self._report(SyncState.ACTIVE, rollout, target=manifest.ref(), canary=verdict,
                         reason=f"canary {verdict.reasons[0]}; holding the new plugin (canary_inconclusive=hold), "
                         "not passed")
        elif not verdict.conclusive:
            self._go_back(rollout, manifest.ref(), "canary " + "; ".join(verdict.reasons), verdict, reject=False)
        else:
            self._go_back(rollout, manifest.ref(), "canary failed: " + "; ".join(verdict.reasons), verdict,
                          reject=True)

    def _go_back(self, rollout: PluginRollout, leaving: ModelRef, why: str, verdict: CanaryVerdict | None,
                 reject: bool) -> None:
        if reject:  # before the switch back: whatever happens next, this plugin is never chosen again
            self.store.reject(leaving.sha256)
        back = self.store.previous(rollout.plugin)
        active = with_plugin(self.store.active(), rollout.plugin, back)
        try:
            self.io.switch(active)
        except StepFailed as exc:
            self._report(SyncState.FAILED, rollout, target=leaving, canary=verdict,
                         reason=f"{why}; going back to {_version(back)} failed too: {exc}")
            return
        # The version gone back to has no known predecessor: an abort of it later removes the plugin.
        self.store.set_active(active, rollout.plugin, remember_previous=False)
        self.store.end_canary()
        log.warning("plugin rolled back", extra=fields(rollout=rollout.rollout_id, plugin=rollout.plugin,
                                                       reason=why, to=_version(back)))
        self._report(SyncState.ROLLED_BACK, rollout, target=leaving, canary=verdict, reason=why)

    # -- helpers -----------------------------------------------------------------------------------

    def _check(self, rollout: PluginRollout) -> None:
        if self.io.superseded(rollout):
            raise Superseded()

    def _report(self, state: SyncState, rollout: PluginRollout, target: ModelRef | None = None,
                reason: str | None = None, canary: CanaryVerdict | None = None) -> None:
        self.io.report(rollout.plugin, state, rollout.rollout_id, target=target or requested(rollout), reason=reason,
                       canary=canary)


def _version(entry: ActivePlugin | None) -> str:
    return f"v{entry.version}" if entry else "none (the plugin removed)"


def _names(refs: list[ModelRef]) -> str:
    return ", ".join(f"{r.name} v{r.version}" for r in refs) or "none"
