"""The inference service: the one owner of its MQTT link and its worker thread.

A frame's way: receive (network thread: `_on_frame`) → backlog → decode → preprocess → batch →
infer → publish (worker thread: `_process`). SIGTERM stops intake, answers every frame already
accepted, publishes the offline status and exits 0.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time

import numpy as np
import paho.mqtt.client as paho

from services.inference.batcher import FrameBacklog
from services.inference.decode import UndecodableFrame, decode_bgr
from services.inference.intake import Frame, FrameRejected, Intake
from services.inference.postprocess import top_k
from services.inference.preprocess import Preprocessor
from services.inference.session import ModelSession, ProviderRefused
from shared import VERSION, logs, topics
from shared.codec import WireFormat, encode
from shared.config import InferenceSettings
from shared.logs import fields
from shared.manifest import ModelError, load_verified
from shared.metrics import Counter
from shared.mqtt import MqttLink, StatusPublisher, content_type_of
from shared.schemas import (
    ClassScore,
    ErrorReason,
    ErrorReport,
    InferenceStats,
    Prediction,
    ServiceState,
    ServiceStatus,
    Timings,
)


SERVICE = "inference"
log = logging.getLogger(__name__)


class InferenceService:
    def __init__(self, settings: InferenceSettings) -> None:
        self.settings = settings
        manifest, model_path = load_verified(settings.model_dir)
        self.session = ModelSession.open(
            manifest,
            model_path,
            settings.providers,
            strict=settings.provider_policy == "strict",
            intra_op_threads=settings.intra_op_threads,
        )
        self.manifest = manifest
        self.preprocess = Preprocessor(manifest.preprocessing)
        self.intake = Intake(settings.max_frame_bytes)
        self.backlog = FrameBacklog(settings.queue_size)
        self.received, self.rejected, self.dropped = Counter(), Counter(), Counter()
        self.published, self.batches = Counter(), Counter()
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
        self._worker = threading.Thread(target=self._work, name="inference-worker")

    # -- lifecycle ---------------------------------------------------------------------------------

    def run(self) -> int:
        """Serves until stop() is called, then drains and returns the exit status."""
        frames_filter = topics.all_frames(self._device)
        self.link.subscribe(frames_filter, self._on_frame, qos=1)
        self.link.start()
        self._worker.start()
        if self.session.provider.fallback:
            self._report(ErrorReason.PROVIDER_FALLBACK, self._fallback_text())
        log.info(
            "serving",
            extra=fields(model=self.manifest.name, version=self.manifest.version, provider=self.session.provider.active),
        )
        while not self._stopping.wait(self.settings.status_interval_s):
            self._publish_status()

        log.info("draining", extra=fields(queued=len(self.backlog)))
        self.link.client.unsubscribe(frames_filter)
        self.backlog.close()
        self._worker.join()
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
        if self.backlog.put(frame) is not None:
            self.dropped.add()

    # -- decode → preprocess → batch → infer → publish (the worker thread) -------------------------

    def _work(self) -> None:
        s = self.settings
        while (frames := self.backlog.take(s.max_batch, s.max_wait_ms / 1000, idle_timeout_s=0.5)) is not None:
            if frames:
                try:
                    self._process(frames)
                except Exception as exc:  # keep serving; the frames of this batch get an error each
                    log.exception("batch failed")
                    for frame in frames:
                        self._reject(frame.camera, ErrorReason.INTERNAL, f"inference failed: {exc}", frame.frame_id)

    def _process(self, frames: list[Frame]) -> None:
        started = time.monotonic()
        crop = self.manifest.preprocessing.crop
        batch = np.empty((len(frames), 3, crop, crop), dtype=np.float32)
        ready: list[tuple[Frame, float]] = []
        for frame in frames:
            t0 = time.monotonic()
            try:
                self.preprocess(decode_bgr(frame.data), batch[len(ready)])
            except UndecodableFrame as exc:
                self._reject(frame.camera, ErrorReason.UNDECODABLE, str(exc), frame.frame_id)
                continue
            ready.append((frame, time.monotonic() - t0))
        if not ready:
            return
        t0 = time.monotonic()
        logits = self.session.run(batch[: len(ready)])
        inference_s = time.monotonic() - t0
        self.batches.add()
        indices, scores = top_k(logits, self.settings.top_k)
        for i, (frame, preprocess_s) in enumerate(ready):
            self._publish_prediction(frame, indices[i], scores[i], started, preprocess_s, inference_s, len(ready))

    def _publish_prediction(
        self, frame: Frame, indices: np.ndarray, scores: np.ndarray,
        started: float, preprocess_s: float, inference_s: float, batch_size: int,
    ) -> None:
        labels = self.manifest.labels
        now = time.monotonic()
        prediction = Prediction(
            device=self._device,
            camera=frame.camera,
            frame_id=frame.frame_id,
            captured_at=frame.captured_at,
            top=[ClassScore(index=int(c), label=labels[c], score=round(float(p), 5)) for c, p in zip(indices, scores)],
            model=self.manifest.ref(),
            provider=self.session.provider.active,
            timings=Timings(
                queued_ms=_ms(started - frame.received),
                preprocess_ms=_ms(preprocess_s),
                inference_ms=_ms(inference_s),
                total_ms=_ms(now - frame.received),
                batch_size=batch_size,
            ),
            published_at=time.time(),
        )
        fmt = self.settings.prediction_format
        self.link.publish(
            topics.predictions(self._device, frame.camera),
            encode(prediction, fmt),
            qos=self.settings.prediction_qos,
            content_type=fmt.content_type,
        )
        self.published.add()

    # -- reports -----------------------------------------------------------------------------------

    def _reject(self, camera: str | None, reason: ErrorReason, detail: str, frame_id: str | None) -> None:
        self.rejected.add()
        log.info("frame rejected", extra=fields(camera=camera, frame_id=frame_id, reason=reason.value, detail=detail))
        self._report(reason, detail, camera, frame_id)

    def _report(self, reason: ErrorReason, detail: str, camera: str | None = None, frame_id: str | None = None) -> None:
        report = ErrorReport(
            device=self._device, service=SERVICE, reason=reason, detail=detail,
            camera=camera, frame_id=frame_id, at=time.time(),
        )
        fmt = self.settings.prediction_format
        self.link.publish(topics.errors(self._device), encode(report, fmt), qos=self.settings.prediction_qos, content_type=fmt.content_type)

    def _fallback_text(self) -> str:
        p = self.session.provider
        return f"requested {p.requested[0]} but running on {p.active} (available: {', '.join(p.available)})"

    def stats(self) -> InferenceStats:
        return InferenceStats(
            frames_received=self.received.value,
            frames_rejected=self.rejected.value,
            frames_dropped=self.dropped.value,
            predictions_published=self.published.value,
            batches=self.batches.value,
            queue_depth=len(self.backlog),
        )

    def status(self, state: ServiceState, reason: str | None = None, with_stats: bool = True) -> ServiceStatus:
        return ServiceStatus(
            device=self._device,
            service=SERVICE,
            state=state,
            at=time.time(),
            edgefleet_version=VERSION,
            reason=reason,
            model=self.manifest.ref(),
            provider=self.session.provider,
            inference=self.stats() if with_stats else None,
        )

    def _publish_status(self) -> None:
        self.link.publish(
            topics.status(self._device, SERVICE),
            encode(self.status(ServiceState.ONLINE)),
            qos=1, retain=True, content_type=WireFormat.JSON.content_type,
        )


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


def main(settings: InferenceSettings) -> int:
    logs.setup(SERVICE, settings.device_id, settings.log_level, settings.log_format)
    try:
        service = InferenceService(settings)
    except (ModelError, ProviderRefused, ValueError) as exc:
        log.error("cannot start", extra=fields(error=str(exc)))
        print(f"edgefleet inference: cannot start: {exc}", file=sys.stderr)
        return 3
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: service.stop())
    return service.run()
