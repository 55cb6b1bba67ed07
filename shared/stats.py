"""Distribution comparisons used on both sides of a model's life: the sync service's canary and the
telemetry service's drift alerts."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable

import numpy as np


def psi(expected: Iterable[str], actual: Iterable[str], smoothing: float = 0.5) -> float:
    """Population stability index between two samples of categories (e.g. predicted labels).

    Additive smoothing on every category seen on either side keeps a category absent from one side
    finite instead of dividing by zero. Rule of thumb: < 0.1 stable, 0.1-0.25 moderate, > 0.25 a shift.
    """
    before, after = Counter(expected), Counter(actual)
    categories = set(before) | set(after)
    if not before or not after:
        return 0.0
    n_before = sum(before.values()) + smoothing * len(categories)
    n_after = sum(after.values()) + smoothing * len(categories)
    total = 0.0
    for category in categories:
        b = (before[category] + smoothing) / n_before
        a = (after[category] + smoothing) / n_after
        total += (a - b) * math.log(a / b)
    return total


def p95(values: Iterable[float]) -> float | None:
    """The 95th percentile (numpy's linear interpolation); None for no values."""
    values = list(values)
    return float(np.percentile(values, 95)) if values else None


def mean(values: Iterable[float]) -> float | None:
    """The arithmetic mean; None for no values."""
    values = list(values)
    return float(np.mean(values)) if values else None
