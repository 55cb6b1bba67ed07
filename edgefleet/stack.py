"""The main job, locally: a spawned Mosquitto (or a given broker), an S3-compatible store for the model
registry, the sync and inference services and a camera simulator as child processes, and live
predictions in the terminal. Ctrl-C stops everything.

Sync starts first: it seeds the device's model store with the built model and points `current` at
it; inference serves from `current`. A model published to the store and rolled out
(`edgefleet model publish`, `edgefleet rollout start`, with the settings the title shows) arrives
live: the table names the model of every prediction."""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from edgefleet.broker import Broker
from edgefleet.s3server import S3Server
from edgefleet.supervise import decoded, show_live, stop_children, wait_for
from shared import topics
from shared.config import DEFAULT_KEY_DIR, DEFAULT_MODEL_DIR, DEFAULT_STORE_DIR, CommonSettings
from shared.registry import new_key_pair
from shared.mqtt import MqttLink
from shared.schemas import ErrorReport, Prediction, ServiceStatus, SyncReport


@dataclass
class CameraRow:
    last: Prediction | None = None
    arrivals: collections.deque = field(default_factory=lambda: collections.deque(maxlen=50))


class LiveView:
    """Collects predictions, statuses and errors from the broker; renders them as a rich table."""

    def __init__(self, console: Console | None = None) -> None:
        # Without a terminal (a pipe, a CI log) a live table would only show at the end: print a line
        # per prediction instead.
        self._lines = console if console is not None and not console.is_terminal else None
        self._lock = threading.Lock()
        self.cameras: dict[str, CameraRow] = collections.defaultdict(CameraRow)
        self.statuses: dict[str, ServiceStatus] = {}
        self.errors: collections.deque[ErrorReport] = collections.deque(maxlen=3)
        self.sync: SyncReport | None = None
        self.predictions = 0

    def on_prediction(self, message) -> None:
        if (prediction := decoded(Prediction, message)) is None:
            return
        with self._lock:
            row = self.cameras[prediction.camera]
            row.last = prediction
            row.arrivals.append(time.monotonic())
            self.predictions += 1
        if self._lines is not None:
            best = prediction.top[0]
            self._lines.print(
                f"{prediction.camera} {prediction.frame_id}: {best.label} {best.score:.1%} "
                f"({prediction.timings.total_ms:.1f} ms)", highlight=False,
            )

    def on_status(self, message) -> None:
        if (status := decoded(ServiceStatus, message)) is not None:
            with self._lock:
                self.statuses[status.service] = status

    def on_sync(self, message) -> None:
        if (report := decoded(SyncReport, message)) is not None:
            with self._lock:
                self.sync = report

    def on_error(self, message) -> None:
        if (report := decoded(ErrorReport, message)) is not None:
            with self._lock:
                self.errors.append(report)

    def render(self, title: str) -> Group:
        table = Table(title=title, expand=True)
        for column in ("camera", "frame", "top label", "confidence", "2nd", "model", "latency ms", "fps"):
            table.add_column(column, justify="right" if column in ("confidence", "latency ms", "fps") else "left")
        with self._lock:
            for camera in sorted(self.cameras):
                row = self.cameras[camera]
                p = row.last
                if p is None:
                    continue
                arrivals = [t for t in row.arrivals if t > time.monotonic() - 5]
                fps = (len(arrivals) - 1) / (arrivals[-1] - arrivals[0]) if len(arrivals) > 1 else 0.0
                second = f"{p.top[1].label} {p.top[1].score:.0%}" if len(p.top) > 1 else ""
                table.add_row(
                    camera, p.frame_id, p.top[0].label, f"{p.top[0].score:.1%}", second,
                    f"v{p.model.version}", f"{p.timings.total_ms:.1f}", f"{fps:.1f}",
                )
            footer = Text()
            inference = self.statuses.get("inference")
            if inference is not None:
                stats, model, provider = inference.inference, inference.model, inference.provider
                footer.append(f"inference {inference.state.value}", style="green" if inference.state == "online" else "red")
                if model:
                    footer.append(f"  model {model.name} v{model.version} ({model.sha256[:12]})")
                if provider:
                    footer.append(f"  provider {provider.active}", style="red" if provider.fallback else "")
                if stats:
                    footer.append(
                        f"\nreceived {stats.frames_received}  answered {stats.predictions_published}  "
                        f"dropped {stats.frames_dropped}  rejected {stats.frames_rejected}  queue {stats.queue_depth}"
                    )
            if self.sync is not None:
                r = self.sync
                footer.append(f"\nsync {r.state.value}" + (f" {r.rollout_id}" if r.rollout_id else "")
                              + (f": {r.reason}" if r.reason else ""), style="red" if r.state in ("failed", "rolled_back") else "")
            footer.append(f"\npredictions seen here {self.predictions}")
            for report in self.errors:
                footer.append(f"\nerror {report.reason.value}: {report.detail[:100]}", style="yellow")
        return Group(table, footer)



def run(
    cameras: int = 3,
    rate_hz: float = 2.0,
    device_id: str = "device-1",
    mqtt_url: str | None = None,
    duration_s: float | None = None,
    log_dir: Path = Path("var/log"),
) -> int:
    console = Console()
    broker = None if mqtt_url else Broker().start()
    url = mqtt_url or broker.url
    s3_server = S3Server().start()
    log_dir.mkdir(parents=True, exist_ok=True)
    if not (DEFAULT_KEY_DIR / "operator.key").exists():
        new_key_pair(DEFAULT_KEY_DIR)
    store = DEFAULT_STORE_DIR / device_id
    env = {
        **os.environ, **s3_server.env(), "EDGEFLEET_MQTT_URL": url, "EDGEFLEET_DEVICE_ID": device_id,
        "EDGEFLEET_LOG_FORMAT": "json", "EDGEFLEET_MODEL_STORE": str(store), "EDGEFLEET_TRUSTED_KEYS_DIR": str(DEFAULT_KEY_DIR),
        "EDGEFLEET_SEED_MODEL_DIR": str(DEFAULT_MODEL_DIR), "EDGEFLEET_MODEL_DIR": str(store / "current"),
    }
    command = [sys.executable, "-m", "edgefleet"]
    camera_ids = ",".join(f"cam-{i + 1}" for i in range(cameras))
    children: list[subprocess.Popen] = []
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        for name, args in (
            ("sync", ["sync"]),
            ("inference", ["inference"]),
            ("camera", ["camera", "--cameras", camera_ids, "--rate", str(rate_hz)]),
        ):
            log_file = (log_dir / f"{name}.log").open("ab")
            children.append(
                subprocess.Popen(command + args, env=env, stdout=log_file, stderr=log_file, start_new_session=True)
            )
            if name == "sync":  # inference serves from the store that sync prepares
                wait_for(lambda: (store / "current").exists() or children[-1].poll() is not None, 60)
        view = LiveView(console)
        settings = CommonSettings(mqtt_url=url, device_id=device_id)
        link = MqttLink(settings, "console", unique=True)
        link.subscribe(topics.all_predictions(device_id), view.on_prediction, qos=0)
        link.subscribe(topics.all_status(device_id), view.on_status)
        link.subscribe(topics.errors(device_id), view.on_error)
        link.subscribe(topics.sync_state(device_id), view.on_sync)
        link.start()
        title = (f"edgefleet · {device_id} · broker {url} · registry {s3_server.url} · logs in {log_dir}/ · Ctrl-C stops\n"
                 f"roll out a model: EDGEFLEET_MQTT_URL={url} EDGEFLEET_S3_ENDPOINT_URL={s3_server.url} "
                 f"EDGEFLEET_S3_ACCESS_KEY_ID={s3_server.env()['EDGEFLEET_S3_ACCESS_KEY_ID']} "
                 f"EDGEFLEET_S3_SECRET_ACCESS_KEY={s3_server.env()['EDGEFLEET_S3_SECRET_ACCESS_KEY']} "
                 "edgefleet model publish DIR && edgefleet rollout start NAME VERSION")
        show_live(console, lambda: view.render(title), children, log_dir, stop, duration_s, period_s=0.25)
        link.stop()
        console.print(f"\nstopped; {view.predictions} predictions shown")
        return 0 if view.predictions else 1
    finally:
        stop_children(children)
        if broker:
            broker.close()
        s3_server.close()

