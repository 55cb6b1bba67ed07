"""What the local consoles (`edgefleet up`, `edgefleet fleet`) share: a client that listens to a
device's broker, reading what it can of each message, rates over a recent window, tables, and a live
view shown until Ctrl-C, a time limit or a dead child."""

from __future__ import annotations

import collections
import signal
import threading
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from typing import TypeVar

from paho.mqtt.client import MQTTMessage
from pydantic import BaseModel
from rich.console import Console, RenderableType
from rich.live import Live
from rich.table import Table

from edgefleet.spawner import Spawner
from shared.codec import DecodeError, decode
from shared.config import CommonSettings, load
from shared.mqtt import Handler, MqttLink, content_type_of

# (topic filter, handler, QoS): what a console subscribes to.
Subscription = tuple[str, Handler, int]
M = TypeVar("M", bound=BaseModel)


def decoded(cls: type[M], message: MQTTMessage) -> M | None:
    """The message as `cls`, or None: a console shows what it can read and skips the rest."""
    try:
        return decode(cls, message.payload, content_type_of(message))
    except DecodeError:
        return None


def listen(mqtt_url: str, device_id: str, subscriptions: Iterable[Subscription]) -> MqttLink:
    """A started client of the device's broker (its own client id, so two consoles can watch one
    device), calling each handler with the messages of its topic filter. Stop it when done."""
    link = MqttLink(load(CommonSettings, None, mqtt_url=mqtt_url, device_id=device_id), "console", unique=True)
    for topic_filter, handler, qos in subscriptions:
        link.subscribe(topic_filter, handler, qos=qos)
    link.start()
    return link


class View:
    """The base of a console's view: a lock between the MQTT thread that feeds it and the renderer,
    and, where no live table can show (a pipe, a CI log: it would only show at the end), the console
    to print a line per event to instead."""

    def __init__(self, console: Console | None) -> None:
        self._lines = console if console is not None and not console.is_terminal else None
        self._lock = threading.Lock()


class Rate:
    """Events per second over the last `window_s` seconds, from the arrival times of the last `keep`."""

    def __init__(self, keep: int = 100, window_s: float = 5.0) -> None:
        self._arrivals: collections.deque[float] = collections.deque(maxlen=keep)
        self.window_s = window_s

    def tick(self, at: float | None = None) -> None:
        """One event, at `at` (time.monotonic(); default: now)."""
        self._arrivals.append(time.monotonic() if at is None else at)

    def per_second(self, now: float | None = None) -> float:
        """The rate between the first and the last event of the window ending `now` (0 with fewer than two)."""
        since = (time.monotonic() if now is None else now) - self.window_s
        recent = [t for t in self._arrivals if t > since]
        span = recent[-1] - recent[0] if len(recent) > 1 else 0.0
        return (len(recent) - 1) / span if span > 0 else 0.0


def table(title: str, columns: Sequence[str], rows: Iterable[Sequence[str]], right: Collection[str] = ()) -> Table:
    """A full-width table of `rows` under `columns`; the columns named in `right` right-aligned (numbers)."""
    result = Table(title=title, expand=True)
    for column in columns:
        result.add_column(column, justify="right" if column in right else "left")
    for row in rows:
        result.add_row(*row)
    return result


def stop_on_signals() -> threading.Event:
    """An event set by SIGTERM or SIGINT (Ctrl-C): the launcher then stops its children in order."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def show_live(console: Console, render: Callable[[], RenderableType], children: Spawner, stop: threading.Event,
              duration_s: float | None, period_s: float = 0.5) -> None:
    """Shows `render()` live, refreshed every `period_s`, until `stop` is set, `duration_s` has passed
    or one of the children has exited (said on the console, with where its log is)."""
    started = time.monotonic()
    with Live(render(), console=console, refresh_per_second=max(1, round(1 / period_s))) as live:
        while not stop.wait(period_s):
            live.update(render())
            if exited := children.exited():
                names = ", ".join(c.name for c in exited)
                console.print(f"[red]a service exited ({names}); see {children.log_dir}/[/red]")
                return
            if duration_s is not None and time.monotonic() - started > duration_s:
                return
