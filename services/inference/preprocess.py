"""Preprocess: pixels to the model's input tensor, exactly as the manifest says."""

from __future__ import annotations

import cv2
import numpy as np

from shared.manifest import Preprocessing

_INTERPOLATION = {"linear": cv2.INTER_LINEAR, "area": cv2.INTER_AREA, "cubic": cv2.INTER_CUBIC}


class Preprocessor:
    def __init__(self, spec: Preprocessing) -> None:
        self._spec = spec
        self._interpolation = _INTERPOLATION[spec.interpolation]
        # Folded into one multiply-add per pixel, in the decoder's BGR channel order.
        mean = np.asarray(spec.mean, dtype=np.float32)
        scale = 1.0 / np.asarray(spec.std, dtype=np.float32)
        if spec.color_order == "RGB":
            mean, scale = mean[::-1].copy(), scale[::-1].copy()
        self._mean, self._scale = mean, scale
        self._swap_to_rgb = spec.color_order == "RGB"

    def __call__(self, bgr: np.ndarray, out: np.ndarray) -> None:
        """Writes the CHW tensor for one BGR image into `out` (a slot of the batch array)."""
        spec = self._spec
        height, width = bgr.shape[:2]
        # Resize-shorter-then-centre-crop, done as crop-then-resize: the same pixels for a fraction
        # of the work, since only the crop's area is ever resampled.
        side = round(min(height, width) * spec.crop / spec.resize_shorter)
        top, left = (height - side) // 2, (width - side) // 2
        crop = cv2.resize(
            bgr[top : top + side, left : left + side],
            (spec.crop, spec.crop),
            interpolation=self._interpolation,
        )
        normalised = (crop.astype(np.float32) - self._mean) * self._scale
        channels = normalised.transpose(2, 0, 1)
        out[:] = channels[::-1] if self._swap_to_rgb else channels
