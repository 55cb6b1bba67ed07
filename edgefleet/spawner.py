"""Starting and stopping `edgefleet <service>` child processes: each started with its typed settings
(as the EDGEFLEET_* environment `shared.config.environment` writes), named, its output kept in a log
file, and stopped the one way: SIGTERM, a grace period, then SIGKILL (as `docker stop` and
systemd's KillMode do). The local stack, the local fleet, the simulator and the tests start their
services through it, with the command the containers run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from shared.config import environment

COMMAND = (sys.executable, "-m", "edgefleet")
GRACE_S = 15.0


def keys_of(settings: BaseModel) -> dict[str, Any]:
    """The keys set on `settings` (given, or read from the environment), as overrides for
    `config.load` of another settings class: a service's settings built on a store's or a broker's."""
    return settings.model_dump(exclude_unset=True)


class Child:
    """One `edgefleet <service>` process, its output (stdout and stderr together) appended to a log file.

    Args:
        service: the command, as `edgefleet <service>` takes it ("sync", "cloud-ingest", ...).
        log_path: the log file, created or appended to.
        settings: the service's typed settings; they reach it as its environment.
        env: EDGEFLEET_* strings on top, for what typed settings cannot say: a test that hands the
            service a bad or raw value on purpose, to see it refuse it.
        args: more arguments after the service's name.
        name: what the launchers call it (default: the service).
        own_session: start it in its own session, so a terminal's Ctrl-C reaches only the launcher,
            which then stops its children in order; tests leave their children in theirs.

    Raises:
        OSError: the interpreter could not be started or the log not opened.
    """

    def __init__(self, service: str, log_path: Path, settings: BaseModel | None = None, *,
                 env: Mapping[str, str] | None = None, args: Sequence[str] = (), name: str | None = None,
                 own_session: bool = False) -> None:
        self.service, self.log_path, self.name = service, log_path, name or service
        self.started = time.time()
        with log_path.open("ab") as log:  # the child holds its own descriptor
            self.proc = subprocess.Popen(
                [*COMMAND, service, *args],
                env={**os.environ, **(environment(settings) if settings is not None else {}), **(env or {})},
                stdout=log, stderr=subprocess.STDOUT, start_new_session=own_session,
            )

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log(self) -> str:
        """Everything it has written so far."""
        return self.log_path.read_text(errors="replace")

    def stop(self, grace_s: float = GRACE_S) -> int:
        """SIGTERM, then SIGKILL if it has not exited after `grace_s` seconds. Returns its exit status
        (negative: the signal that ended it)."""
        stop_all([self], grace_s)
        return self.proc.wait()

    def kill(self) -> int:
        """SIGKILL at once (a crash, for the fault tests); returns its exit status."""
        if self.alive():
            self.proc.kill()
        return self.proc.wait()


def stop_all(children: Iterable[Child], grace_s: float = GRACE_S) -> None:
    """Stops the children together: SIGTERM to each in reverse order of start (consumers before what
    feeds them), then one shared grace period, then SIGKILL to whichever is still running."""
    children = list(children)
    for child in reversed(children):
        if child.alive():
            child.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for child in children:
        try:
            child.proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.proc.kill()
            child.proc.wait()


class Spawner:
    """The children of one launcher: started in order, each with its own log `<log_dir>/<name>.log`,
    stopped together. Use it as a context manager, or call `stop()` in a `finally`.

    Args:
        log_dir: where the logs go (created).
        grace_s: how long stopped children get between SIGTERM and SIGKILL.
    """

    def __init__(self, log_dir: Path, grace_s: float = GRACE_S) -> None:
        self.log_dir, self.grace_s = log_dir, grace_s
        self.children: list[Child] = []
        log_dir.mkdir(parents=True, exist_ok=True)

    def start(self, name: str, service: str, settings: BaseModel, *args: str) -> Child:
        """Starts `edgefleet <service> [args]` with `settings` as its environment, in its own session.

        Args:
            name: its name here and its log's (`<name>.log`); unique per launcher.
            service: the command ("sync", "inference", "telemetry", "camera", "cloud-ingest").
            settings: its typed settings (e.g. `config.load(SyncSettings, None, device_id=...)`).
            args: more arguments for the command.

        Returns:
            The running child.

        Raises:
            OSError: it could not be started.
        """
        child = Child(service, self.log_dir / f"{name}.log", settings, args=args, name=name, own_session=True)
        self.children.append(child)
        return child

    def exited(self) -> list[Child]:
        """The children that are no longer running."""
        return [c for c in self.children if not c.alive()]

    def stop(self) -> None:
        """Stops every child (see `stop_all`)."""
        stop_all(self.children, self.grace_s)

    def __enter__(self) -> Spawner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
