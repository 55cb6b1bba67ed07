"""The telemetry store's identity, on real processes and real S3 servers: a device keeps its outbox while
the fleet's store starts afresh (a second `./scripts/run.sh` did this), and `edgefleet telemetry audit`
of the new store tells the records an earlier store acknowledged (sent before this store existed) from
records missing with no explanation, and from records this store acknowledged and lost."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

from services.cloud_ingest import store_marker
from shared import lake, s3
from shared.config import IngestSettings, load
from tests.support import ServiceProcess, wait_until
from tests.uplink import BUCKET

SLOW = {"resource_interval_s": "0.05", "flush_interval_s": "0.05"}  # ~20 records a second


def _audit_cli(uplink, *args: str) -> subprocess.CompletedProcess:
    """`edgefleet telemetry audit` as an operator runs it, against the rig's current store."""
    env = {**os.environ, **uplink.s3_server.env(), "EDGEFLEET_TELEMETRY_BUCKET": BUCKET, "COLUMNS": "250"}
    return subprocess.run([sys.executable, "-m", "edgefleet", "telemetry", "audit", *args], env=env,
                          capture_output=True, text=True, timeout=120)


def test_a_fresh_store_shows_what_an_earlier_store_acknowledged_as_sent_before_it_existed(uplink):
    ingest = uplink.start_ingest()
    telemetry = uplink.start_telemetry(**SLOW)
    wait_until(lambda: uplink.audit().received > 20, 60, "records in the first store")
    assert ingest.terminate() == 0  # the fleet goes away; the device keeps its outbox and keeps recording
    first_store, first = lake.read_store_marker(uplink.store, BUCKET), uplink.audit()
    assert first.missing == [] and first.lost == [] and first.before_store == []
    # Every batch the first store holds was acknowledged, and the device keeps that it was.
    assert uplink.outbox_acknowledged() == [(first_store.store, 1, first.highest_seq)]

    uplink.new_store()  # the fleet comes back with an empty store
    ingest = uplink.start_ingest()
    wait_until(lambda: uplink.audit().received > 20, 60, "records in the new store")
    assert telemetry.terminate() == 0
    assert ingest.terminate() == 0
    second_store, second = lake.read_store_marker(uplink.store, BUCKET), uplink.audit()
    assert second_store is not None and second_store.store != first_store.store
    assert second.before_store == [(1, first.highest_seq)], "sent before this store existed"
    assert second.missing == [] and second.lost == [] and second.duplicates == 0

    # The operator's command says the same, in words and in JSON.
    table = _audit_cli(uplink)
    assert table.returncode == 0, table.stderr
    assert "sent before this store existed" in table.stdout and f"1-{first.highest_seq}" in table.stdout
    row = json.loads(_audit_cli(uplink, "--json").stdout.splitlines()[0])
    assert row["store"] == second_store.store and row["before_store_count"] == first.highest_seq
    assert row["missing_count"] == 0 and row["lost_count"] == 0

    # A batch this store acknowledged and no longer holds is lost, which is not the same as the above;
    # even its first batch, whose index was the first to say what the earlier store acknowledged.
    first_batch = min(_indexes(uplink), key=lambda i: i.seqs[0])
    assert first_batch.seqs[0] == first.highest_seq + 1
    _drop(uplink, first_batch)
    damaged = uplink.audit()
    assert damaged.lost == [(first_batch.seqs[0], first_batch.seqs[-1])] and damaged.missing == []
    assert damaged.before_store == [(1, first.highest_seq)]


def test_a_marker_made_again_in_the_same_bucket_leaves_the_old_ids_losses_lost_not_sent_before(uplink):
    """The marker is deleted and the next ingest makes a new id in the same bucket. The bucket holds
    records the old id acknowledged, so the old id wrote here: a batch of it that goes missing is lost."""
    ingest = uplink.start_ingest()
    telemetry = uplink.start_telemetry(**SLOW)
    wait_until(lambda: uplink.audit().received > 20, 60, "records under the first id")
    assert ingest.terminate() == 0
    old_id = lake.read_store_marker(uplink.store, BUCKET)
    uplink.store.delete_object(Bucket=BUCKET, Key=lake.STORE_MARKER)
    ingest = uplink.start_ingest()
    wait_until(lambda: (m := lake.read_store_marker(uplink.store, BUCKET)) is not None and m != old_id
               and uplink.audit().received > 40, 60, "records under a new id in the same bucket")
    assert telemetry.terminate() == 0
    assert ingest.terminate() == 0
    new_id = lake.read_store_marker(uplink.store, BUCKET)
    assert new_id is not None and old_id is not None and new_id.store != old_id.store
    old_batch = min(_indexes(uplink), key=lambda i: i.seqs[0])  # acknowledged by the old id
    _drop(uplink, old_batch)
    result = uplink.audit()
    assert result.lost == [(old_batch.seqs[0], old_batch.seqs[-1])], "lost, never 'sent before this store'"
    assert result.before_store == [] and result.missing == []


def _flushes(uplink) -> dict[str, lake.FlushIndex]:
    return {key: lake.read_flush_index(uplink.store.get_object(Bucket=BUCKET, Key=key)["Body"].read(), key)
            for key in uplink.objects(f"{lake.FLUSHES}/")}


def _indexes(uplink) -> list[lake.BatchIndex]:
    return [batch for flush in _flushes(uplink).values() for batch in flush.batches]


def _drop(uplink, batch: lake.BatchIndex) -> None:
    """The store loses one batch: its entry is taken out of its flush's index (the flush's other batches kept)."""
    for key, flush in _flushes(uplink).items():
        if batch in flush.batches:
            kept = flush.model_copy(update={"batches": [b for b in flush.batches if b != batch]})
            uplink.store.put_object(Bucket=BUCKET, Key=key, Body=kept.model_dump_json().encode())


def test_replicas_starting_together_on_an_empty_bucket_agree_on_one_store_id(s3_server):
    client = s3.client(s3_server.settings())
    s3.ensure_bucket(client, BUCKET)
    claimed: list[lake.StoreMarker] = []
    threads = [threading.Thread(target=lambda: claimed.append(store_marker.claim(client, BUCKET))) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(claimed) == 4 and len({m.store for m in claimed}) == 1
    assert lake.read_store_marker(client, BUCKET) == claimed[0]
    assert store_marker.claim(client, BUCKET) == claimed[0]  # a later start reads it, never makes another


def test_ingest_refuses_to_start_on_a_store_marker_it_cannot_read_and_leaves_it_as_it_is(s3_server, tmp_path):
    client = s3.client(s3_server.settings())
    s3.ensure_bucket(client, BUCKET)
    client.put_object(Bucket=BUCKET, Key=lake.STORE_MARKER, Body=b"{not a marker")
    settings = load(IngestSettings, None, **{**s3_server.settings().model_dump(exclude_unset=True),
                                              "telemetry_bucket": BUCKET, "mqtt_url": "mqtt://127.0.0.1:1",
                                              "device_id": "ingest-x"})
    ingest = ServiceProcess(settings, tmp_path / "ingest.log", "cloud-ingest")
    assert ingest.proc.wait(60) == 3, ingest.log()
    assert "cannot start" in ingest.log() and lake.STORE_MARKER in ingest.log()
    kept = client.get_object(Bucket=BUCKET, Key=lake.STORE_MARKER)["Body"].read()
    assert kept == b"{not a marker", "the marker is evidence: never overwritten"


def test_the_audit_names_the_key_of_a_marker_it_cannot_read_and_of_a_store_that_fails(s3_server):
    """`edgefleet telemetry audit` on an invalid marker, then on a bucket that does not exist: a line that
    names the key and a non-zero exit, never a traceback."""
    client = s3.client(s3_server.settings())
    s3.ensure_bucket(client, BUCKET)
    client.put_object(Bucket=BUCKET, Key=lake.STORE_MARKER, Body=b"{not a marker")

    def audit(bucket: str) -> subprocess.CompletedProcess:
        env = {**os.environ, **s3_server.env(), "EDGEFLEET_TELEMETRY_BUCKET": bucket}
        return subprocess.run([sys.executable, "-m", "edgefleet", "telemetry", "audit"], env=env,
                              capture_output=True, text=True, timeout=120)

    invalid = audit(BUCKET)
    assert invalid.returncode == 1 and "Traceback" not in invalid.stderr, invalid.stderr
    assert f"s3://{BUCKET}/{lake.STORE_MARKER} is not a store marker" in invalid.stderr
    absent = audit("no-such-bucket")
    assert absent.returncode == 1 and "Traceback" not in absent.stderr, absent.stderr
    assert f"cannot read s3://no-such-bucket/{lake.STORE_MARKER}" in absent.stderr
