"""The sync service: the one owner of the device's model store, its MQTT link and its rollout workers
(models: "rollouts"; WebAssembly plugins: "plugin-rollouts", plugin_io.py, with the plugin store).

This file is the wiring and the I/O: MQTT callbacks, switch requests to inference, the prediction
watch and the retained reports; the registry reads (size-capped), resumable downloads (a cascade's
document, then its members, each held to its pin) and a paced rollout's pause are registry_io.py's
RegistryIo, which this service composes. The rollout state machine itself (its states, the pending
canary persisted before a switch, what a restart resumes) is rollout.py, which reads top to bottom;
this service is its `Io`. The registry reads, downloads and switch requests take a `Job` (job.py), so
the plugin machine (plugins.py, its Io in plugin_io.py) uses the same ones.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from pathlib import Path
from typing import TypeVar

import paho.mqtt.client as paho

from services.sync import canary
from services.sync.job import Job
from services.sync.membership import supersedes
from services.sync.metrics import SyncMetrics
from services.sync.plugin_io import PluginDelivery
from services.sync.registry_io import RegistryIo, RegistrySteps
from services.sync.rollout import Machine, StepFailed, Superseded
from services.sync.store import ModelStore
from shared import VERSION, registry, s3, topics
from shared.codec import DecodeError, WireFormat, decode, encode
from shared.config import SyncSettings
from shared.errors import EdgefleetError
from shared.lifecycle import Liveness, Progress, serve
from shared.logs import fields
from shared.manifest import ModelError
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


class SyncService(RegistrySteps):
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
        # The worker ticks its Progress from the Io methods below and RegistryIo's, announcing each bounded wait
        # (an S3 request within its connect and read timeouts, a backoff, a pause, a switch deadline) so that only
        # a real hang counts.
        self.liveness, self._progress = Liveness(), Progress("rollouts")
        self.registry = RegistryIo(settings, self.s3, self.trusted, self.store, self.superseded, self._changed,
                                   self._progress, self._report, self.sync_metrics.downloaded)

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

    def read_object(self, job: Job, key: str, max_bytes: int) -> bytes:
        """RegistryIo.read_object: a registry object read whole, at most max_bytes (the plugin rollouts' too)."""
        return self.registry.read_object(job, key, max_bytes)

    def download_object(self, job: Job, target: ModelRef, key: str, part: Path, size: int, sha256: str,
                        note: str | None = None) -> Path:
        """RegistryIo.download_object: one registry object into its staging file (the plugin rollouts' too)."""
        return self.registry.download_object(job, target, key, part, size, sha256, note)

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


def main(settings: SyncSettings) -> int:
    # EdgefleetError: ModelError (the seed model or the store), SignatureError (the trusted keys).
    return serve(SERVICE, settings, lambda: SyncService(settings), (EdgefleetError, OSError, ValueError))
