"""Preprocess: pixels to the model's input tensor, exactly as the manifest says."""

from __future__ import annotations

import cv2
import numpy as np

from shared.manifest import Preprocessing

_INTERPOLATION = {"linear": cv2.INTER_LINEAR, "area": cv2.INTER_AREA, "cubic": cv2.INTER_CUBIC}


class Preprocessor:
    """The manifest's preprocessing (resize shorter side, centre crop, normalise, channel order).

    Args:
        spec: the model manifest's preprocessing section.
    """

    def __init__(self, spec: Preprocessing) -> None:
        self._spec = spec
        self._interpolation = _INTERPOLATION[spec.interpolation]
        self._mean = np.asarray(spec.mean, dtype=np.float32)
        self._scale = 1.0 / np.asarray(spec.std, dtype=np.float32)
        # OpenCV decodes to BGR: the source channel of each model channel.
        self._source_channel = (2, 1, 0) if spec.color_order == "RGB" else (0, 1, 2)

    def __call__(self, bgr: np.ndarray, out: np.ndarray) -> None:
        """Writes the CHW tensor for one BGR image into `out` (a slot of the batch array).

        Args:
            bgr: a decoded image, height x width x 3, uint8, BGR.
            out: a 3 x crop x crop float32 array, written in place.
        """
        spec = self._spec
        height, width = bgr.shape[:2]
        # Resize-shorter-then-centre-crop, done as crop-then-resize: the same scale factor and sampling
        # grid (up to rounding at the edges) for a fraction of the work, as only the crop is resampled.
        side = round(min(height, width) * spec.crop / spec.resize_shorter)
        top, left = (height - side) // 2, (width - side) // 2
        crop = cv2.resize(
            bgr[top : top + side, left : left + side],
            (spec.crop, spec.crop),
            interpolation=self._interpolation,
        )
        # Channel by channel straight into the batch slot: no float HWC temporary, no transpose copy.
        for c, source in enumerate(self._source_channel):
            np.subtract(crop[:, :, source], self._mean[c], out=out[c], dtype=np.float32)
            out[c] *= self._scale[c]
