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
    # One contiguous copy of the rows, then every statistic over flat memory: 118-137 µs a frame against
    # 185-194 µs over the strided view (the bundled photos, hot cache, pinned to one core of this shared
    # box, 2026-12-07); the same figures to within 2e-6, every one equal at the 4 decimals a prediction carries.
    rows = np.ascontiguousarray(batch[:, :, ::4, :])
    flat = rows.reshape(rows.shape[0], rows.shape[1], -1)
    means = flat.mean(axis=2)
    centred = flat - means[:, :, None]
    stds = np.sqrt(np.einsum("ncj,ncj->nc", centred, centred) / flat.shape[2])
    steps = rows[:, :, :, 1:] - rows[:, :, :, :-1]
    np.abs(steps, out=steps)
    sharpness = steps.reshape(len(steps), -1).mean(axis=1)
    return np.concatenate([means, stds, sharpness[:, None]], axis=1)
