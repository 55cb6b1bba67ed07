"""The plugin side of the sync service: its rollout messages and switch answers in, its worker loop, and
the plugin machine's `PluginIo` (plugins.py), built on the service's primitives (size-capped registry
reads, resumable downloads with backoff, requests to inference with a deadline) rather than copies.

The plugin worker is a second thread of the sync service ("plugin-rollouts"): model and plugin
rollouts never wait for each other. It takes the latest rollout of each plugin in turn.
"""

from __future__ import annotations

import logging
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import paho.mqtt.client as paho

from services.sync.job import Job
from services.sync.membership import requested, supersedes
from services.sync.plugin_canary import PluginWatch, PluginWindow
from services.sync.plugin_store import PluginStore, PluginStoreStateError
from services.sync.plugins import PluginMachine
from services.sync.rollout import StepFailed, Superseded
from shared import registry, topics
from shared.codec import DecodeError, WireFormat, decode, encode
from shared.lifecycle import Progress
from shared.logs import fields
from shared.mqtt import content_type_of
from shared.plugin import ActivePlugins, PluginManifest
from shared.schemas import (
    MAX_STR,
    CanaryVerdict,
    ErrorReason,
    ModelRef,
    PluginLoad,
    PluginRollout,
    PluginSwitch,
    PluginSwitched,
    SyncReport,
    SyncState,
)

if TYPE_CHECKING:
    from services.sync.service import SyncService

log = logging.getLogger(__name__)

IDLE_TICK_S = 1.0


class PluginDelivery:
    """Owns the plugin store, the plugin canary's watch and the plugin worker's state; is the PluginIo.

    :param service: the sync service whose link, registry reads, downloads, inference requests, error
        reports, liveness and `changed` condition it uses.
    """

    def __init__(self, service: SyncService) -> None:
        self.service = service
        self.settings = service.settings
        self.device = service.settings.device_id
        self.store = PluginStore(self.settings.plugins.dir, self.settings.keep_versions)
        self.repairs = self.store.repair()
        self.canary = PluginWatch()
        self.progress = Progress("plugin-rollouts")
        self.machine = PluginMachine(self.store, self.settings, self, self.device)
        self._latest: dict[str, PluginRollout] = {}  # by plugin, the most recent message last
        self._handled: dict[str, PluginRollout] = {}
        # The answer to the one switch request in flight (at most one entry): answers nobody waits for
        # (late, repeated, or to another sync's request) are dropped as they come, never kept.
        self._answers: dict[str, PluginSwitched] = {}
        self._awaited: str | None = None

    # -- messages in (paho's network thread) ---------------------------------------------------------

    def on_rollout(self, message: paho.MQTTMessage) -> None:
        if not message.payload:  # the retained rollout was cleared
            return
        try:
            rollout = decode(PluginRollout, message.payload, content_type_of(message))
        except DecodeError as exc:
            self.service.error(ErrorReason.MALFORMED_COMMAND, f"plugin rollout: {exc}")
            return
        if rollout.plugin != topics.plugin_of(message.topic):
            self.service.error(ErrorReason.MALFORMED_COMMAND, f"plugin rollout for {rollout.plugin[:80]!r} on "
                               f"{message.topic}: a plugin's rollout is on its own topic")
            return
        with self.service.changed:
            self._latest.pop(rollout.plugin, None)
            self._latest[rollout.plugin] = rollout
            self.service.changed.notify_all()

    def on_switched(self, message: paho.MQTTMessage) -> None:
        try:
            result = decode(PluginSwitched, message.payload, content_type_of(message))
        except DecodeError as exc:
            self.service.error(ErrorReason.MALFORMED_COMMAND, f"plugin switch result: {exc}")
            return
        with self.service.changed:
            if result.request_id != self._awaited:
                log.info("plugin switch answer nobody waits for: dropped",
                         extra=fields(request=result.request_id[:64], ok=result.ok))
                return
            self._answers[result.request_id] = result
            self.service.changed.notify_all()

    # -- the plugin worker -------------------------------------------------------------------------

    def work(self) -> None:
        with self.service.liveness.watch(self.progress):
            try:
                self.machine.recover()
            except PluginStoreStateError as exc:  # fail closed: nothing changed; each rollout is refused too
                log.error("plugin recovery at start refused", extra=fields(error=str(exc)))
                self.service.error(ErrorReason.INTERNAL, str(exc))
            except Exception as exc:  # the store and inference stay as they were; rollouts still get handled
                log.exception("plugin recovery at start failed")
                self.service.error(ErrorReason.INTERNAL, f"plugin recovery at start failed: {exc}")
            while (rollout := self._next()) is not None:
                try:
                    self.machine.handle(rollout)
                except Superseded:
                    log.info("plugin rollout superseded", extra=fields(rollout=rollout.rollout_id))
                except Exception as exc:  # a bug must not stop the worker; the device keeps its plugins
                    log.exception("plugin rollout failed unexpectedly")
                    self.report(rollout.plugin, SyncState.FAILED, rollout.rollout_id, requested(rollout),
                                reason=f"internal error: {exc}")

    def _next(self) -> PluginRollout | None:
        """The oldest plugin rollout not yet handled (each plugin's latest only); None on shutdown."""
        with self.service.changed:
            while not self.service.stopping and (waiting := self._waiting()) is None:
                self.progress.tick()
                self.service.changed.wait(IDLE_TICK_S)
            if self.service.stopping or waiting is None:
                return None
            self._handled[waiting.plugin] = waiting
            return waiting

    def _waiting(self) -> PluginRollout | None:
        return next((r for name, r in self._latest.items() if self._handled.get(name) != r), None)

    # -- PluginIo: what the plugin machine (plugins.py) asks of the world ---------------------------

    def superseded(self, rollout: PluginRollout) -> bool:
        return self.service.stopping or supersedes(self._latest.get(rollout.plugin), rollout)

    def fetch_manifest(self, rollout: PluginRollout) -> tuple[PluginManifest, bytes, bytes]:
        try:
            document_key = registry.plugin_key(rollout.plugin, rollout.version, registry.MANIFEST_OBJECT)
            signature_key = registry.plugin_key(rollout.plugin, rollout.version, registry.SIGNATURE_OBJECT)
        except ValueError as exc:
            raise StepFailed(f"refused the rollout's plugin name or version: {exc}") from None
        job = self._job(rollout)
        document = self.service.read_object(job, document_key, registry.MAX_MANIFEST_BYTES)
        try:
            signature = self.service.read_object(job, signature_key, registry.MAX_SIGNATURE_BYTES)
        except StepFailed as exc:
            raise StepFailed(f"refused {rollout.plugin} v{rollout.version}: no signature ({exc})") from None
        try:
            manifest = registry.verify_plugin(document, signature, self.service.trusted)
        except (registry.SignatureError, ValueError) as exc:
            raise StepFailed(f"refused {rollout.plugin} v{rollout.version}: {exc}") from None
        if (manifest.name, manifest.version) != (rollout.plugin, rollout.version):
            raise StepFailed(f"the signed manifest is for {manifest.name} v{manifest.version}, not the rollout's")
        return manifest, document, signature

    def pause(self, rollout: PluginRollout, seconds: float) -> None:
        self.service.registry.wait(self._job(rollout), seconds)

    def download(self, rollout: PluginRollout, manifest: PluginManifest) -> Path:
        part = self.store.part_file(manifest.name, manifest.version, manifest.sha256)
        self.store.discard_parts(keep={part})
        key = registry.plugin_key(manifest.name, manifest.version, registry.PLUGIN_OBJECT)
        return self.service.download_object(self._job(rollout), manifest.ref(), key, part, manifest.size_bytes,
                                            manifest.sha256)

    def switch(self, active: ActivePlugins) -> None:
        """Asks inference to run exactly `active` and waits for its answer (as the model's switch does).

        Folders go relative to the plugin store's root (PluginLoad.folder): inference resolves them under
        its own mount of the store.

        :raises StepFailed: refused, late, or no answer at all.
        """
        timeout_s = self.settings.switch_timeout_s
        request = PluginSwitch(
            request_id=uuid.uuid4().hex, at=time.time(), timeout_s=timeout_s,
            plugins=[PluginLoad(plugin=p.ref(), folder=p.folder) for p in active.plugins],
        )
        with self.service.changed:
            self._awaited = request.request_id
        try:
            result = self.service.ask_inference(topics.plugin_switch(self.device), request.request_id,
                                                encode(request), self._answers, self.progress)
        finally:
            with self.service.changed:
                self._awaited = None
                self._answers.clear()
        if result is None:
            raise StepFailed(f"inference did not answer the plugin switch within its {timeout_s:g} s deadline")
        if not result.ok:
            raise StepFailed(f"inference refused the plugin set: {result.error}")

    def watch(self, sha256: str | None) -> None:
        """Starts counting predictions and faults for the plugin `sha256` from now (None: stops)."""
        if sha256 is None:
            self.canary.stop()
        else:
            self.canary.start(sha256, time.time())

    def wait_for_canary(self, rollout: PluginRollout, sha256: str, count: int, timeout_s: float) -> PluginWindow:
        deadline = time.monotonic() + timeout_s
        changed = self.service.changed
        with changed:
            while (not (window := self.canary.snapshot(sha256)).disabled and window.predictions < count
                   and (left := deadline - time.monotonic()) > 0 and not self.superseded(rollout)):
                self.progress.tick()
                changed.wait(timeout=min(0.5, left))
        if self.service.stopping:
            raise Superseded()  # shutdown: the pending canary record makes the restart roll back
        return self.canary.snapshot(sha256)

    def inference_plugins(self) -> list[ModelRef] | None:
        """The plugins inference's retained status names; None if it is offline or its status says nothing
        of plugins (an inference without a plugin host): then what it runs is not known."""
        status = self.service.inference_status(self.progress)
        return None if status is None or status.plugins is None else [p.plugin for p in status.plugins]

    def report(self, plugin: str, state: SyncState, rollout_id: str | None, target: ModelRef | None = None,
               reason: str | None = None, canary: CanaryVerdict | None = None, progress: int | None = None) -> None:
        running = self.store.running(plugin)
        report = SyncReport(
            device=self.device, rollout_id=rollout_id, state=state, target=target,
            serving=running.ref() if running else None, reason=reason[:MAX_STR] if reason else reason,
            progress_bytes=progress, canary=canary, at=time.time(),
        )
        if state is not SyncState.DOWNLOADING:
            log.info("plugin sync state", extra=fields(plugin=plugin, state=state.value, rollout=rollout_id,
                                                       reason=reason))
        self.service.link.publish(topics.plugin_sync_state(self.device, plugin), encode(report), qos=1,
                                  retain=True, content_type=WireFormat.JSON.content_type)

    # -- helpers -----------------------------------------------------------------------------------

    def _job(self, rollout: PluginRollout) -> Job:
        def report(state: SyncState, target: ModelRef, reason: str | None, progress: int | None) -> None:
            self.report(rollout.plugin, state, rollout.rollout_id, target, reason, progress=progress)

        return Job(rollout.rollout_id, requested(rollout), lambda: self.superseded(rollout), self.progress, report)
