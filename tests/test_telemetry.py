"""Store-and-forward from the device to S3, on real brokers, a real S3 server and real processes."""

from __future__ import annotations

import time

from tests.support import wait_until

LOAD = {"resource_interval_s": "0.01", "flush_interval_s": "0.01"}  # ~100 real resource samples a second


def _drained(uplink, timeout=90):
    wait_until(lambda: (s := uplink.telemetry_stats()) is not None and s.queue_records <= 3, timeout, "the outbox to drain")


def test_a_cut_link_loses_nothing_and_duplicates_nothing(uplink):
    uplink.start_ingest()
    telemetry = uplink.start_telemetry(**LOAD)
    time.sleep(2)
    uplink.cloud_broker.kill()  # the link is cut under load
    wait_until(lambda: uplink.telemetry_stats().queue_records > 300, 30, "a backlog while the cloud is away")
    uplink.cloud_broker.start()
    _drained(uplink)
    assert telemetry.terminate() == 0
    result = uplink.assert_complete()
    assert result.received > 400 and not result.declared_lost


def test_telemetry_and_ingest_killed_under_load_lose_and_duplicate_nothing(uplink):
    ingest = uplink.start_ingest()
    telemetry = uplink.start_telemetry(**LOAD)
    time.sleep(2)
    telemetry.kill()  # SIGKILL, mid-batch or mid-commit
    telemetry = uplink.start_telemetry(**LOAD)
    time.sleep(2)
    ingest.kill()
    time.sleep(1)
    uplink.start_ingest("ingest-2")
    time.sleep(2)
    _drained(uplink)
    assert telemetry.terminate() == 0
    result = uplink.assert_complete()
    assert result.received > 300
    assert uplink.telemetry_stats().batches_resent >= 0


def test_a_full_outbox_drops_the_oldest_counts_them_and_the_audit_shows_the_gap(uplink):
    uplink.cloud_broker.kill()  # no link from the start
    telemetry = uplink.start_telemetry(outbox_max_bytes=str(64 * 1024), **LOAD)
    wait_until(lambda: uplink.telemetry_stats().dropped.get("queue_full", 0) > 200, 60, "drops past the cap")
    uplink.cloud_broker.start()
    uplink.start_ingest()
    _drained(uplink)
    assert telemetry.terminate() == 0
    dropped = uplink.telemetry_stats().dropped["queue_full"]
    result = uplink.assert_complete()
    assert result.declared_lost["queue_full"] == dropped > 200


def test_a_damaged_outbox_is_repaired_keeping_what_is_readable(tmp_path):
    """Real file damage: pages in the middle of the database overwritten with garbage."""
    from services.telemetry.outbox import Outbox
    from shared.schemas import ResourceSample

    path = tmp_path / "outbox.db"
    outbox = Outbox(path, "edge-d", 1 << 30)
    sample = ResourceSample(device="edge-d", cpu_percent=1, memory_percent=2, memory_used_bytes=3, disk_percent=4, at=time.time())
    for _ in range(20):
        outbox.append([sample] * 100)
    outbox.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    outbox.close()
    data = bytearray(path.read_bytes())
    page = 4096
    assert len(data) > 40 * page
    for p in range(10, 14):  # four pages of record data
        data[p * page : (p + 1) * page] = b"\xde\xad\xbe\xef" * (page // 4)
    path.write_bytes(bytes(data))

    repaired = Outbox(path, "edge-d", 1 << 30)
    note = repaired.stats.repaired
    assert note and "kept" in note and "lost" in note
    kept = int(note.split("kept ")[1].split()[0])
    lost = int(note.split("lost ")[1].split()[0].rstrip(";"))
    assert 1000 < kept < 2000 and kept + lost == 2000
    assert list(tmp_path.glob("outbox.db.damaged-*")), "the damaged file is kept, not deleted"
    rows = repaired.db.execute("SELECT count(*) FROM records WHERE kind = 'gap'").fetchone()[0]
    assert rows == 1 and repaired.stats.next_seq == 2002  # the gap record took 2001
    assert repaired.next_batch(5000, 1 << 30)[-1].body.reason == "damaged"
    repaired.close()


def test_drift_is_raised_after_the_minimum_samples_and_resolved_when_it_ends(broker, start_inference, tmp_path):
    import cv2

    from edgefleet import photos
    from shared import topics
    from shared.codec import decode
    from shared.mqtt import content_type_of
    from shared.schemas import Alert

    _, device = start_inference(broker, device_id="edge-drift")
    alerts = []
    device.link.subscribe(topics.alerts("edge-drift"), lambda m: alerts.append(decode(Alert, m.payload, content_type_of(m))))
    telemetry = _beside(broker, device, tmp_path, drift_baseline=96, drift_window=48, drift_min_samples=40)
    try:
        normal = [photos.jpeg(name) for name in photos.BUNDLED]
        dark = [cv2.imencode(".jpg", (cv2.imdecode(__import__("numpy").frombuffer(j, "uint8"), cv2.IMREAD_COLOR) * 0.25).astype("uint8"))[1].tobytes()
                for j in normal]
        sent = 0

        def stream(frames, count):
            nonlocal sent
            for i in range(count):
                device.publish_envelope("cam", f"f{sent}", frames[i % len(frames)])
                sent += 1
                time.sleep(0.01)
            wait_until(lambda: len(device.predictions) >= sent, 60, "the predictions")

        stream(normal, 96)  # the model's baseline
        stream(dark, 35)  # a shift, but fewer records than the minimum: no verdict yet
        time.sleep(1)
        assert alerts == [], [a.detail for a in alerts]
        stream(dark, 30)
        raised = wait_until(lambda: [a for a in alerts if a.state == "raised"], 30, "a drift alert")
        feature = next(a for a in raised if a.type == "feature_drift")
        assert feature.value > feature.threshold and feature.window >= 40
        stream(normal, 96)
        wait_until(lambda: {a.alert_id for a in alerts if a.state == "resolved"} >= {a.alert_id for a in raised}, 30,
                   "every incident to end")
        assert len([a for a in alerts if a.type == "feature_drift" and a.state == "raised"]) == 1, "one incident, one alert"
        before = len(alerts)
        stream(normal, 96 * 5)  # a long unshifted stream: nothing
        time.sleep(1)
        assert alerts[before:] == [], [a.detail for a in alerts[before:]]
    finally:
        telemetry.kill()


def test_hard_examples_and_alerts_reach_s3_and_bad_batches_are_dead_lettered(uplink, start_inference):
    import gzip
    import json

    from edgefleet import photos
    from shared import lake, topics
    from shared.codec import WireFormat, decode
    from shared.mqtt import content_type_of
    from shared.schemas import TelemetryAck

    uplink.start_ingest()
    start_inference(uplink.device_broker, device_id=uplink.device_id)
    telemetry = uplink.start_telemetry(hard_example_confidence="0.99", hard_examples_per_minute="600")
    for i in range(12):
        uplink.device.publish_envelope("yard", f"h{i}", photos.jpeg(photos.BUNDLED[i % len(photos.BUNDLED)]))
    wait_until(lambda: len(uplink.device.predictions) >= 12, 30, "predictions")
    wait_until(lambda: uplink.telemetry_stats().records_acknowledged >= 12, 60, "hard examples forwarded")
    keys = [o["Key"] for o in uplink.store.list_objects_v2(Bucket="edgefleet-telemetry", Prefix="telemetry/hard_example/")["Contents"]]
    lines = [json.loads(line) for key in keys
             for line in gzip.decompress(uplink.store.get_object(Bucket="edgefleet-telemetry", Key=key)["Body"].read()).splitlines()]
    assert len(lines) >= 12 and {line["body"]["prediction"]["frame_id"] for line in lines} >= {f"h{i}" for i in range(12)}
    assert all(line["body"]["data"] for line in lines), "the frame itself travels with its prediction"

    # A payload that is not a batch, and a batch sent on another device's topic: dead-lettered, acknowledged.
    acks = []
    probe = uplink.device
    from tests.support import Device

    cloud = Device(uplink.cloud_broker.url, "intruder")
    cloud.link.subscribe(topics.telemetry_ack("intruder"), lambda m: acks.append(decode(TelemetryAck, m.payload, content_type_of(m))))
    time.sleep(0.3)
    cloud.link.publish(topics.telemetry("intruder"), b"\x00garbage", qos=1, content_type=WireFormat.MSGPACK_ZLIB.content_type,
                       correlation=b"000000000001-000000000001").wait_for_publish(5)
    ack = wait_until(lambda: acks[:1], 30, "an acknowledgement of the dead letter")[0]
    assert ack.dead_lettered and ack.batch_id == "000000000001-000000000001"
    dead = [o["Key"] for o in uplink.store.list_objects_v2(Bucket="edgefleet-telemetry", Prefix=lake.DEAD_LETTER)["Contents"]]
    reasons = [json.loads(uplink.store.get_object(Bucket="edgefleet-telemetry", Key=k)["Body"].read()) for k in dead if k.endswith(".json")]
    assert reasons and reasons[0]["device"] == "intruder" and "not valid" in reasons[0]["reason"]
    cloud.close()
    assert probe is uplink.device and telemetry.terminate() == 0


def test_records_past_their_ttl_expire_into_a_counted_gap(tmp_path):
    from services.telemetry.outbox import Outbox
    from shared.schemas import ResourceSample

    outbox = Outbox(tmp_path / "outbox.db", "edge-ttl", 1 << 30, ttl_s={"metric": 0.05})
    sample = ResourceSample(device="edge-ttl", cpu_percent=1, memory_percent=2, memory_used_bytes=3, disk_percent=4, at=time.time())
    outbox.append([sample] * 10)
    in_flight = outbox.next_batch(3, 1 << 20)  # the batch in flight never expires under the forwarder
    time.sleep(0.1)
    assert outbox.expire() == 7 and outbox.stats.dropped["expired"] == 7
    batch = outbox.next_batch(100, 1 << 20)
    assert [r.seq for r in batch] == [r.seq for r in in_flight]
    outbox.ack(batch[0].seq, batch[-1].seq)
    gap = outbox.next_batch(100, 1 << 20)[0].body
    assert (gap.kind, gap.reason, gap.first_seq, gap.last_seq, gap.count) == ("gap", "expired", 4, 10, 7)
    outbox.close()



def _beside(broker, device, tmp_path, **settings):
    """`edgefleet telemetry` on the device's broker (which also plays the cloud broker here)."""
    from tests.support import ServiceProcess

    env = {
        "EDGEFLEET_MQTT_URL": broker.url, "EDGEFLEET_CLOUD_MQTT_URL": broker.url, "EDGEFLEET_DEVICE_ID": device.device_id,
        "EDGEFLEET_OUTBOX_PATH": str(tmp_path / "outbox.db"), "EDGEFLEET_STATUS_INTERVAL_S": "0.5",
        **{f"EDGEFLEET_{k.upper()}": str(v) for k, v in settings.items()},
    }
    telemetry = ServiceProcess(env, tmp_path / "telemetry.log", "telemetry")
    wait_until(lambda: (s := device.latest_status("telemetry")) is not None and s.state == "online", 60, "telemetry")
    return telemetry


def test_an_execution_provider_fallback_is_an_alert(broker, start_inference, tmp_path):
    from shared import topics
    from shared.codec import decode
    from shared.mqtt import content_type_of
    from shared.schemas import Alert

    _, device = start_inference(broker, device_id="edge-gpu", providers="cuda,cpu")  # no CUDA here: CPU serves
    alerts = []
    device.link.subscribe(topics.alerts("edge-gpu"), lambda m: alerts.append(decode(Alert, m.payload, content_type_of(m))))
    time.sleep(0.3)
    telemetry = _beside(broker, device, tmp_path)
    try:
        alert = wait_until(lambda: next((a for a in alerts if a.type == "provider_fallback"), None), 30, "the alert")
        assert alert.state == "raised" and alert.severity == "critical" and "CUDAExecutionProvider" in alert.detail
        time.sleep(1.5)  # statuses keep coming; the incident is raised once
        assert len([a for a in alerts if a.type == "provider_fallback"]) == 1
    finally:
        telemetry.kill()
