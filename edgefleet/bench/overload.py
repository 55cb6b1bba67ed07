"""`edgefleet bench overload`: the inference service offered ten times what it can answer, against its
own sustainable rate measured first in the same run.

The baseline is a closed loop (every answer lets the next frame in, a few in flight): the rate the
service sustains on this machine, and the latency of an unhurried frame. Then an open loop offers
10 × that rate for a while. What must hold (these were wall-clock and memory asserts in
tests/test_overload.py; timings belong here, where a run says which machine it measured):

- the offered overload really is an overload: achieved rate ≥ 5 × sustainable;
- latency of what is answered does not grow with the overload's length: the p90 end-to-end latency of
  the last third of answered frames ≤ 2 × that of the first third (an unbounded queue grows it);
- memory does not grow: peak resident memory in the second half ≤ 1.1 × the first half;
- every frame is accounted for: received = published + lost + dropped + rejected, once drained.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import psutil

from edgefleet.bench.harness import DEVICE, Harness, serving
from edgefleet.bench.report import Goal, emit
from edgefleet.broker import Broker
from edgefleet.progress import QUIET, Reporter
from shared import topics
from shared.codec import decode
from shared.mqtt import content_type_of
from shared.schemas import InferenceStats, ServiceStatus

QUEUE_SIZE = 16
MAX_BATCH = 4
MIB = 2**20


def run(quick: bool, json_out: Path | None, model_dir: Path, factor: float = 10.0, *,
        progress: Reporter = QUIET) -> int:
    """The sustainable rate, then `factor` times it; `progress` shows each phase."""
    baseline_s, overload_s = (4.0, 8.0) if quick else (10.0, 30.0)
    keys = {"queue_size": QUEUE_SIZE, "max_batch": MAX_BATCH, "status_interval_s": 0.5}
    with Broker() as broker, serving(broker, model_dir, **keys) as (harness, service):
        latest: list[InferenceStats] = []
        harness.link.subscribe(topics.status(DEVICE, "inference"), lambda m: _keep_stats(m, latest))
        time.sleep(0.5)

        with progress.task(f"measuring the sustainable rate ({baseline_s:.0f} s, closed loop)"):
            sustainable, calm_p90 = _closed_loop(harness, baseline_s)
        sent_before = next(harness.ids)
        rss: list[tuple[float, int]] = []
        stop = threading.Event()
        process = psutil.Process(service.proc.pid)
        sampler = threading.Thread(target=_sample_rss, args=(process, rss, stop))
        sampler.start()
        start = time.perf_counter()
        with progress.task(f"offering {factor:g} x that for {overload_s:.0f} s"):
            harness.paced(factor * sustainable, overload_s)
        end = time.perf_counter()
        stop.set()
        sampler.join()
        offered = next(harness.ids) - sent_before - 1
        with progress.task("waiting for the service to drain"):
            stats = _drained(latest, 60)
        window = [r for r in harness.results if r[0] - r[1] >= start]

    ordered = sorted(window, key=lambda r: r[0] - r[1])  # by send time
    third = max(1, len(ordered) // 3)
    first_p90 = float(np.percentile([r[1] * 1000 for r in ordered[:third]], 90)) if ordered else float("nan")
    last_p90 = float(np.percentile([r[1] * 1000 for r in ordered[-third:]], 90)) if ordered else float("nan")
    half = start + overload_s / 2
    early = max((r for t, r in rss if t < half), default=0)
    late = max((r for t, r in rss if t >= half), default=0)
    achieved = offered / (end - start)
    unaccounted = (
        stats.frames_received - stats.predictions_published - stats.predictions_lost - stats.frames_dropped
        - stats.frames_rejected
        if stats else float("nan")
    )
    rows = [
        {"phase": "baseline (closed loop)", "frames/s": sustainable, "answered": "", "dropped": "", "p90 ms": calm_p90},
        {"phase": f"overload ({factor:g}x offered)", "frames/s": achieved, "answered": len(window),
         "dropped": stats.frames_dropped if stats else "?", "p90 ms": last_p90},
        {"phase": "overload, first third", "frames/s": "", "answered": third, "dropped": "", "p90 ms": first_p90},
        {"phase": "overload, last third", "frames/s": "", "answered": third, "dropped": "", "p90 ms": last_p90},
        {"phase": "resident MiB, first half / second half", "frames/s": "", "answered": "", "dropped": "",
         "p90 ms": f"{early / MIB:.0f} / {late / MIB:.0f}"},
    ]
    goals = [
        Goal("overload achieved / sustainable", achieved / sustainable, 5.0, "x"),
        Goal("p90 latency, last third / first third", last_p90 / first_p90, 2.0, "x", "max"),
        Goal("peak RSS, second half / first half", late / max(early, 1), 1.1, "x", "max"),
        Goal("frames unaccounted by the counters", float(unaccounted), 0.0, "frames", "max"),
    ]
    return emit("overload", quick, rows, goals, json_out, progress=progress)


def _keep_stats(message, latest: list[InferenceStats]) -> None:
    status = decode(ServiceStatus, message.payload, content_type_of(message))
    if status.inference is not None:
        latest.append(status.inference)


def _closed_loop(harness: Harness, seconds: float, in_flight: int = MAX_BATCH) -> tuple[float, float]:
    """Frames per second the service sustains with `in_flight` frames always waiting, and their p90 ms."""
    harness.refill = True
    t0 = time.perf_counter()
    for _ in range(in_flight):
        harness.send()
    time.sleep(seconds)
    harness.refill = False
    t1 = time.perf_counter()
    done = [r for r in harness.results if t0 <= r[0] < t1]
    time.sleep(1.0)  # the last frames in flight are answered before the overload starts
    return len(done) / (t1 - t0), float(np.percentile([r[1] * 1000 for r in done], 90))


def _sample_rss(process: psutil.Process, out: list[tuple[float, int]], stop: threading.Event) -> None:
    while not stop.wait(0.25):
        out.append((time.perf_counter(), process.memory_info().rss))


def _drained(latest: list[InferenceStats], timeout: float) -> InferenceStats | None:
    """The service's counters once its backlog is empty and they stand still for a second."""
    deadline = time.monotonic() + timeout
    previous = None
    while time.monotonic() < deadline:
        time.sleep(1.0)
        current = latest[-1] if latest else None
        if current is not None and current.queue_depth == 0 and current == previous:
            return current
        previous = current
    return latest[-1] if latest else None
