"""How every service process starts and stops: logs set up, the service built (a bad model, config or
store fails here with a clear line and exit status 3), SIGTERM and SIGINT wired to its stop(), and
its run() returning the exit status once it has drained.

A service never limps on half dead: an exception out of run() (its main loop) or out of any thread's
target (a worker, the forwarder) is logged, stops the service and makes the process exit non-zero
(FATAL_EXIT), so the container is restarted, as systemd and Kubernetes expect of a failed unit. A
drain that does not finish within FATAL_DRAIN_S after that ends the process with os._exit: a stuck
thread must not turn a crash into a hang. (Erlang's "let it crash" under a supervisor; Vector and
Greengrass components exit non-zero on an unrecoverable sink or disk error for the same reason.)

Health sees work, not only the link: each service exposes a `liveness` (Liveness), whose worker loops
tick a Progress every time round, idle rounds of a loop that waits with a timeout included, so an
idle service is alive and a stuck one is not (systemd's WatchdogSec, each loop pinging WATCHDOG=1;
Kubernetes' liveness probe reads the result). A heartbeat thread checks every health_interval_s:

- healthy: the broker link is up and no loop is more than liveness_s late; where health_file is set
  it is rewritten with the pid, the time of the last healthy check and what is wrong, if anything;
- a loop more than hang_exit_s late ends the process through the fatal path (exit FATAL_EXIT), as
  systemd kills a unit that misses its watchdog: Docker restarts a container that exits, never one
  that is merely unhealthy (`restart: unless-stopped` and the HEALTHCHECK do not meet).

`edgefleet health FILE` (the images' HEALTHCHECK, the k3s probes) fails when the last healthy check
is older than --max-age; with --kill-after S it also SIGKILLs a process whose heartbeat thread itself
has been silent for max-age + S seconds (frozen: SIGSTOPped, deadlocked, stuck holding the GIL), which
nothing inside it can notice. That is for containers run with an init (compose `init: true`): the
service is then not PID 1, which a signal from inside its own namespace cannot kill. Times in the file
are CLOCK_MONOTONIC, shared by every process on the host and deaf to the wall clock jumping when a
device without a real-time clock gets NTP time.

Metrics: with EDGEFLEET_METRICS_PORT set, a service that exposes `metrics` (a prometheus_client
CollectorRegistry, shared.metrics) has it served over HTTP from before run() until run() returns;
serve() owns that endpoint and stops it, and a port it cannot bind is a start failure (exit 3)."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

import psutil
from prometheus_client import CollectorRegistry

from shared import logs
from shared.config import ENV_PREFIX, CommonSettings
from shared.health import Beat
from shared.logs import fields
from shared.metrics import MetricsEndpoint

log = logging.getLogger(__name__)


class Service(Protocol):
    def run(self) -> int: ...

    def stop(self) -> None: ...


FATAL_EXIT = 70  # EX_SOFTWARE (sysexits.h): an internal error, not a usage or config problem
FATAL_DRAIN_S = 5.0
_current: _Fatal | None = None


def serve(name: str, settings: CommonSettings, build: Callable[[], Service],
          start_errors: tuple[type[BaseException], ...]) -> int:
    """Builds and runs a service; returns its exit status (3: cannot start; FATAL_EXIT: it failed).

    Never returns after a fatal error if the drain hangs: the process is ended with os._exit.

    :param str name: the service's name, in its log lines and its health file.
    :param CommonSettings settings: logging and health settings (settings.log, settings.health).
    :param build: makes the service; what it raises of `start_errors` is a start failure (exit 3).
    :param start_errors: the errors that mean "cannot start", already worded for a person: the
        service's error base (shared.errors.EdgefleetError) and the library errors its set-up raises
        (OSError, ValueError...). Anything else out of `build` is a bug and propagates as a traceback.
    :returns: run()'s status, 3, or FATAL_EXIT.
    """
    logs.setup(name, settings.device_id, settings.log.level, settings.log.format)
    if settings.health.file is not None:  # a previous run's (same container): not this process's health
        settings.health.file.unlink(missing_ok=True)
    try:
        service = build()
    except start_errors as exc:
        log.error("cannot start", extra=fields(error=str(exc)))
        print(f"edgefleet {name}: cannot start: {exc}", file=sys.stderr)
        return 3
    try:
        endpoint = metrics_endpoint(name, settings, service)
    except OSError as exc:
        reason = f"{METRICS_PORT_KEY}: cannot serve metrics on {settings.metrics_host}:{settings.metrics_port}: {exc}"
        log.error("cannot start", extra=fields(error=reason))
        print(f"edgefleet {name}: cannot start: {reason}", file=sys.stderr)
        return 3
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: service.stop())
    global _current
    fatal = _current = _Fatal(name, service)
    threading.excepthook = fatal.thread_died
    beat = Heartbeat(settings, service, fatal.fail, name)
    try:
        status = service.run()
    except BaseException as exc:  # whatever ended the main loop ends the process, loudly
        fatal.fail(f"main loop: {type(exc).__name__}: {exc}", exc)
        return FATAL_EXIT
    finally:
        beat.stop()
        if endpoint is not None:
            endpoint.stop()
    return FATAL_EXIT if fatal.reason else status


METRICS_PORT_KEY = f"{ENV_PREFIX}METRICS_PORT"


def metrics_endpoint(name: str, settings: CommonSettings, service: Service) -> MetricsEndpoint | None:
    """Starts serving the service's `metrics` registry (shared.metrics) when settings.metrics_port is set.

    A service that serves metrics exposes them as `metrics`, a prometheus_client CollectorRegistry; the
    caller owns the endpoint returned and stops it once run() has returned.

    :param str name: the service's name, in the log line.
    :param CommonSettings settings: metrics_host and metrics_port (None: no endpoint).
    :param service: the built service.
    :returns: the endpoint, serving; None when metrics_port is unset or the service has no metrics.
    :raises OSError: the address cannot be bound (the port in use): a start failure.
    """
    if settings.metrics_port is None:
        return None
    registry = getattr(service, "metrics", None)
    if not isinstance(registry, CollectorRegistry):
        log.warning("no metrics to serve", extra=fields(service=name, key=METRICS_PORT_KEY))
        return None
    endpoint = MetricsEndpoint(registry, settings.metrics_host, settings.metrics_port)
    endpoint.start()
    log.info(f"metrics at {endpoint.url}", extra=fields(url=endpoint.url))
    return endpoint


def fail(reason: str, exc: BaseException | None = None) -> None:
    """For errors a thread catches but cannot survive (a pool worker's task, whose exception would
    otherwise vanish with its future): the service stops and the process exits FATAL_EXIT."""
    if _current is None:
        raise RuntimeError(f"fatal outside serve(): {reason}") from exc
    _current.fail(reason, exc)


class _Fatal:
    """The one way a service dies of an error: log it, ask the service to stop, and make sure the
    process is gone within FATAL_DRAIN_S even if a thread never finishes."""

    def __init__(self, name: str, service: Service) -> None:
        self.name, self.service = name, service
        self.reason: str | None = None
        self._lock = threading.Lock()

    def thread_died(self, args: threading.ExceptHookArgs) -> None:
        thread = args.thread.name if args.thread is not None else "?"
        self.fail(f"thread {thread}: {args.exc_type.__name__}: {args.exc_value}", args.exc_value)

    def fail(self, reason: str, exc: BaseException | None) -> None:
        with self._lock:
            first = self.reason is None
            self.reason = self.reason or reason
        if not first:
            return
        log.critical("fatal error, exiting", exc_info=(type(exc), exc, exc.__traceback__) if exc else None,
                     extra=fields(reason=reason[:500], exit_status=FATAL_EXIT))
        print(f"edgefleet {self.name}: fatal: {reason}", file=sys.stderr, flush=True)
        threading.Thread(target=self._watchdog, name="fatal-watchdog", daemon=True).start()
        try:
            self.service.stop()
        except Exception:  # the watchdog ends the process regardless
            log.exception("stop after a fatal error failed")

    def _watchdog(self) -> None:
        time.sleep(FATAL_DRAIN_S)
        log.critical("drain did not finish after a fatal error; exiting now", extra=fields(after_s=FATAL_DRAIN_S))
        logging.shutdown()
        os._exit(FATAL_EXIT)


class Progress:
    """One worker loop's proof of life. tick() each time round; tick(allow_s) before a wait that is
    bounded but long (an S3 call within its timeouts, an ack timeout): the loop may then be that much
    later without counting as stuck (systemd's WATCHDOG_USEC= for one wait). One store of a monotonic
    time: cheap enough for a hot loop."""

    __slots__ = ("name", "due")

    def __init__(self, name: str, allow_s: float = 0.0) -> None:
        self.name = name
        self.due = time.monotonic() + allow_s

    def tick(self, allow_s: float = 0.0) -> None:
        self.due = time.monotonic() + allow_s


class Liveness:
    """The worker loops of one service, for its heartbeat to check; a service exposes it as `liveness`."""

    def __init__(self) -> None:
        self._loops: dict[int, Progress] = {}
        self._lock = threading.Lock()

    @contextmanager
    def watch(self, loop: str | Progress, allow_s: float = 0.0) -> Iterator[Progress]:
        """Watches a loop while the block runs (a worker thread's whole life, or one task of a pool).

        :param loop: its name, or a Progress made beforehand (for callers that tick it from helpers).
        :param allow_s: how late its first tick may be.
        :returns: the Progress to tick.
        """
        progress = Progress(loop, allow_s) if isinstance(loop, str) else loop
        progress.tick(allow_s)
        with self._lock:
            self._loops[id(progress)] = progress
        try:
            yield progress
        finally:
            with self._lock:
                self._loops.pop(id(progress), None)

    def late(self, now: float | None = None) -> list[tuple[str, float]]:
        """Each watched loop's name and how many seconds it is past due (negative: not yet due), latest first."""
        now = time.monotonic() if now is None else now
        with self._lock:
            loops = list(self._loops.values())
        return sorted(((p.name, now - p.due) for p in loops), key=lambda item: -item[1])




# Until the first healthy check, checks come this often: a container turns healthy at the first probe
# after its broker link is up, not up to health_interval_s later (`edgefleet bench images`, "healthy s").
STARTING_CHECK_S = 0.25


class Heartbeat:
    """Checks the service every health_interval_s (see the module's doc): writes the health file,
    and ends the process through `fail` when a loop is more than hang_exit_s late."""

    def __init__(self, settings: CommonSettings, service: Service, fail: Callable[[str, BaseException | None], None],
                 name: str = "", start: bool = True) -> None:
        self.path, self.service, self.fail = settings.health.file, service, fail
        self.interval_s = settings.health.interval_s
        self.liveness_s, self.hang_exit_s = settings.liveness_s, settings.hang_exit_s
        me = psutil.Process()
        self._identity = {"service": name or type(service).__name__, "pid": me.pid, "started": me.create_time()}
        self.healthy_at: float | None = None
        self.problems: list[str] = ["starting"]
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)
        if start:
            self._thread.start()

    def _run(self) -> None:
        self.beat()  # at once: the file says who to kill (the pid) as soon as there is someone
        while not self._stopping.wait(self.interval_s if self.healthy_at is not None else STARTING_CHECK_S):
            self.beat()

    def beat(self, now: float | None = None) -> None:
        """One check; `now` is CLOCK_MONOTONIC (given by tests)."""
        now = time.monotonic() if now is None else now
        liveness: Liveness | None = getattr(self.service, "liveness", None)
        late = liveness.late(now) if liveness is not None else []
        if self.hang_exit_s and late and late[0][1] > self.hang_exit_s:
            loop, seconds = late[0]
            self.fail(f"the {loop} loop has not come round for {seconds:.0f} s (hang_exit_s {self.hang_exit_s:g})",
                      None)
        stuck = [f"the {name} loop has not come round for {seconds:.0f} s"
                 for name, seconds in late if seconds > self.liveness_s]
        link = getattr(self.service, "link", None)
        problems = ["broker link down", *stuck] if link is not None and not link.connected.is_set() else stuck
        # Not yet connected at start is not news; losing health once had, or a stuck loop, is.
        if problems and problems != self.problems and (stuck or self.healthy_at is not None):
            log.warning("unhealthy", extra=fields(problems=problems))
        elif not problems and self.problems:
            log.info("healthy")
        self.problems = problems
        if not problems:
            self.healthy_at = now
        if self.path is not None:
            self._write(self.path, Beat(**self._identity, beat=now, healthy=self.healthy_at, problems=problems))

    def _write(self, path: Path, beat: Beat) -> None:
        staging = path.with_name(path.name + ".tmp")
        try:  # a reader sees the old file or the new one, never half of one
            staging.write_text(beat.model_dump_json())
            os.replace(staging, path)
        except OSError as exc:  # the check then fails on a stale file, which is the truth
            log.warning("cannot write the health file", extra=fields(path=str(path), error=str(exc)))

    def stop(self) -> None:
        self._stopping.set()
        if self.path is not None:
            self.path.unlink(missing_ok=True)
