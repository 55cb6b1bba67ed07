"""How late the simulator's asyncio loop runs what it scheduled: a tick every TICK_S, each measured as
the time it ran minus the time it was due. Every device's work (paho reads and writes, the outboxes'
SQLite, rollout reports handed over from the workers) runs on that one loop, so a loop running late
delays every device alike: end-to-end lag measured through a saturated simulator measures the
simulator, not the cloud. The bench reads the p99 and the max from the stats file (SimStats) and flags
a run where they are high. Both are over the last minute, so the connects at start (TLS handshakes
answered on the loop) are out of a later phase's figures; a reader polling every second sees each minute."""

from __future__ import annotations

import asyncio
import math
from collections import deque

TICK_S = 0.1
WINDOW = 600  # ticks the p99 and the max are taken over: the last minute


class LoopLag:
    """Measures the running loop's lateness (see the module's doc). One owner: the simulator starts
    run() as a task on its loop and cancels it at shutdown; stats are read on the same loop.

    :param float tick_s: how often the loop is asked to run the tick.
    :param int window: how many of the latest ticks the p99 and the max are taken over.
    """

    def __init__(self, tick_s: float = TICK_S, window: int = WINDOW) -> None:
        if tick_s <= 0 or window < 1:
            raise ValueError(f"tick_s must be > 0 and window >= 1, not {tick_s}, {window}")
        self.tick_s = tick_s
        self._lags: deque[float] = deque(maxlen=window)

    async def run(self) -> None:
        """Ticks until cancelled. A tick that runs later than the next one was due skips the ticks it
        missed (they would only measure the same stall again)."""
        loop = asyncio.get_running_loop()
        due = loop.time() + self.tick_s
        while True:
            await asyncio.sleep(max(0.0, due - loop.time()))
            lag = max(0.0, loop.time() - due)
            self._lags.append(lag)
            due += self.tick_s * (1 + math.floor(lag / self.tick_s))

    @property
    def samples(self) -> int:
        """Ticks measured in the window."""
        return len(self._lags)

    def count_over(self, seconds: float) -> int:
        """How many of the window's ticks ran at least `seconds` late."""
        return sum(1 for lag in self._lags if lag >= seconds)

    def max_s(self) -> float:
        """The window's worst lateness, in seconds (0.0 before any tick)."""
        return max(self._lags, default=0.0)

    def p99_s(self) -> float:
        """The 99th percentile of the window's lateness, in seconds (nearest rank; 0.0 before any tick)."""
        if not self._lags:
            return 0.0
        ordered = sorted(self._lags)
        return ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)]
