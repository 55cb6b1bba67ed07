"""The rollout state machine, top to bottom: what sync does with one rollout message, what it persists
before the step a crash could interrupt, and what a restart does with what it finds.

    received ── not a member ───────────────────────────────────────────────────→ not_targeted
       │ paced (rollout.pacing): waits what is left of its turn first (wait_turn), reported ("paced:
       │ ..."); a newer rollout or shutdown ends the wait
       │ manifest (size-capped, signature verified), admitted ── refused ──────→ failed
       │                                         ── rejected here before ──────→ rolled_back
    downloading (ranged GETs into a resumable .part) → verified (size, SHA-256)
       │ a cascade: cascade.json (size-capped) read, each member's signed manifest verified and held
       │ to its pin (name, version, SHA-256, size) ── otherwise ─────────────────→ failed
       │ then each member downloaded the same way
    installed (atomic: a cascade's whole folder in one rename) and smoke-tested
       │ baseline: up to canary_timeout_s for canary_min_samples predictions of the serving model
       │ PERSIST "canary pending: sha X (folder), previous Y"   ← from here a crash rolls back at start
       │ inference told to switch, with a deadline it honours ── refused/late ──→ failed
    active (the store's `current` is the new model) → canary, up to canary_timeout_s
       ├ passed ───────────────────────────────────────────────────────────────→ active, kept
       ├ failed ────────────────────────────→ rolled_back, the model rejected (it never returns)
       └ inconclusive (too few samples on a side) ──→ rolled_back, or held (active, reported not passed)
    each verdict clears the pending record

At start, recover(): a pending canary means sync died inside it. No verdict, no keep: the store goes
back to the recorded previous model, the one on trial is rejected (fail closed: a model that was on
trial when the device fell over is the first suspect), and the rollout is reported rolled_back "sync
restarted during the canary". Then the store's `current` is the one truth: if inference's retained
status names another model, inference is switched to `current`.

A cascade is one unit from the manifest on: its manifest's SHA-256 names it in the canary, the switch,
the pending record, the rejected list and the rollback, exactly as a single model's does.

Only a rollout for another model or version, or an abort, supersedes the one in progress; a phase
change of the same model and version (canary → promoted) does not, so a promote never skips a canary.
All I/O (MQTT, S3, the prediction watch) sits behind `Io`, passed in; the store is the on-disk truth.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from services.sync import canary
from services.sync.errors import SyncError
from services.sync.membership import Targeted, is_member, requested, start_delay
from services.sync.smoke import SmokeFailed, smoke_test
from services.sync.store import ModelStore, PendingCanary, StagedMember
from shared import VERSION
from shared.cascade import MAX_CASCADE_BYTES, CascadeSpec, is_cascade, read_spec, verify_folder
from shared.config import SyncSettings
from shared.errors import EdgefleetError
from shared.logs import fields
from shared.manifest import ModelError, ModelManifest
from shared.schemas import CanaryVerdict, ModelRef, Rollout, RolloutPacing, RolloutPhase, SyncState

log = logging.getLogger(__name__)

RESTARTED_IN_CANARY = "sync restarted during the canary"


class Superseded(SyncError):
    """A newer rollout message (or shutdown) replaces the one being handled."""


class StepFailed(SyncError):
    """This rollout cannot proceed on this device; the message says why."""


class Rejected(StepFailed):
    """A canary on this device already rolled this model back: it never returns."""


class Io(Protocol):
    """What the state machine needs from the outside world; SyncService provides it."""

    def report(self, state: SyncState, rollout_id: str | None, target: ModelRef | None = None,
               reason: str | None = None, canary: CanaryVerdict | None = None, progress: int | None = None) -> None:
        """Publishes the device's sync state (retained)."""

    def fetch_manifest(self, rollout: Rollout) -> tuple[ModelManifest, bytes, bytes]:
        """The verified manifest, its bytes and its signature. Raises StepFailed, Superseded."""

    def download(self, rollout: Rollout, manifest: ModelManifest) -> Path:
        """The verified artifact (model.onnx or cascade.json) in a staging file. Raises StepFailed, Superseded."""

    def download_members(self, rollout: Rollout, cascade: ModelManifest, spec: CascadeSpec) -> list[StagedMember]:
        """A cascade's members, stage 1 then stage 2: each one's signed manifest verified and equal to its
        pin, then its model downloaded and verified. Raises StepFailed (naming the member), Superseded."""

    def switch(self, folder: Path, sha256: str) -> None:
        """Has inference serve the model in folder, within the switch deadline. Raises StepFailed."""

    def wait_for_samples(self, rollout: Rollout, sha256: str, count: int, timeout_s: float) -> canary.Window:
        """The model's prediction window once it holds `count` samples, the timeout passes, or `rollout`
        is superseded (whichever comes first). Raises Superseded on shutdown."""

    def serving_changed(self, sha256: str) -> None:
        """Tells the prediction watch which model inference failures are charged to."""

    def inference_serving(self) -> ModelRef | None:
        """The model inference's retained status names, or None if it is not online."""

    def superseded(self, rollout: Rollout) -> bool:
        """Whether shutdown or a newer rollout message ends this one."""

    def pause(self, rollout: Rollout, seconds: float) -> None:
        """Waits `seconds` (a paced rollout's turn: membership.start_delay) before the manifest is fetched,
        ending the wait as soon as `rollout` is superseded.

        :param rollout: the rollout waited for.
        :param seconds: how long to wait (> 0).
        :raises Superseded: a newer rollout message (another model or version, or an abort) or shutdown,
            before or during the wait.
        """




class Machine:
    def __init__(self, store: ModelStore, settings: SyncSettings, io: Io, device_id: str,
                 smoke: Callable[[Path], None] = smoke_test) -> None:
        """:param smoke: the smoke test an installed folder passes before the switch (raises SmokeFailed);
            a simulated device, which runs no inference, passes its own."""
        self.store, self.settings, self.io, self.device = store, settings, io, device_id
        self.smoke = smoke
        self.limits = settings.canary

    # -- at start ----------------------------------------------------------------------------------

    def recover(self) -> None:
        """Undoes a canary a crash interrupted, then makes inference serve the store's `current`."""
        pending = self.store.pending_canary()
        if pending is not None:
            self._undo_pending(pending)
        problem = self._reconcile()
        if pending is not None:
            trial = ModelRef(name=pending.model, version=pending.version, sha256=pending.sha256)
            if problem:
                self.io.report(SyncState.FAILED, pending.rollout_id, target=trial,
                               reason=f"{RESTARTED_IN_CANARY}; going back failed: {problem}")
            else:
                self.io.report(SyncState.ROLLED_BACK, pending.rollout_id, target=trial,
                               reason=f"{RESTARTED_IN_CANARY}: no verdict, so the model is not kept")

    def _undo_pending(self, pending: PendingCanary) -> None:
        self.store.reject(pending.sha256)
        folder = self.store.root / pending.previous
        try:
            if self.store.is_rejected(folder):
                raise ModelError("rejected")
        except ModelError:
            folder = self.store.last_good()
        self.store.activate(folder, remember_previous=False)
        self.store.end_canary()
        log.warning("a canary was pending at start: rolled back",
                    extra=fields(rollout=pending.rollout_id, sha256=pending.sha256[:16], to=str(folder)))

    def _reconcile(self) -> str | None:
        """Switches inference to the store's current model if its status names another; the problem, if any."""
        folder, current = self.store.current()
        self.io.serving_changed(current.sha256)
        serving = self.io.inference_serving()
        if serving is None or serving.sha256 == current.sha256:
            return None
        log.warning("inference serves another model than the store's current: switching it",
                    extra=fields(serving=f"{serving.name} v{serving.version}",
                                 current=f"{current.name} v{current.version}"))
        try:
            self.io.switch(folder, current.sha256)
        except StepFailed as exc:
            self.io.report(SyncState.FAILED, None, target=current.ref(),
                           reason=f"inference serves {serving.name} v{serving.version}, the store {current.name} "
                           f"v{current.version}, and the switch failed: {exc}")
            return str(exc)
        return None

    # -- one rollout message -----------------------------------------------------------------------

    def handle(self, rollout: Rollout) -> None:
        """Takes one rollout message as far as it goes; every outcome is reported. Raises Superseded."""
        _, serving = self.store.current()
        if rollout.phase is RolloutPhase.ABORTED:
            self._abort(rollout, serving)
            return
        if not is_member(rollout, self.device, self.settings.groups):
            self._report(SyncState.NOT_TARGETED, rollout)
            return
        if (serving.name, serving.version) == (rollout.model, rollout.version):
            self._report(SyncState.ACTIVE, rollout, target=serving.ref(), reason="already serving it")
            return
        wait_turn(rollout, self.device, lambda reason: self._report(SyncState.RECEIVED, rollout, reason=reason),
                  lambda seconds: self.io.pause(rollout, seconds))
        self._report(SyncState.RECEIVED, rollout)
        try:
            manifest, folder = self._install(rollout, serving)
            before = self._baseline(rollout, serving)
            self._switch_to(rollout, manifest, folder)
        except Rejected as exc:
            self._report(SyncState.ROLLED_BACK, rollout, target=exc.args[1], reason=exc.args[0])
            return
        except StepFailed as exc:
            log.warning("rollout step failed", extra=fields(rollout=rollout.rollout_id, reason=str(exc)))
            self._report(SyncState.FAILED, rollout, reason=str(exc))
            return
        self._judge(rollout, manifest, before)

    def _abort(self, rollout: Rollout, serving: ModelManifest) -> None:
        if (serving.name, serving.version) == (rollout.model, rollout.version):
            self._go_back(rollout, serving.ref(), "the operator aborted the rollout", None, reject=False)
        else:
            self._report(SyncState.IDLE, rollout, reason="rollout aborted; this device did not serve it")

    def _install(self, rollout: Rollout, serving: ModelManifest) -> tuple[ModelManifest, Path]:
        manifest, document, signature = self.io.fetch_manifest(rollout)
        self._admit(rollout, manifest, serving)
        try:
            part = self.io.download(rollout, manifest)
            members = self._members(rollout, manifest, part)
        except StepFailed:
            self.store.discard_parts()  # a refused cascade leaves no download behind either
            raise
        self._report(SyncState.VERIFIED, rollout, target=manifest.ref())
        self._check(rollout)
        try:
            folder = self.store.install(part, document, signature, manifest, members)
        except ModelError as exc:  # e.g. a member with other labels than the cascade: nothing was installed
            raise StepFailed(f"the downloaded model does not verify as a whole: {exc}") from None
        try:
            self.smoke(folder)
        except SmokeFailed as exc:
            self.store.quarantine(folder)
            raise StepFailed(f"smoke test failed: {exc}") from None
        self._report(SyncState.INSTALLED, rollout, target=manifest.ref())
        self._check(rollout)
        return manifest, folder

    def _members(self, rollout: Rollout, manifest: ModelManifest, part: Path) -> list[StagedMember]:
        """A cascade's members, fetched and held to their pins; none for a single model."""
        if not is_cascade(manifest):
            return []
        try:
            spec = read_spec(part)
        except ModelError as exc:
            raise StepFailed(f"refused the cascade document: {exc}") from None
        return self.io.download_members(rollout, manifest, spec)

    def _admit(self, rollout: Rollout, manifest: ModelManifest, serving: ModelManifest) -> None:
        if manifest.sha256 in self.store.state().rejected:
            raise Rejected("a canary on this device already rolled this model back", manifest.ref())
        if manifest.name == serving.name and manifest.version < serving.version and not rollout.allow_downgrade:
            raise StepFailed(f"v{manifest.version} is older than the v{serving.version} being served "
                             "(an explicit rollback must allow the downgrade)")
        if manifest.quality is not None and not manifest.quality.passed:
            # published only as a cascade's member (edgefleet.publish): never to be served alone
            raise StepFailed(f"{manifest.name} v{manifest.version} failed its quality gate "
                             f"({manifest.quality.value:.4f} < {manifest.quality.threshold}): not served alone")
        if manifest.min_edgefleet and _release(manifest.min_edgefleet) > _release(VERSION):
            raise StepFailed(f"the model needs edgefleet {manifest.min_edgefleet}; this device runs {VERSION}")
        if is_cascade(manifest) and manifest.size_bytes > MAX_CASCADE_BYTES:
            raise StepFailed(f"the cascade document is {manifest.size_bytes} bytes, over the cap of "
                             f"{MAX_CASCADE_BYTES}: not downloaded")

    def _baseline(self, rollout: Rollout, serving: ModelManifest) -> canary.Window:
        """The serving model's window, waited for (up to the canary timeout) so the canary has a 'before'."""
        need = self.settings.canary.min_samples
        if len(before := self.io.wait_for_samples(rollout, serving.sha256, need, 0)) < need:
            self._report(SyncState.INSTALLED, rollout, reason=f"canary: waiting for {need} predictions of the model "
                         f"being served (has {len(before)}), up to {self.settings.canary.timeout_s:g} s")
            before = self.io.wait_for_samples(rollout, serving.sha256, need, self.settings.canary.timeout_s)
        self._check(rollout)
        return before

    def _switch_to(self, rollout: Rollout, manifest: ModelManifest, folder: Path) -> None:
        current, _ = self.store.current()
        self.store.begin_canary(PendingCanary(
            rollout_id=rollout.rollout_id, model=manifest.name, version=manifest.version, sha256=manifest.sha256,
            folder=str(folder.relative_to(self.store.root)), previous=str(current.relative_to(self.store.root)),
        ))
        try:
            self.io.switch(folder, manifest.sha256)
        except StepFailed:
            self.store.end_canary()  # inference refused or discarded it: it still serves `current`
            raise
        self.store.activate(folder)
        self.io.serving_changed(manifest.sha256)
        self._report(SyncState.ACTIVE, rollout, target=manifest.ref(),
                     reason=f"canary: comparing {self.settings.canary.window} predictions with the model before")

    def _judge(self, rollout: Rollout, manifest: ModelManifest, before: canary.Window) -> None:
        canary_settings = self.settings.canary
        after = self.io.wait_for_samples(rollout, manifest.sha256, canary_settings.window, canary_settings.timeout_s)
        verdict = canary.judge(before, after, self.limits)
        if verdict.passed:
            self.store.end_canary()
            self.store.prune()
            self._report(SyncState.ACTIVE, rollout, target=manifest.ref(), canary=verdict,
                         reason=f"canary passed on {verdict.samples_after} predictions")
        elif not verdict.conclusive and self.settings.canary.inconclusive == "hold":
            self.store.end_canary()
            self._report(SyncState.ACTIVE, rollout, target=manifest.ref(), canary=verdict,
                         reason=f"canary {verdict.reasons[0]}; holding the new model (canary_inconclusive=hold), "
                         "not passed")
        elif not verdict.conclusive:
            self._go_back(rollout, manifest.ref(), "canary " + "; ".join(verdict.reasons), verdict, reject=False)
        else:
            self._go_back(rollout, manifest.ref(), "canary failed: " + "; ".join(verdict.reasons), verdict, reject=True)

    def _go_back(self, rollout: Rollout, leaving: ModelRef, why: str, verdict: CanaryVerdict | None,
                 reject: bool) -> None:
        folder = self.store.previous()
        try:
            back = verify_folder(folder)
            self.io.switch(folder, back.sha256)
        except (EdgefleetError, OSError, ValueError) as exc:  # ours (StepFailed, ModelError), the disk's, pydantic's
            self._report(SyncState.FAILED, rollout, target=leaving, canary=verdict,
                         reason=f"{why}; going back to {folder.name} failed too: {exc}")
            return
        if reject:
            self.store.reject(leaving.sha256)
        self.store.activate(folder)
        self.store.end_canary()
        self.io.serving_changed(back.sha256)
        log.warning("rolled back",
                    extra=fields(rollout=rollout.rollout_id, reason=why, to=back.name, version=back.version))
        self._report(SyncState.ROLLED_BACK, rollout, target=leaving, canary=verdict, reason=why)

    # -- helpers -----------------------------------------------------------------------------------

    def _check(self, rollout: Rollout) -> None:
        if self.io.superseded(rollout):
            raise Superseded()

    def _report(self, state: SyncState, rollout: Rollout, target: ModelRef | None = None, reason: str | None = None,
                canary: CanaryVerdict | None = None) -> None:
        self.io.report(state, rollout.rollout_id, target=target or requested(rollout), reason=reason, canary=canary)




def wait_turn(rollout: Targeted, device: str, report: Callable[[str], None], pause: Callable[[float], None]) -> None:
    """A paced rollout: waits what is left of this device's turn (membership.start_delay), reported first;
    the one pacing step of both machines, the model's and the plugins'.

    :param report: reports the wait's reason (RECEIVED, before the wait).
    :param pause: waits the seconds given (the machine's Io.pause).
    :raises Superseded: a newer rollout or shutdown ends the wait (from `pause`).
    """
    pacing = rollout.pacing
    if pacing is None:  # not paced: every device starts at once
        return
    delay = start_delay(rollout.rollout_id, device, pacing, rollout.issued_at, time.time())
    if delay > 0:
        report(paced_reason(delay, pacing))
        pause(delay)


def paced_reason(delay_s: float, pacing: RolloutPacing) -> str:
    """What a paced device reports while it waits its turn."""
    at_once = f", about {pacing.max_concurrent} at once" if pacing.max_concurrent else ""
    return (f"paced: starting the download in {delay_s:.1f} s (the rollout spreads the fleet's downloads over "
            f"{pacing.spread_s:.0f} s{at_once})")


def _release(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("+")[0].split(".") if part.isdigit())
