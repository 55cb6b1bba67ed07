"""A frame's way through the service, top to bottom:

    receive  (paho's network thread, Receiver)   header-only checks, then into the bounded backlog
    batch    (each worker thread, Worker)        up to max_batch frames, across cameras
    cache    (cache.SceneCache, when enabled)    repeats and unchanged scenes answered, before any decode
    decode   (decode_batch)                      JPEG/PNG to pixels to the model's input tensor, and each
                                                 frame's input summary (features.py) while it is in cache
    infer    (BatchRun)                          one ONNX Runtime run for the batch, top-k;
                                                 a cascade's unsure rows run again on stage 2
    plugins  (plugins.PluginRunner)              each WebAssembly plugin, in order, keeps, replaces or
                                                 drops the prediction (the model's or the cache's)
    publish  (publisher.Publisher)               one prediction per frame, or an error report

Frames are decoded only once a worker takes them, so the frames overload drops cost no decode (as
Vector's buffers hold events undecoded). Every frame received ends in exactly one of: a prediction
(published or lost), an error report (rejected), a drop, or a plugin's drop; the Counters say which.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import paho.mqtt.client as paho

from services.inference.batcher import CameraCounts, FrameBacklog
from services.inference.cache import Hit, Probe, SceneCache
from services.inference.counters import Counters
from services.inference.decode import decode_bgr, image_size
from services.inference.errors import Closed, FrameRejected, UndecodableFrame
from services.inference.features import summarise
from services.inference.intake import Frame, Intake, clip
from services.inference.plugins import PluginRunner, PluginSet
from services.inference.postprocess import top_k
from services.inference.publisher import Publisher
from services.inference.session import ModelSession
from services.inference.swap import ServedModel
from shared import topics
from shared.cascade import stage1_metric
from shared.lifecycle import Progress
from shared.logs import fields
from shared.mqtt import content_type_of
from shared.schemas import CascadeAnswer, ClassScore, ErrorReason, Prediction, Timings

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
        if not topics.is_id(camera):
            # The camera names the prediction's topic, the counters and the metrics' labels, and a topic
            # level may be 65535 bytes: a name no camera could log in with goes no further than here.
            self._counters.receive(CameraCounts.OTHER)
            self._publisher.reject(camera=None, reason=ErrorReason.INVALID_CAMERA, frame_id=None,
                                   detail=f"the topic's camera {clip(camera, 80)!r} is not a camera id: "
                                          f"{topics.ID_RULE}")
            return
        self._counters.receive(camera)
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
        max_image_pixels: the largest image a plugin's `infer` import decodes (the frames' pixel budget).
        max_image_bytes: the longest encoded image a plugin's `infer` import takes (the frames' byte budget).
        cache: the scene cache, or None (disabled: the path never touches it).
        plugins: the plugin set running now, read once per batch like `serving`; None: no plugins.
    """

    def __init__(self, *, backlog: FrameBacklog, serving: Callable[[], ServedModel], publisher: Publisher,
                 counters: Counters, device: str, max_batch: int, max_wait_s: float, top_k: int,
                 max_image_pixels: int, max_image_bytes: int, cache: SceneCache | None = None,
                 plugins: Callable[[], PluginSet] | None = None) -> None:
        self._backlog, self._serving, self._publisher, self._counters = backlog, serving, publisher, counters
        self._device, self._max_batch, self._max_wait_s, self._top_k = device, max_batch, max_wait_s, top_k
        self._cache, self._plugins = cache, plugins
        self._max_image_pixels, self._max_image_bytes = max_image_pixels, max_image_bytes

    def run(self, progress: Progress) -> None:
        """Answers batches until the backlog is closed and drained, ticking `progress` every time round."""
        # The thread's own plugin instances: a wasm instance is not thread-safe.
        runner = None if self._plugins is None else PluginRunner(
            plugins=self._plugins, publisher=self._publisher,
            context=lambda frame, model: FrameContext(frame, model, max_pixels=self._max_image_pixels,
                                                      max_bytes=self._max_image_bytes))
        # take() returns at least every half second when idle: an idle worker ticks, a stuck one does not.
        while (frames := self._backlog.take(self._max_batch, self._max_wait_s)) is not None:
            progress.tick()
            if not frames:
                continue
            try:
                self.answer(frames, runner)
            except Exception:  # a bug must not stop the worker; model failures are reported in answer()
                log.exception("batch abandoned", extra=fields(frames=[f.frame_id for f in frames]))

    def answer(self, frames: list[Frame], plugins: PluginRunner | None = None) -> None:
        """Publishes a prediction or an error report for each frame of the batch.

        Args:
            frames: the batch.
            plugins: this thread's plugin runner (None: no plugins run).
        """
        model = self._serving()
        if plugins is not None:
            plugins.next_batch()  # the batch meets one plugin set, as it meets one model
        probes: dict[int, Probe] = {}  # by id() of the frames the cache did not answer
        if self._cache is not None:
            frames = self._answer_from_cache(self._cache, model, frames, probes, plugins)
        batch, ready = decode_batch(model, frames, self._publisher)
        if not ready:
            return
        try:
            run = BatchRun.of(model, batch, k=self._top_k, features=np.stack([item.features for item in ready]),
                              summary_s=sum(item.summary_s for item in ready))
        except Exception as exc:  # e.g. an execution provider failing: every frame hears why
            log.exception("inference failed")
            for item in ready:
                self._publisher.reject(camera=item.frame.camera, reason=ErrorReason.INTERNAL,
                                       detail=f"inference failed: {clip(str(exc))}", frame_id=item.frame.frame_id)
            return
        self._counters.batches.add()
        for i, item in enumerate(ready):
            if run.stage2_failure is not None and run.escalated[i]:
                self._publisher.reject(camera=item.frame.camera, reason=ErrorReason.INTERNAL,
                                       detail=f"inference failed (the cascade's stage 2): {run.stage2_failure}",
                                       frame_id=item.frame.frame_id)
                continue
            try:
                prediction = run.prediction(i, item, device=self._device)
                self._publish(prediction, item.frame, model, plugins)
            except Exception as exc:  # one frame's failure must not cost the rest of the batch its answers
                self._failed(item.frame, "publishing its prediction", exc)
                continue
            if self._cache is not None and (probe := probes.get(id(item.frame))) is not None:
                try:
                    self._cache.remember(item.frame, probe, prediction)  # the scene's new reference
                except Exception:  # the cache must never cost the rest of the batch its answers
                    log.exception("scene cache remember failed", extra=fields(frame_id=item.frame.frame_id))

    def _failed(self, frame: Frame, step: str, exc: Exception) -> None:
        """Answers a frame whose own step failed with an internal error report, logged; a report that
        cannot be sent either is logged only, and the batch goes on."""
        log.exception("frame failed", extra=fields(frame_id=frame.frame_id, step=step))
        try:
            self._publisher.reject(camera=frame.camera, reason=ErrorReason.INTERNAL,
                                   detail=f"{step} failed: {clip(str(exc))}", frame_id=frame.frame_id)
        except Exception:
            log.exception("error report failed", extra=fields(frame_id=frame.frame_id))

    def _publish(self, prediction: Prediction, frame: Frame, model: ServedModel, plugins: PluginRunner | None) -> None:
        """The plugins step, then publish: what the plugins make of the prediction, unless one dropped it.

        The scene cache keeps the model's own answer: a cached answer meets the plugins again."""
        if plugins is not None:
            changed = plugins.apply(prediction, frame, model)
            if changed is None:
                self._counters.dropped_by_plugins.add()
                return
            prediction = changed
        self._publisher.prediction(prediction)

    # -- scene cache: before any decode; frames it answers never reach decode_batch or the model --------

    def _answer_from_cache(self, cache: SceneCache, model: ServedModel, frames: list[Frame],
                           probes: dict[int, Probe], plugins: PluginRunner | None) -> list[Frame]:
        """Publishes a cached prediction for each frame the cache answers; returns the others, in order,
        each one's probe put in `probes` for remember()."""
        left = []
        for frame in frames:
            taken = time.monotonic()
            try:
                found = cache.check(frame, model.ref)
                if isinstance(found, Hit):
                    answer = found.prediction(frame, taken=taken, checked_s=time.monotonic() - taken)
            except Exception:  # the cache must never cost a frame its answer: the model answers it
                log.exception("scene cache check failed", extra=fields(frame_id=frame.frame_id))
                found = None
            if isinstance(found, Hit):
                try:
                    self._publish(answer, frame, model, plugins)
                except Exception as exc:  # as a model-run frame's: the others of the batch go on
                    self._failed(frame, "publishing its cached prediction", exc)
                continue
            if found is not None:
                probes[id(frame)] = found
            left.append(frame)
        return left


# -- decode --------------------------------------------------------------------------------------------


@dataclass(slots=True)
class Prepared:
    """A frame decoded and preprocessed into its slot of the batch, and its input summary (features.py)."""

    frame: Frame
    preprocess_s: float
    features: np.ndarray  # (7,)
    summary_s: float  # taking `features`: the service's own work, never the frame's queue wait


def decode_batch(model: ServedModel, frames: list[Frame], publisher: Publisher) -> tuple[np.ndarray, list[Prepared]]:
    """The model's input tensor for the frames that decode, and those frames, in order.

    A frame that cannot be used is answered with an error report (through `publisher`) and takes no
    slot. Returns (NCHW float32 batch of len(ready) rows, ready).
    """
    crop = model.manifest.preprocessing.crop
    batch = np.empty((len(frames), 3, crop, crop), dtype=np.float32)
    ready: list[Prepared] = []
    for frame in frames:
        slot = batch[len(ready)]
        if (preprocess_s := _prepare(model, frame, slot, publisher)) is not None:
            # Summarised now, while the slot preprocessing just wrote is still in the CPU's cache: a model
            # run evicts it (in-process, batch 1: 76 µs on the hot slot, 330 µs right after a run). In the
            # service (bench pipeline's device core, batch 1, 2026-12-07) the step's p50 went from 309 to
            # 167-184 µs a frame, with features.py's contiguous pass; top-k, now the first numpy work after
            # the run, pays 40-60 µs more of the refill. Outside preprocess_s and queued_ms (summary_s):
            # the service's own work.
            t0 = time.monotonic()
            features = summarise(slot[None])[0]
            ready.append(Prepared(frame, preprocess_s, features, time.monotonic() - t0))
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
    """One model run over a batch: what each of its predictions is made from.

    For a cascade, stage 1 runs on the whole batch and the rows whose metric falls below the threshold
    run on stage 2 as one sub-batch, whose answers replace stage 1's for those rows.
    """

    model: ServedModel
    started: float  # monotonic: when the run began
    inference_s: float  # the model's run over the batch (a cascade's stage 1)
    classes: np.ndarray  # (frames, k) class indices, best first
    scores: np.ndarray  # (frames, k) probabilities
    features: np.ndarray  # (frames, 7) input summaries for drift detection; (frames, 0) for a plugin's run
    # All the batch's input summaries, taken before `started` (decode_batch, for the CPU cache's sake):
    # kept out of every frame's queued_ms, which is waiting, as when they ran after the model; total_ms
    # counts them.
    summary_s: float
    escalated: np.ndarray  # (frames,) bool: answered by a cascade's stage 2
    metric: np.ndarray | None = None  # (frames,) a cascade's stage-1 margin or confidence
    escalation_s: float = 0.0  # stage 2's run over the escalated rows
    # Why stage 2 failed, if it did: its frames are answered with an error report, the frames stage 1
    # answered still get their predictions (stage 1's answers stand whatever stage 2 does).
    stage2_failure: str | None = None

    @classmethod
    def of(cls, model: ServedModel, batch: np.ndarray, *, k: int, features: np.ndarray,
           summary_s: float = 0.0) -> BatchRun:
        """Runs the model (a cascade: both stages, as needed) on the batch; top-k classes, the caller's
        features kept.

        Args:
            model: the model to run.
            batch: its NCHW float32 input.
            k: classes per row.
            features: the batch's (frames, 7) input summaries, taken by the caller (decode_batch takes
                them while each slot is in cache); (frames, 0) where no prediction is made of the run.
            summary_s: the seconds the caller spent taking `features` (kept out of queued_ms).

        Raises:
            Exception: whatever ONNX Runtime raises when the run (a cascade's stage 1) fails: no frame of
                the batch gets an answer. A failure of stage 2 is kept in stage2_failure instead.
        """
        started = time.monotonic()
        logits = model.session.run(batch)
        inference_s = time.monotonic() - started
        if model.escalation is None:
            classes, scores = top_k(logits, k)
            return cls(model=model, started=started, inference_s=inference_s, classes=classes, scores=scores,
                       features=features, summary_s=summary_s, escalated=np.zeros(len(classes), dtype=bool))
        escalation = model.escalation
        # top-2 at least: the margin needs the runner-up even when one class is asked for
        classes, scores = top_k(logits, max(k, 2))
        metric = stage1_metric(scores, escalation.spec.metric)
        classes, scores = classes[:, :k], scores[:, :k]
        escalated = metric < escalation.spec.threshold
        escalation_s, failure = 0.0, None
        if (rows := np.flatnonzero(escalated)).size:
            t0 = time.monotonic()
            try:
                # One run over a contiguous copy of the unsure rows: ONNX Runtime's per-run cost is paid
                # once per batch, as for stage 1, never once per frame.
                logits = escalation.session.run(np.take(batch, rows, axis=0))
                classes[rows], scores[rows] = top_k(logits, k)
            except Exception as exc:  # e.g. stage 2's execution provider failing
                log.exception("inference failed in the cascade's stage 2")
                failure = clip(str(exc))
            escalation_s = time.monotonic() - t0
        return cls(model=model, started=started, inference_s=inference_s, classes=classes, scores=scores,
                   features=features, summary_s=summary_s, escalated=escalated, metric=metric,
                   escalation_s=escalation_s, stage2_failure=failure)

    def prediction(self, i: int, item: Prepared, *, device: str) -> Prediction:
        """The prediction for the batch's i-th frame, timed from its arrival to now."""
        frame, labels = item.frame, self.model.manifest.labels
        session, inference_s, cascade = self._answered_by(i)
        now = time.monotonic()
        return Prediction(
            device=device,
            camera=frame.camera,
            frame_id=frame.frame_id,
            captured_at=frame.captured_at,
            top=[ClassScore(index=int(c), label=labels[c], score=round(float(p), 5))
                 for c, p in zip(self.classes[i], self.scores[i], strict=True)],
            model=self.model.ref,
            provider=session.provider.active,
            timings=Timings(
                queued_ms=_ms(self.started - frame.received - item.preprocess_s - self.summary_s),
                preprocess_ms=_ms(item.preprocess_s),
                inference_ms=_ms(inference_s),
                total_ms=_ms(now - frame.received),
                batch_size=len(self.classes),
            ),
            published_at=time.time(),
            features=[round(float(f), 4) for f in self.features[i]],
            cascade=cascade,
        )

    def _answered_by(self, i: int) -> tuple[ModelSession, float, CascadeAnswer | None]:
        """The session that answered row i, the model time it cost, and (cascade) which stage it was.

        An escalated frame cost both runs; a frame stage 1 answered, stage 1's run alone (it waits for
        stage 2 only to be published with its batch, which total_ms shows).
        """
        if (escalation := self.model.escalation) is None or self.metric is None:
            return self.model.session, self.inference_s, None
        up = bool(self.escalated[i])
        answer = CascadeAnswer(stage=2 if up else 1, small=escalation.small, large=escalation.large,
                               score=round(float(self.metric[i]), 5))
        if up:
            return escalation.session, self.inference_s + self.escalation_s, answer
        return self.model.session, self.inference_s, answer


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


# -- plugins -------------------------------------------------------------------------------------------


class FrameContext:
    """What one plugin call's host imports reach (wasm.HostContext): the prediction's frame, and the
    model that answered it, run as the service runs it (BatchRun: a cascade answers with both stages).

    Args:
        frame: the frame the prediction answers.
        model: the model that answered it.
        max_pixels: the largest image `infer_image` decodes, checked in its header first.
        max_bytes: the longest encoded image `infer` takes (the service's max_frame_bytes).

    Attributes:
        max_image_bytes: max_bytes, for the host to check before it copies an image out of the plugin.
        tensor_bytes: the served model's input in bytes, for the host to check before it copies a tensor.
    """

    __slots__ = ("_frame", "_max_pixels", "_model", "max_image_bytes", "tensor_bytes")

    def __init__(self, frame: Frame, model: ServedModel, *, max_pixels: int, max_bytes: int) -> None:
        self._frame, self._model, self._max_pixels = frame, model, max_pixels
        self.max_image_bytes = max_bytes
        crop = model.manifest.preprocessing.crop
        self.tensor_bytes = 4 * 3 * crop * crop

    def frame(self) -> bytes | None:
        """The encoded frame, as the camera sent it."""
        return self._frame.data

    def infer_image(self, data: bytes, x: int, y: int, w: int, h: int) -> np.ndarray | None:
        """The served model's probabilities for a pixel rectangle of an encoded image.

        Args:
            data: JPEG or PNG bytes (a plugin's: bounded by its memory, checked here before decoding).
            x, y, w, h: the rectangle in the image's full-resolution pixels; w = h = 0: the whole image.

        Returns:
            float32 probabilities, one per class; None: undecodable, over the pixel budget, or the
            rectangle is empty or not inside the image.

        Raises:
            RuntimeError: a cascade's stage 2 failed on this crop (the host reports the call's fault).
        """
        size = image_size(data)
        if size is None or size[0] * size[1] > self._max_pixels:
            return None
        try:
            bgr = decode_bgr(data)  # every pixel: the rectangle is in the image's own coordinates
        except UndecodableFrame:
            return None
        height, width = bgr.shape[:2]
        if w or h:
            if not (w > 0 and h > 0 and 0 <= x <= width - w and 0 <= y <= height - h):
                return None
            bgr = bgr[y : y + h, x : x + w]
        crop = self._model.manifest.preprocessing.crop
        batch = np.empty((1, 3, crop, crop), dtype=np.float32)
        self._model.preprocess(bgr, batch[0])
        return self._probabilities(batch)

    def infer_tensor(self, tensor: np.ndarray) -> np.ndarray:
        """The served model's probabilities for a ready (1, 3, crop, crop) float32 input.

        Raises:
            ValueError: another shape or type (the host reports the call's fault).
            RuntimeError: a cascade's stage 2 failed on it.
        """
        crop = self._model.manifest.preprocessing.crop
        if tensor.shape != (1, 3, crop, crop) or tensor.dtype != np.float32:
            raise ValueError(f"infer_tensor takes float32 (1, 3, {crop}, {crop}), not {tensor.dtype} {tensor.shape}")
        return self._probabilities(tensor)

    def _probabilities(self, batch: np.ndarray) -> np.ndarray:
        classes = len(self._model.manifest.labels)
        # A plugin reads probabilities, never a prediction: no input summary, which would cost its
        # deadline 0.08-0.33 ms a call (decode_batch's figures, hot and cold).
        run = BatchRun.of(self._model, batch, k=classes, features=np.empty((len(batch), 0), dtype=np.float32))
        if run.stage2_failure is not None and run.escalated[0]:
            raise RuntimeError(f"the cascade's stage 2 failed: {run.stage2_failure}")
        probabilities = np.zeros(classes, dtype=np.float32)
        probabilities[run.classes[0]] = run.scores[0]
        return probabilities
