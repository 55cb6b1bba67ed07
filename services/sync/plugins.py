"""The plugin rollout state machine, top to bottom: what sync does with one plugin rollout message, what
it persists before the step a crash could interrupt, and what a restart does with what it finds. It is
the model machine's (rollout.py) twin for WebAssembly plugins (docs/plugins.md); plugins roll out
beside the model, one plugin at a time, and a plugin's switch leaves every other plugin as it runs.

    received ── not a member ───────────────────────────────────────────────────→ not_targeted
       │ paced (rollout.pacing): waits what is left of its turn first (rollout.wait_turn), as a model's does
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

    going back: the store first (the rejection, then the active set with the version before, then the
    pending record cleared), then inference is switched. The store is the truth inference loads at its
    next start: if that switch fails the rollout is reported failed with both reasons, and reconcile
    (below) switches inference to the store's set at sync's next start or before the next rollout.

    aborted: a device running the aborted version goes back to the version before it (or, for the
    plugin's first version, to none: the plugin is removed); any other device has nothing to undo.

At start, recover(): a pending canary means sync died inside it. No verdict, no keep: the plugin on trial
is rejected, the version before it (or none) goes back into the active set, and the rollout is reported
rolled_back "sync restarted during the canary". Then the store's active set is the one truth: if
inference's retained status names another set of plugins, inference is switched to the store's
(reconcile). Every rollout message does the same first: a pending record it did not write (an earlier
rollout that ended without a verdict) is rolled back, never overwritten.

The set a switch sends: inference's switch is all-or-nothing, and inference leaves out at its start a
plugin it cannot load (a granted folder missing on this device, say). So a switch sends the store's set
less the plugins inference's status shows it runs no version of, except the plugin the switch is about;
the report names what was left out. Those stay in the store's set (inference tries them again at its
next start). Inference's status unknown: the store's whole set.

An unreadable .sync-state.json (plugin_store.PluginStoreStateError) refuses every plugin rollout,
reported failed, until an operator repairs it: the rejections and a pending canary are never forgotten.

Every outcome is a SyncReport on the plugin's own sync-state topic: target is the plugin version the
rollout asks for, serving the version of that plugin this device runs (None: it runs none).
All I/O (MQTT, S3, the fault watch) sits behind `PluginIo`, passed in; the store is the on-disk truth.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from services.sync import plugin_canary
from services.sync.membership import is_member, requested
from services.sync.plugin_store import PendingPluginCanary, PluginStore, PluginStoreStateError, with_plugin
from services.sync.rollout import RESTARTED_IN_CANARY, Rejected, StepFailed, Superseded, wait_turn
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
        """The plugins inference's retained status names (the ones it runs, disabled ones included), or
        None if it is not online."""

    def superseded(self, rollout: PluginRollout) -> bool:
        """Whether shutdown or a newer rollout message for this plugin ends this one."""

    def pause(self, rollout: PluginRollout, seconds: float) -> None:
        """Waits `seconds` (a paced rollout's turn: membership.start_delay) before the manifest is fetched.

        :raises Superseded: a newer rollout of this plugin or shutdown, before or during the wait.
        """






@dataclass(frozen=True)
class SwitchSet:
    """What one switch sends inference: the store's set less `left_out`, the plugins inference runs no
    version of (it could not load them), which stay in the store's set."""

    sent: ActivePlugins
    left_out: tuple[ActivePlugin, ...] = ()

    def note(self) -> str:
        """The words a report adds about what was left out ('' when nothing was)."""
        if not self.left_out:
            return ""
        return ("; left out of the switch, as inference does not run them (it could not load them): "
                + _names([p.ref() for p in self.left_out]))


class PluginMachine:
    """The plugin rollout state machine (this module's docstring) for one device.

    :param store: the plugin store, the on-disk truth; this machine is its one writer.
    :param settings: the sync settings (canary limits, groups).
    :param io: everything else: registry, inference, the fault watch, reports.
    :param device_id: this device, for rollout membership.
    """

    def __init__(self, store: PluginStore, settings: SyncSettings, io: PluginIo, device_id: str) -> None:
        self.store, self.settings, self.io, self.device = store, settings, io, device_id

    # -- at start ----------------------------------------------------------------------------------

    def recover(self) -> None:
        """Undoes a plugin canary a crash interrupted, then makes inference run the store's active set.

        :raises PluginStoreStateError: the store's state is unreadable: nothing is changed.
        """
        self._settle(RESTARTED_IN_CANARY)

    def _settle(self, why: str) -> None:
        """Rolls back a canary left pending (`why` says how it was left), then reconciles inference."""
        pending = self.store.pending_canary()
        if pending is not None:
            self._undo_pending(pending)
        problem, note = self._reconcile(about=pending.name if pending else None)
        if pending is None:
            return
        trial = ModelRef(name=pending.name, version=pending.version, sha256=pending.sha256)
        if problem:
            self.io.report(pending.name, SyncState.FAILED, pending.rollout_id, target=trial,
                           reason=f"{why}; going back failed: {problem}{note}")
        else:
            self.io.report(pending.name, SyncState.ROLLED_BACK, pending.rollout_id, target=trial,
                           reason=f"{why}: no verdict, so the plugin is not kept{note}")

    def _undo_pending(self, pending: PendingPluginCanary) -> None:
        self.store.reject(pending.sha256)
        back = self.store.verified(pending.previous)
        self.store.set_active(with_plugin(self.store.active(), pending.name, back), pending.name,
                              remember_previous=False)
        self.store.end_canary()
        log.warning("a plugin canary was pending: rolled back",
                    extra=fields(rollout=pending.rollout_id, plugin=pending.name, sha256=pending.sha256[:16],
                                 to=back.folder if back else "none"))

    def _reconcile(self, about: str | None = None) -> tuple[str | None, str]:
        """Switches inference to the store's active set (as _switch_set sends it) if it runs another.

        :returns: the problem, if the switch failed, and the words about what was left out.
        """
        running = self.io.inference_plugins()
        if running is None:
            return None, ""
        switch = _switch_set(self.store.active(), running, about)
        if {r.sha256 for r in running} == {p.sha256 for p in switch.sent.plugins}:
            return None, switch.note()
        log.warning("inference runs other plugins than the store's active set: switching it",
                    extra=fields(running=_names(running), active=_names([p.ref() for p in switch.sent.plugins]),
                                 left_out=_names([p.ref() for p in switch.left_out])))
        try:
            self.io.switch(switch.sent)
        except StepFailed as exc:
            log.warning("switching inference to the store's plugins failed", extra=fields(error=str(exc)))
            return str(exc), switch.note()
        return None, switch.note()

    # -- one rollout message -----------------------------------------------------------------------

    def handle(self, rollout: PluginRollout) -> None:
        """Takes one plugin rollout message as far as it goes; every outcome is reported.

        A canary an earlier rollout left pending is rolled back first, and inference brought to the
        store's set; with the store's state unreadable the rollout is refused (reported failed).

        :raises Superseded: a newer rollout of this plugin, or shutdown, ends this one.
        """
        if rollout.phase is not RolloutPhase.ABORTED and not is_member(rollout, self.device, self.settings.groups):
            self._report(SyncState.NOT_TARGETED, rollout)
            return
        try:
            self._settle(f"an earlier canary ended without a verdict (found before rollout {rollout.rollout_id})")
            self._handle(rollout)
        except PluginStoreStateError as exc:
            log.error("plugin rollout refused: the plugin store's state is unreadable",
                      extra=fields(rollout=rollout.rollout_id, plugin=rollout.plugin, error=str(exc)))
            self._report(SyncState.FAILED, rollout, reason=str(exc))

    def _handle(self, rollout: PluginRollout) -> None:
        running = self.store.running(rollout.plugin)
        if rollout.phase is RolloutPhase.ABORTED:
            self._abort(rollout, running)
            return
        if running is not None and running.version == rollout.version:
            self._report(SyncState.ACTIVE, rollout, target=running.ref(), reason="already running it")
            return
        wait_turn(rollout, self.device, lambda reason: self._report(SyncState.RECEIVED, rollout, reason=reason),
                  lambda seconds: self.io.pause(rollout, seconds))
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
        active = with_plugin(self.store.active(), entry.name, entry)
        switch = self._switch_set(active, entry.name)
        self.store.begin_canary(PendingPluginCanary(
            rollout_id=rollout.rollout_id, name=entry.name, version=entry.version, sha256=entry.sha256,
            folder=entry.folder, previous=running.folder if running else None,
        ))
        try:
            self.io.switch(switch.sent)
        except StepFailed as exc:
            self.store.end_canary()  # inference refused it or gave up on it: it runs the set it ran
            raise StepFailed(f"{exc}{switch.note()}") from None
        self.io.watch(entry.sha256)
        self.store.set_active(active, entry.name)
        c = self.settings.canary
        self._report(SyncState.ACTIVE, rollout, target=entry.ref(),
                     reason=f"canary: counting faults over {c.window} predictions (at least {c.min_samples})"
                     + switch.note())

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
        # The store first (fail closed): whatever happens to the switch, this plugin is never chosen again
        # (reject), the store names the version gone back to, and inference loads that at its next start.
        if reject:
            self.store.reject(leaving.sha256)
        back = self.store.previous(rollout.plugin)
        active = with_plugin(self.store.active(), rollout.plugin, back)
        # The version gone back to has no known predecessor: an abort of it later removes the plugin.
        self.store.set_active(active, rollout.plugin, remember_previous=False)
        self.store.end_canary()  # the verdict is in the store; only inference has to follow it
        switch = self._switch_set(active, rollout.plugin)
        try:
            self.io.switch(switch.sent)
        except StepFailed as exc:
            log.warning("going back failed: inference runs another plugin set than the store's until reconciled",
                        extra=fields(rollout=rollout.rollout_id, plugin=rollout.plugin, reason=why, error=str(exc)))
            self._report(SyncState.FAILED, rollout, target=leaving, canary=verdict,
                         reason=f"{why}; going back to {_version(back)} failed too: {exc} (the store has gone "
                         "back: inference is switched to it at sync's next start or before the next plugin "
                         f"rollout){switch.note()}")
            return
        log.warning("plugin rolled back", extra=fields(rollout=rollout.rollout_id, plugin=rollout.plugin,
                                                       reason=why, to=_version(back)))
        self._report(SyncState.ROLLED_BACK, rollout, target=leaving, canary=verdict, reason=why + switch.note())

    def _switch_set(self, active: ActivePlugins, about: str) -> SwitchSet:
        running = self.io.inference_plugins()
        return SwitchSet(active) if running is None else _switch_set(active, running, about)

    # -- helpers -----------------------------------------------------------------------------------

    def _check(self, rollout: PluginRollout) -> None:
        if self.io.superseded(rollout):
            raise Superseded()

    def _report(self, state: SyncState, rollout: PluginRollout, target: ModelRef | None = None,
                reason: str | None = None, canary: CanaryVerdict | None = None) -> None:
        self.io.report(rollout.plugin, state, rollout.rollout_id, target=target or requested(rollout), reason=reason,
                       canary=canary)


def _switch_set(active: ActivePlugins, running: list[ModelRef], about: str | None) -> SwitchSet:
    """`active` less the plugins inference runs no version of, `about` (the plugin switched) excepted.

    By name, not by SHA-256: a plugin inference runs in another version than the store's (a going back
    whose switch failed) is switched to the store's version, never dropped.
    """
    names = {r.name for r in running}
    left_out = tuple(p for p in active.plugins if p.name != about and p.name not in names)
    return SwitchSet(ActivePlugins(plugins=[p for p in active.plugins if p not in left_out]), left_out)


def _version(entry: ActivePlugin | None) -> str:
    return f"v{entry.version}" if entry else "none (the plugin removed)"


def _names(refs: list[ModelRef]) -> str:
    return ", ".join(f"{r.name} v{r.version}" for r in refs) or "none"
