"""What the local stacks (`edgefleet up`, `edgefleet fleet`) share: reading what their consoles can,
showing a live view until Ctrl-C, a time limit or a dead child, and stopping the children they
started (SIGTERM, then SIGKILL)."""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

from rich.console import Console, RenderableType
from rich.live import Live

from shared.codec import DecodeError, decode
from shared.mqtt import content_type_of


def decoded(cls, message):
    """The message as `cls`, or None: a console shows what it can read and skips the rest."""
    try:
        return decode(cls, message.payload, content_type_of(message))
    except DecodeError:
        return None


def show_live(console: Console, render: Callable[[], RenderableType], children: list[subprocess.Popen],
              log_dir: Path, stop: threading.Event, duration_s: float | None, period_s: float = 0.5) -> None:
    started = time.monotonic()
    with Live(render(), console=console, refresh_per_second=max(1, round(1 / period_s))) as live:
        while not stop.wait(period_s):
            live.update(render())
            if any(c.poll() is not None for c in children):
                console.print(f"[red]a service exited; see {log_dir}/[/red]")
                return
            if duration_s is not None and time.monotonic() - started > duration_s:
                return


def stop_children(children: list[subprocess.Popen], grace_s: float = 15) -> None:
    for child in reversed(children):
        if child.poll() is None:
            child.terminate()
    for child in children:
        try:
            child.wait(grace_s)
        except subprocess.TimeoutExpired:
            child.kill()


def wait_for(check: Callable[[], bool], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not check() and time.monotonic() < deadline:
        time.sleep(0.1)
