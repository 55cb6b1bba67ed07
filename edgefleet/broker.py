"""A Mosquitto broker spawned as a child process on a free loopback port, with its own config.

The local stack, the benchmarks and the test fixtures all start brokers through this, so the tests
exercise the broker set-up the main job uses.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from edgefleet.ports import claim, free_port, wait_listening


def find_mosquitto() -> str:
    path = shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.access(p, os.X_OK)), None
    )
    if path is None:
        raise FileNotFoundError("mosquitto is not installed (scripts/setup.sh installs Debian's package)")
    return path


class Broker:
    def __init__(self, port: int | None = None, workdir: Path | None = None, extra_config: str = "",
                 persistent: bool = False, security: str = "", tcp_nodelay: bool = True) -> None:
        """security: listener settings from edgefleet.brokerconf (passwords, ACL, TLS); empty: anonymous.
        tcp_nodelay: `set_tcp_nodelay true`, as deploy/mosquitto/edge.conf ships it (the edge broker carries
        the inference frames); False for a broker run as the shipped cloud.conf, which does not set it."""
        self.port = port or free_port()
        self.security = security
        self.tcp_nodelay = tcp_nodelay
        # Persistent: retained messages and sessions survive a restart (saved on a clean stop, and every
        # autosave_interval the security settings give: deploy/mosquitto/cloud.conf's is a second).
        # This flag wins over the settings' own `persistence` (it is written after them).
        self.persistent = persistent
        self._own_dir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="edgefleet-broker-"))
        self.extra_config = extra_config
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> Broker:
        conf = self.workdir / "mosquitto.conf"
        conf.write_text(
            f"listener {self.port} 127.0.0.1\n"
            + (self.security or "allow_anonymous true\n")
            + (f"persistence true\npersistence_location {self.workdir}/\n" if self.persistent
               else "persistence false\n")
            + f"log_dest file {self.workdir / 'mosquitto.log'}\n"
            "log_type error\nlog_type warning\nlog_type notice\nlog_type information\n"
            # Frames are large and arrive in bursts: let the broker hold a backlog for slow clients.
            "max_queued_messages 10000\n"
            # Nagle's algorithm delays the tail of every frame bigger than one segment (edge.conf sets it too).
            + ("set_tcp_nodelay true\n" if self.tcp_nodelay else "")
            # As root, mosquitto would switch to the 'mosquitto' user and lose access to this folder.
            + ("user root\n" if os.geteuid() == 0 else "")
            + f"{self.extra_config}\n"
        )
        self.process = subprocess.Popen(
            [find_mosquitto(), "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,  # a Ctrl-C in the terminal reaches our handler, not the broker
        )
        try:
            wait_listening(self.process, self.port, timeout, f"mosquitto (log: {self.workdir}/mosquitto.log)")
        except BaseException as failed:
            self.stop()  # whatever ended the wait (Ctrl-C, psutil), no broker is left running
            failed.add_note(self.log_tail())  # the log goes with the work folder on close
            raise
        return self

    def log_tail(self, lines: int = 5) -> str:
        """The last `lines` lines of the broker's log, labelled, for an error message."""
        log = self.workdir / "mosquitto.log"
        if not log.exists():
            return f"{log}: no log"
        with log.open("rb") as file:  # only its end: a long-lived broker's log has no bound
            file.seek(max(0, log.stat().st_size - 64 * 1024))
            text = file.read().decode(errors="replace").splitlines()[-lines:]
        return "\n".join([f"{log} ends:", *text])

    def reload(self, timeout: float = 10.0) -> None:
        """SIGHUP: Mosquitto re-reads its config (ACL, passwords, certificates and, on 2.0, the CRL), as
        `kill -HUP` or a container's reload does; returns once the broker has logged the reload.

        Raises:
            TimeoutError: the broker did not log it in time.
        """
        log = self.workdir / "mosquitto.log"

        def count() -> int:
            return log.read_text().count("Reloading config.") if log.exists() else 0

        before = count()
        self.process.send_signal(signal.SIGHUP)
        wait_for_log = time.monotonic() + timeout
        while count() <= before:
            if time.monotonic() > wait_for_log:
                raise TimeoutError(f"mosquitto did not reload (log: {log})")
            time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL: the broker dies as in a crash or power cut."""
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()
            self._keep_port()

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.kill()
            self._keep_port()

    def _keep_port(self) -> None:
        """Its port stays out of other draws for a while from now, for a restart (edgefleet.ports.claim). A
        courtesy to that restart: a claims folder that refuses it must not fail the stop."""
        with contextlib.suppress(OSError, RuntimeError):
            claim(self.port)

    def close(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Broker:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()
