"""The scene cache: a frame whose answer the model has already given is answered without a model run.

A frame matches in one of two ways (docs/protocol.md, "Cached predictions"):

- exact: the same decoded pixels as a frame the model answered, found by a 16-byte BLAKE2b digest of
  what decides them (pixel_digest: a JPEG's or PNG's bytes less the metadata that cameras stamp into
  every frame and the decoder never turns into pixels, such as COM, most APPn, an EXIF DateTime, PNG
  text; anything it cannot parse, all of its bytes) in a bounded LRU shared by all cameras. Exact
  hits do not count against max_consecutive: the same pixels through the same model give the same
  answer, so a re-run would prove nothing. They do expire after max_age_s, so that no cached answer
  of either kind is older than max_age_s (one bound on staleness for consumers) and a frozen camera
  still has its frame re-run, the model path re-proved, that often.
- scene: per camera (at most MAX_CAMERAS; past that the camera forgotten is the one whose latest frame
  the cache looked at, checked, backing off or exact, is the oldest), the grey thumbnail of the
  last frame the model really ran on, its answer, and how many cached answers were given since. A
  frame whose thumbnail differs from that reference by at most `threshold` (mean absolute difference,
  grey levels), while the reference is at most max_age_s old and fewer than max_consecutive cached
  answers were given in a row, is answered from it; otherwise it goes to the model and its answer
  becomes the camera's new reference. The cap means a slow drift below the threshold is re-checked.
  A camera whose scene keeps changing backs off: from its second change in a row, 1, 3, 7, then 15
  frames go to the model unchecked before the next check, and the first hit ends the back-off.
  An answer whose top-1 margin is under min_margin is never reused, so while a camera's reference
  answer is unsure its frames skip the thumbnail; a sure answer to such a frame has its thumbnail
  decoded when it is remembered, so the next frame can already be answered from it.

Nothing outlives a model swap: an entry is given only to frames served by the model that made it
(name, version and SHA-256), and the service clears the cache when it installs a model. Two guards,
for two races: answers of frames checked before the clear are not remembered after it (their probes
carry the cache's generation); and a batch checked after the clear but run by the old model (taken
just before the install) is remembered under the old model's name, which no frame served by the new
model is ever given.

Ages are on the service's monotonic clock, between the arrivals (Frame.received) of the frame answered
and of the frame the model ran on: how old the observation of the scene is.

Cost, measured on the 8 bundled photos (edgefleet.photos, 35-265 KB JPEGs) with timeit on 2026-12-07,
on this 2-core machine while other work ran on it (the fastest of 5-7 timeit repeats): a check on a
camera with a sure reference takes 0.81 ms a frame on average (the grey thumbnail 0.68, from 0.30 to
2.2; the digest 0.086, 0.083 for a digest of all the bytes), against 1.1 ms for the full decode and
preprocessing and 6.7 ms of model run per frame at batch 8 (measured before). So a hit saves about
7 ms, but a check on every frame of a scene that keeps changing would cost about a tenth of the
throughput: the reduced decode still entropy-decodes the whole JPEG, most of a decode's work; hence
the back-off. A camera whose reference answer is unsure pays the digest alone (0.09 ms, against 0.75
ms when it decoded the thumbnail too). What the cache costs a stream where every frame changes is
measured by `edgefleet bench pipeline` ("changing frames: cache on / off" in README.md), not here.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

import cv2
import numpy as np

from services.inference.decode import grey_thumbnail
from services.inference.errors import UndecodableFrame
from services.inference.intake import Frame
from services.inference.pixel_digest import pixel_digest
from shared.config import CacheSettings
from shared.schemas import CacheSource, ModelRef, Prediction, Timings

# Cameras whose reference scene is kept; the least recently seen is forgotten past this (as many as
# the status names in dropped_by_camera).
MAX_CAMERAS = 256
# A camera whose scene keeps changing is checked on one frame in this many at least (see _scene_hit).
MAX_BACKOFF = 16


@dataclass(frozen=True, slots=True)
class Probe:
    """What the check learnt of a frame it could not answer, remembered with the model's answer.

    Attributes:
        digest: the digest of what decides the frame's pixels (pixel_digest; None: exact matching is off).
        thumbnail: the frame's grey thumbnail; None where its camera's reference answer was unsure, so
            none was decoded (remember() decodes it if the answer to this frame is sure).
        model: the model serving the frame's batch.
        generation: the cache's generation at the check (a clear since makes the probe stale).
    """

    digest: bytes | None
    thumbnail: np.ndarray | None
    model: ModelRef
    generation: int


@dataclass(frozen=True, slots=True)
class Hit:
    """A frame the cache answers: the model's answer to an earlier frame, and where it comes from."""

    reference: Prediction
    source: CacheSource

    def prediction(self, frame: Frame, *, taken: float, checked_s: float) -> Prediction:
        """The frame's cached prediction: the reference's answer (top, model, provider, features) under
        this frame's own camera, id and capture time, marked cached.

        Args:
            frame: the frame answered.
            taken: when a worker took the frame (monotonic).
            checked_s: seconds the cache check took, reported as its preprocessing.

        Returns:
            The prediction, inference_ms 0 and batch_size 0 (no model run), total_ms from arrival to now.
        """
        timings = Timings(queued_ms=_ms(taken - frame.received), preprocess_ms=_ms(checked_s), inference_ms=0.0,
                          total_ms=_ms(time.monotonic() - frame.received), batch_size=0)
        # model_copy, not a new Prediction: the answer's lists are shared, never mutated, and the
        # validator's rule (cached names its source) holds by construction.
        return self.reference.model_copy(update={
            "camera": frame.camera, "frame_id": frame.frame_id, "captured_at": frame.captured_at,
            "timings": timings, "published_at": time.time(), "cached": True, "cache": self.source,
        })


@dataclass(frozen=True, slots=True)
class _Answer:
    prediction: Prediction  # the model's own answer (never a cached one)
    received: float  # monotonic arrival of the frame the model ran on
    model: ModelRef  # the model served when it was asked


@dataclass(slots=True)
class _Camera:
    # The reference: the last checked frame the model ran on. None where that frame's check skipped
    # the thumbnail and its answer is unsure (or its thumbnail did not decode): no scene hit from it.
    thumbnail: np.ndarray | None
    answer: _Answer
    streak: int = 0  # cached answers given from this reference
    changes: int = 0  # checks in a row that found the scene changed
    unchecked: int = 0  # frames still to pass to the model without a check (back-off)


class SceneCache:
    """Answers repeated frames and unchanged scenes from the model's earlier answers.

    Safe for several workers: one lock, held only for dictionary work and one 32x32 difference; the
    digest and the thumbnail decode run outside it.

    Args:
        settings: threshold, thumbnail side, max_age_s, max_consecutive, exact_entries.
        cameras: most cameras with a reference scene.
    """

    def __init__(self, settings: CacheSettings, cameras: int = MAX_CAMERAS) -> None:
        self._settings = settings
        self._cameras = cameras
        self._lock = threading.Lock()
        self._exact: OrderedDict[bytes, _Answer] = OrderedDict()
        self._scenes: OrderedDict[str, _Camera] = OrderedDict()
        self._generation = 0

    def check(self, frame: Frame, model: ModelRef) -> Hit | Probe | None:
        """Whether the cache can answer `frame` for `model`.

        Args:
            frame: a frame taken for a batch, not yet decoded.
            model: the model serving its batch.

        Returns:
            A Hit to publish; or a Probe to hand to remember() with the model's answer (without a
            thumbnail where the camera's reference answer is unsure); or None: the frame goes to the
            model unchecked (its camera is backing off, or its thumbnail cannot be decoded and the full
            decode will report it).
        """
        with self._lock:
            camera = self._seen(frame.camera)
            if camera is not None and camera.unchecked:  # backing off (see _scene_hit)
                camera.unchecked -= 1
                return None
        digest = pixel_digest(frame.data) if self._settings.exact_entries else None
        with self._lock:
            if digest is not None and (hit := self._exact_hit(digest, frame, model)) is not None:
                return hit
            if self._unsure(frame.camera, model):
                # The scene check could only miss (an unsure answer is never reused), and the thumbnail
                # is most of a check's cost: an unsure camera would pay it on every frame for nothing.
                # Only this case skips it. The other misses a reference alone decides (too old, streak
                # at the cap, another model) still decode it: they end with this frame's answer, which
                # is likely sure, and its thumbnail is then the reference the next frames are hit by.
                return Probe(digest, None, model, self._generation)
        try:
            thumbnail = grey_thumbnail(frame.data, self._settings.thumbnail)
        except UndecodableFrame:
            return None
        with self._lock:
            return self._scene_hit(frame, model, thumbnail) or Probe(digest, thumbnail, model, self._generation)

    def remember(self, frame: Frame, probe: Probe, answer: Prediction) -> None:
        """Keeps the model's answer to `frame` for the frames that repeat it.

        Args:
            frame: the frame the model ran on.
            probe: what check() returned for it.
            answer: the model's prediction for it (not a cached one).
        """
        entry = _Answer(answer, frame.received, probe.model)
        thumbnail = probe.thumbnail
        if thumbnail is None and margin(answer) >= self._settings.min_margin:
            # The check skipped it (the answer before was unsure), but this answer can be reused: decoded
            # now, once, rather than sending the next frame to the model to get a reference with one.
            try:
                thumbnail = grey_thumbnail(frame.data, self._settings.thumbnail)
            except UndecodableFrame:
                pass
        with self._lock:
            if probe.generation != self._generation:  # cleared since the check: a swap happened
                return
            if probe.digest is not None and self._settings.exact_entries:
                self._exact[probe.digest] = entry
                self._exact.move_to_end(probe.digest)
                while len(self._exact) > self._settings.exact_entries:
                    self._exact.popitem(last=False)
            camera = self._seen(frame.camera)
            if camera is None:
                self._scenes[frame.camera] = _Camera(thumbnail, entry)
                while len(self._scenes) > self._cameras:
                    self._scenes.popitem(last=False)
            elif camera.answer.received <= frame.received:  # workers finish out of order: the later frame wins
                camera.thumbnail, camera.answer, camera.streak = thumbnail, entry, 0

    def clear(self) -> None:
        """Forgets every answer (a model swap); answers of batches checked before are not remembered."""
        with self._lock:
            self._exact.clear()
            self._scenes.clear()
            self._generation += 1

    def _exact_hit(self, digest: bytes, frame: Frame, model: ModelRef) -> Hit | None:
        answer = self._exact.get(digest)
        if answer is None:
            return None
        age = frame.received - answer.received
        if answer.model != model or age > self._settings.max_age_s:
            return None
        self._exact.move_to_end(digest)
        return Hit(answer.prediction, CacheSource(frame_id=answer.prediction.frame_id, age_ms=_ms(max(age, 0.0)),
                                                  match="exact"))

    def _seen(self, name: str) -> _Camera | None:
        """The camera's entry, marked most recently seen: every frame the cache looks at counts, so
        the camera forgotten past the bound is the one whose frames stopped longest ago."""
        camera = self._scenes.get(name)
        if camera is not None:
            self._scenes.move_to_end(name)
        return camera

    def _unsure(self, name: str, model: ModelRef) -> bool:
        camera = self._scenes.get(name)
        return (camera is not None and camera.answer.model == model
                and margin(camera.answer.prediction) < self._settings.min_margin)

    def _scene_hit(self, frame: Frame, model: ModelRef, thumbnail: np.ndarray) -> Hit | None:
        camera = self._scenes.get(frame.camera)
        if camera is None:
            return None
        answer, age = camera.answer, frame.received - camera.answer.received
        if answer.model != model or age > self._settings.max_age_s or camera.streak >= self._settings.max_consecutive:
            return None
        if margin(answer.prediction) < self._settings.min_margin:
            return None  # an unsure answer flips with the sensor's noise: the model must see each frame
        if camera.thumbnail is None:
            return None  # its thumbnail did not decode when it was remembered: this frame's answer has one
        if difference(thumbnail, camera.thumbnail) > self._settings.threshold:
            # A camera whose scene keeps changing (moving, or panning) would pay the check on every
            # frame for nothing: from the second change in a row it skips 1, 3, 7, then 15 frames.
            camera.changes += 1
            camera.unchecked = min(1 << (camera.changes - 1), MAX_BACKOFF) - 1
            return None
        camera.streak, camera.changes = camera.streak + 1, 0
        return Hit(answer.prediction, CacheSource(frame_id=answer.prediction.frame_id, age_ms=_ms(max(age, 0.0)),
                                                  match="scene"))


def margin(prediction: Prediction) -> float:
    """The answer's top-1 probability minus its runner-up's (its top-1 alone when it names one class)."""
    top = prediction.top
    return top[0].score - (top[1].score if len(top) > 1 else 0.0)


def difference(a: np.ndarray, b: np.ndarray) -> float:
    """The change measure: mean absolute difference of two grey thumbnails, in grey levels (0-255)."""
    return float(cv2.absdiff(a, b).mean())


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)
