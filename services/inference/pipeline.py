"""A frame's way through the service, top to bottom:

    receive  (paho's network thread, Receiver)   header-only checks, then into the bounded backlog
    batch    (each worker thread, Worker)        up to max_batch frames, across cameras
    decode   (decode_batch)                      JPEG/PNG to pixels to the model's input tensor
    infer    (BatchRun)                          one ONNX Runtime run for the batch, top-k, features
    publish  (publish.Publisher)                 one prediction per frame, or an error report

Frames are decoded only once a worker takes them, so the frames overload drops cost no decode (as
Vector's buffers hold events undecoded). Every frame received ends in exactly one of: a prediction
(published or lost), an error report (rejected), or a drop; the Counters say which.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import paho.mqtt.client as paho

from services.inference.batcher import FrameBacklog
from services.inference.counters import Counters
from services.inference.decode import decode_bgr
from services.inference.errors import Closed, FrameRejected, UndecodableFrame
from services.inference.features import summarise
from services.inference.intake import Frame, Intake, clip
from services.inference.postprocess import top_k
from services.inference.publisher import Publisher
from services.inference.swap import ServedModel
from shared import topics
from shared.lifecycle import Progress
from shared.logs import fields
from shared.mqtt import content_type_of
from shared.schemas import ClassScore, ErrorReason, Prediction, Timings

log = logging.getLogger(__name__)


# -- receive -----------------------------------------------------------------------------------------


class Receiver:
    """The frames subscription's handler: a message becomes a queued Frame, or an error report.

    Runs on paho's network thread, so it only reads headers (Intake); a full backlog drops the oldest
    frame of the fullest camera, counted, never blocks.
    """

    def __init__(self, *, intake: Intake, backlog: FrameBacklog, publisher: Publisher, counters: Counters) -> None:
        self._intake, self._backlog, self._publisher, self._counters = intake, backlog, publisher, counters

    def __call__(self, message: paho.MQTTMessage) -> None:
        camera = topics.last_level(message.topic)
        self._counters.received.add()
        # paho hands received payloads as bytes; bytes() of bytes is the same object, not a copy.
        payload = bytes(message.payload)
        try:
            frame = self._intake.parse(camera, payload, content_type_of(message))
        except FrameRejected as rejected:
            self._publisher.reject(camera=camera, reason=rejected.reason, detail=rejected.detail,
                                   frame_id=rejected.frame_id)
            return
        try:
            if (dropped := self._backlog.put(frame)) is not None:
                self._counters.drop(dropped.camera)
        except Closed:  # arrived while shutting down, after intake stopped
            self._counters.drop(camera)


# -- batch ---------------------------------------------------------------------------------------------


class Worker:
    """One worker thread's loop: takes a batch from the backlog, decodes it, runs the model, publishes.

    Args:
        backlog: where the Receiver queues frames.
        serving: the model served now; read once per batch, so a batch is decoded, run and labelled by
            one model whatever a swap does meanwhile.
        publisher: sends the predictions and error reports.
        counters: where batches are counted.
        device: the device id the predictions name.
        max_batch: most frames in one run.
        max_wait_s: how long a batch may wait for more frames after its first.
        top_k: classes per prediction.
    """

    def __init__(self, *, backlog: FrameBacklog, serving: Callable[[], ServedModel], publisher: Publisher,
                 counters: Counters, device: str, max_batch: int, max_wait_s: float, top_k: int) -> None:
        self._backlog, self._serving, self._publisher, self._counters = backlog, serving, publisher, counters
        self._device, self._max_batch, self._max_wait_s, self._top_k = device, max_batch, max_wait_s, top_k

    def run(self, progress: Progress) -> None:
        """Answers batches until the backlog is closed and drained, ticking `progress` every time round."""
        # take() returns at least every half second when idle: an idle worker ticks, a stuck one does not.
        while (frames := self._backlog.take(self._max_batch, self._max_wait_s)) is not None:
            progress.tick()
            if not frames:
                continue
            try:
                self.answer(frames)
            except Exception:  # a bug must not stop the worker; model failures are reported in answer()
                log.exception("batch abandoned", extra=fields(frames=[f.frame_id for f in frames]))

    def answer(self, frames: list[Frame]) -> None:
        """Publishes a prediction or an error report for each frame of the batch."""
        model = self._serving()
        batch, ready = decode_batch(model, frames, self._publisher)
        if not ready:
            return
        started = time.monotonic()
        try:
            logits = model.session.run(batch)
        except Exception as exc:  # e.g. an execution provider failing: every frame hears why
            log.exception("inference failed")
            for item in ready:
                self._publisher.reject(camera=item.frame.camera, reason=ErrorReason.INTERNAL,
                                       detail=f"inference failed: {clip(str(exc))}", frame_id=item.frame.frame_id)
            return
        run = BatchRun.of(model, batch, logits, started=started, k=self._top_k)
        self._counters.batches.add()
        for i, item in enumerate(ready):
            self._publisher.prediction(run.prediction(i, item, device=self._device))


# -- decode --------------------------------------------------------------------------------------------


@dataclass(slots=True)
class Prepared:
    """A frame decoded and preprocessed into its slot of the batch."""

    frame: Frame
    preprocess_s: float


def decode_batch(model: ServedModel, frames: list[Frame], publisher: Publisher) -> tuple[np.ndarray, list[Prepared]]:
    """The model's input tensor for the frames that decode, and those frames, in order.

    A frame that cannot be used is answered with an error report (through `publisher`) and takes no
    slot. Returns (NCHW float32 batch of len(ready) rows, ready).
    """
    crop = model.manifest.preprocessing.crop
    batch = np.empty((len(frames), 3, crop, crop), dtype=np.float32)
    ready: list[Prepared] = []
    for frame in frames:
        if (preprocess_s := _prepare(model, frame, batch[len(ready)], publisher)) is not None:
            ready.append(Prepared(frame, preprocess_s))
    return batch[: len(ready)], ready


def _prepare(model: ServedModel, frame: Frame, slot: np.ndarray, publisher: Publisher) -> float | None:
    """Decodes and preprocesses into the batch slot; returns the seconds it took, or None after
    reporting a frame that cannot be used."""
    t0 = time.monotonic()
    try:
        model.preprocess(decode_bgr(frame.data, model.decode_min_side), slot)
    except UndecodableFrame as exc:
        publisher.reject(camera=frame.camera, reason=ErrorReason.UNDECODABLE, detail=str(exc), frame_id=frame.frame_id)
        return None
    except Exception as exc:  # an image OpenCV decoded but we cannot use: report, keep serving
        log.exception("preprocessing failed")
        publisher.reject(camera=frame.camera, reason=ErrorReason.INTERNAL,
                         detail=f"preprocessing failed: {clip(str(exc))}", frame_id=frame.frame_id)
        return None
    return time.monotonic() - t0


# -- infer ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class BatchRun:
    """One model run over a batch: what each of its predictions is made from."""

    model: ServedModel
    started: float  # monotonic: when the run began
    inference_s: float
    classes: np.ndarray  # (frames, k) class indices, best first
    scores: np.ndarray  # (frames, k) probabilities
    features: np.ndarray  # (frames, 7) input summaries for drift detection

    @classmethod
    def of(cls, model: ServedModel, batch: np.ndarray, logits: np.ndarray, *, started: float, k: int) -> BatchRun:
        """The run's top-k classes and input features; `started` is when the run began (monotonic)."""
        inference_s = time.monotonic() - started
        classes, scores = top_k(logits, k)
        return cls(model=model, started=started, inference_s=inference_s, classes=classes, scores=scores,
                   features=summarise(batch))

    def prediction(self, i: int, item: Prepared, *, device: str) -> Prediction:
        """The prediction for the batch's i-th frame, timed from its arrival to now."""
        frame, labels = item.frame, self.model.manifest.labels
        now = time.monotonic()
        return Prediction(
            device=device,
            camera=frame.camera,
            frame_id=frame.frame_id,
            captured_at=frame.captured_at,
            top=[ClassScore(index=int(c), label=labels[c], score=round(float(p), 5))
                 for c, p in zip(self.classes[i], self.scores[i], strict=True)],
            model=self.model.ref,
            provider=self.model.session.provider.active,
            timings=Timings(
                queued_ms=_ms(self.started - frame.received - item.preprocess_s),
                preprocess_ms=_ms(item.preprocess_s),
                inference_ms=_ms(self.inference_s),
                total_ms=_ms(now - frame.received),
                batch_size=len(self.classes),
            ),
            published_at=time.time(),
            features=[round(float(f), 4) for f in self.features[i]],
        )


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)
