"""Device-to-cloud telemetry for the tests, all real and on the production path: the device's
Mosquitto, bridged over TLS with the device's certificate (a persistent session: cleansession false)
to a separate fleet Mosquitto with the committed cloud config and ACL, an S3-compatible server, and the
real `edgefleet telemetry` and `edgefleet cloud-ingest` processes (one certificate per replica)."""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path

from edgefleet.audit import DeviceAudit, audit
from edgefleet.broker import Broker
from edgefleet.brokerconf import bridge, cloud_listener
from edgefleet.certs import issue, new_ca
from edgefleet.spawner import keys_of
from shared import s3
from shared.config import CommonSettings, IngestSettings, TelemetrySettings, load
from shared.mqtt import MqttLink
from tests import s3pool
from tests.support import Device, ServiceProcess, Services, wait_until

BUCKET = "edgefleet-telemetry"
REPLICAS = {"ingest-1": "cloud-ingest-0", "ingest-2": "cloud-ingest-1"}  # replica -> its certificate


class Uplink:
    def __init__(self, tmp: Path, request, device_id: str = "edge-t") -> None:
        self.tmp, self.request, self.device_id = tmp, request, device_id
        self.certs = tmp / "certs"
        new_ca(self.certs)
        issue(self.certs, "cloud-broker", server=True)
        for name in (device_id, *REPLICAS.values()):
            issue(self.certs, name)
        self._closing = contextlib.ExitStack()  # closed in reverse: services, clients, then servers
        self.cloud_broker = self._closing.enter_context(Broker(security=cloud_listener(self.certs)))
        to_cloud = bridge(device_id, "127.0.0.1", self.cloud_broker.port, self.certs)
        self.device_broker = self._closing.enter_context(Broker(extra_config=to_cloud))
        self.s3_server = self._closing.enter_context(contextlib.closing(s3pool.take()))
        self.store = s3.client(self.s3_server.settings())
        self.outbox_path = tmp / "outbox.db"
        self.device = Device(self.device_broker.url, device_id)
        self._closing.callback(self.device.close)
        self.services = Services(tmp, request)
        self._closing.callback(self.services.close)

    def new_store(self) -> None:
        """An empty S3 store in place of the current one, for the ingest started next: a fleet whose store
        began afresh while its devices kept their outboxes. The old store keeps running until the rig
        closes; stop the services that use the new one before then (it closes first)."""
        self.s3_server = self._closing.enter_context(contextlib.closing(s3pool.take()))
        self.store = s3.client(self.s3_server.settings())

    @property
    def cloud_url(self) -> str:
        return f"mqtts://127.0.0.1:{self.cloud_broker.port}"

    def start_telemetry(self, wait_online: bool = True, **settings) -> ServiceProcess:
        """`edgefleet telemetry` on the device's broker: its batches reach the fleet through the bridge."""
        telemetry = load(TelemetrySettings, None, **{
            "mqtt_url": self.device_broker.url, "cloud_mqtt_url": self.device_broker.url, "device_id": self.device_id,
            "outbox_path": self.outbox_path, "status_interval_s": 0.5, "mqtt_reconnect_max_s": 1,
            "ack_timeout_s": 3, "forward_retry_max_s": 1, **settings,
        })
        process = self.services.start(telemetry, "telemetry", "telemetry")
        if wait_online:
            wait_until(lambda: (s := self.device.latest_status("telemetry")) is not None and s.state == "online"
                       and s.at > process.started or not process.alive(), 60, "the telemetry service online")
            assert process.alive(), process.log()
        return process

    def start_ingest(self, replica: str = "ingest-1", **settings) -> ServiceProcess:
        cert = REPLICAS[replica]
        ingest = load(IngestSettings, None, **{
            **keys_of(self.s3_server.settings()), "mqtt_url": self.cloud_url, "device_id": replica,
            "mqtt_ca_file": self.certs / "ca.crt", "mqtt_cert_file": self.certs / f"{cert}.crt",
            "mqtt_key_file": self.certs / f"{cert}.key", "telemetry_bucket": BUCKET, "mqtt_reconnect_max_s": 1,
            # Each batch written as soon as a writer is free (still as a flush): these tests are about one
            # device's protocol, whose one batch in flight would otherwise wait up to a second for its ack.
            "ingest_flush_s": 0,
            **settings,
        })
        # The replica's log file is appended to by each of its starts: this start's line is one more.
        log = self.services.folder / f"{replica}.log"
        before = log.read_text(errors="replace").count("connected to broker") if log.exists() else 0
        process = self.services.start(ingest, replica, "cloud-ingest")
        wait_until(lambda: process.log().count("connected to broker") > before or not process.alive(), 60,
                   "cloud_ingest to subscribe")
        assert process.alive(), process.log()
        return process

    def cloud_client(self, name: str) -> MqttLink:
        """A client of the fleet broker with its own certificate (common name `name`), not yet started."""
        if not (self.certs / f"{name}.crt").exists():
            issue(self.certs, name)
        settings = CommonSettings(mqtt_url=self.cloud_url, device_id=name, mqtt_reconnect_max_s=1,
                                  mqtt_ca_file=self.certs / "ca.crt", mqtt_cert_file=self.certs / f"{name}.crt",
                                  mqtt_key_file=self.certs / f"{name}.key")
        link = MqttLink(settings, "test", unique=True)
        self._closing.callback(link.stop)
        return link

    def telemetry_stats(self):
        status = self.device.latest_status("telemetry")
        return status.telemetry if status else None

    def objects(self, prefix: str = "telemetry/") -> dict[str, str]:
        """Every object under `prefix` in the telemetry bucket, with its ETag."""
        found = {}
        for page in self.store.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
            found.update({o["Key"]: o["ETag"] for o in page.get("Contents", [])})
        return found

    def audit(self) -> DeviceAudit:
        """The device's audit (empty while S3 holds nothing of it yet)."""
        return audit(self.store, BUCKET).get(self.device_id) or DeviceAudit(self.device_id)

    def outbox_meta(self, key: str) -> int:
        """One counter from the outbox file (read-only: a running service keeps writing it)."""
        db = sqlite3.connect(f"file:{self.outbox_path}?mode=ro", uri=True)
        try:
            row = db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
            return int(row[0]) if row else 0
        finally:
            db.close()

    def outbox_acknowledged(self) -> list[tuple[str, int, int]]:
        """Which store acknowledged which numbers, as the outbox keeps it: (store id, first, last), oldest first."""
        db = sqlite3.connect(f"file:{self.outbox_path}?mode=ro", uri=True)
        try:
            return db.execute("SELECT store, first_seq, last_seq FROM acknowledged ORDER BY first_seq").fetchall()
        finally:
            db.close()

    def outbox_epoch(self) -> str:
        return f"{self.outbox_meta('epoch'):08x}"

    def outbox_seqs(self) -> set[int]:
        """What the (stopped) telemetry service still holds, read from its file."""
        db = sqlite3.connect(f"file:{self.outbox_path}?mode=ro", uri=True)
        try:
            return {row[0] for row in db.execute("SELECT seq FROM records")}
        finally:
            db.close()

    def assert_complete(self) -> DeviceAudit:
        """In every epoch, every sequence number is in S3 exactly once or declared lost by the device; in
        the outbox's current epoch, what is neither may still be in the outbox. Nothing the store
        acknowledged is missing from it."""
        result = self.audit()
        current, remaining = self.outbox_epoch(), self.outbox_seqs()
        for epoch, numbers in result.epochs.items():
            held = remaining if epoch == current else set()
            unexplained = [s for a, b in numbers.missing for s in range(a, b + 1) if s not in held]
            assert not unexplained, f"epoch {epoch}: lost records: {unexplained[:20]}"
            assert not numbers.lost, f"epoch {epoch}: acknowledged by this store and not in it: {numbers.lost[:20]}"
            assert numbers.duplicates == 0, f"epoch {epoch}: {numbers.duplicates} duplicates"
        return result

    def close(self) -> None:
        self._closing.close()
