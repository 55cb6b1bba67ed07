"""`edgefleet bench telemetry`: the outbox's write rate against raw SQLite inserts of the same rows in
the same run; how fast a ten-minute backlog drains to S3 through the real telemetry and cloud_ingest
processes; and cloud_ingest's throughput with two replicas against one.

Goals (issue 5): >= 20,000 records/s into the outbox; a backlog drains at >= 10 x its arrival rate;
two ingest replicas >= 1.7 x one.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path

from edgefleet.bench.report import Goal, emit
from edgefleet.broker import Broker
from edgefleet.s3server import S3Server
from services.telemetry.outbox import Outbox
from shared import topics
from shared.codec import WireFormat, decode, encode
from shared.config import CommonSettings
from shared.mqtt import MqttLink, content_type_of
from shared.schemas import (
    Alert,
    AlertState,
    AlertType,
    ResourceSample,
    ServiceStatus,
    Severity,
    TelemetryAck,
    TelemetryBatch,
    TelemetryRecord,
)

ARRIVAL_PER_S = 20.0  # a busy device: resource samples, alerts, hard-example metadata


def _records(device: str, n: int) -> list:
    now = time.time()
    out = []
    for i in range(n):
        if i % 10 == 9:
            out.append(Alert(device=device, alert_id=f"a{i}", type=AlertType.FEATURE_DRIFT, state=AlertState.RAISED,
                             severity=Severity.WARNING, value=1.7, threshold=1.5, window=100, detail="bench", at=now))
        else:
            out.append(ResourceSample(device=device, cpu_percent=37.5, memory_percent=41.0, memory_used_bytes=2_000_000_000,
                                      disk_percent=63.0, temperatures_c={"cpu/0": 51.0}, queue_bytes=i, queue_records=i, at=now))
    return out


def _outbox_rate(tmp: Path, n: int, per_commit: int = 500) -> tuple[float, float]:
    bodies = _records("bench", n)
    outbox = Outbox(tmp / "outbox.db", "bench", 1 << 34)
    t0 = time.perf_counter()
    for i in range(0, n, per_commit):
        outbox.append(bodies[i : i + per_commit])
    ours = n / (time.perf_counter() - t0)
    outbox.close()
    # The baseline: the same rows, already encoded, straight into a table with the same settings.
    blobs = [(i + 1, b.kind, None, 0, encode(TelemetryRecord(seq=i + 1, body=b), WireFormat.MSGPACK)) for i, b in enumerate(bodies)]
    raw = sqlite3.connect(str(tmp / "raw.db"), isolation_level=None)
    raw.execute("PRAGMA journal_mode=WAL")
    raw.execute("PRAGMA synchronous=FULL")
    raw.execute("CREATE TABLE records (seq INTEGER PRIMARY KEY, kind TEXT, expires REAL, size INTEGER, body BLOB)")
    t0 = time.perf_counter()
    for i in range(0, n, per_commit):
        raw.execute("BEGIN")
        raw.executemany("INSERT INTO records VALUES (?,?,?,?,?)", blobs[i : i + per_commit])
        raw.execute("COMMIT")
    baseline = n / (time.perf_counter() - t0)
    raw.close()
    return ours, baseline


def _spawn(stack: ExitStack, tmp: Path, name: str, command: str, env: dict[str, str]) -> subprocess.Popen:
    log = stack.enter_context(open(tmp / f"{name}.log", "wb"))
    process = subprocess.Popen([sys.executable, "-m", "edgefleet", command], env={**os.environ, **env}, stdout=log, stderr=log)
    stack.callback(lambda: (process.terminate(), process.wait(30)))
    return process


def _ingest_env(broker: Broker, store: S3Server, replica: str) -> dict[str, str]:
    return {"EDGEFLEET_MQTT_URL": broker.url, "EDGEFLEET_DEVICE_ID": replica, "EDGEFLEET_LOG_LEVEL": "WARNING", **store.env()}


def _drain(tmp: Path, backlog: int) -> float:
    """Records/s from a full outbox into S3 through `edgefleet telemetry` and `edgefleet cloud-ingest`."""
    outbox = Outbox(tmp / "backlog.db", "bench-drain", 1 << 34)
    for i in range(0, backlog, 500):
        outbox.append(_records("bench-drain", min(500, backlog - i)))
    outbox.close()
    with ExitStack() as stack:
        device, cloud, store = (stack.enter_context(x) for x in (Broker(), Broker(), S3Server()))
        _spawn(stack, tmp, "ingest", "cloud-ingest", _ingest_env(cloud, store, "ingest-1"))
        time.sleep(2)
        remaining = [backlog]
        done = threading.Event()

        def on_status(message) -> None:
            status = decode(ServiceStatus, message.payload, content_type_of(message))
            if status.telemetry is not None:
                remaining[0] = status.telemetry.queue_records
                if remaining[0] == 0:
                    done.set()

        watcher = MqttLink(CommonSettings(mqtt_url=device.url, device_id="bench-drain"), "bench", unique=True)
        watcher.subscribe(topics.status("bench-drain", "telemetry"), on_status)
        watcher.start()
        stack.callback(watcher.stop)
        t0 = time.perf_counter()
        _spawn(stack, tmp, "telemetry", "telemetry", {
            "EDGEFLEET_MQTT_URL": device.url, "EDGEFLEET_CLOUD_MQTT_URL": cloud.url, "EDGEFLEET_DEVICE_ID": "bench-drain",
            "EDGEFLEET_OUTBOX_PATH": str(tmp / "backlog.db"), "EDGEFLEET_RESOURCE_INTERVAL_S": "3600",
            "EDGEFLEET_STATUS_INTERVAL_S": "0.2", "EDGEFLEET_LOG_LEVEL": "WARNING",
        })
        if not done.wait(600):
            raise RuntimeError(f"the backlog did not drain: {remaining[0]} records left")
        return backlog / (time.perf_counter() - t0)


def _ingest_rate(replicas: int, devices: int, batches: int, per_batch: int, tmp: Path) -> float:
    """Records/s stored by `replicas` cloud_ingest processes, fed by `devices` senders that each wait
    for the acknowledgement of one batch before sending the next, as the forwarder does."""
    with ExitStack() as stack:
        cloud, store = stack.enter_context(Broker()), stack.enter_context(S3Server())
        for r in range(replicas):
            _spawn(stack, tmp, f"ingest-{replicas}-{r}", "cloud-ingest", _ingest_env(cloud, store, f"ingest-{r}"))
        time.sleep(3)
        payloads = {
            d: [encode(TelemetryBatch(device=f"dev-{d}", epoch="0000bec4", records=[TelemetryRecord(seq=b * per_batch + i + 1, body=body)
                                                                  for i, body in enumerate(_records(f"dev-{d}", per_batch))],
                                      sent_at=time.time()), WireFormat.MSGPACK_ZLIB) for b in range(batches)]
            for d in range(devices)
        }
        acks_by_device = {f"dev-{d}": threading.Semaphore(0) for d in range(devices)}

        def on_ack(message) -> None:
            acks_by_device[decode(TelemetryAck, message.payload, content_type_of(message)).device].release()

        link = MqttLink(CommonSettings(mqtt_url=cloud.url, device_id="bench"), "bench", unique=True)
        link.subscribe(topics.all_telemetry_acks(), on_ack)
        link.start()
        link.wait_connected(10)
        stack.callback(link.stop)
        time.sleep(0.5)

        def device(d: int) -> None:
            for payload in payloads[d]:
                link.publish(topics.telemetry(f"dev-{d}"), payload, qos=1, content_type=WireFormat.MSGPACK_ZLIB.content_type)
                if not acks_by_device[f"dev-{d}"].acquire(timeout=60):
                    raise RuntimeError("a batch was not acknowledged")

        threads = [threading.Thread(target=device, args=(d,)) for d in range(devices)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return devices * batches * per_batch / (time.perf_counter() - t0)


def run(quick: bool, json_out: Path | None) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ours, raw = _outbox_rate(tmp, 20_000 if quick else 100_000)
        backlog = int(ARRIVAL_PER_S * (60 if quick else 600))
        drain = _drain(tmp, backlog)
        devices, batches = (4, 5) if quick else (8, 15)
        one = _ingest_rate(1, devices, batches, 200, tmp)
        two = _ingest_rate(2, devices, batches, 200, tmp)
    rows = [
        {"measure": "outbox appends (500 per commit, synchronous=FULL)", "records/s": round(ours)},
        {"measure": "raw SQLite inserts, same rows and settings", "records/s": round(raw)},
        {"measure": f"backlog of {backlog} records ({backlog / ARRIVAL_PER_S / 60:.0f} min at {ARRIVAL_PER_S:g}/s) drained to S3",
         "records/s": round(drain)},
        {"measure": f"cloud_ingest, 1 replica ({devices} devices)", "records/s": round(one)},
        {"measure": f"cloud_ingest, 2 replicas ({devices} devices)", "records/s": round(two)},
    ]
    print(f"outbox / raw SQLite: {ours / raw:.2f}")
    goals = [
        Goal("records/s into the outbox", round(ours), 20_000, "records/s"),
        Goal("backlog drain rate / arrival rate", round(drain / ARRIVAL_PER_S, 1), 10, "ratio"),
        Goal("two ingest replicas / one", round(two / one, 3), 1.7, "ratio"),
    ]
    return emit("telemetry", quick, rows, goals, json_out)
