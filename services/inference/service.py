"""The inference service: the one owner of its MQTT link and its worker threads.

A frame's way:
    receive (paho's network thread: `_on_frame`) → backlog (bounded, drops the oldest of the fullest camera)
    → batch → decode → preprocess → infer → publish (each worker: `_work`)
Workers share the served model's ONNX Runtime session and each run their own batch: while one decodes, another
infers, so every core stays busy, and on small CPUs several single-threaded runs beat one run spread
over all cores. Frames are decoded only once taken, so frames dropped under overload cost nothing.
SIGTERM stops intake, answers every frame already accepted, publishes the offline status, exits 0.
A switch request from the sync service loads the next model beside the current one and swaps it in
between batches (swap.py): no frame is dropped or answered twice.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import paho.mqtt.client as paho

from services.inference.batcher import CameraCounts, Closed, FrameBacklog
from services.inference.decode import UndecodableFrame, decode_bgr
from services.inference.features import summarise
from services.inference.intake import Frame, FrameRejected, Intake, clip
from services.inference.postprocess import top_k
from services.inference import swap
from services.inference.session import ProviderRefused, plan_workers
from services.inference.swap import ServedModel, Swapper
from shared import VERSION, topics
from shared.codec import DecodeError, WireFormat, decode, encode
from shared.config import InferenceSettings
from shared.lifecycle import Liveness, serve
from shared.logs import fields
from shared.manifest import ModelError
from shared.metrics import Counter
from shared.mqtt import MqttLink, StatusPublisher, content_type_of
from shared.schemas import (
    MAX_CAMERA_KEYS,
    MAX_STR,
    ClassScore,
    ErrorReason,
    ErrorReport,
    InferenceStats,
    ModelSwitch,
    ModelSwitched,
    Prediction,
    ServiceState,
    ServiceStatus,
    Timings,
)


SERVICE = "inference"
log = logging.getLogger(__name__)


@dataclass(slots=True)
class Prepared:
    """A frame decoded and preprocessed into its slot of the batch."""

    frame: Frame
    preprocess_s: float


class InferenceService:
    def __init__(self, settings: InferenceSettings) -> None:
        self.settings = settings
        workers, self._threads_per_run = plan_workers(settings.providers, settings.inference_workers, settings.intra_op_threads)
        self.model = self._load(settings.model_dir)
        self.intake = Intake(settings.max_frame_bytes, settings.max_frame_pixels)
        self.backlog = FrameBacklog(settings.queue_size)
        self.received, self.rejected, self.dropped = Counter(), Counter(), Counter()
        self.published, self.lost, self.batches = Counter(), Counter(), Counter()
        self.dropped_by_camera = CameraCounts(MAX_CAMERA_KEYS)
        self._started_at = time.time()
        self._stopping = threading.Event()
        self._device = settings.device_id
        self.link = MqttLink(
            settings,
            SERVICE,
            StatusPublisher(
                topics.status(self._device, SERVICE),
                online=lambda: encode(self.status(ServiceState.ONLINE)),
                will=encode(self.status(ServiceState.OFFLINE, reason="connection lost", with_stats=False)),
            ),
        )
        self.liveness = Liveness()  # the workers' proof of life, for the health check (shared.lifecycle)
        self._threads = [threading.Thread(target=self._work, name=f"worker-{i}") for i in range(workers)]
        self.swapper = Swapper(
            lambda switch: self._load(Path(switch.model_dir), switch.sha256), self._install,
            lambda: self.model.ref, self._reply_switched,
        )
        self.switches = Counter()

    def _load(self, model_dir: Path, expected_sha256: str | None = None) -> ServedModel:
        s = self.settings
        return swap.load(model_dir, s.providers, s.provider_policy == "strict", self._threads_per_run, s.scaled_decode, expected_sha256)

    def _install(self, model: ServedModel) -> ServedModel:
        """Serves `model` from the next batch on; returns the model it replaces."""
        old, self.model = self.model, model  # one reference assignment: workers pick it up at their next batch
        self.switches.add()
        if model.session.provider.fallback:
            self._report(ErrorReason.PROVIDER_FALLBACK, self._fallback_text())
        self._publish_status()
        return old

    # -- lifecycle ---------------------------------------------------------------------------------

    def run(self) -> int:
        """Serves until stop() is called, then drains and returns the exit status."""
        frames_filter = topics.all_frames(self._device)
        self.link.subscribe(frames_filter, self._on_frame, qos=1)
        self.link.subscribe(topics.model_switch(self._device), self._on_switch, qos=1)
        self.link.start()
        for thread in self._threads:
            thread.start()
        self.swapper.start()
        if self.model.session.provider.fallback:
            self._report(ErrorReason.PROVIDER_FALLBACK, self._fallback_text())
        log.info(
            "serving",
            extra=fields(
                model=self.model.manifest.name, version=self.model.manifest.version,
                provider=self.model.session.provider.active, workers=len(self._threads),
            ),
        )
        while not self._stopping.wait(self.settings.status_interval_s):
            self._publish_status()

        if not self.link.unsubscribe(frames_filter):
            log.warning("no UNSUBACK from the broker: frames it sent meanwhile count as dropped")
        self.swapper.stop()  # a switch in progress completes; none starts after
        log.info("draining", extra=fields(queued=len(self.backlog)))
        self.backlog.close()  # the workers answer what is left, then stop
        for thread in self._threads:
            thread.join()
        self.link.stop(final_status=encode(self.status(ServiceState.OFFLINE, reason="shutdown")))
        log.info("stopped", extra=fields(**self.stats().model_dump()))
        return 0

    def stop(self) -> None:
        self._stopping.set()

    # -- receive (paho's network thread) -----------------------------------------------------------

    def _on_frame(self, message: paho.MQTTMessage) -> None:
        camera = topics.last_level(message.topic)
        self.received.add()
        try:
            frame = self.intake.parse(camera, message.payload, content_type_of(message))
        except FrameRejected as rejected:
            self._reject(camera, rejected.reason, rejected.detail, rejected.frame_id)
            return
        try:
            if (dropped := self.backlog.put(frame)) is not None:
                self._count_drop(dropped.camera)
        except Closed:  # arrived while shutting down, after intake stopped
            self._count_drop(camera)

    def _count_drop(self, camera: str) -> None:
        self.dropped.add()
        self.dropped_by_camera.add(camera)

    def _on_switch(self, message: paho.MQTTMessage) -> None:
        try:
            switch = decode(ModelSwitch, message.payload, content_type_of(message))
        except DecodeError as exc:
            self._report(ErrorReason.MALFORMED_COMMAND, f"model switch request: {exc}")
            return
        self.swapper.request(switch)

    def _reply_switched(self, result: ModelSwitched) -> None:
        self.link.publish(topics.model_switched(self._device), encode(result), qos=1,
                          content_type=WireFormat.JSON.content_type)

    # -- decode → preprocess → batch → infer → publish (each worker thread) -------------------------

    def _work(self) -> None:
        s = self.settings
        with self.liveness.watch(threading.current_thread().name) as progress:
            # take() returns at least every half second when idle: an idle worker ticks, a stuck one does not.
            while (frames := self.backlog.take(s.max_batch, s.max_wait_ms / 1000)) is not None:
                progress.tick()
                if not frames:
                    continue
                try:
                    self._answer(frames)
                except Exception:  # a bug must not stop the worker; model failures are reported in _answer
                    log.exception("batch abandoned", extra=fields(frames=[f.frame_id for f in frames]))

    def _answer(self, frames: list[Frame]) -> None:
        model = self.model  # this batch's model from start to end, whatever a swap does meanwhile
        crop = model.manifest.preprocessing.crop
        batch = np.empty((len(frames), 3, crop, crop), dtype=np.float32)
        ready: list[Prepared] = []
        for frame in frames:
            if (preprocess_s := self._prepare(model, frame, batch[len(ready)])) is not None:
                ready.append(Prepared(frame, preprocess_s))
        if not ready:
            return
        started = time.monotonic()
        try:
            logits = model.session.run(batch[: len(ready)])
        except Exception as exc:  # e.g. an execution provider failing: every frame hears why
            log.exception("inference failed")
            for item in ready:
                self._reject(item.frame.camera, ErrorReason.INTERNAL, f"inference failed: {clip(str(exc))}", item.frame.frame_id)
            return
        inference_s = time.monotonic() - started
        self.batches.add()
        indices, scores = top_k(logits, self.settings.top_k)
        summaries = summarise(batch[: len(ready)])
        for i, item in enumerate(ready):
            self._publish_prediction(model, item, indices[i], scores[i], summaries[i], started, inference_s, len(ready))

    def _prepare(self, model: ServedModel, frame: Frame, slot: np.ndarray) -> float | None:
        """Decodes and preprocesses into the batch slot; returns the seconds it took, or None after
        reporting a frame that cannot be used."""
        t0 = time.monotonic()
        try:
            model.preprocess(decode_bgr(frame.data, model.decode_min_side), slot)
        except UndecodableFrame as exc:
            self._reject(frame.camera, ErrorReason.UNDECODABLE, str(exc), frame.frame_id)
            return None
        except Exception as exc:  # an image OpenCV decoded but we cannot use: report, keep serving
            log.exception("preprocessing failed")
            self._reject(frame.camera, ErrorReason.INTERNAL, f"preprocessing failed: {clip(str(exc))}", frame.frame_id)
            return None
        return time.monotonic() - t0

    def _publish_prediction(
        self, model: ServedModel, item: Prepared, indices: np.ndarray, scores: np.ndarray, features: np.ndarray,
        started: float, inference_s: float, batch_size: int,
    ) -> None:
        frame, labels = item.frame, model.manifest.labels
        now = time.monotonic()
        prediction = Prediction(
            device=self._device,
            camera=frame.camera,
            frame_id=frame.frame_id,
            captured_at=frame.captured_at,
            top=[ClassScore(index=int(c), label=labels[c], score=round(float(p), 5)) for c, p in zip(indices, scores)],
            model=model.ref,
            provider=model.session.provider.active,
            timings=Timings(
                queued_ms=_ms(started - frame.received - item.preprocess_s),
                preprocess_ms=_ms(item.preprocess_s),
                inference_ms=_ms(inference_s),
                total_ms=_ms(now - frame.received),
                batch_size=batch_size,
            ),
            published_at=time.time(),
            features=[round(float(f), 4) for f in features],
        )
        fmt, qos = self.settings.prediction_format, self.settings.prediction_qos
        info = self.link.publish(
            topics.predictions(self._device, frame.camera), encode(prediction, fmt), qos=qos, content_type=fmt.content_type,
        )
        if _accepted(info.rc, qos):
            self.published.add()
        else:
            self.lost.add()
            if (lost := self.lost.value) == 1 or lost % 100 == 0:  # an outage must not flood the log too
                log.warning("prediction lost", extra=fields(frame_id=frame.frame_id, rc=paho.error_string(info.rc), lost=lost))

    # -- reports -----------------------------------------------------------------------------------

    def _reject(self, camera: str | None, reason: ErrorReason, detail: str, frame_id: str | None) -> None:
        self.rejected.add()
        log.info("frame rejected", extra=fields(camera=camera, frame_id=frame_id, reason=reason.value, detail=detail))
        self._report(reason, detail, camera, frame_id)

    def _report(self, reason: ErrorReason, detail: str, camera: str | None = None, frame_id: str | None = None) -> None:
        report = ErrorReport(
            device=self._device, service=SERVICE, reason=reason, detail=detail[:MAX_STR],
            camera=camera, frame_id=frame_id, at=time.time(),
        )
        fmt = self.settings.prediction_format
        self.link.publish(topics.errors(self._device), encode(report, fmt), qos=self.settings.prediction_qos, content_type=fmt.content_type)

    def _fallback_text(self) -> str:
        p = self.model.session.provider
        return f"requested {p.requested[0]} but running on {p.active} (available: {', '.join(p.available)})"

    def stats(self) -> InferenceStats:
        return InferenceStats(
            frames_received=self.received.value,
            frames_rejected=self.rejected.value,
            frames_dropped=self.dropped.value,
            predictions_published=self.published.value,
            predictions_lost=self.lost.value,
            batches=self.batches.value,
            queue_depth=len(self.backlog),
            dropped_by_camera=self.dropped_by_camera.snapshot(),
        )

    def status(self, state: ServiceState, reason: str | None = None, with_stats: bool = True) -> ServiceStatus:
        return ServiceStatus(
            device=self._device,
            service=SERVICE,
            state=state,
            at=time.time(),
            edgefleet_version=VERSION,
            reason=reason,
            model=self.model.ref,
            provider=self.model.session.provider,
            inference=self.stats() if with_stats else None,
        )

    def _publish_status(self) -> None:
        self.link.publish(
            topics.status(self._device, SERVICE),
            encode(self.status(ServiceState.ONLINE)),
            qos=1, retain=True, content_type=WireFormat.JSON.content_type,
        )


def _accepted(rc: int, qos: int) -> bool:
    """Whether paho took a publish: sent, or (QoS > 0 only) kept in its session queue to send after the
    reconnect. MQTT_ERR_QUEUE_SIZE (queue full) and QoS 0 while disconnected mean it is gone."""
    return rc == paho.MQTT_ERR_SUCCESS or (qos > 0 and rc == paho.MQTT_ERR_NO_CONN)


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


def main(settings: InferenceSettings) -> int:
    return serve(SERVICE, settings, lambda: InferenceService(settings), (ModelError, ProviderRefused, ValueError))
