"""How every service process starts and stops: logs set up, the service built (a bad model, config or
store fails here with a clear line and exit status 3), SIGTERM and SIGINT wired to its stop(), and
its run() returning the exit status once it has drained.

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


def serve(name: str, settings: CommonSettings, build: Callable[[], Service],
          start_errors: tuple[type[BaseException], ...]) -> int:
    logs.setup(name, settings.device_id, settings.log_level, settings.log_format)
    try:
        service = build()
    except start_errors as exc:
        log.error("cannot start", extra=fields(error=str(exc)))
        print(f"edgefleet {name}: cannot start: {exc}", file=sys.stderr)
        return 3
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: service.stop())
    beat = _Heartbeat(Path(os.environ[HEALTH_FILE_ENV]), service) if os.environ.get(HEALTH_FILE_ENV) else None
    try:
        return service.run()
    finally:
        if beat is not None:
            beat.stop()


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
