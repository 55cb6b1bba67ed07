"""The simulators' loop lag as the fleet bench samples it from their stats files, so each phase of a run
can be given the lag its own minutes had."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

from edgefleet.simulate import loop_lag
from edgefleet.simulate.stats import SimStats

LAG_WINDOW_S = loop_lag.TICK_S * loop_lag.WINDOW  # what one stats file's loop_lag figures cover: the last minute


@dataclass(frozen=True)
class LagFigures:
    """The simulators' loop lag over a phase: the worst process's p99 and max (seconds); `covers_s`: how
    much before the phase's start the figures may reach back (a phase shorter than LAG_WINDOW_S)."""

    p99_s: float
    max_s: float
    covers_s: float


class LagSampler:
    """Reads the simulators' stats every second and keeps their loop lag figures, so each phase can be
    given the lag its own minutes had. One owner: the bench starts it, and stops it with close().

    Args:
        read: the simulators' latest stats (edgefleet.bench.fleet.sim_totals over the processes).
        every_s: how often it reads.
    """

    def __init__(self, read: Callable[[], list[SimStats]], every_s: float = 1.0) -> None:
        self._read, self._every_s = read, every_s
        self._samples: dict[int, list[tuple[float, float, float]]] = {}  # pid -> (at, p99, max)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lag-sampler", daemon=True)

    def start(self) -> LagSampler:
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.wait(self._every_s):
            for s in self._read():
                with self._lock:
                    samples = self._samples.setdefault(s.pid, [])
                    if not samples or samples[-1][0] != s.at:
                        samples.append((s.at, s.loop_lag_p99_s, s.loop_lag_max_s))

    def over(self, start: float, end: float) -> LagFigures | None:
        """The phase [start, end] (wall clock): each process's figures reported from a minute into the
        phase (whole minutes inside it) to its end, or, for a phase shorter than that, at its end (they
        then reach back before it); the worst process's. None: no sample in it."""
        since = min(start + LAG_WINDOW_S, end)
        with self._lock:
            inside = [(p, m) for samples in self._samples.values() for at, p, m in samples if since <= at <= end + 2.5]
            first = min((samples[0][0] for samples in self._samples.values() if samples), default=start)
        if not inside:
            return None
        # How far the last minute reaches back before the phase, and only while the simulators ran.
        before = min(LAG_WINDOW_S - (end - start), start - first + 1.0)
        return LagFigures(max(p for p, _ in inside), max(m for _, m in inside), max(0.0, before))


