"""cloud_ingest's flushes, on a real fleet broker (TLS, the committed ACL), a real S3 server and real
replica processes: several devices' batches share one flush (one object per kind and one index instead
of 2+ per batch), a batch is acknowledged only once its flush index is in S3, a batch sent again is
not written again by the replica that stored it, and the readers (the audit, the console's charts)
count a batch stored twice once, in the flush layout and in the per-batch layout written before it."""

from __future__ import annotations

import gzip
import json
import os
import secrets
import subprocess
import sys
import time

from edgefleet.audit import audit
from edgefleet.s3access import _iam
from edgefleet.s3server import S3Server
from services.cloud_ingest.flush import Flush, Pending
from services.cloud_ingest.writer import write_flush
from services.console import charts as drift_charts
from shared import lake, metrics, s3, topics
from shared.codec import WireFormat, decode, encode
from shared.mqtt import content_type_of
from shared.schemas import (
    AlertType,
    DriftSample,
    ModelRef,
    ResourceSample,
    TelemetryAck,
    TelemetryBatch,
    TelemetryRecord,
)
from tests.support import metric_family, metrics_url, scrape, wait_until
from tests.uplink import BUCKET

MODEL = ModelRef(name="efficientnet-lite0", version=1, sha256="a" * 64)


def _batch(device: str, first: int, count: int, epoch: str = "0a0b0c0d") -> TelemetryBatch:
    """A batch as a device's outbox sends it: resource samples, and a drift sample last."""
    now = time.time()
    records = [TelemetryRecord(seq=first + i, body=ResourceSample(
        device=device, cpu_percent=1, memory_percent=2, memory_used_bytes=3, disk_percent=4, at=now))
        for i in range(count - 1)]
    records.append(TelemetryRecord(seq=first + count - 1, body=DriftSample(
        device=device, model=MODEL, scores={AlertType.PREDICTION_DRIFT: 0.1}, samples=10, at=now + first)))
    return TelemetryBatch(device=device, epoch=epoch, records=records, sent_at=now)


class _Device:
    """A device of the fleet on the fleet broker with its own certificate: sends batches, keeps the acks."""

    def __init__(self, uplink, name: str) -> None:
        self.name, self.acks = name, []
        self.link = uplink.cloud_client(name)
        self.link.subscribe(topics.telemetry_ack(name), lambda m: self.acks.append(
            (time.time(), decode(TelemetryAck, m.payload, content_type_of(m)))))
        self.link.start()
        assert self.link.wait_connected(10)
        wait_until(lambda: self.link.client.is_connected(), 5, "the subscription")

    def send(self, batch: TelemetryBatch) -> None:
        self.link.publish(topics.telemetry(self.name), encode(batch, WireFormat.MSGPACK_ZLIB), qos=1,
                          content_type=WireFormat.MSGPACK_ZLIB.content_type,
                          correlation=batch.batch_id.encode()).wait_for_publish(5)

    def acked(self, batch_id: str) -> list[TelemetryAck]:
        return [ack for _, ack in self.acks if ack.batch_id == batch_id]


def _flushes(uplink) -> list[lake.FlushIndex]:
    return [lake.read_flush_index(uplink.store.get_object(Bucket=BUCKET, Key=key)["Body"].read(), key)
            for key in uplink.objects(f"{lake.FLUSHES}/")]


def test_several_devices_batches_share_one_flush_acknowledged_once_its_index_is_stored(uplink):
    uplink.start_ingest(ingest_flush_s=2)  # long enough to gather every batch below
    devices = [_Device(uplink, f"edge-{i}") for i in range(3)]
    sent = []
    for device in devices:
        for first in (1, 4):
            sent.append(batch := _batch(device.name, first, 3))
            device.send(batch)
    wait_until(lambda: all(d.acks and len(d.acks) == 2 for d in devices), 30, "every batch acknowledged")
    [flush] = _flushes(uplink)  # one flush, one index
    assert {(b.device, b.batch_id) for b in flush.batches} == {(b.device, b.batch_id) for b in sent}
    records = [k for k in uplink.objects() if lake.flush_of_key(k) is not None]
    assert sorted(k.split("/")[1] for k in records) == ["drift", "metric"]  # one object per kind: 2 < 6 batches
    assert all(lake.device_of_key(k) is None for k in records), "a flush's folder is never a device's"
    lines = [lake.StoredRecord.model_validate_json(line) for key in records for line in
             gzip.decompress(uplink.store.get_object(Bucket=BUCKET, Key=key)["Body"].read()).splitlines()]
    assert sorted((r.device, r.seq) for r in lines) == sorted((b.device, r.seq) for b in sent for r in b.records)
    for device in devices:
        assert all(at >= flush.stored_at for at, _ in device.acks), "acknowledged before its flush was stored"
        assert all(ack.stored == 3 for _, ack in device.acks)
    report = audit(uplink.store, BUCKET)
    assert {d: (r.received, r.duplicates, r.copies, r.missing) for d, r in report.items()} == {
        d.name: (6, 0, 0, []) for d in devices}


def test_a_batch_is_acknowledged_only_after_its_flush_index_is_in_s3(uplink):
    """On a store that enforces IAM policies, the replica's key may write records but not flush indexes: its
    records objects are stored and still nothing is acknowledged, until the index may be written too."""
    root = (f"root{secrets.token_hex(4)}", secrets.token_urlsafe(24))
    with S3Server(root_credentials=root) as store:
        admin = s3.client(store.settings())
        s3.ensure_bucket(admin, BUCKET)
        iam = _iam(store.settings())
        iam.create_user(UserName="ingest")
        key = iam.create_access_key(UserName="ingest")["AccessKey"]
        allow = {"Effect": "Allow", "Action": "*", "Resource": "*"}
        no_index = {"Effect": "Deny", "Action": "s3:PutObject", "Resource": f"arn:aws:s3:::{BUCKET}/{lake.FLUSHES}/*"}
        iam.put_user_policy(UserName="ingest", PolicyName="ingest", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [allow, no_index]}))
        uplink.start_ingest(s3_endpoint_url=store.url, s3_access_key_id=key["AccessKeyId"],
                            s3_secret_access_key=key["SecretAccessKey"])
        device = _Device(uplink, "edge-s")
        batch = _batch(device.name, 1, 5)
        device.send(batch)

        def records() -> list[str]:
            listed = admin.list_objects_v2(Bucket=BUCKET, Prefix=f"{lake.ROOT}/").get("Contents", [])
            return [o["Key"] for o in listed if lake.flush_of_key(o["Key"]) is not None]

        wait_until(lambda: len(records()) == 2, 30, "the flush's records objects (metric, drift)")
        time.sleep(2)  # its index refused, retried each second
        assert device.acks == [], "acknowledged with its records stored and its flush index refused"
        iam.put_user_policy(UserName="ingest", PolicyName="ingest", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [allow]}))
        wait_until(lambda: device.acked(batch.batch_id), 30, "the acknowledgement once the index is written")
        [key_] = [o["Key"] for o in admin.list_objects_v2(Bucket=BUCKET, Prefix=f"{lake.FLUSHES}/")["Contents"]]
        flush = lake.read_flush_index(admin.get_object(Bucket=BUCKET, Key=key_)["Body"].read(), key_)
        assert [b.batch_id for b in flush.batches] == [batch.batch_id]
        assert device.acks[0][0] >= flush.stored_at


def test_a_batch_sent_again_is_acknowledged_again_and_not_written_again(uplink):
    ingest = uplink.start_ingest(metrics_port=0)
    device = _Device(uplink, "edge-r")
    batch = _batch(device.name, 1, 4)
    device.send(batch)
    wait_until(lambda: device.acked(batch.batch_id), 30, "the first acknowledgement")
    device.send(batch)  # its ack lost, as the device sees it: sent again
    wait_until(lambda: len(device.acked(batch.batch_id)) == 2, 30, "the batch acknowledged again")
    assert all(ack.stored == 4 for ack in device.acked(batch.batch_id))
    later = _batch(device.name, 5, 2)
    device.send(later)  # the replica is still writing: what follows is stored
    wait_until(lambda: device.acked(later.batch_id), 30, "the next batch")
    stored = [b.batch_id for f in _flushes(uplink) for b in f.batches]
    assert sorted(stored) == sorted([batch.batch_id, later.batch_id]), "written once each"
    assert audit(uplink.store, BUCKET)[device.name].copies == 0
    scraped = scrape(metrics_url(ingest))
    outcomes = {s.labels["outcome"]: s.value for s in metric_family(scraped, metrics.INGEST_BATCHES)}
    assert (outcomes["stored"], outcomes["duplicate"]) == (2, 1), outcomes


def test_repeats_of_a_batch_being_written_are_released_at_once_and_do_not_fill_the_receive_window(uplink):
    """Receive Maximum 4 (one batch a flush, one writer). While the batch's write hangs, the device sends it
    six more times: each repeat is PUBACKed at once, so the broker still delivers the device's next batch."""
    ingest = uplink.start_ingest(ingest_flush_batches=1, ingest_workers=1, log_level="DEBUG")
    device = _Device(uplink, "edge-w")
    batch, later = _batch(device.name, 1, 2), _batch(device.name, 3, 2)
    uplink.s3_server.pause()  # the write hangs
    try:
        device.send(batch)
        wait_until(lambda: ingest.log().count('"batch taken"') == 1, 10, "the batch taken")
        for _ in range(6):
            device.send(batch)
        device.send(later)
        wait_until(lambda: later.batch_id in ingest.log(), 10, "the next batch delivered while the write hangs")
        assert device.acks == []
    finally:
        uplink.s3_server.resume()
    wait_until(lambda: device.acked(batch.batch_id) and device.acked(later.batch_id), 60, "both stored")
    time.sleep(1)
    assert len(device.acked(batch.batch_id)) == 1, "the device's ack goes out once, when the held copy is stored"
    assert sorted(b.batch_id for f in _flushes(uplink) for b in f.batches) == sorted([batch.batch_id,
                                                                                       later.batch_id])


def test_a_replica_forgets_what_it_stored_once_the_bucket_is_emptied_and_writes_a_repeat_again(uplink):
    uplink.start_ingest(status_interval_s=1)
    device = _Device(uplink, "edge-e")
    batch = _batch(device.name, 1, 3)
    device.send(batch)
    wait_until(lambda: device.acked(batch.batch_id), 30, "the first acknowledgement")
    first_store = device.acked(batch.batch_id)[0].store
    for key in uplink.objects():  # the bucket emptied: its marker too
        uplink.store.delete_object(Bucket=BUCKET, Key=key)
    wait_until(lambda: (m := lake.read_store_marker(uplink.store, BUCKET)) is not None and m.store != first_store,
               30, "the replica to claim the emptied bucket as a new store")
    device.send(batch)  # its ack lost, as the device sees it
    wait_until(lambda: len(device.acked(batch.batch_id)) == 2, 30, "the repeat acknowledged")
    again = device.acked(batch.batch_id)[1]
    assert again.store != first_store, "acknowledged in the name of a store that is gone"
    assert [b.batch_id for f in _flushes(uplink) for b in f.batches] == [batch.batch_id], "written again"


def test_two_replicas_storing_one_batch_is_a_copy_in_the_audit_and_the_charts_not_a_duplicate(uplink):
    batch = _batch("edge-c", 1, 3)
    ingest = uplink.start_ingest("ingest-1")
    device = _Device(uplink, "edge-c")
    device.send(batch)
    wait_until(lambda: device.acked(batch.batch_id), 30, "the first replica's acknowledgement")
    assert ingest.terminate() == 0
    ingest = uplink.start_ingest("ingest-2")  # it knows nothing of what the first stored
    device.send(batch)  # the first ack lost, as the device sees it
    wait_until(lambda: len(device.acked(batch.batch_id)) == 2, 30, "the second replica's acknowledgement")
    assert ingest.terminate() == 0
    assert len(_flushes(uplink)) == 2  # the same batch in two flushes
    result = audit(uplink.store, BUCKET)["edge-c"]
    assert (result.received, result.copies, result.duplicates, result.missing) == (3, 1, 0, [])
    env = {**os.environ, **uplink.s3_server.env(), "EDGEFLEET_TELEMETRY_BUCKET": BUCKET, "COLUMNS": "250"}
    cli = subprocess.run([sys.executable, "-m", "edgefleet", "telemetry", "audit", "--json"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert cli.returncode == 0, cli.stderr
    row = json.loads(cli.stdout.splitlines()[0])
    assert row["copies"] == 1 and row["duplicates"] == 0
    [series] = drift_charts.DriftCharts(uplink.store, BUCKET, window_s=3600).refresh().devices
    assert series.device == "edge-c" and len(series.at) == 1, "a sample stored twice is charted once"


def test_the_per_batch_layout_and_flushes_are_read_together_by_the_audit_and_the_charts(s3_server):
    """A store that holds batches written before flushes (one object per kind and batch, and a batch index)
    and flushes: the audit and the charts read both, and a batch in both counts once."""
    client = s3.client(s3_server.settings())
    s3.ensure_bucket(client, BUCKET)
    old = _batch("edge-old", 1, 3)
    by_kind: dict[str, list[str]] = {}
    for record in old.records:  # the per-batch layout, as cloud_ingest wrote it before flushes
        by_kind.setdefault(record.body.kind, []).append(record.model_dump_json())
    for kind, lines in by_kind.items():
        client.put_object(Bucket=BUCKET, Key=lake.records_key(kind, old.records[0].body.at, old.device, old.batch_id),
                          Body=gzip.compress(("\n".join(lines) + "\n").encode()))
    index = Pending.of(old, None).index.model_copy(update={"stored_at": time.time()})
    client.put_object(Bucket=BUCKET, Key=lake.index_key(old.device, old.batch_id),
                      Body=index.model_dump_json().encode())
    new, again = _batch("edge-new", 1, 4), old  # the old batch sent again lands in a flush too
    flush = Flush(opened=time.monotonic(), flush_id=lake.flush_id(time.time(), "00c0ffee"))
    for batch in (new, again):
        flush.batches[(batch.device, batch.batch_id)] = Pending.of(batch, None)
    write_flush(client, BUCKET, "ingest-x", flush)
    report = audit(client, BUCKET)
    assert {d: (r.received, r.copies, r.duplicates, r.missing) for d, r in report.items()} == {
        "edge-old": (3, 1, 0, []), "edge-new": (4, 0, 0, [])}
    charted = {d.device: d.at for d in drift_charts.DriftCharts(client, BUCKET, window_s=3600).refresh().devices}
    assert charted == {"edge-old": [old.records[-1].body.at], "edge-new": [new.records[-1].body.at]}


def test_a_replica_stopped_with_batches_in_its_open_flush_writes_and_acknowledges_them(uplink):
    ingest = uplink.start_ingest(ingest_flush_s=30, log_level="DEBUG")  # nothing is due before the stop
    device = _Device(uplink, "edge-d")
    batch = _batch(device.name, 1, 2)
    device.send(batch)
    wait_until(lambda: '"batch taken"' in ingest.log(), 10, "the batch taken")
    assert device.acks == []
    assert ingest.terminate() == 0  # SIGTERM drains: the open flush is written, then acknowledged
    wait_until(lambda: device.acked(batch.batch_id), 10, "the acknowledgement at shutdown")
    assert [b.batch_id for f in _flushes(uplink) for b in f.batches] == [batch.batch_id]
