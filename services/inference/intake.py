"""Receive: turns an MQTT frame message into a Frame, or rejects it with a reason.

Only cheap checks happen here, on the network thread: size, kind (raw image or envelope), the
envelope's fields and the image header's dimensions. Every input is bounded before it is expanded: the
payload by max_frame_bytes, an envelope declared msgpack+zlib by the same cap while it inflates (a
frame is never sniffed for compression: a 3 MB zlib bomb is just a malformed envelope), and the pixels
by max_frame_pixels before OpenCV allocates them. Decoding the image waits until the frame is taken
for a batch, so frames that overload drops never cost a decode.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from itertools import count

from services.inference.decode import image_size
from services.inference.errors import FrameRejected
from shared.codec import DecodeError, decode
from shared.config import InferenceSettings
from shared.schemas import ErrorReason, FrameEnvelope

# Error details quote the codec's complaint; keep them well under the schemas' MAX_STR.
MAX_DETAIL = 1000
_DEFAULT_MAX_PIXELS: int = InferenceSettings.model_fields["max_frame_pixels"].default

_JPEG_MAGIC = b"\xff\xd8\xff"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@dataclass(slots=True)
class Frame:
    camera: str
    frame_id: str
    data: bytes
    captured_at: float | None
    received: float = field(default_factory=time.monotonic)


class Intake:
    """Turns frame messages into Frames, refusing what is over the limits before anything expands.

    Args:
        max_frame_bytes: largest payload, and largest envelope once inflated.
        max_frame_pixels: largest width x height an image header may declare.
    """

    def __init__(self, max_frame_bytes: int, max_frame_pixels: int = _DEFAULT_MAX_PIXELS) -> None:
        self._max_bytes = max_frame_bytes
        self._max_pixels = max_frame_pixels
        # Raw frames carry no id: "<camera>-<n>", n counting every raw frame this service took, lets
        # clients correlate predictions.
        self._sequence = count(1)

    def parse(self, camera: str, payload: bytes, content_type: str | None) -> Frame:
        """A frame from a raw JPEG/PNG or an envelope (msgpack, or msgpack+zlib when the content type
        says so), its header read and its dimensions within the pixel budget.

        Args:
            camera: the camera the topic names.
            payload: the message's bytes.
            content_type: the MQTT v5 content type, if the sender set one.

        Returns:
            The frame, with the envelope's id and capture time, or "<camera>-<n>" for a raw image.

        Raises:
            FrameRejected: empty, over max_frame_bytes (also once inflated), not an envelope, no
                readable image header, or more pixels than max_frame_pixels.
        """
        frame = self._frame(camera, payload, content_type)
        self._check_dimensions(frame)
        return frame

    def _frame(self, camera: str, payload: bytes, content_type: str | None) -> Frame:
        if not payload:
            raise FrameRejected(ErrorReason.EMPTY, "empty payload")
        if len(payload) > self._max_bytes:
            raise FrameRejected(
                ErrorReason.OVERSIZED, f"{len(payload)} bytes is over the limit of {self._max_bytes}"
            )
        if payload.startswith(_JPEG_MAGIC) or payload.startswith(_PNG_MAGIC):
            return Frame(camera, f"{camera}-{next(self._sequence)}", payload, None)
        try:
            # No sniffing: only an envelope that says it is compressed is inflated, and at most to the
            # size a frame may have (Mosquitto's message_size_limit applies the same rule on the wire).
            envelope = decode(FrameEnvelope, payload, content_type, max_inflated_bytes=self._max_bytes)
        except DecodeError as exc:
            raise FrameRejected(
                ErrorReason.MALFORMED_ENVELOPE,
                f"neither a JPEG/PNG image nor a valid frame envelope ({clip(str(exc))})",
            ) from None
        return Frame(camera, envelope.frame_id, envelope.data, envelope.captured_at)

    def _check_dimensions(self, frame: Frame) -> None:
        """Decode cost grows with the pixels a header declares, not with the bytes sent: refuse
        before OpenCV allocates them (libpng's and browsers' decoders cap dimensions the same way)."""
        size = image_size(frame.data)
        if size is None:
            raise FrameRejected(
                ErrorReason.UNDECODABLE, "no JPEG or PNG header giving the image's dimensions", frame.frame_id
            )
        height, width = size
        if height * width > self._max_pixels:
            raise FrameRejected(
                ErrorReason.OVERSIZED,
                f"{width}x{height} pixels is over the budget of {self._max_pixels} pixels",
                frame.frame_id,
            )


def clip(text: str, limit: int = MAX_DETAIL) -> str:
    """`text`, cut to `limit` characters (marked with an ellipsis) so a report stays within MAX_STR."""
    return text if len(text) <= limit else text[: limit - 1] + "…"
