"""The simulator's telemetry logic in this process: the drawn records (valid as the cloud validates
them, the service's mix of kinds, alerts that follow the drift rules' hysteresis) and SimTelemetry's
forwarding on the asyncio loop over a stand-in link (pure logic: the link is a fake, the outbox a real
file). On the real broker, ingest and S3: tests/test_simulate_telemetry.py."""

from __future__ import annotations

import asyncio
import random
import time

import paho.mqtt.client as paho
import pytest

from edgefleet.simulate.telemetry import DRIFT_SHARE, RecordDraw, SimTelemetry
from services.telemetry.drift import rules_from
from services.telemetry.outbox import Outbox
from services.telemetry.sending import Outgoing
from shared import topics
from shared.codec import WireFormat, decode, encode
from shared.config import BatchSettings, DriftSettings, ForwardSettings
from shared.schemas import Alert, AlertState, TelemetryAck, TelemetryBatch

DEVICE = "sim-unit"
STORE = "a" * 32


def test_drawn_records_are_valid_in_the_services_mix_and_alerts_follow_the_rules(tmp_path):
    draw = RecordDraw(DEVICE, random.Random(16))
    records = draw.draw(6000)
    outbox = Outbox(tmp_path / "outbox.db", DEVICE, 1 << 30)
    assert len(outbox.append(records)) == len(records) and outbox.stats.refused == 0  # all valid
    kinds = [r.kind for r in records if r.kind != "alert"]
    assert kinds.count("drift") / len(kinds) == pytest.approx(DRIFT_SHARE, abs=0.02)
    assert {r.kind for r in records} >= {"metric", "drift"}
    rules = {rule.type: rule for rule in rules_from(DriftSettings())}
    alerts = [r for r in records if isinstance(r, Alert)]
    assert alerts, "the drift scores never crossed a rule in 6000 records"
    open_ids: dict[str, str] = {}
    for alert in alerts:  # raised over raise_at, resolved under clear_at, one id per incident
        rule = rules[alert.type]
        if alert.state == AlertState.RAISED:
            assert alert.type not in open_ids and alert.value > rule.raise_at
            open_ids[alert.type] = alert.alert_id
        else:
            assert open_ids.pop(alert.type) == alert.alert_id and alert.value < rule.clear_at


def test_a_ticks_records_are_stamped_over_the_tick_oldest_first():
    before = time.time()
    records = [r for r in RecordDraw(DEVICE, random.Random(3)).draw(5, span_s=1.0) if r.kind != "alert"]
    ats = [r.at for r in records]
    assert ats == sorted(ats) and len(set(ats)) == 5
    assert ats[-1] - ats[0] == pytest.approx(0.8) and ats[-1] >= before  # 5 records made 0.2 s apart, the last now


class FakeLink:
    """The DeviceLink seam (edgefleet/simulate/link.py) without a network: publishes are kept."""

    def __init__(self) -> None:
        self.device = DEVICE
        self.connected = asyncio.Event()
        self.published: list[tuple[str, bytes, str | None, bytes | None]] = []
        self.handlers: dict[str, object] = {}

    def subscribe(self, topic, handler, qos=1) -> None:
        self.handlers[topic] = handler

    def publish(self, topic, payload, *, qos=1, retain=False, content_type=None, correlation=None) -> None:
        self.published.append((topic, payload, content_type, correlation))

    def deliver_ack(self, batch: Outgoing) -> None:
        ack = TelemetryAck(device=DEVICE, batch_id=batch.batch_id, stored=batch.records, at=time.time(), store=STORE)
        message = paho.MQTTMessage(topic=topics.telemetry_ack(DEVICE).encode())
        message.payload = encode(ack)
        self.handlers[topics.telemetry_ack(DEVICE)](message)


def _batches(link: FakeLink) -> list[TelemetryBatch]:
    return [decode(TelemetryBatch, payload, content_type) for _, payload, content_type, _ in link.published]


def test_sim_telemetry_forwards_acknowledged_batches_and_waits_out_a_cut_link_without_resending(tmp_path):
    async def scenario():
        link = FakeLink()
        telemetry = SimTelemetry(DEVICE, tmp_path, link, records_per_s=100.0, batch=BatchSettings(linger_s=0.2),
                                 forward=ForwardSettings(), ack_timeout_s=0.3, rng=random.Random(1))
        answering = True

        async def cloud():  # acknowledges each batch as it comes, while it answers
            acked: set[str] = set()
            while True:
                await asyncio.sleep(0.01)
                sending = telemetry.sender.in_flight
                if answering and sending is not None and sending.batch_id not in acked:
                    acked.add(sending.batch_id)
                    link.deliver_ack(sending)

        tasks = [asyncio.create_task(telemetry.run()), asyncio.create_task(cloud())]
        link.connected.set()
        while telemetry.stats().acked == 0:
            await asyncio.sleep(0.01)
        answering = False
        sent = telemetry.stats().sent_batches
        while telemetry.stats().sent_batches == sent:
            await asyncio.sleep(0.01)
        held = telemetry.sender.in_flight
        link.connected.clear()  # the link is cut with a batch unacknowledged, for > 3 ack timeouts
        await asyncio.sleep(1.0)
        resent_while_down = telemetry.stats().resent_batches
        link.connected.set()
        link.deliver_ack(held)  # the broker's session delivers the held ack after the reconnect
        answering = True
        while telemetry.stats().acked <= held.last_seq:
            await asyncio.sleep(0.01)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        telemetry.close()
        return link, telemetry, resent_while_down

    link, telemetry, resent_while_down = asyncio.run(scenario())
    stats = telemetry.stats()
    assert resent_while_down == 0 and stats.resent_batches == 0
    batches = _batches(link)
    assert all(topic == topics.telemetry(DEVICE) for topic, *_ in link.published)
    assert all(ct == WireFormat.MSGPACK_ZLIB.content_type and corr == b.batch_id.encode()
               for (_, _, ct, corr), b in zip(link.published, batches, strict=True))
    seqs = [r.seq for b in batches for r in b.records]
    assert seqs == list(range(1, len(seqs) + 1))  # batch after batch, in order, none twice
    assert stats.sent_batches == len(batches) and stats.appended >= seqs[-1] >= stats.acked
    assert len(batches) * 5 < stats.appended  # lingering 0.2 s at 100 records/s: batches of about 20
