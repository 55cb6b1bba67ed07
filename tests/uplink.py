"""Device-to-cloud telemetry for the tests, all real: the device's Mosquitto, a separate cloud
Mosquitto, an S3-compatible server, and the real `edgefleet telemetry` and `edgefleet cloud-ingest`
processes."""

from __future__ import annotations

from pathlib import Path

from edgefleet.audit import DeviceAudit, audit
from edgefleet.broker import Broker
from edgefleet.s3server import S3Server
from services.telemetry.outbox import Outbox
from shared import s3
from tests.support import Device, ServiceProcess, stop_and_report, wait_until

BUCKET = "edgefleet-telemetry"


class Uplink:
    def __init__(self, tmp: Path, request, device_id: str = "edge-t") -> None:
        self.tmp, self.request, self.device_id = tmp, request, device_id
        self.device_broker = Broker().start()
        self.cloud_broker = Broker().start()
        self.s3_server = S3Server().start()
        self.store = s3.client(self.s3_server.settings())
        self.outbox_path = tmp / "outbox.db"
        self.processes: list[ServiceProcess] = []
        self.device = Device(self.device_broker.url, device_id)

    def start_telemetry(self, **settings) -> ServiceProcess:
        env = {
            "EDGEFLEET_MQTT_URL": self.device_broker.url, "EDGEFLEET_CLOUD_MQTT_URL": self.cloud_broker.url,
            "EDGEFLEET_DEVICE_ID": self.device_id, "EDGEFLEET_OUTBOX_PATH": str(self.outbox_path),
            "EDGEFLEET_STATUS_INTERVAL_S": "0.5", "EDGEFLEET_MQTT_RECONNECT_MAX_S": "1",
            "EDGEFLEET_ACK_TIMEOUT_S": "3", "EDGEFLEET_FORWARD_RETRY_MAX_S": "1",
            **{f"EDGEFLEET_{k.upper()}": str(v) for k, v in settings.items()},
        }
        process = ServiceProcess(env, self.tmp / "telemetry.log", "telemetry")
        self.processes.append(process)
        wait_until(lambda: (s := self.device.latest_status("telemetry")) is not None and s.state == "online"
                   and s.at > process.started or not process.alive(), 60, "the telemetry service online")
        assert process.alive(), process.log()
        return process

    def start_ingest(self, replica: str = "ingest-1", **settings) -> ServiceProcess:
        env = {
            "EDGEFLEET_MQTT_URL": self.cloud_broker.url, "EDGEFLEET_DEVICE_ID": replica,
            "EDGEFLEET_TELEMETRY_BUCKET": BUCKET, "EDGEFLEET_MQTT_RECONNECT_MAX_S": "1", **self.s3_server.env(),
            **{f"EDGEFLEET_{k.upper()}": str(v) for k, v in settings.items()},
        }
        process = ServiceProcess(env, self.tmp / f"{replica}.log", "cloud-ingest")
        self.processes.append(process)
        wait_until(lambda: "ingesting" in process.log() or not process.alive(), 60, "cloud_ingest to subscribe")
        assert process.alive(), process.log()
        return process

    def telemetry_stats(self):
        status = self.device.latest_status("telemetry")
        return status.telemetry if status else None

    def audit(self) -> DeviceAudit:
        return audit(self.store, BUCKET)[self.device_id]

    def outbox_seqs(self) -> set[int]:
        """What the (stopped) telemetry service still holds, read from its file."""
        outbox = Outbox(self.outbox_path, self.device_id, 1 << 30)
        seqs = {row[0] for row in outbox.db.execute("SELECT seq FROM records")}
        outbox.close()
        return seqs

    def assert_complete(self) -> DeviceAudit:
        """Every sequence number is in S3 exactly once, declared lost by the device, or still in its outbox."""
        result = self.audit()
        remaining = self.outbox_seqs()
        unexplained = [s for a, b in result.missing for s in range(a, b + 1) if s not in remaining]
        assert not unexplained, f"lost records: {unexplained[:20]}"
        assert result.duplicates == 0
        return result

    def close(self) -> None:
        stop_and_report(self.processes, self.request)
        self.device.close()
        for server in (self.device_broker, self.cloud_broker, self.s3_server):
            server.close()
