"""A compact summary of each frame's model input for drift detection (shared.schemas.INPUT_FEATURES):
per-channel mean and standard deviation, and sharpness. Darker, blurred or different scenes move these
long before anyone looks at the predictions.

Computed on every fourth row of the input tensor: the statistics barely move, and the cost falls from
about 0.6 to 0.15 ms per frame, which the model's own 9 ms can afford."""

from __future__ import annotations

import numpy as np


def summarise(batch: np.ndarray) -> np.ndarray:
    """Per-frame input summaries of an NCHW float batch.

    Returns:
        (frames, 7): the three channel means, the three channel standard deviations, sharpness.
    """
    rows = batch[:, :, ::4, :]
    means = rows.mean(axis=(2, 3))
    stds = rows.std(axis=(2, 3))
    sharpness = np.abs(np.diff(rows, axis=3)).mean(axis=(1, 2, 3))
    return np.concatenate([means, stds, sharpness[:, None]], axis=1)
