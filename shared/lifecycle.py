"""How every service process starts and stops: logs set up, the service built (a bad model, config or
store fails here with a clear line and exit status 3), SIGTERM and SIGINT wired to its stop(), and
its run() returning the exit status once it has drained.

A service never limps on half dead: an exception out of run() (its main loop) or out of any thread's
target (a worker, the forwarder) is logged, stops the service and makes the process exit non-zero
(FATAL_EXIT), so the container is restarted, as systemd and Kubernetes expect of a failed unit. A
drain that does not finish within FATAL_DRAIN_S after that ends the process with os._exit: a stuck
thread must not turn a crash into a hang. (Erlang's "let it crash" under a supervisor; Vector and
Greengrass components exit non-zero on an unrecoverable sink or disk error for the same reason.)

Health for containers: where EDGEFLEET_HEALTH_FILE is set, a heartbeat thread touches that file every
few seconds while the service's broker link is up; `edgefleet health FILE` (the images' HEALTHCHECK
and the k3s probes) fails when the file is older than it should be. A service that runs but has lost
its broker is unhealthy, which is what an orchestrator should act on."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from shared import logs
from shared.config import CommonSettings
from shared.logs import fields

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
    """
    logs.setup(name, settings.device_id, settings.log_level, settings.log_format)
    try:
        service = build()
    except start_errors as exc:
        log.error("cannot start", extra=fields(error=str(exc)))
        print(f"edgefleet {name}: cannot start: {exc}", file=sys.stderr)
        return 3
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: service.stop())
    global _current
    fatal = _current = _Fatal(name, service)
    threading.excepthook = fatal.thread_died
    beat = _Heartbeat(Path(os.environ[HEALTH_FILE_ENV]), service) if os.environ.get(HEALTH_FILE_ENV) else None
    try:
        status = service.run()
    except BaseException as exc:  # noqa: BLE001 - whatever ended the main loop ends the process, loudly
        fatal.fail(f"main loop: {type(exc).__name__}: {exc}", exc)
        return FATAL_EXIT
    finally:
        if beat is not None:
            beat.stop()
    return FATAL_EXIT if fatal.reason else status


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
        except Exception:  # noqa: BLE001 - the watchdog ends the process regardless
            log.exception("stop after a fatal error failed")

    def _watchdog(self) -> None:
        time.sleep(FATAL_DRAIN_S)
        log.critical("drain did not finish after a fatal error; exiting now", extra=fields(after_s=FATAL_DRAIN_S))
        logging.shutdown()
        os._exit(FATAL_EXIT)


HEALTH_FILE_ENV = "EDGEFLEET_HEALTH_FILE"
HEARTBEAT_S = 5.0


class _Heartbeat:
    def __init__(self, path: Path, service: Service) -> None:
        self.path, self.service = path, service
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stopping.wait(HEARTBEAT_S):
            link = getattr(self.service, "link", None)
            if link is None or link.connected.is_set():
                self.path.touch()

    def stop(self) -> None:
        self._stopping.set()
        self.path.unlink(missing_ok=True)


def healthy(path: Path, max_age_s: float = 3 * HEARTBEAT_S) -> bool:
    try:
        return time.time() - path.stat().st_mtime <= max_age_s
    except FileNotFoundError:
        return False
