"""`edgefleet console`: the fleet console. Owns three things and stops them on one path (stop(), which
SIGTERM and SIGINT call through shared.lifecycle.serve):

- the MQTT link to the FLEET broker (its own client certificate, common name `console`; read-only in
  deploy/mosquitto/cloud.acl): every device's retained statuses and sync states, the model's and the
  plugins' rollouts, into a FleetState (fleet.py);
- the S3 reader thread: the drift and latency charts (charts.py) read again every telemetry_refresh_s;
- the HTTP server (server.py), on its own thread: the page, /api/fleet, /api/charts, /api/events.

The console publishes nothing: it has no status topic and no last will (the ACL gives it none), so a
console can never disturb the fleet it watches."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import paho.mqtt.client as paho
from botocore.exceptions import BotoCoreError, ClientError

from services.console.charts import DriftCharts
from services.console.errors import ConsoleError
from services.console.fleet import FleetState
from services.console.server import ConsoleServer
from shared import metrics, s3, topics
from shared.config import ConsoleSettings
from shared.lifecycle import Liveness, serve
from shared.logs import fields
from shared.mqtt import Handler, MqttLink, content_type_of

SERVICE = "console"
log = logging.getLogger(__name__)
# How often the broker link's state is looked at (the page shows it) while the main loop waits.
LINK_CHECK_S = 0.5
CHARTS_JOIN_S = 5.0


class ConsoleService:
    """The console (see the module's doc).

    :param ConsoleSettings settings: the fleet broker (mqtt), the telemetry store (s3, telemetry_bucket)
        and the page (console: host, port, stale_after_s, telemetry_refresh_s, telemetry_window_s).
    :raises ConsoleError: the HTTP address cannot be bound, or the page's files are not installed.
    :raises OSError: a certificate cannot be read.
    """

    def __init__(self, settings: ConsoleSettings) -> None:
        self.settings = settings
        page = settings.console
        self.fleet = FleetState(page.stale_after_s)
        self.charts = DriftCharts(s3.client(settings), settings.telemetry_bucket, page.telemetry_window_s)
        self._charts_json = self.charts.latest.model_dump_json().encode()
        self._stopping = threading.Event()
        self.liveness = Liveness()
        self.link = MqttLink(settings, SERVICE)
        # The operators' plugin rollouts before the devices' plugin states: the broker replays retained
        # messages subscription by subscription, and a full plugin table makes room only for a plugin a
        # rollout names (FleetState._room_for_plugin).
        for topic_filter, handler in (
            (topics.every_device_status("+"), self.fleet.on_status),
            (topics.all_sync_states(), self.fleet.on_sync_state),
            (topics.rollout(), self.fleet.on_rollout),
            (topics.all_plugin_rollouts(), self.fleet.on_plugin_rollout),
            (topics.all_plugin_sync_states(), self.fleet.on_plugin_sync_state),
        ):
            self.link.subscribe(topic_filter, _reading(handler), qos=1)
        try:
            self.server = ConsoleServer(page.host, page.port, self, page.allowed_hosts)
        except OSError as exc:
            raise ConsoleError(f"EDGEFLEET_CONSOLE_HOST/EDGEFLEET_CONSOLE_PORT: cannot listen on "
                               f"{page.host}:{page.port}: {exc.strerror or exc}") from None
        self.metrics = metrics.service_registry(device=settings.device_id, service=SERVICE,
                                                connected=self.link.connected.is_set, status_at=lambda: None)
        # The charts thread may be inside an S3 call (bounded by its timeouts, up to s3.call_bound_s()): a stop
        # waits CHARTS_JOIN_S for it, then leaves it (a daemon) rather than hold the exit that long.
        self._http = threading.Thread(target=self.server.serve, name="http")
        self._charts = threading.Thread(target=self._read_charts, name="charts", daemon=True)

    # -- what the HTTP server shows (server.Source) ------------------------------------------------------

    def fleet_json(self) -> bytes:
        return self.fleet.snapshot().model_dump_json().encode()

    def charts_json(self) -> bytes:
        return self._charts_json

    def wait_change(self, seen: int, timeout: float) -> int:
        return self.fleet.wait_change(seen, timeout)

    # -- the service -------------------------------------------------------------------------------------

    def run(self) -> int:
        self.link.start()
        self._http.start()
        self._charts.start()
        log.info("serving the fleet console", extra=fields(url=self.server.url, broker=self.settings.mqtt.url,
                                                           bucket=self.settings.telemetry_bucket))
        # The launchers (`edgefleet fleet`, the tests) and a person read the address here; with port 0 it is
        # the only place the port is told.
        print(f"edgefleet console: {self.server.url}", flush=True)
        with self.liveness.watch("main") as progress:
            while not self._stopping.wait(LINK_CHECK_S):
                progress.tick()
                self.fleet.set_connected(self.link.connected.is_set())
        self.server.stop()
        self.fleet.wake()
        self._http.join()
        self._charts.join(CHARTS_JOIN_S)
        if self._charts.is_alive():
            log.warning("stopping while an S3 read is still waiting", extra=fields(waited_s=CHARTS_JOIN_S))
        self.link.stop()
        return 0

    def stop(self) -> None:
        self._stopping.set()

    def _read_charts(self) -> None:
        bound = s3.call_bound_s()
        with self.liveness.watch("charts", bound) as progress:
            while True:
                try:
                    latest = self.charts.refresh(before_call=lambda: progress.tick(bound))
                except (BotoCoreError, ClientError) as exc:
                    log.warning("cannot read the telemetry", extra=fields(error=str(exc)[:300]))
                    latest = self.charts.failed(f"cannot read s3://{self.settings.telemetry_bucket}: {exc}")
                self._charts_json = latest.model_dump_json().encode()
                self.fleet.charts_changed()
                progress.tick(self.settings.console.telemetry_refresh_s)  # the wait below is not a hang
                if self._stopping.wait(self.settings.console.telemetry_refresh_s):
                    return


def _reading(handler: Callable[[str, bytes, str | None], None]) -> Handler:
    """An MQTT handler feeding one of FleetState's on_* methods (topic, payload, content type)."""
    def on_message(message: paho.MQTTMessage) -> None:
        handler(message.topic, bytes(message.payload), content_type_of(message))
    return on_message


def main(settings: ConsoleSettings) -> int:
    # OSError: the HTTP port in use, or a certificate it cannot read; ValueError: a bad TLS file.
    return serve(SERVICE, settings, lambda: ConsoleService(settings), (ConsoleError, OSError, ValueError))
