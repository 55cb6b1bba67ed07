"""From logits to the top-k classes with probabilities."""

from __future__ import annotations

import numpy as np


def top_k(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Row-wise softmax top-k.

    Args:
        logits: (batch, classes) model output.
        k: classes wanted per row; more than there are gives them all.

    Returns:
        (indices, probabilities), each shaped (batch, k), best first.
    """
    shifted = logits - logits.max(axis=1, keepdims=True)
    probs = np.exp(shifted)
    probs /= probs.sum(axis=1, keepdims=True)
    k = min(k, probs.shape[1])
    idx = np.argpartition(-probs, k - 1, axis=1)[:, :k]
    picked = np.take_along_axis(probs, idx, axis=1)
    order = np.argsort(-picked, axis=1)
    return np.take_along_axis(idx, order, axis=1), np.take_along_axis(picked, order, axis=1)
