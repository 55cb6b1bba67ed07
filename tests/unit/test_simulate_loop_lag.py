"""The simulator's loop-lag tick (edgefleet/simulate/loop_lag.py): a loop blocked by work shows as lag,
an idle one as (nearly) none. Pure logic on an asyncio loop in this process."""

from __future__ import annotations

import asyncio
import time

import pytest

from edgefleet.simulate.loop_lag import LoopLag


def _measure(stall_s: float, window: int = 6000) -> LoopLag:
    async def scenario() -> LoopLag:
        lag = LoopLag(tick_s=0.02, window=window)
        task = asyncio.create_task(lag.run())
        await asyncio.sleep(0.2)
        if stall_s:
            time.sleep(stall_s)  # work that holds the loop, as a saturated simulator's would
        await asyncio.sleep(0.2)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return lag

    return asyncio.run(scenario())


def test_a_stalled_loop_shows_as_lag_and_the_ticks_it_missed_are_skipped():
    lag = _measure(0.3)
    assert lag.max_s() >= 0.25 and lag.p99_s() >= 0.25  # the stall, seen by the tick that was due in it
    # The missed ticks are not run late one after another: one tick measured the stall, the next ones none of it.
    assert lag.count_over(0.25) == 1


def test_the_p99_and_the_max_are_taken_over_the_latest_ticks_only():
    lag = _measure(0.3, window=5)
    assert lag.samples == 5
    assert lag.p99_s() < 0.25 and lag.max_s() < 0.25  # the stall left the window


def test_bad_parameters_are_refused():
    with pytest.raises(ValueError):
        LoopLag(tick_s=0)
    with pytest.raises(ValueError):
        LoopLag(window=0)
