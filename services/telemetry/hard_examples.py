"""Hard examples: frames the model was unsure about (low top-1 confidence), forwarded with their
prediction at a bounded rate, for the cloud to calibrate and distil on. Frames are matched to their
predictions by frame id, so only enveloped frames (which carry one) can be sampled."""

from __future__ import annotations

import time
from collections import OrderedDict

from shared.schemas import Encoding, FrameEnvelope, HardExample, Prediction


class HardExampleSampler:
    def __init__(self, device: str, confidence_below: float, per_minute: float, frames_kept: int = 64) -> None:
        self.device, self.confidence_below = device, confidence_below
        self.capacity = max(per_minute, 1.0)
        self.rate_per_s = per_minute / 60.0
        self._tokens, self._refilled = self.capacity, time.monotonic()
        self._frames: OrderedDict[str, FrameEnvelope] = OrderedDict()
        self._kept = frames_kept
        self.skipped_over_rate = 0

    def remember(self, envelope: FrameEnvelope) -> None:
        self._frames[envelope.frame_id] = envelope
        while len(self._frames) > self._kept:
            self._frames.popitem(last=False)

    def consider(self, prediction: Prediction) -> HardExample | None:
        if not prediction.top or prediction.top[0].score >= self.confidence_below or self.rate_per_s <= 0:
            return None
        frame = self._frames.pop(prediction.frame_id, None)
        if frame is None:
            return None
        now = time.monotonic()
        self._tokens = min(self.capacity, self._tokens + (now - self._refilled) * self.rate_per_s)
        self._refilled = now
        if self._tokens < 1:
            self.skipped_over_rate += 1
            return None
        self._tokens -= 1
        return HardExample(device=self.device, encoding=Encoding(frame.encoding), data=frame.data,
                           prediction=prediction, at=time.time())
