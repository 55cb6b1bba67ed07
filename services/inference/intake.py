"""Receive: turns an MQTT frame message into a Frame, or rejects it with a reason.

Only cheap checks happen here, on the network thread: size, kind (raw image or envelope) and the
envelope's fields. Decoding the image waits until the frame is taken for a batch, so frames that
overload drops never cost a decode.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from itertools import count

from shared.codec import DecodeError, decode
from shared.schemas import ErrorReason, FrameEnvelope

_JPEG_MAGIC = b"\xff\xd8\xff"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@dataclass(slots=True)
class Frame:
    camera: str
    frame_id: str
    data: bytes
    captured_at: float | None
    received: float = field(default_factory=time.monotonic)


class FrameRejected(Exception):
    def __init__(self, reason: ErrorReason, detail: str, frame_id: str | None = None):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
        self.frame_id = frame_id


class Intake:
    def __init__(self, max_frame_bytes: int) -> None:
        self._max_bytes = max_frame_bytes
        # Raw frames carry no id: "<camera>-<n>", n counting every raw frame this service took, lets
        # clients correlate predictions.
        self._sequence = count(1)

    def parse(self, camera: str, payload: bytes, content_type: str | None) -> Frame:
        if not payload:
            raise FrameRejected(ErrorReason.EMPTY, "empty payload")
        if len(payload) > self._max_bytes:
            raise FrameRejected(
                ErrorReason.OVERSIZED, f"{len(payload)} bytes is over the limit of {self._max_bytes}"
            )
        if payload.startswith(_JPEG_MAGIC) or payload.startswith(_PNG_MAGIC):
            return Frame(camera, f"{camera}-{next(self._sequence)}", payload, None)
        try:
            envelope = decode(FrameEnvelope, payload, content_type)
        except DecodeError as exc:
            raise FrameRejected(
                ErrorReason.MALFORMED_ENVELOPE,
                f"neither a JPEG/PNG image nor a valid frame envelope ({exc})",
            ) from None
        return Frame(camera, envelope.frame_id, envelope.data, envelope.captured_at)
