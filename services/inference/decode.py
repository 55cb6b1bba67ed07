"""Decode: image bytes to pixels with OpenCV."""

from __future__ import annotations

import os

# A tiny PNG can claim a huge canvas; OpenCV refuses to allocate past this many pixels. Set before
# cv2 is imported because OpenCV reads it once.
os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(64 * 1024 * 1024))

import cv2  # noqa: E402
import numpy as np  # noqa: E402

# OpenCV's own threads would fight ONNX Runtime's for the same few cores.
cv2.setNumThreads(1)


class UndecodableFrame(ValueError):
    pass


def decode_bgr(data: bytes) -> np.ndarray:
    """Decodes a JPEG or PNG into an 8-bit, 3-channel BGR image (grey and alpha are converted)."""
    buffer = np.frombuffer(data, dtype=np.uint8)
    try:
        image = cv2.imdecode(buffer, cv2.IMREAD_COLOR)
    except cv2.error as exc:
        raise UndecodableFrame(f"OpenCV could not decode the image: {exc.err}") from None
    if image is None or image.size == 0:
        raise UndecodableFrame("OpenCV could not decode the image (corrupt, truncated or not JPEG/PNG)")
    return image
