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
    # One contiguous copy of the rows, then every statistic over flat memory: 117-128 µs a frame against
    # 147-173 µs over the strided view (the bundled photos, hot cache, pinned to one core of this shared
    # box under other load, 2026-12-07, with the std below); within 4e-8 of a float64 reference there,
    # as the strided view's figures are.
    rows = np.ascontiguousarray(batch[:, :, ::4, :])
    flat = rows.reshape(rows.shape[0], rows.shape[1], -1)
    means = flat.mean(axis=2)
    centred = flat - means[:, :, None]
    # The mean of the squared centred values (numpy's pairwise sum), as ndarray.std takes it: an einsum
    # of the products sums serially, ~50 times less precise in float32 (1.7e-6 against 3.5e-8).
    np.square(centred, out=centred)
    stds = np.sqrt(centred.mean(axis=2))
    steps = rows[:, :, :, 1:] - rows[:, :, :, :-1]
    np.abs(steps, out=steps)
    sharpness = steps.reshape(len(steps), -1).mean(axis=1)
    return np.concatenate([means, stds, sharpness[:, None]], axis=1)
