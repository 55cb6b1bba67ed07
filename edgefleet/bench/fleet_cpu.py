"""CPU meters for the fleet bench: CPU seconds of named groups of processes (the broker, the replicas,
the S3 server, the simulators) and of the whole machine, read at marks, so each phase's CPU seconds per
second can be told apart."""

from __future__ import annotations

import time
from dataclasses import dataclass

import psutil

MACHINE = "machine"  # the whole machine's busy CPU seconds (every core, every process), beside the groups


@dataclass(frozen=True)
class CpuMark:
    at: float  # monotonic, for the rates
    wall: float  # wall clock, so a window measured with it is the window the marks were taken at
    seconds: dict[str, float]


class CpuMeter:
    """CPU seconds (user + system, every thread) of named groups of processes, read at marks, so each
    phase's CPU seconds per second can be told apart; MACHINE is every core's busy time (what the groups
    and everything else on the machine took).

    Args:
        groups: name -> its processes (e.g. "broker": [mosquitto], "ingest": the replicas); a group may be
            added later (its figures then exist only between marks taken after it).
    """

    def __init__(self, groups: dict[str, list[psutil.Process]]) -> None:
        self.groups = groups

    def mark(self) -> CpuMark:
        times = psutil.cpu_times()
        busy = float(times.user + times.nice + times.system + getattr(times, "irq", 0) + getattr(times, "softirq", 0)
                     + getattr(times, "steal", 0))
        return CpuMark(time.monotonic(), time.time(), {MACHINE: busy, **{name: sum(_cpu_s(p) for p in processes)
                                                            for name, processes in self.groups.items()}})

    @staticmethod
    def per_s(start: CpuMark, end: CpuMark, name: str) -> float:
        """A group's CPU seconds per second between two marks (nan where it was not metered at both)."""
        if name not in start.seconds or name not in end.seconds:
            return float("nan")
        return (end.seconds[name] - start.seconds[name]) / max(end.at - start.at, 1e-9)

    @staticmethod
    def used(start: CpuMark, end: CpuMark, name: str) -> float:
        """A group's CPU seconds between two marks (nan where it was not metered at both)."""
        if name not in start.seconds or name not in end.seconds:
            return float("nan")
        return end.seconds[name] - start.seconds[name]


def _cpu_s(process: psutil.Process) -> float:
    try:
        times = process.cpu_times()
    except psutil.NoSuchProcess:
        return 0.0
    return float(times.user + times.system)


