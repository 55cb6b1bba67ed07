"""How every service process starts and stops: logs set up, the service built (a bad model, config or
store fails here with a clear line and exit status 3), SIGTERM and SIGINT wired to its stop(), and
its run() returning the exit status once it has drained."""

from __future__ import annotations

import logging
import signal
import sys
from collections.abc import Callable
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
    return service.run()
