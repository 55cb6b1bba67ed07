"""The sync service: the one owner of the device's model store, its MQTT link and its rollout workers
(models: "rollouts"; WebAssembly plugins: "plugin-rollouts", plugin_io.py, with the plugin store).

This file is the wiring and the I/O: MQTT callbacks, registry reads (size-capped), resumable downloads
(a cascade's document, then its members, each held to its pin), switch requests to inference, the
prediction watch and the retained reports. The rollout state machine
itself (its states, the pending canary persisted before a switch, what a restart resumes) is
rollout.py, which reads top to bottom; this service is its `Io`. The registry reads, downloads and
switch requests take a `Job` (job.py), so the plugin machine (plugins.py, its Io in plugin_io.py) uses
the same ones.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from pathlib import Path
from typing import TypeVar

import paho.mqtt.client as paho
from botocore.exceptions import BotoCoreError, ClientError

from services.sync import canary
from services.sync.download import Cancelled, DownloadFailed, DownloadInterrupted, download
from services.sync.job import Job
from services.sync.membership import requested, supersedes
from services.sync.metrics import SyncMetrics
from services.sync.plugin_io import PluginDelivery
from services.sync.rollout import Machine, StepFailed, Superseded
from services.sync.store import ModelStore, StagedMember
from shared import VERSION, registry, s3, topics
from shared.cascade import CascadeMember, CascadeSpec, is_cascade
from shared.codec import DecodeError, WireFormat, decode, encode
from shared.config import SyncSettings
from shared.errors import EdgefleetError
from shared.lifecycle import Liveness, Progress, serve
from shared.logs import fields
from shared.manifest import MODEL_FILE, ModelError, ModelManifest
from shared.metrics import service_registry
from shared.mqtt import MqttLink, StatusPublisher, content_type_of
from shared.schemas import (
    MAX_STR,
    CanaryVerdict,
    ErrorReason,
    ErrorReport,
    ModelRef,
    ModelSwitch,
    ModelSwitched,
    PluginSwitched,
    Prediction,
    Rollout,
    ServiceState,
    ServiceStatus,
    SyncReport,
    SyncState,
)

SERVICE = "sync"
INFERENCE = "inference"
log = logging.getLogger(__name__)

# Inference answers a switch by its deadline either way (ok, refused, or "late"); this covers the
# answer's trip over the local broker, not more loading time.
SWITCH_ANSWER_GRACE_S = 5.0
# At start, how long to wait for inference's retained status (it arrives right after the subscription
# if inference ever ran; none means inference will load the store's `current` when it starts).
INFERENCE_STATUS_WAIT_S = 3.0
# How often an idle rollout worker wakes to tick its Progress (shared.lifecycle): idle is alive, stuck is not.
IDLE_TICK_S = 1.0

Answer = TypeVar("Answer", ModelSwitched, PluginSwitched)


class SyncService:
    def __init__(self, settings: SyncSettings) -> None:
        self.settings = settings
        self._device = settings.device_id
        self.store = ModelStore(settings.model_store, settings.keep_versions)
        self.store.seed(settings.seed_model_dir)
        self.repairs = self.store.repair()
        self.trusted = registry.load_public_keys(settings.trusted_keys_dir)
        self.s3 = s3.client(settings, attempts=1, timeout_s=settings.download.timeout_s)
        self.watch = canary.Watch(settings.canary)
        self.machine = Machine(self.store, settings, self, self._device)
        self._inference_status: ServiceStatus | None = None
        self._inference_seen = threading.Event()
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
        self._status_at: float | None = None
        self.metrics = service_registry(device=self._device, service=SERVICE, connected=self.link.connected.is_set,
                                        status_at=lambda: self._status_at)
        self.sync_metrics = SyncMetrics(self.metrics, self._device)
        self._worker = threading.Thread(target=self._work, name="rollouts")
        self.plugins = PluginDelivery(self)
        self._plugin_worker = threading.Thread(target=self.plugins.work, name="plugin-rollouts")
        # The worker ticks its Progress from the Io methods below, announcing each bounded wait (an S3 request
        # within its connect and read timeouts, a backoff, a switch deadline) so that only a real hang counts.
        self.liveness, self._progress = Liveness(), Progress("rollouts")
        self._s3_call_s = 2 * settings.download.timeout_s  # one attempt: connect, then read, each within the timeout

    # -- lifecycle ---------------------------------------------------------------------------------

    def run(self) -> int:
        self.link.subscribe(topics.rollout(), self._on_rollout, qos=1)
        self.link.subscribe(topics.all_predictions(self._device), self._on_prediction, qos=0)
        self.link.subscribe(topics.errors(self._device), self._on_error, qos=0)
        self.link.subscribe(topics.model_switched(self._device), self._on_switched, qos=1)
        self.link.subscribe(topics.status(self._device, INFERENCE), self._on_inference_status, qos=1)
        self.link.subscribe(topics.all_plugin_rollouts(), self.plugins.on_rollout, qos=1)
        self.link.subscribe(topics.plugin_switched(self._device), self.plugins.on_switched, qos=1)
        self.link.start()
        _, serving = self.store.current()
        self.watch.serving = serving.sha256
        log.info("serving from the store",
                 extra=fields(model=serving.name, version=serving.version, repairs=self.repairs))
        self._report(SyncState.IDLE, None, reason="; ".join(self.repairs + self.plugins.repairs) or None)
        self._worker.start()
        self._plugin_worker.start()
        while not self._stopping.wait(self.settings.status_interval_s):
            self.link.publish(topics.status(self._device, SERVICE), encode(self._status(ServiceState.ONLINE)),
                              qos=1, retain=True, content_type=WireFormat.JSON.content_type)
            self._status_at = time.time()
        with self._changed:
            self._changed.notify_all()
        self._worker.join()
        self._plugin_worker.join()
        self.link.stop(final_status=encode(self._status(ServiceState.OFFLINE, reason="shutdown")))
        return 0

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    @property
    def changed(self) -> threading.Condition:
        """Notified on every message a worker may wait for (rollouts, answers, predictions) and on stop."""
        return self._changed

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
            self.error(ErrorReason.MALFORMED_COMMAND, f"rollout: {exc}")
            return
        with self._changed:
            self._latest = rollout
            self._changed.notify_all()

    def _on_prediction(self, message: paho.MQTTMessage) -> None:
        try:
            prediction = decode(Prediction, message.payload, content_type_of(message))
        except DecodeError:
            return  # not ours to judge: inference's own errors topic reports bad output
        self.watch.on_prediction(prediction)
        self.plugins.canary.on_prediction(prediction)

    def _on_error(self, message: paho.MQTTMessage) -> None:
        try:
            report = decode(ErrorReport, message.payload, content_type_of(message))
        except DecodeError:
            return
        if report.service == "inference" and report.reason is ErrorReason.INTERNAL:
            self.watch.on_failure()
        elif report.reason in (ErrorReason.PLUGIN_FAULT, ErrorReason.PLUGIN_DISABLED):
            self.plugins.canary.on_error(report)
            with self._changed:  # a disabled plugin ends its canary at once
                self._changed.notify_all()

    def _on_inference_status(self, message: paho.MQTTMessage) -> None:
        if not message.payload:
            return
        try:
            self._inference_status = decode(ServiceStatus, message.payload, content_type_of(message))
        except DecodeError as exc:
            self.error(ErrorReason.MALFORMED_COMMAND, f"inference status: {exc}")
            return
        self._inference_seen.set()

    def _on_switched(self, message: paho.MQTTMessage) -> None:
        try:
            result = decode(ModelSwitched, message.payload, content_type_of(message))
        except DecodeError as exc:
            self.error(ErrorReason.MALFORMED_COMMAND, f"switch result: {exc}")
            return
        with self._changed:
            self._switch_results[result.request_id] = result
            self._changed.notify_all()

    # -- the rollout worker ------------------------------------------------------------------------

    def _work(self) -> None:
        with self.liveness.watch(self._progress):
            self._recover_and_handle()

    def _recover_and_handle(self) -> None:
        try:
            self.machine.recover()
        except Exception as exc:  # the store and inference stay as they were; rollouts still get handled
            log.exception("recovery at start failed")
            self._report(SyncState.FAILED, None, reason=f"internal error while recovering at start: {exc}")
        while (rollout := self._next()) is not None:
            try:
                self.machine.handle(rollout)
            except Superseded:
                log.info("rollout superseded", extra=fields(rollout=rollout.rollout_id))
            except Exception as exc:  # a bug must not stop the worker; the device keeps its model
                log.exception("rollout failed unexpectedly")
                self._report(SyncState.FAILED, rollout.rollout_id, reason=f"internal error: {exc}")

    def _next(self) -> Rollout | None:
        with self._changed:
            while not self._stopping.is_set() and (self._latest is None or self._latest == self._handled):
                self._progress.tick()
                self._changed.wait(IDLE_TICK_S)
            if self._stopping.is_set():
                return None
            self._handled = self._latest
            return self._handled

    # -- Io: what the state machine (rollout.py) asks of the world ---------------------------------

    def superseded(self, rollout: Rollout) -> bool:
        return self._stopping.is_set() or supersedes(self._latest, rollout)

    def _job(self, rollout: Rollout) -> Job:
        def report(state: SyncState, target: ModelRef, reason: str | None, progress: int | None) -> None:
            self._report(state, rollout.rollout_id, target=target, reason=reason, progress=progress)

        return Job(rollout.rollout_id, requested(rollout), lambda: self.superseded(rollout), self._progress, report)

    def fetch_manifest(self, rollout: Rollout) -> tuple[ModelManifest, bytes, bytes]:
        bucket = self.settings.registry_bucket
        try:
            document_key = registry.key(rollout.model, rollout.version, registry.MANIFEST_OBJECT)
            signature_key = registry.key(rollout.model, rollout.version, registry.SIGNATURE_OBJECT)
        except ValueError as exc:
            raise StepFailed(f"refused the rollout's model name or version: {exc}") from None
        document = self.read_object(self._job(rollout), document_key, registry.MAX_MANIFEST_BYTES)
        signature = self.read_object(self._job(rollout), signature_key, registry.MAX_SIGNATURE_BYTES)
        try:
            manifest = registry.verify(document, signature, self.trusted)
        except (registry.SignatureError, ValueError) as exc:
            raise StepFailed(f"refused s3://{bucket}/{rollout.model}/{rollout.version}: {exc}") from None
        if (manifest.name, manifest.version) != (rollout.model, rollout.version):
            raise StepFailed(f"the signed manifest is for {manifest.name} v{manifest.version}, not the rollout's")
        return manifest, document, signature

    def read_object(self, job: Job, key: str, max_bytes: int) -> bytes:
        """A registry object read whole, but only if it is at most max_bytes; retried while the store is away.

        :raises StepFailed: missing, forbidden or over the cap.
        :raises Superseded: a newer rollout or shutdown.
        """
        delay = 1.0
        while True:
            job.check()
            job.progress.tick(self._s3_call_s)
            try:
                return registry.read_bounded(self.s3, self.settings.registry_bucket, key, max_bytes)
            except registry.ObjectTooLarge as exc:
                raise StepFailed(f"refused s3://{self.settings.registry_bucket}/{key}: {exc}") from None
            except ClientError as exc:
                code = exc.response.get("Error", {}).get("Code")
                if code in ("NoSuchKey", "404", "NoSuchBucket", "AccessDenied", "403"):
                    raise StepFailed(f"s3://{self.settings.registry_bucket}/{key}: {code}") from None
                reason = str(exc)
            except (BotoCoreError, OSError) as exc:
                reason = str(exc)
            job.report(SyncState.RECEIVED, job.target, f"registry unreachable, retrying in {delay:.0f} s: {reason}",
                       None)
            delay = self._backoff(job, delay)

    def download(self, rollout: Rollout, manifest: ModelManifest) -> Path:
        part = self.store.part_file(manifest.name, manifest.version, manifest.sha256)
        if not is_cascade(manifest):  # a cascade's members' parts are known, and kept, once its document is read
            self.store.discard_parts(keep={part})
        key = registry.key(manifest.name, manifest.version, manifest.file)
        return self.download_object(self._job(rollout), manifest.ref(), key, part, manifest.size_bytes,
                                    manifest.sha256)

    def download_members(self, rollout: Rollout, cascade: ModelManifest, spec: CascadeSpec) -> list[StagedMember]:
        # Every member's signature and pin first: a refused member costs two small reads, not a model download.
        signed = [self._member_manifest(rollout, pin) for pin in spec.stages]
        parts = [self.store.part_file(pin.name, pin.version, pin.sha256) for pin in spec.stages]
        self.store.discard_parts(keep={self.store.part_file(cascade.name, cascade.version, cascade.sha256), *parts})
        staged = []
        for pin, part, (member, document, signature) in zip(spec.stages, parts, signed, strict=True):
            key = registry.key(member.name, member.version, member.file)
            self.download_object(self._job(rollout), cascade.ref(), key, part, member.size_bytes, member.sha256,
                                 note=f"{pin.folder}: {member.name} v{member.version}")
            staged.append(StagedMember(pin.folder, part, document, signature))
        return staged

    def _member_manifest(self, rollout: Rollout, pin: CascadeMember) -> tuple[ModelManifest, bytes, bytes]:
        """A member's signed manifest from the registry, verified and held to the cascade's pin.

        :raises StepFailed: missing, not signed by a trusted key, or not the model the pin names.
        """
        what = f"the cascade's {pin.folder} member {pin.name} v{pin.version}"
        try:
            job = self._job(rollout)
            document = self.read_object(job, registry.key(pin.name, pin.version, registry.MANIFEST_OBJECT),
                                        registry.MAX_MANIFEST_BYTES)
            signature = self.read_object(job, registry.key(pin.name, pin.version, registry.SIGNATURE_OBJECT),
                                         registry.MAX_SIGNATURE_BYTES)
        except StepFailed as exc:
            raise StepFailed(f"{what}: {exc}") from None
        try:
            member = registry.verify(document, signature, self.trusted)
        except (registry.SignatureError, ValueError) as exc:
            raise StepFailed(f"refused {what}: {exc}") from None
        if member.file != MODEL_FILE:
            raise StepFailed(f"refused {what}: it is {member.file}, a member is one ONNX model")
        signed = (member.name, member.version, member.sha256, member.size_bytes)
        if signed != (pin.name, pin.version, pin.sha256, pin.size_bytes):
            raise StepFailed(f"refused {what}: the cascade pins SHA-256 {pin.sha256[:16]}… ({pin.size_bytes} bytes), "
                             f"the registry's signed manifest is {member.name} v{member.version} with "
                             f"{member.sha256[:16]}… ({member.size_bytes} bytes)")
        return member, document, signature

    def download_object(self, job: Job, target: ModelRef, key: str, part: Path, size: int, sha256: str,
                        note: str | None = None) -> Path:
        """One registry object into its staging file, resumed and retried while the store is away.

        :param target: what the reports name (the rollout's model, also while a cascade's member downloads).
        :param note: what is downloading, when that is not `target` itself (a cascade's member).
        :raises StepFailed: the object is missing or not what its manifest says.
        :raises Superseded: a newer rollout or shutdown.
        """
        s = self.settings
        resumed = part.stat().st_size if part.exists() else 0
        job.report(SyncState.DOWNLOADING, target, _joined(note, f"resuming at byte {resumed}" if resumed else None),
                   resumed)
        last = [time.monotonic()]
        counted = [resumed]  # bytes a previous attempt (or process) fetched are not counted again
        throttle_s = s.download.chunk_bytes / s.download.limit_bytes_s if s.download.limit_bytes_s else 0
        chunk_s = self._s3_call_s + throttle_s

        def progress(done: int) -> None:
            job.progress.tick(chunk_s)
            self.sync_metrics.downloaded(max(0, done - counted[0]))
            counted[0] = done
            if time.monotonic() - last[0] >= 1.0:
                last[0] = time.monotonic()
                job.report(SyncState.DOWNLOADING, target, note, done)

        delay = 1.0
        while True:
            job.progress.tick(chunk_s)
            try:
                return download(self.s3, s.registry_bucket, key, part, size, sha256,
                                s.download.chunk_bytes, s.download.limit_bytes_s, progress, job.superseded)
            except Cancelled:
                raise Superseded() from None
            except DownloadFailed as exc:
                part.unlink(missing_ok=True)
                raise StepFailed(str(exc)) from None
            except DownloadInterrupted as exc:
                have = part.stat().st_size if part.exists() else 0
                job.report(SyncState.DOWNLOADING, target,
                           _joined(note, f"interrupted, retrying in {delay:.0f} s from byte {have}: {exc}"), have)
                delay = self._backoff(job, delay)

    def _backoff(self, job: Job, delay: float) -> float:
        job.progress.tick(delay)
        with self._changed:
            self._changed.wait_for(job.superseded, timeout=delay)
        job.check()
        return min(delay * 2, self.settings.download.retry_max_s)

    def switch(self, folder: Path, sha256: str) -> None:
        """Asks inference to serve the model in folder and waits for its answer.

        The request carries the deadline (switch_timeout_s) and inference discards a load that misses
        it, answering ok=False; so waiting a little longer than the deadline for that answer can never
        leave inference serving a model sync reported as failed.

        :raises StepFailed: refused, late, or no answer at all.
        """
        timeout_s = self.settings.switch_timeout_s
        request = ModelSwitch(request_id=uuid.uuid4().hex, model_dir=str(folder.resolve()), sha256=sha256,
                              at=time.time(), timeout_s=timeout_s)
        result = self.ask_inference(topics.model_switch(self._device), request.request_id, encode(request),
                                    self._switch_results, self._progress)
        if result is None:
            raise StepFailed(f"inference did not answer the switch within its {timeout_s:g} s deadline")
        if not result.ok:
            raise StepFailed(f"inference refused the model: {result.error}")

    def ask_inference(self, topic: str, request_id: str, request: bytes, answers: dict[str, Answer],
                      progress: Progress) -> Answer | None:
        """Publishes a switch request (its deadline switch_timeout_s inside) and waits for its answer.

        :param answers: where the answers' MQTT callback files them by request id (guarded by `_changed`).
        :returns: the answer, or None if none came by the deadline and its grace (or on shutdown).
        """
        timeout_s = self.settings.switch_timeout_s + SWITCH_ANSWER_GRACE_S
        self.link.publish(topic, request, qos=1, content_type=WireFormat.JSON.content_type)
        progress.tick(timeout_s)
        with self._changed:
            self._changed.wait_for(lambda: request_id in answers or self._stopping.is_set(), timeout=timeout_s)
            return answers.pop(request_id, None)

    def wait_for_samples(self, rollout: Rollout, sha256: str, count: int, timeout_s: float) -> canary.Window:
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while (len(self.watch.snapshot(sha256)) < count and (left := deadline - time.monotonic()) > 0
                   and not self.superseded(rollout)):
                self._progress.tick()
                self._changed.wait(timeout=min(0.5, left))
        if self._stopping.is_set():
            raise Superseded()  # shutdown: the pending canary record makes the restart roll back
        return self.watch.snapshot(sha256)

    def serving_changed(self, sha256: str) -> None:
        self.watch.serving = sha256

    def inference_serving(self) -> ModelRef | None:
        """The model in inference's retained status, if it is online; waits briefly for that status."""
        status = self.inference_status(self._progress)
        return status.model if status is not None else None

    def inference_status(self, progress: Progress) -> ServiceStatus | None:
        """Inference's retained status if it is online; waits briefly for it."""
        progress.tick(2 * INFERENCE_STATUS_WAIT_S)
        self.link.wait_connected(INFERENCE_STATUS_WAIT_S)
        self._inference_seen.wait(INFERENCE_STATUS_WAIT_S)
        status = self._inference_status
        return status if status is not None and status.state is ServiceState.ONLINE else None

    def report(self, state: SyncState, rollout_id: str | None, target: ModelRef | None = None,
               reason: str | None = None, canary: CanaryVerdict | None = None, progress: int | None = None) -> None:
        self._report(state, rollout_id, target, reason, canary, progress)

    # -- reports -----------------------------------------------------------------------------------

    def _report(self, state: SyncState, rollout_id: str | None, target: ModelRef | None = None,
                reason: str | None = None, canary: CanaryVerdict | None = None, progress: int | None = None) -> None:
        serving = self._serving()
        report = SyncReport(
            device=self._device, rollout_id=rollout_id, state=state, target=target, serving=serving,
            reason=reason[:MAX_STR] if reason else reason, progress_bytes=progress, canary=canary, at=time.time(),
        )
        self.sync_metrics.reported(state)
        if state is not SyncState.DOWNLOADING:
            log.info("sync state", extra=fields(state=state.value, rollout=report.rollout_id, reason=reason))
        self.link.publish(topics.sync_state(self._device), encode(report), qos=1, retain=True,
                          content_type=WireFormat.JSON.content_type)

    def error(self, reason: ErrorReason, detail: str) -> None:
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


def _joined(*parts: str | None) -> str | None:
    return "; ".join(p for p in parts if p) or None


def main(settings: SyncSettings) -> int:
    # EdgefleetError: ModelError (the seed model or the store), SignatureError (the trusted keys).
    return serve(SERVICE, settings, lambda: SyncService(settings), (EdgefleetError, OSError, ValueError))
