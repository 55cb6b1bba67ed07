"""The main job, locally: a spawned Mosquitto (or a given broker), an S3-compatible store for the model
registry, the sync and inference services and a camera simulator as child processes, and live
predictions in the terminal. Ctrl-C stops everything.

Sync starts first: it seeds the device's model store with the built model and points `current` at
it; inference serves from `current`. The store's registry is seeded with that model (signed with the
operator key), and the operator's settings are written to var/up/operator.env: in another terminal,
`source var/up/operator.env`, then a model published (`edgefleet model publish`, the next free
version) and rolled out (`edgefleet rollout start`) arrives live: the table names the model of every
prediction."""

from __future__ import annotations

import collections
from pathlib import Path

from paho.mqtt.client import MQTTMessage
from rich.console import Console, Group
from rich.text import Text

from edgefleet.broker import Broker
from edgefleet.liveview import Rate, View, decoded, listen, show_live, stop_on_signals, table
from edgefleet.operator_shell import OPERATOR_ENV, seed_registry, write_operator_env
from edgefleet.s3server import S3Server
from edgefleet.spawner import Spawner, keys_of
from edgefleet.waiting import wait_until
from shared import topics
from shared.config import (
    DEFAULT_KEY_DIR,
    DEFAULT_MODEL_DIR,
    DEFAULT_STORE_DIR,
    CameraSettings,
    InferenceSettings,
    StoreSettings,
    SyncSettings,
    load,
)
from shared.registry import ensure_key_pair
from shared.schemas import ErrorReport, Prediction, ServiceStatus, SyncReport

UP_DIR = Path("var/up")  # the operator's env file of `edgefleet up`
CAMERA_COLUMNS = ("camera", "frame", "top label", "confidence", "2nd", "model", "latency ms", "fps")


def start_device(spawner: Spawner, device_id: str, mqtt_url: str, store_dir: Path, registry: StoreSettings, *,
                 cameras: list[str], rate_hz: float, envelope: bool = False, prefix: str = "") -> None:
    """Starts one device's sync, inference and camera simulator on its broker, in that order: inference
    serves from the model store that sync prepares (`<store_dir>/current`) and runs the plugins sync
    installs in `<store_dir>-plugins`.

    Args:
        spawner: starts the children (named `<prefix>sync`, `<prefix>inference`, `<prefix>camera`).
        device_id: the device.
        mqtt_url: the device's broker.
        store_dir: the device's model store.
        registry: where sync finds the model registry (the S3 keys).
        cameras: the simulated cameras' ids; rate_hz: frames per second each; envelope: msgpack envelopes.
        prefix: put before the children's names (a fleet names its devices).

    Raises:
        WaitTimeout: sync prepared no model store within a minute.
        ConfigError: a value the services would refuse.
    """
    common = {"mqtt_url": mqtt_url, "device_id": device_id, "log_format": "json"}
    # Each device its own plugin store and compiled-module cache beside its model store, as on a real device.
    plugins = {"plugins_dir": store_dir.with_name(f"{store_dir.name}-plugins")}
    sync = spawner.start(f"{prefix}sync", "sync", load(
        SyncSettings, None, **{**keys_of(registry), **common}, model_store=store_dir,
        seed_model_dir=DEFAULT_MODEL_DIR, trusted_keys_dir=DEFAULT_KEY_DIR, **plugins))
    current = store_dir / "current"
    wait_until(lambda: current.exists() or not sync.alive(), 60, f"{device_id}'s sync to prepare its model store")
    spawner.start(f"{prefix}inference", "inference", load(
        InferenceSettings, None, **common, model_dir=current, **plugins,
        plugins_cache_dir=store_dir.with_name(f"{store_dir.name}-plugin-cache")))
    spawner.start(f"{prefix}camera", "camera", load(CameraSettings, None, **common, cameras=cameras, rate_hz=rate_hz,
                                                    envelope=envelope))


class LiveView(View):
    """Collects predictions, statuses and errors from the broker; renders them as a rich table."""

    def __init__(self, console: Console | None = None) -> None:
        super().__init__(console)
        self.cameras: dict[str, Prediction] = {}
        self.rates: dict[str, Rate] = collections.defaultdict(lambda: Rate(keep=50))
        self.statuses: dict[str, ServiceStatus] = {}
        self.errors: collections.deque[ErrorReport] = collections.deque(maxlen=3)
        self.sync: SyncReport | None = None
        self.predictions = 0

    def on_prediction(self, message: MQTTMessage) -> None:
        if (prediction := decoded(Prediction, message)) is None:
            return
        with self._lock:
            self.cameras[prediction.camera] = prediction
            self.rates[prediction.camera].tick()
            self.predictions += 1
        if self._lines is not None:
            best = prediction.top[0]
            self._lines.print(
                f"{prediction.camera} {prediction.frame_id}: {best.label} {best.score:.1%} "
                f"({prediction.timings.total_ms:.1f} ms)", highlight=False,
            )

    def on_status(self, message: MQTTMessage) -> None:
        if (status := decoded(ServiceStatus, message)) is not None:
            with self._lock:
                self.statuses[status.service] = status

    def on_sync(self, message: MQTTMessage) -> None:
        if (report := decoded(SyncReport, message)) is not None:
            with self._lock:
                self.sync = report

    def on_error(self, message: MQTTMessage) -> None:
        if (report := decoded(ErrorReport, message)) is not None:
            with self._lock:
                self.errors.append(report)

    def render(self, title: str) -> Group:
        with self._lock:
            rows = [self._row(camera) for camera in sorted(self.cameras)]
            footer = self._footer()
        return Group(table(title, CAMERA_COLUMNS, rows, right=("confidence", "latency ms", "fps")), footer)

    def _row(self, camera: str) -> list[str]:
        p = self.cameras[camera]
        second = f"{p.top[1].label} {p.top[1].score:.0%}" if len(p.top) > 1 else ""
        return [camera, p.frame_id, p.top[0].label, f"{p.top[0].score:.1%}", second, f"v{p.model.version}",
                f"{p.timings.total_ms:.1f}", f"{self.rates[camera].per_second():.1f}"]

    def _footer(self) -> Text:
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
            failed = r.state in ("failed", "rolled_back")
            footer.append(f"\nsync {r.state.value}" + (f" {r.rollout_id}" if r.rollout_id else "")
                          + (f": {r.reason}" if r.reason else ""), style="red" if failed else "")
        footer.append(f"\npredictions seen here {self.predictions}")
        for report in self.errors:
            footer.append(f"\nerror {report.reason.value}: {report.detail[:100]}", style="yellow")
        return footer


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
    url = broker.url if broker is not None else str(mqtt_url)
    s3_server = S3Server().start()
    ensure_key_pair(DEFAULT_KEY_DIR)
    spawner = Spawner(log_dir)
    stop = stop_on_signals()
    try:
        seeded = seed_registry(s3_server.settings())
        env_file = UP_DIR / OPERATOR_ENV
        write_operator_env(env_file, s3_server.settings(mqtt_url=url, device_id="operator"), DEFAULT_KEY_DIR)
        start_device(spawner, device_id, url, DEFAULT_STORE_DIR / device_id, s3_server.settings(),
                     cameras=[f"cam-{i + 1}" for i in range(cameras)], rate_hz=rate_hz)
        view = LiveView(console)
        link = listen(url, device_id, [(topics.all_predictions(device_id), view.on_prediction, 0),
                                       (topics.all_status(device_id), view.on_status, 1),
                                       (topics.errors(device_id), view.on_error, 1),
                                       (topics.sync_state(device_id), view.on_sync, 1)])
        title = (f"edgefleet · {device_id} serving {seeded.name} v{seeded.version} (in the registry) · broker {url} · "
                 f"registry {s3_server.url} · logs in {log_dir}/ · Ctrl-C stops\n"
                 f"operator shell: source {env_file} · then: edgefleet model publish DIR --name {seeded.name} · "
                 f"edgefleet rollout start {seeded.name} {seeded.version + 1}")
        console.print(title, highlight=False, soft_wrap=True)  # also where no live table shows: pipes, logs
        show_live(console, lambda: view.render(title), spawner, stop, duration_s, period_s=0.25)
        link.stop()
        console.print(f"\nstopped; {view.predictions} predictions shown")
        return 0 if view.predictions else 1
    finally:
        spawner.stop()
        if broker:
            broker.close()
        s3_server.close()
