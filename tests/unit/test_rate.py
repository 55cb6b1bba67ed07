"""The live views' rate (edgefleet/liveview.py): events per second over a recent window."""

from __future__ import annotations

import pytest

from edgefleet.liveview import Rate


def test_a_rate_counts_the_recent_window_only():
    rate = Rate(keep=50, window_s=5)
    assert rate.per_second(now=0) == 0.0
    for t in (0.0, 10.0, 10.5, 11.0, 11.5, 12.0):  # one old arrival, then 2 a second
        rate.tick(at=t)
    assert rate.per_second(now=12.0) == pytest.approx(2.0)
    assert rate.per_second(now=16.8) == 0.0  # only one arrival left in the window
