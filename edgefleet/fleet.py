"""The main job: the whole fleet on this machine, without Docker, shown live.

    cloud:   the fleet broker (TLS, client certificates, deploy/mosquitto/cloud.acl), an S3 store
             (moto), cloud_ingest
    devices: each with its own broker (bridged to the fleet broker over TLS with its certificate),
             sync, inference, telemetry and a camera simulator

The certificates (var/fleet/certs) and the operator key (var/keys) are made on first use. The table
shows every device: the model it serves, predictions per second, its last label, sync state, outbox
depth and open alerts. A model published and rolled out from another terminal (the title shows the
settings) arrives live. Ctrl-C stops everything."""

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
from edgefleet.brokerconf import bridge, cloud_listener
from edgefleet.certs import CRL, issue, new_ca, write_crl
from edgefleet.s3server import S3Server
from edgefleet.supervise import decoded, show_live, stop_children, wait_for
from shared import topics
from shared.config import DEFAULT_KEY_DIR, DEFAULT_MODEL_DIR, CommonSettings
from shared.mqtt import MqttLink
from shared.registry import new_key_pair
from shared.schemas import Alert, AlertState, Prediction, ServiceStatus, SyncReport

FLEET_DIR = Path("var/fleet")
INGEST_REPLICA = "cloud-ingest-0"


@dataclass
class DeviceRow:
    arrivals: collections.deque = field(default_factory=lambda: collections.deque(maxlen=100))
    last: Prediction | None = None
    sync: SyncReport | None = None
    queue: int | None = None
    alerts: dict[str, Alert] = field(default_factory=dict)
    predictions: int = 0


class FleetView:
    def __init__(self, console: Console) -> None:
        self._lines = console if not console.is_terminal else None
        self._lock = threading.Lock()
        self.devices: dict[str, DeviceRow] = collections.defaultdict(DeviceRow)

    def on_prediction(self, message) -> None:
        if (p := decoded(Prediction, message)) is None:
            return
        with self._lock:
            row = self.devices[p.device]
            row.last, row.predictions = p, row.predictions + 1
            row.arrivals.append(time.monotonic())
        if self._lines is not None and row.predictions % 10 == 1:
            self._lines.print(f"{p.device} {p.camera}: {p.top[0].label} {p.top[0].score:.0%} (model v{p.model.version})",
                              highlight=False)

    def on_status(self, message) -> None:
        if (s := decoded(ServiceStatus, message)) is not None and s.telemetry is not None:
            with self._lock:
                self.devices[s.device].queue = s.telemetry.queue_records

    def on_sync(self, message) -> None:
        if (r := decoded(SyncReport, message)) is not None:
            with self._lock:
                self.devices[r.device].sync = r

    def on_alert(self, message) -> None:
        if (a := decoded(Alert, message)) is not None:
            with self._lock:
                open_alerts = self.devices[a.device].alerts
                if a.state is AlertState.RAISED:
                    open_alerts[a.alert_id] = a
                else:
                    open_alerts.pop(a.alert_id, None)

    def total(self) -> int:
        with self._lock:
            return sum(r.predictions for r in self.devices.values())

    def render(self, title: str) -> Group:
        table = Table(title=title, expand=True)
        for column in ("device", "model", "pred/s", "last label", "sync", "outbox", "alerts"):
            table.add_column(column)
        with self._lock:
            for device in sorted(self.devices):
                r = self.devices[device]
                recent = [t for t in r.arrivals if t > time.monotonic() - 5]
                rate = (len(recent) - 1) / (recent[-1] - recent[0]) if len(recent) > 1 else 0.0
                model = f"{r.last.model.name} v{r.last.model.version}" if r.last else ""
                label = f"{r.last.top[0].label} {r.last.top[0].score:.0%}" if r.last else ""
                sync = f"{r.sync.state.value}" + (f" ({r.sync.reason[:40]})" if r.sync and r.sync.reason else "") if r.sync else ""
                alerts = ", ".join(a.type.value for a in r.alerts.values()) or "none"
                table.add_row(device, model, f"{rate:.1f}", label, sync, "" if r.queue is None else str(r.queue), alerts)
        return Group(table, Text("predictions seen here " + str(self.total())))



def _pki(folder: Path, devices: list[str]) -> Path:
    certs = folder / "certs"
    if not (certs / "ca.key").exists():
        new_ca(certs, "edgefleet local fleet CA")
    if not (certs / CRL).exists():  # a CA made before the fleet broker checked revocations
        write_crl(certs, {})
    # One certificate per cloud_ingest replica: the fleet broker takes its common name as the client id.
    for name, server in (("cloud-broker", True), (INGEST_REPLICA, False), ("operator", False), *((d, False) for d in devices)):
        if not (certs / f"{name}.crt").exists():
            issue(certs, name, server=server)
    return certs


def run(devices: int = 2, rate_hz: float = 2.0, duration_s: float | None = None, folder: Path = FLEET_DIR) -> int:
    console = Console()
    ids = [f"device-{i + 1}" for i in range(devices)]
    folder.mkdir(parents=True, exist_ok=True)
    certs = _pki(folder, ids).resolve()
    if not (DEFAULT_KEY_DIR / "operator.key").exists():
        new_key_pair(DEFAULT_KEY_DIR)
    logs = folder / "log"
    logs.mkdir(exist_ok=True)
    servers: list = []
    children: list[subprocess.Popen] = []
    links: list[MqttLink] = []
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        cloud = Broker(security=cloud_listener(certs)).start()
        store = S3Server().start()
        servers += [cloud, store]
        cloud_url = f"mqtts://127.0.0.1:{cloud.port}"
        tls = {"EDGEFLEET_MQTT_CA_FILE": str(certs / "ca.crt")}
        base = {**os.environ, **store.env(), "EDGEFLEET_LOG_FORMAT": "json"}

        def spawn(name: str, args: list[str], env: dict[str, str]) -> None:
            log = (logs / f"{name}.log").open("wb")
            children.append(subprocess.Popen([sys.executable, "-m", "edgefleet", *args], env={**base, **env},
                                             stdout=log, stderr=log, start_new_session=True))

        spawn("cloud-ingest", ["cloud-ingest"], {**tls, "EDGEFLEET_MQTT_URL": cloud_url, "EDGEFLEET_DEVICE_ID": "cloud-ingest",
                                                 "EDGEFLEET_MQTT_CERT_FILE": str(certs / f"{INGEST_REPLICA}.crt"),
                                                 "EDGEFLEET_MQTT_KEY_FILE": str(certs / f"{INGEST_REPLICA}.key")})
        view = FleetView(console)
        for device in ids:
            (folder / device / "broker").mkdir(parents=True, exist_ok=True)
            broker = Broker(extra_config=bridge(device, "127.0.0.1", cloud.port, certs), persistent=True,
                            workdir=(folder / device / "broker").resolve()).start()
            servers.append(broker)
            store_dir = folder / device / "store"
            env = {"EDGEFLEET_MQTT_URL": broker.url, "EDGEFLEET_DEVICE_ID": device}
            spawn(f"{device}-sync", ["sync"], {**env, "EDGEFLEET_MODEL_STORE": str(store_dir),
                                               "EDGEFLEET_SEED_MODEL_DIR": str(DEFAULT_MODEL_DIR),
                                               "EDGEFLEET_TRUSTED_KEYS_DIR": str(DEFAULT_KEY_DIR)})
            wait_for(lambda: (store_dir / "current").exists() or children[-1].poll() is not None, 60)
            spawn(f"{device}-inference", ["inference"], {**env, "EDGEFLEET_MODEL_DIR": str(store_dir / "current")})
            spawn(f"{device}-telemetry", ["telemetry"], {**env, "EDGEFLEET_CLOUD_MQTT_URL": broker.url,
                                                         "EDGEFLEET_OUTBOX_PATH": str(folder / device / "outbox.db"),
                                                         "EDGEFLEET_RESOURCE_INTERVAL_S": "5"})
            spawn(f"{device}-camera", ["camera", "--cameras", "door,yard", "--rate", str(rate_hz), "--envelope"], env)
            link = MqttLink(CommonSettings(mqtt_url=broker.url, device_id=device), "console", unique=True)
            link.subscribe(topics.all_predictions(device), view.on_prediction, qos=0)
            link.subscribe(topics.status(device, "telemetry"), view.on_status)
            link.subscribe(topics.sync_state(device), view.on_sync)
            link.subscribe(topics.alerts(device), view.on_alert)
            link.start()
            links.append(link)
        operator = (f"EDGEFLEET_MQTT_URL={cloud_url} EDGEFLEET_MQTT_CA_FILE={certs}/ca.crt "
                    f"EDGEFLEET_MQTT_CERT_FILE={certs}/operator.crt EDGEFLEET_MQTT_KEY_FILE={certs}/operator.key "
                    + " ".join(f"{k}={v}" for k, v in store.env().items()))
        title = (f"edgefleet fleet · {devices} devices · fleet broker {cloud_url} · S3 {store.url} · logs in {logs}/ · Ctrl-C stops\n"
                 f"roll out from another terminal: {operator} edgefleet model publish DIR && "
                 f"{operator} edgefleet rollout start NAME VERSION")
        console.print(title, highlight=False, soft_wrap=True)  # also where no live table shows: pipes, logs
        show_live(console, lambda: view.render(title), children, logs, stop, duration_s)
        console.print(f"\nstopped; {view.total()} predictions shown")
        return 0 if view.total() else 1
    finally:
        for link in links:
            link.stop()
        stop_children(children)
        for server in reversed(servers):
            server.close()
