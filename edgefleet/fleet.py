"""The main job: the whole fleet on this machine, without Docker, shown live.

    cloud:   the fleet broker (TLS, client certificates, deploy/mosquitto/cloud.acl), an S3 store
             (moto), cloud_ingest
    devices: each with its own broker (bridged to the fleet broker over TLS with its certificate),
             sync, inference, telemetry and a camera simulator

The certificates (var/fleet/certs) and the operator key (var/keys) are made on first use. The S3 store
lives in memory, so every run starts it empty; the devices start fresh with it (their outboxes, model
and plugin stores and broker state are cleared) and its registry is seeded with the model they serve,
signed with the operator key. The table shows every device: the model it serves, predictions per second,
its last label, sync state, outbox depth and open alerts. The operator's settings are written to
var/fleet/operator.env for another terminal (`source var/fleet/operator.env`), where a model published
and rolled out arrives live. Ctrl-C stops everything."""

from __future__ import annotations

import collections
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from paho.mqtt.client import MQTTMessage
from rich.console import Console, Group
from rich.text import Text

from edgefleet.broker import Broker
from edgefleet.brokerconf import bridge, cloud_listener
from edgefleet.certs import CRL, issue, new_ca, write_crl
from edgefleet.liveview import Rate, View, decoded, listen, show_live, stop_on_signals, table
from edgefleet.operator_shell import OPERATOR_ENV, seed_registry, write_operator_env
from edgefleet.ports import bindable, free_port
from edgefleet.s3server import S3Server
from edgefleet.spawner import Spawner, keys_of
from edgefleet.stack import start_device
from shared import topics
from shared.config import (
    DEFAULT_KEY_DIR,
    DEFAULT_MODEL_DIR,
    ConsoleSettings,
    IngestSettings,
    StoreSettings,
    TelemetrySettings,
    TelemetryStoreSettings,
    load,
)
from shared.mqtt import MqttLink
from shared.registry import ensure_key_pair
from shared.schemas import Alert, AlertState, Prediction, ServiceStatus, SyncReport

FLEET_DIR = Path("var/fleet")
# The README's first rollout (the section "First rollout"), shown under the title.
INT8_MODEL_DIR = DEFAULT_MODEL_DIR.with_name(f"{DEFAULT_MODEL_DIR.name}-int8-static-minmax")
INGEST_REPLICA = "cloud-ingest-0"
# The fleet console's certificate (its block in deploy/mosquitto/cloud.acl) and the port it takes where
# free, so the address to open is the same from run to run.
CONSOLE_CERT, CONSOLE_PORT = "console", 8080
DEVICE_COLUMNS = ("device", "model", "pred/s", "last label", "sync", "outbox", "alerts")


@dataclass
class DeviceRow:
    rate: Rate = field(default_factory=Rate)
    last: Prediction | None = None
    sync: SyncReport | None = None
    queue: int | None = None
    alerts: dict[str, Alert] = field(default_factory=dict)
    predictions: int = 0

    def cells(self, device: str) -> list[str]:
        last, sync = self.last, self.sync
        model = f"{last.model.name} v{last.model.version}" if last else ""
        label = f"{last.top[0].label} {last.top[0].score:.0%}" if last else ""
        state = f"{sync.state.value}" + (f" ({sync.reason[:40]})" if sync.reason else "") if sync else ""
        alerts = ", ".join(a.type.value for a in self.alerts.values()) or "none"
        outbox = "" if self.queue is None else str(self.queue)
        return [device, model, f"{self.rate.per_second():.1f}", label, state, outbox, alerts]


class FleetView(View):
    def __init__(self, console: Console) -> None:
        super().__init__(console)
        self.devices: dict[str, DeviceRow] = collections.defaultdict(DeviceRow)

    def on_prediction(self, message: MQTTMessage) -> None:
        if (p := decoded(Prediction, message)) is None:
            return
        with self._lock:
            row = self.devices[p.device]
            row.last, row.predictions = p, row.predictions + 1
            row.rate.tick()
        if self._lines is not None and row.predictions % 10 == 1:
            best = p.top[0]
            self._lines.print(f"{p.device} {p.camera}: {best.label} {best.score:.0%} (model v{p.model.version})",
                              highlight=False)

    def on_status(self, message: MQTTMessage) -> None:
        if (s := decoded(ServiceStatus, message)) is not None and s.telemetry is not None:
            with self._lock:
                self.devices[s.device].queue = s.telemetry.queue_records

    def on_sync(self, message: MQTTMessage) -> None:
        if (r := decoded(SyncReport, message)) is not None:
            with self._lock:
                self.devices[r.device].sync = r

    def on_alert(self, message: MQTTMessage) -> None:
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
        with self._lock:
            rows = [self.devices[device].cells(device) for device in sorted(self.devices)]
        return Group(table(title, DEVICE_COLUMNS, rows), Text("predictions seen here " + str(self.total())))


def _pki(folder: Path, devices: list[str]) -> Path:
    certs = folder / "certs"
    if not (certs / "ca.key").exists():
        new_ca(certs, "edgefleet local fleet CA")
    if not (certs / CRL).exists():  # a CA made before the fleet broker checked revocations
        write_crl(certs, {})
    # One certificate per cloud_ingest replica: the fleet broker takes its common name as the client id.
    clients = (INGEST_REPLICA, "operator", CONSOLE_CERT, *devices)
    for name, server in (("cloud-broker", True), *((c, False) for c in clients)):
        if not (certs / f"{name}.crt").exists():
            issue(certs, name, server=server)
    return certs


def _start_console(spawner: Spawner, store: StoreSettings, cloud_url: str, certs: Path) -> str:
    """Starts `edgefleet console` on the fleet broker (its own certificate) and the S3 telemetry; returns the
    page's address. The port: EDGEFLEET_CONSOLE_PORT where set (not 0), else CONSOLE_PORT where free, else a free
    one."""
    settings = load(ConsoleSettings, None, **{**keys_of(store), "mqtt_url": cloud_url, "device_id": "console"},
                    log_format="json", mqtt_ca_file=certs / "ca.crt", mqtt_cert_file=certs / f"{CONSOLE_CERT}.crt",
                    mqtt_key_file=certs / f"{CONSOLE_CERT}.key")
    if "port" in settings.console.model_fields_set and settings.console.port:
        port = settings.console.port  # asked for: the console takes it or refuses to start, saying why
    else:
        port = CONSOLE_PORT if bindable(settings.console.host, CONSOLE_PORT) else free_port()
    spawner.start("console", "console", settings.model_copy(
        update={"console": settings.console.model_copy(update={"port": port})}))
    host = "127.0.0.1" if settings.console.host in ("0.0.0.0", "") else settings.console.host  # noqa: S104
    return f"http://{host}:{port}/"


def _fresh_devices(folder: Path, devices: list[str]) -> None:
    """Clears each device's state (outbox, model and plugin stores, broker persistence: all of
    <folder>/<device>/), so the devices start as fresh as the in-memory S3 store: an outbox kept from an
    earlier run would hold records its store never saw. Certificates and logs live elsewhere and stay."""
    for device in devices:
        shutil.rmtree(folder / device, ignore_errors=True)


def run(devices: int = 2, rate_hz: float = 2.0, duration_s: float | None = None, folder: Path = FLEET_DIR) -> int:
    console = Console()
    ids = [f"device-{i + 1}" for i in range(devices)]
    folder.mkdir(parents=True, exist_ok=True)
    _fresh_devices(folder, ids)
    console.print(f"devices start fresh with the in-memory S3 store: outboxes, model stores, broker state cleared "
                  f"in {folder}/ (certificates, logs kept)", highlight=False)
    certs = _pki(folder, ids).resolve()
    ensure_key_pair(DEFAULT_KEY_DIR)
    logs = folder / "log"
    spawner = Spawner(logs)
    servers: list[Broker | S3Server] = []
    links: list[MqttLink] = []
    stop = stop_on_signals()
    try:
        cloud = Broker(security=cloud_listener(certs)).start()
        store = S3Server().start()
        servers += [cloud, store]
        seeded = seed_registry(store.settings())
        cloud_url = f"mqtts://127.0.0.1:{cloud.port}"
        spawner.start("cloud-ingest", "cloud-ingest", load(
            IngestSettings, None, **{**keys_of(store.settings()), "mqtt_url": cloud_url, "device_id": "cloud-ingest"},
            log_format="json", mqtt_ca_file=certs / "ca.crt", mqtt_cert_file=certs / f"{INGEST_REPLICA}.crt",
            mqtt_key_file=certs / f"{INGEST_REPLICA}.key"))
        console_url = _start_console(spawner, store.settings(), cloud_url, certs)
        view = FleetView(console)
        for device in ids:
            (folder / device / "broker").mkdir(parents=True, exist_ok=True)
            broker = Broker(extra_config=bridge(device, "127.0.0.1", cloud.port, certs), persistent=True,
                            workdir=(folder / device / "broker").resolve()).start()
            servers.append(broker)
            spawner.start(f"{device}-telemetry", "telemetry", load(
                TelemetrySettings, None, mqtt_url=broker.url, device_id=device, log_format="json",
                cloud_mqtt_url=broker.url, outbox_path=folder / device / "outbox.db", resource_interval_s=5))
            start_device(spawner, device, broker.url, folder / device / "store", store.settings(),
                         cameras=["door", "yard"], rate_hz=rate_hz, envelope=True, prefix=f"{device}-")
            links.append(listen(broker.url, device, [(topics.all_predictions(device), view.on_prediction, 0),
                                                     (topics.status(device, "telemetry"), view.on_status, 1),
                                                     (topics.sync_state(device), view.on_sync, 1),
                                                     (topics.alerts(device), view.on_alert, 1)]))
        env_file = folder / OPERATOR_ENV
        write_operator_env(env_file, load(
            TelemetryStoreSettings, None, **keys_of(store.settings()), mqtt_url=cloud_url, device_id="operator",
            mqtt_ca_file=certs / "ca.crt", mqtt_cert_file=certs / "operator.crt", mqtt_key_file=certs / "operator.key"),
            DEFAULT_KEY_DIR)
        title = (f"edgefleet fleet · {devices} devices serving {seeded.name} v{seeded.version} (in the registry) · "
                 f"fleet broker {cloud_url} · S3 {store.url} · logs in {logs}/ · Ctrl-C stops\n"
                 f"operator shell: source {env_file} · then: edgefleet model publish {INT8_MODEL_DIR} --name "
                 f"{seeded.name} · edgefleet rollout start {seeded.name} {seeded.version + 1} --canary-devices 1")
        console.print(title, highlight=False, soft_wrap=True)  # also where no live table shows: pipes, logs
        console.print(f"console: {console_url}", highlight=False, soft_wrap=True)
        show_live(console, lambda: view.render(title), spawner, stop, duration_s)
        console.print(f"\nstopped; {view.total()} predictions shown")
        return 0 if view.total() else 1
    finally:
        for link in links:
            link.stop()
        spawner.stop()
        for server in reversed(servers):
            server.close()
