"""A simulated device's telemetry (edgefleet.simulate.telemetry.SimTelemetry) on the real path: its own
certificate and MQTT session (edgefleet.simulate.link.DeviceLink) on the TLS fleet broker with the
committed ACL, a real cloud_ingest replica and a real S3 server (tests/uplink.py), the real outbox and
Sender. What S3 holds is checked by the audit."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from edgefleet.audit import DeviceAudit, audit
from edgefleet.certs import issue
from edgefleet.simulate.link import DeviceLink, Endpoint, LinkCounters
from edgefleet.simulate.telemetry import SimTelemetry
from shared.config import BatchSettings, ForwardSettings
from tests.uplink import BUCKET

DEVICE = "sim-telemetry-1"  # not the rig's device: its bridge holds that client id on the fleet broker


def _audit(uplink) -> DeviceAudit:
    return audit(uplink.store, BUCKET).get(DEVICE) or DeviceAudit(DEVICE)


async def _until(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)
    return result


def _complete(uplink, outbox: Path) -> DeviceAudit:
    """Every sequence number is in S3 once or still in the (closed) outbox; nothing acknowledged is missing."""
    result = _audit(uplink)
    with contextlib.closing(sqlite3.connect(f"file:{outbox}?mode=ro", uri=True)) as db:
        held = {row[0] for row in db.execute("SELECT seq FROM records")}
    for epoch, numbers in result.epochs.items():
        unexplained = [s for a, b in numbers.missing for s in range(a, b + 1) if s not in held]
        assert not unexplained, f"epoch {epoch}: lost records: {unexplained[:20]}"
        assert not numbers.lost and numbers.duplicates == 0, (numbers.lost[:20], numbers.duplicates)
    return result


async def _misc(link: DeviceLink) -> None:
    """paho's periodic work (keepalive), every second as the simulator's fleet does it."""
    while True:
        await asyncio.sleep(1.0)
        link.misc()


@contextlib.asynccontextmanager
async def _device(uplink, tmp_path, **batch):
    issue(uplink.certs, DEVICE)
    endpoint = Endpoint("127.0.0.1", uplink.cloud_broker.port, uplink.certs)
    with ThreadPoolExecutor(2) as connector:
        link = DeviceLink(DEVICE, endpoint, connector, LinkCounters())
        telemetry = SimTelemetry(DEVICE, tmp_path / DEVICE, link, records_per_s=50.0,
                                 batch=BatchSettings(**batch), forward=ForwardSettings(retry_max_s=1),
                                 ack_timeout_s=2.0)
        link.start()
        tasks = [asyncio.create_task(telemetry.run()), asyncio.create_task(_misc(link))]
        try:
            yield link, telemetry
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            link.disconnect()
            await _until(lambda: link.closed, 10, "the link closed")
            telemetry.close()


def test_drawn_records_reach_s3_in_lingering_batches_and_the_audit_is_clean(uplink, tmp_path):
    uplink.start_ingest()

    async def scenario():
        async with _device(uplink, tmp_path, linger_s=0.5) as (_, telemetry):
            await _until(lambda: telemetry.stats().acked >= 100, 60, "records acknowledged")
        return telemetry

    telemetry = asyncio.run(scenario())
    stats = telemetry.stats()
    # 50 records/s lingering 0.5 s: batches of about 25, far fewer batches than records.
    assert stats.sent_batches * 5 < stats.appended, stats
    result = _complete(uplink, tmp_path / DEVICE / "outbox.db")
    assert result.received >= stats.acked >= 100 and not result.declared_lost


def test_a_link_cut_while_a_batch_is_unacknowledged_waits_for_the_held_ack_instead_of_resending(uplink, tmp_path):
    """S3 is paused, so the replica holds the batch and cannot acknowledge it; the link is cut for longer
    than the ack timeout; S3 comes back during the cut, the replica's ack waits in the device's session,
    and arrives after the reconnect: the ack clock stopped with the link, so the batch is never resent."""
    uplink.start_ingest()

    async def scenario():
        async with _device(uplink, tmp_path) as (link, telemetry):
            await _until(lambda: telemetry.stats().acked > 0, 60, "records acknowledged")
            uplink.s3_server.pause()
            sent = telemetry.stats().sent_batches
            await _until(lambda: telemetry.stats().sent_batches > sent, 30, "a batch sent while S3 is paused")
            batch = telemetry.sender.in_flight
            assert batch is not None
            link.cut(6.0)  # 3 ack timeouts
            await _until(lambda: not link.connected.is_set(), 10, "the link down")
            await asyncio.sleep(1.0)
            uplink.s3_server.resume()
            await asyncio.sleep(5.0)
            assert telemetry.stats().resent_batches == 0, "sent again: the ack clock ran while the link was down"
            await _until(lambda: link.connected.is_set(), 30, "the link back")
            # Numbers run on without holes here: this many acknowledged records include the held batch.
            await _until(lambda: telemetry.stats().acked > batch.last_seq, 30, "the held ack to settle the batch")
            resent = telemetry.stats().resent_batches
        return telemetry, resent

    telemetry, resent = asyncio.run(scenario())
    assert resent == 0, "the batch was sent again after the reconnect instead of waiting for its held ack"
    _complete(uplink, tmp_path / DEVICE / "outbox.db")
