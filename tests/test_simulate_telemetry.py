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
from shared.config import TelemetrySettings, load
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
        settings = load(TelemetrySettings, None, device_id=DEVICE, ack_timeout_s=2.0, forward_retry_max_s=1,
                        batch=batch)
        telemetry = SimTelemetry(DEVICE, tmp_path / DEVICE, link, records_per_s=50.0, settings=settings)
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


def test_a_fleet_link_cut_queues_the_resends_of_a_bridged_device_and_every_record_is_acknowledged(uplink, tmp_path):
    """A bridged device's forwarder links to its own broker, which stays up through a fleet link cut: the
    batch in flight times out after ack_timeout_s and is sent again with the Sender's backoff, and the
    DeviceLink queues those sendings (the bridge queue) until the reconnect, when they reach the replica as
    copies of one batch. Every record is acknowledged; the audit finds each number once (copies, if a copy
    was stored, counted apart), none lost."""
    uplink.start_ingest()

    async def scenario():
        async with _device(uplink, tmp_path) as (link, telemetry):
            await _until(lambda: telemetry.stats().acked > 0, 60, "records acknowledged")
            before = telemetry.stats()
            link.cut(8.0)  # 4 ack timeouts: resends at about 2.5 s and 5.5 s (backoff 0.5 s, then 1 s)
            await _until(lambda: not link.connected.is_set(), 10, "the link down")
            queued = 0
            while not link.connected.is_set():
                queued = max(queued, link.pending())
                await asyncio.sleep(0.1)
            during = telemetry.stats()
            appended = during.appended
            # Numbers run on without holes: this many acknowledged records include everything made by the reconnect.
            await _until(lambda: telemetry.stats().acked >= appended, 60, "every record made by the reconnect acked")
            after = telemetry.stats()
        return before, during, after, queued

    before, during, after, queued = asyncio.run(scenario())
    assert during.resent_batches - before.resent_batches >= 2, "no resends during the cut: the ack clock stopped"
    assert queued >= 2, "the sendings made during the cut were not queued by the link"
    assert after.dead_lettered == 0 and after.acked >= during.appended
    result = _complete(uplink, tmp_path / DEVICE / "outbox.db")
    assert result.received >= after.acked and not result.declared_lost
    assert result.copies <= after.resent_batches  # a stored copy comes only from a resend
