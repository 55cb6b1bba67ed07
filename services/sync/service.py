"""The sync service: the one owner of the device's model store, its MQTT link and its rollout worker.

A rollout's way on the device, each step reported (retained, on edgefleet/<device>/sync/state):
    received → (membership: hash of device and rollout) → manifest fetched, signature verified
    → downloading (ranged GETs, resumable) → verified (size, SHA-256) → installed (atomic) and
    smoke-tested → inference told to switch → active → canary: new model against the one before
    → kept, or rolled back by itself with the reasons.
Any failure leaves the device serving the model it had, and says why. A newer rollout message (abort,
promote, another model) supersedes the one in progress at its next step.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from pathlib import Path

import paho.mqtt.client as paho
from botocore.exceptions import BotoCoreError, ClientError

from services.sync import canary
from services.sync.download import Cancelled, DownloadFailed, DownloadInterrupted, download
from services.sync.membership import is_member
from services.sync.smoke import SmokeFailed, smoke_test
from services.sync.store import ModelStore
from shared import VERSION, registry, s3, topics
from shared.codec import DecodeError, WireFormat, decode, encode
from shared.config import SyncSettings
from shared.lifecycle import serve
from shared.logs import fields
from shared.manifest import ModelError, ModelManifest
from shared.mqtt import MqttLink, StatusPublisher, content_type_of
from shared.schemas import (
    CanaryVerdict,
    ErrorReason,
    ErrorReport,
    ModelRef,
    ModelSwitch,
    ModelSwitched,
    Prediction,
    Rollout,
    RolloutPhase,
    ServiceState,
    ServiceStatus,
    SyncReport,
    SyncState,
)

SERVICE = "sync"
log = logging.getLogger(__name__)


class Superseded(Exception):
    """A newer rollout message (or shutdown) replaces the one being handled."""


class StepFailed(Exception):
    """This rollout cannot proceed on this device; the message says why."""


class SyncService:
    def __init__(self, settings: SyncSettings) -> None:
        self.settings = settings
        self._device = settings.device_id
        self.store = ModelStore(settings.model_store, settings.keep_versions)
        self.store.seed(settings.seed_model_dir)
        self.repairs = self.store.repair()
        self.trusted = registry.load_public_keys(settings.trusted_keys_dir)
        self.s3 = s3.client(settings, attempts=1, timeout_s=settings.download_timeout_s)
        self.watch = canary.Watch(settings.canary_window, settings.canary_warmup)
        self.limits = canary.Thresholds(
            settings.canary_max_psi, settings.canary_max_error_rate, settings.canary_max_latency_ratio,
            settings.canary_max_confidence_drop,
        )
        self._changed = threading.Condition()
        self._latest: Rollout | None = None
        self._handled: Rollout | None = None
        self._switch_results: dict[str, ModelSwitched] = {}
        self._stopping = threading.Event()
        self.link = MqttLink(
            settings, SERVICE,
            StatusPublisher(
                topics.status(self._device, SERVICE),
                online=lambda: encode(self._status(ServiceState.ONLINE)),
                will=encode(self._status(ServiceState.OFFLINE, reason="connection lost")),
            ),
        )
        self._worker = threading.Thread(target=self._work, name="rollouts")

    # -- lifecycle ---------------------------------------------------------------------------------

    def run(self) -> int:
        self.link.subscribe(topics.rollout(), self._on_rollout, qos=1)
        self.link.subscribe(topics.all_predictions(self._device), self._on_prediction, qos=0)
        self.link.subscribe(topics.errors(self._device), self._on_error, qos=0)
        self.link.subscribe(topics.model_switched(self._device), self._on_switched, qos=1)
        self.link.start()
        _, serving = self.store.current()
        self.watch.serving = serving.sha256
        log.info("serving from the store", extra=fields(model=serving.name, version=serving.version, repairs=self.repairs))
        self._report(SyncState.IDLE, None, reason="; ".join(self.repairs) or None)
        self._worker.start()
        while not self._stopping.wait(self.settings.status_interval_s):
            self.link.publish(topics.status(self._device, SERVICE), encode(self._status(ServiceState.ONLINE)),
                              qos=1, retain=True, content_type=WireFormat.JSON.content_type)
        with self._changed:
            self._changed.notify_all()
        self._worker.join()
        self.link.stop(final_status=encode(self._status(ServiceState.OFFLINE, reason="shutdown")))
        return 0

    def stop(self) -> None:
        self._stopping.set()
        with self._changed:
            self._changed.notify_all()

    # -- messages in (paho's network thread) ---------------------------------------------------------

    def _on_rollout(self, message: paho.MQTTMessage) -> None:
        if not message.payload:  # the retained rollout was cleared
            return
        try:
            rollout = decode(Rollout, message.payload, content_type_of(message))
        except DecodeError as exc:
            self._error(ErrorReason.MALFORMED_COMMAND, f"rollout: {exc}")
            return
        with self._changed:
            self._latest = rollout
            self._changed.notify_all()

    def _on_prediction(self, message: paho.MQTTMessage) -> None:
        try:
            self.watch.on_prediction(decode(Prediction, message.payload, content_type_of(message)))
        except DecodeError:
            pass  # not ours to judge: inference's own errors topic reports bad output

    def _on_error(self, message: paho.MQTTMessage) -> None:
        try:
            report = decode(ErrorReport, message.payload, content_type_of(message))
        except DecodeError:
            return
        if report.service == "inference" and report.reason is ErrorReason.INTERNAL:
            self.watch.on_failure()

    def _on_switched(self, message: paho.MQTTMessage) -> None:
        try:
            result = decode(ModelSwitched, message.payload, content_type_of(message))
        except DecodeError as exc:
            self._error(ErrorReason.MALFORMED_COMMAND, f"switch result: {exc}")
            return
        with self._changed:
            self._switch_results[result.request_id] = result
            self._changed.notify_all()

    # -- the rollout worker ------------------------------------------------------------------------

    def _work(self) -> None:
        while (rollout := self._next()) is not None:
            try:
                self._handle(rollout)
            except Superseded:
                log.info("rollout superseded", extra=fields(rollout=rollout.rollout_id))
            except Exception as exc:  # a bug must not stop the worker; the device keeps its model
                log.exception("rollout failed unexpectedly")
                self._report(SyncState.FAILED, rollout, reason=f"internal error: {exc}")

    def _next(self) -> Rollout | None:
        with self._changed:
            while not self._stopping.is_set() and (self._latest is None or self._latest == self._handled):
                self._changed.wait()
            if self._stopping.is_set():
                return None
            self._handled = self._latest
            return self._handled

    def _check(self, rollout: Rollout) -> None:
        if self._stopping.is_set() or self._latest != rollout:
            raise Superseded()

    def _handle(self, rollout: Rollout) -> None:
        serving_dir, serving = self.store.current()
        wanted = (rollout.model, rollout.version)
        if rollout.phase is RolloutPhase.ABORTED:
            if (serving.name, serving.version) == wanted:
                self._go_back(rollout, serving, "the operator aborted the rollout", None)
            else:
                self._report(SyncState.IDLE, rollout, reason="rollout aborted; this device did not serve it")
            return
        if not is_member(rollout, self._device, self.settings.groups):
            self._report(SyncState.NOT_TARGETED, rollout)
            return
        if (serving.name, serving.version) == wanted:
            self._report(SyncState.ACTIVE, rollout, target=serving.ref(), reason="already serving it")
            return
        self._report(SyncState.RECEIVED, rollout)
        try:
            manifest, document, signature = self._fetch_manifest(rollout)
            self._admit(rollout, manifest, serving)
            part = self._download(rollout, manifest)
            self._report(SyncState.VERIFIED, rollout, target=manifest.ref())
            self._check(rollout)
            folder = self.store.install(part, document, signature, manifest)
            try:
                smoke_test(folder)
            except SmokeFailed as exc:
                self.store.quarantine(folder)
                raise StepFailed(f"smoke test failed: {exc}") from None
            self._report(SyncState.INSTALLED, rollout, target=manifest.ref())
            self._check(rollout)
            before = self.watch.snapshot(serving.sha256)
            self._switch(folder, manifest.sha256)
        except StepFailed as exc:
            log.warning("rollout step failed", extra=fields(rollout=rollout.rollout_id, reason=str(exc)))
            self._report(SyncState.FAILED, rollout, target=_ref(rollout), reason=str(exc))
            return
        self.store.activate(folder)
        self.watch.serving = manifest.sha256
        self._report(SyncState.ACTIVE, rollout, target=manifest.ref(),
                     reason=f"canary: comparing {self.settings.canary_window} predictions with the model before")
        verdict = self._canary(rollout, manifest, before)
        if verdict.passed:
            self.store.prune()
            self._report(SyncState.ACTIVE, rollout, target=manifest.ref(), canary=verdict,
                         reason=f"canary passed on {verdict.samples_after} predictions")
        else:
            self._go_back(rollout, manifest, "canary failed: " + "; ".join(verdict.reasons), verdict)

    def _fetch_manifest(self, rollout: Rollout) -> tuple[ModelManifest, bytes, bytes]:
        bucket = self.settings.registry_bucket
        document = self._get(rollout, registry.key(rollout.model, rollout.version, registry.MANIFEST_OBJECT))
        signature = self._get(rollout, registry.key(rollout.model, rollout.version, registry.SIGNATURE_OBJECT))
        try:
            manifest = registry.verify(document, signature, self.trusted)
        except (registry.SignatureError, ValueError) as exc:
            raise StepFailed(f"refused s3://{bucket}/{rollout.model}/{rollout.version}: {exc}") from None
        if (manifest.name, manifest.version) != (rollout.model, rollout.version):
            raise StepFailed(f"the signed manifest is for {manifest.name} v{manifest.version}, not the rollout's")
        return manifest, document, signature

    def _admit(self, rollout: Rollout, manifest: ModelManifest, serving: ModelManifest) -> None:
        if manifest.sha256 in self.store.state().rejected:
            raise StepFailed("a canary on this device already rolled this model back")
        if manifest.name == serving.name and manifest.version < serving.version and not rollout.allow_downgrade:
            raise StepFailed(f"v{manifest.version} is older than the v{serving.version} being served "
                             "(an explicit rollback must allow the downgrade)")
        if manifest.min_edgefleet and _release(manifest.min_edgefleet) > _release(VERSION):
            raise StepFailed(f"the model needs edgefleet {manifest.min_edgefleet}; this device runs {VERSION}")

    def _get(self, rollout: Rollout, key: str) -> bytes:
        delay = 1.0
        while True:
            self._check(rollout)
            try:
                return self.s3.get_object(Bucket=self.settings.registry_bucket, Key=key)["Body"].read()
            except ClientError as exc:
                code = exc.response.get("Error", {}).get("Code")
                if code in ("NoSuchKey", "404", "NoSuchBucket", "AccessDenied", "403"):
                    raise StepFailed(f"s3://{self.settings.registry_bucket}/{key}: {code}") from None
                reason = str(exc)
            except (BotoCoreError, OSError) as exc:
                reason = str(exc)
            self._report(SyncState.RECEIVED, rollout, reason=f"registry unreachable, retrying in {delay:.0f} s: {reason}")
            delay = self._backoff(rollout, delay)

    def _download(self, rollout: Rollout, manifest: ModelManifest) -> Path:
        s = self.settings
        part = self.store.part_file(manifest.name, manifest.version, manifest.sha256)
        self.store.discard_parts(keep=part)
        key = registry.key(manifest.name, manifest.version, registry.MODEL_OBJECT)
        resumed = part.stat().st_size if part.exists() else 0
        self._report(SyncState.DOWNLOADING, rollout, target=manifest.ref(), progress=resumed,
                     reason=f"resuming at byte {resumed}" if resumed else None)
        last = [time.monotonic()]

        def progress(done: int) -> None:
            if time.monotonic() - last[0] >= 1.0:
                last[0] = time.monotonic()
                self._report(SyncState.DOWNLOADING, rollout, target=manifest.ref(), progress=done)

        delay = 1.0
        while True:
            try:
                return download(self.s3, s.registry_bucket, key, part, manifest.size_bytes, manifest.sha256,
                                s.download_chunk_bytes, s.download_limit_bytes_s, progress,
                                lambda: self._stopping.is_set() or self._latest != rollout)
            except Cancelled:
                raise Superseded() from None
            except DownloadFailed as exc:
                part.unlink(missing_ok=True)
                raise StepFailed(str(exc)) from None
            except DownloadInterrupted as exc:
                have = part.stat().st_size if part.exists() else 0
                self._report(SyncState.DOWNLOADING, rollout, target=manifest.ref(), progress=have,
                             reason=f"interrupted, retrying in {delay:.0f} s from byte {have}: {exc}")
                delay = self._backoff(rollout, delay)

    def _backoff(self, rollout: Rollout, delay: float) -> float:
        with self._changed:
            self._changed.wait_for(lambda: self._stopping.is_set() or self._latest != rollout, timeout=delay)
        self._check(rollout)
        return min(delay * 2, self.settings.download_retry_max_s)

    def _switch(self, folder: Path, sha256: str) -> ModelSwitched:
        """Asks inference to serve the model in folder and waits for its answer."""
        request = ModelSwitch(request_id=uuid.uuid4().hex, model_dir=str(folder.resolve()), sha256=sha256, at=time.time())
        self.link.publish(topics.model_switch(self._device), encode(request), qos=1,
                          content_type=WireFormat.JSON.content_type)
        with self._changed:
            answered = self._changed.wait_for(
                lambda: request.request_id in self._switch_results or self._stopping.is_set(),
                timeout=self.settings.switch_timeout_s,
            )
            result = self._switch_results.pop(request.request_id, None)
        if not answered or result is None:
            raise StepFailed(f"inference did not confirm the switch within {self.settings.switch_timeout_s:.0f} s")
        if not result.ok:
            raise StepFailed(f"inference refused the model: {result.error}")
        return result

    def _canary(self, rollout: Rollout, manifest: ModelManifest, before: canary.Window) -> CanaryVerdict:
        deadline = time.monotonic() + self.settings.canary_timeout_s
        with self._changed:
            while len(self.watch.snapshot(manifest.sha256)) < self.settings.canary_window and time.monotonic() < deadline:
                self._changed.wait(timeout=0.5)
                if self._stopping.is_set() or self._latest != rollout:
                    break
        return canary.judge(before, self.watch.snapshot(manifest.sha256), self.limits)

    def _go_back(self, rollout: Rollout, leaving: ModelManifest, why: str, verdict: CanaryVerdict | None) -> None:
        folder = self.store.previous()
        try:
            back = ModelManifest.model_validate_json((folder / "manifest.json").read_bytes())
            self._switch(folder, back.sha256)
        except (StepFailed, ModelError, OSError, ValueError) as exc:
            self._report(SyncState.FAILED, rollout, target=leaving.ref(), canary=verdict,
                         reason=f"{why}; going back to {folder.name} failed too: {exc}")
            return
        self.store.activate(folder)
        self.watch.serving = back.sha256
        if verdict is not None:
            self.store.reject(leaving.sha256)
        log.warning("rolled back", extra=fields(rollout=rollout.rollout_id, reason=why, to=back.name, version=back.version))
        self._report(SyncState.ROLLED_BACK, rollout, target=leaving.ref(), canary=verdict, reason=why)

    # -- reports -----------------------------------------------------------------------------------

    def _report(self, state: SyncState, rollout: Rollout | None, target: ModelRef | None = None,
                reason: str | None = None, canary: CanaryVerdict | None = None, progress: int | None = None) -> None:
        serving = self._serving()
        report = SyncReport(
            device=self._device, rollout_id=rollout.rollout_id if rollout else None, state=state,
            target=target or (_ref(rollout) if rollout else None), serving=serving, reason=reason,
            progress_bytes=progress, canary=canary, at=time.time(),
        )
        if state is not SyncState.DOWNLOADING:
            log.info("sync state", extra=fields(state=state.value, rollout=report.rollout_id, reason=reason))
        self.link.publish(topics.sync_state(self._device), encode(report), qos=1, retain=True,
                          content_type=WireFormat.JSON.content_type)

    def _error(self, reason: ErrorReason, detail: str) -> None:
        log.warning("bad message", extra=fields(reason=reason.value, detail=detail))
        report = ErrorReport(device=self._device, service=SERVICE, reason=reason, detail=detail, at=time.time())
        self.link.publish(topics.errors(self._device), encode(report), qos=1, content_type=WireFormat.JSON.content_type)

    def _status(self, state: ServiceState, reason: str | None = None) -> ServiceStatus:
        return ServiceStatus(device=self._device, service=SERVICE, state=state, at=time.time(),
                             edgefleet_version=VERSION, reason=reason, model=self._serving())

    def _serving(self) -> ModelRef | None:
        try:
            return self.store.current()[1].ref()
        except (OSError, ModelError):
            return None


def _ref(rollout: Rollout) -> ModelRef:
    """What a rollout asks for, before its manifest is known (SHA-256 not yet known)."""
    return ModelRef(name=rollout.model, version=rollout.version, sha256="")


def _release(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("+")[0].split(".") if part.isdigit())


def main(settings: SyncSettings) -> int:
    return serve(SERVICE, settings, lambda: SyncService(settings), (ModelError, OSError, registry.SignatureError, ValueError))
