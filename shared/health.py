"""The health file between a service and its health check: what the service's heartbeat writes
(shared/lifecycle.py) and what `python -m shared.health FILE` (the images' HEALTHCHECK, the k3s probes,
`edgefleet health`) reads. A module of its own, importing pydantic and psutil only: the check runs in
the container's CPU quota every few seconds, and going through the `edgefleet` command imports the
whole CLI (measured: 0.6 CPU-seconds a probe against 0.13 here; a 0.25-CPU cloud_ingest replica
stored 17 % fewer records/s with the heavier probe, `edgefleet bench telemetry`)."""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path

import psutil
from pydantic import BaseModel, ValidationError


class Beat(BaseModel):
    """The health file: the service's pid and process start time (so a reused pid is never killed),
    and CLOCK_MONOTONIC times of its last check and last healthy check."""

    service: str
    pid: int
    started: float
    beat: float
    healthy: float | None
    problems: list[str]


MAX_HEALTH_FILE_BYTES = 64 * 1024


def check_health(path: Path, max_age_s: float, kill_after_s: float | None = None,
                 now: float | None = None) -> tuple[bool, str]:
    """What `edgefleet health` answers: whether the service was healthy within max_age_s, and why not.

    :param kill_after_s: where given, a process whose heartbeat has been silent for max_age_s +
        kill_after_s is sent SIGKILL (its pid as the file names it, if that process still has the start
        time the file records).
    :param now: CLOCK_MONOTONIC (given by tests).
    :returns: (healthy, a line saying why).
    """
    try:
        with path.open("rb") as f:
            beat = Beat.model_validate_json(f.read(MAX_HEALTH_FILE_BYTES + 1)[:MAX_HEALTH_FILE_BYTES])
    except FileNotFoundError:
        return False, f"no heartbeat in {path} (not started, or stopped)"
    except (OSError, ValidationError) as exc:
        return False, f"unreadable heartbeat in {path}: {str(exc)[:300]}"
    now = time.monotonic() if now is None else now
    silent = now - beat.beat
    if kill_after_s is not None and silent > max_age_s + kill_after_s:
        return False, f"no heartbeat for {silent:.0f} s: {_kill(beat)}"
    if silent > max_age_s:
        return False, f"no heartbeat for {silent:.0f} s: the process is frozen or its heartbeat thread died"
    if beat.healthy is None or now - beat.healthy > max_age_s:
        return False, "unhealthy: " + ("; ".join(beat.problems) or "not yet checked")
    return True, f"healthy (pid {beat.pid})"


def _kill(beat: Beat) -> str:
    if beat.pid == 1:
        return "it is PID 1, which a signal from inside its container cannot kill: run the container with an init " \
               "(compose `init: true`, `docker run --init`)"
    try:
        process = psutil.Process(beat.pid)
        if abs(process.create_time() - beat.started) > 0.5:
            return f"pid {beat.pid} is another process now; not killed"
        process.send_signal(signal.SIGKILL)
    except psutil.NoSuchProcess:
        return f"pid {beat.pid} is gone"
    except psutil.AccessDenied as exc:
        return f"cannot kill pid {beat.pid}: {exc}"
    return f"killed the frozen {beat.service} (pid {beat.pid}, SIGKILL) so that its container restarts"


def main(argv: list[str] | None = None) -> int:
    """`python -m shared.health FILE [--max-age S] [--kill-after S]`: exit 0 when healthy, 1 (with why) when not."""
    summary = (check_health.__doc__ or "").split("\n", 1)[0]
    parser = argparse.ArgumentParser(prog="python -m shared.health", description=summary)
    parser.add_argument("file", type=Path)
    parser.add_argument("--max-age", type=float, default=15.0)
    parser.add_argument("--kill-after", type=float, default=None)
    args = parser.parse_args(argv)
    ok, why = check_health(args.file, args.max_age, args.kill_after)
    print(why, file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
