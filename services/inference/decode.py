"""Decode: image bytes to pixels with OpenCV.

A JPEG at least twice as large as the model needs is decoded at 1/2, 1/4 or 1/8 scale in the DCT
domain (libjpeg-turbo's scaled decoding, through OpenCV's IMREAD_REDUCED_* flags): the same picture,
already downsampled, for less work, which matters most for HD cameras feeding a 224-pixel model.
PNGs are always decoded whole: OpenCV's PNG decoder has no scaled decode (IMREAD_REDUCED_* on a PNG
decodes every pixel and then resizes: measured 0.099 s against 0.110 s for a 3000x2000 PNG), so what
bounds a PNG's cost is the pixel budget that intake checks against image_size() before any decode.
The scene cache's grey thumbnail (grey_thumbnail) uses the same scaled decode, in grey, before any
full decode.
"""

from __future__ import annotations

import os
import struct

# A tiny PNG can claim a huge canvas; OpenCV refuses to allocate past this many pixels. Set before
# cv2 is imported because OpenCV reads it once.
os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(64 * 1024 * 1024))

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from services.inference.errors import UndecodableFrame  # noqa: E402

# OpenCV's own threads would fight ONNX Runtime's for the same few cores.
cv2.setNumThreads(1)

_REDUCED = ((8, cv2.IMREAD_REDUCED_COLOR_8), (4, cv2.IMREAD_REDUCED_COLOR_4), (2, cv2.IMREAD_REDUCED_COLOR_2))
_REDUCED_GREY = ((8, cv2.IMREAD_REDUCED_GRAYSCALE_8), (4, cv2.IMREAD_REDUCED_GRAYSCALE_4),
                 (2, cv2.IMREAD_REDUCED_GRAYSCALE_2))
# Start-of-frame markers of baseline, extended, progressive and lossless JPEGs (not DHT/JPG/DAC).
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def decode_bgr(data: bytes, min_short_side: int = 0) -> np.ndarray:
    """Decodes a JPEG or PNG into an 8-bit, 3-channel BGR image (grey and alpha are converted).

    Args:
        data: the image file's bytes, their size and declared dimensions already bounded (intake).
        min_short_side: a JPEG is decoded at the coarsest scale (1/2, 1/4, 1/8) that keeps its shorter
            side at least this long; 0 decodes every pixel.

    Returns:
        The image, height x width x 3, uint8, BGR.

    Raises:
        UndecodableFrame: truncated (no end-of-image marker or IEND chunk), corrupt, or not JPEG/PNG.
    """
    check_complete(data)
    flag = cv2.IMREAD_COLOR
    if min_short_side and (size := jpeg_size(data)) is not None:
        short = min(size)
        flag = next((f for factor, f in _REDUCED if short // factor >= min_short_side), flag)
    return _imdecode(data, flag)


def _imdecode(data: bytes, flag: int) -> np.ndarray:
    """OpenCV's decode with `flag`; raises UndecodableFrame for what it cannot decode."""
    try:
        image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), flag)
    except cv2.error as exc:
        raise UndecodableFrame(f"OpenCV could not decode the image: {exc.err}") from None
    if image is None or image.size == 0:
        raise UndecodableFrame("OpenCV could not decode the image (corrupt, truncated or not JPEG/PNG)")
    return image


def grey_thumbnail(data: bytes, side: int) -> np.ndarray:
    """A side x side grey thumbnail of a JPEG or PNG, for the scene cache's change measure.

    A JPEG is decoded grey at the coarsest scale (1/8, 1/4, 1/2) that keeps its shorter side at least
    twice `side`: libjpeg-turbo then skips the colour planes' IDCT and most of the luma's, though not
    the entropy decoding of the whole file (0.64 ms on the bundled photos, against 1.1 ms for
    decode_bgr and preprocessing, which a cache hit spares besides the model run). Twice, because two
    box filters in a row blur more than one: on the bundled photos the thumbnail is then within 1.6
    grey levels (mean absolute difference) of the full decode's, against up to 4.8 when the reduced
    picture is barely larger than the thumbnail. A PNG is decoded grey whole (no scaled PNG decode).
    The picture is area-resized to a square: each thumbnail pixel is the mean of its block, which
    averages sensor noise away, and a camera's thumbnails are only compared with each other.

    Args:
        data: the image file's bytes, bounded by intake.
        side: the thumbnail's side in pixels.

    Returns:
        side x side uint8 grey levels.

    Raises:
        UndecodableFrame: truncated, corrupt or not JPEG/PNG (a truncated JPEG would decode grey-filled
            and could look like a cached scene: it is refused here as by decode_bgr).
    """
    check_complete(data)
    flag = cv2.IMREAD_GRAYSCALE
    if (size := jpeg_size(data)) is not None:
        flag = next((f for factor, f in _REDUCED_GREY if min(size) // factor >= 2 * side), flag)
    return cv2.resize(_imdecode(data, flag), (side, side), interpolation=cv2.INTER_AREA)


def check_complete(data: bytes) -> None:
    """OpenCV decodes a truncated JPEG without complaint, filling the missing part with grey, and the
    model would answer it with confidence. A whole JPEG ends with its end-of-image marker (FFD9, which
    byte stuffing keeps out of the image data); a whole PNG with its IEND chunk. Tolerates padding."""
    tail = data[-64:]
    if data.startswith(b"\xff\xd8") and b"\xff\xd9" not in tail:
        raise UndecodableFrame("truncated JPEG: no end-of-image marker")
    if data.startswith(b"\x89PNG") and b"IEND" not in tail:
        raise UndecodableFrame("truncated PNG: no IEND chunk")


def image_size(data: bytes) -> tuple[int, int] | None:
    """(height, width) declared by a JPEG's or PNG's header, or None when neither header can be read.
    Reads only header bytes: cheap enough for the network thread, and it runs before any decode."""
    return jpeg_size(data) or png_size(data)


def png_size(data: bytes) -> tuple[int, int] | None:
    """(height, width) from a PNG's IHDR chunk, which the PNG spec requires to come first."""
    if not data.startswith(_PNG_MAGIC) or len(data) < 24 or data[12:16] != b"IHDR":
        return None
    width, height = struct.unpack_from(">II", data, 16)
    return (height, width) if height and width else None


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(height, width) from a JPEG's start-of-frame header, or None. OpenCV's Python API has no
    header-only read, and this walk over marker segments stops long before the image data."""
    if not data.startswith(b"\xff\xd8"):
        return None
    i = 2
    while i + 9 <= len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        (length,) = struct.unpack_from(">H", data, i + 2)
        if marker in _SOF:
            height, width = struct.unpack_from(">HH", data, i + 5)
            return (height, width) if height and width else None
        if marker == 0xDA or length < 2:  # image data begins: no SOF seen
            return None
        i += 2 + length
    return None
