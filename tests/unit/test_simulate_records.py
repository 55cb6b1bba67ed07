"""The simulator's telemetry logic in this process: the drawn records (valid as the cloud validates
them, the service's mix of kinds, alerts that follow the drift rules' hysteresis) and SimTelemetry's
forwarding on the asyncio loop over a stand-in link, as a bridged device's forwarder (pure logic: the
link is a fake, the outbox a real file). On the real broker, ingest and S3: tests/test_simulate_telemetry.py."""

from __future__ import annotations

import asyncio
import random
import time

import paho.mqtt.client as paho
import pytest

from edgefleet.simulate.telemetry import RecordDraw, SimTelemetry, drift_share
from services.telemetry.drift import rules_from
from services.telemetry.outbox import Outbox
from services.telemetry.sending import Outgoing
from shared import topics
from shared.codec import WireFormat, decode, encode
from shared.config import BatchSettings, DriftSettings, ForwardSettings, TelemetrySettings
from shared.schemas import Alert, AlertState, AlertType, TelemetryAck, TelemetryBatch

DEVICE = "sim-unit"
STORE = "a" * 32
SETTINGS = TelemetrySettings(device_id=DEVICE)  # the service's defaults (and this environment's EDGEFLEET_*)


def test_drawn_records_are_valid_in_the_services_mix_and_alerts_follow_the_rules(tmp_path):
    draw = RecordDraw(DEVICE, random.Random(16), SETTINGS)
    records = draw.draw(6000)
    outbox = Outbox(tmp_path / "outbox.db", DEVICE, 1 << 30)
    assert len(outbox.append(records)) == len(records) and outbox.stats.refused == 0  # all valid
    kinds = [r.kind for r in records if r.kind != "alert"]
    assert kinds.count("drift") / len(kinds) == pytest.approx(drift_share(SETTINGS), abs=0.02)
    assert {r.kind for r in records} >= {"metric", "drift"}
    rules = {rule.type: rule for rule in rules_from(SETTINGS.drift)}
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
    records = [r for r in RecordDraw(DEVICE, random.Random(3), SETTINGS).draw(5, span_s=1.0) if r.kind != "alert"]
    ats = [r.at for r in records]
    assert ats == sorted(ats) and len(set(ats)) == 5
    assert ats[-1] - ats[0] == pytest.approx(0.8) and ats[-1] >= before  # 5 records made 0.2 s apart, the last now


class FakeLink:
    """The DeviceLink seam (edgefleet/simulate/link.py) without a network: publishes are kept."""

    def __init__(self) -> None:
        self.device = DEVICE
        self.connected = asyncio.Event()
        self.closing = False  # the device runs: its forwarder's local broker link is up
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


def test_the_mix_of_kinds_and_the_drift_rules_come_from_the_settings_given():
    settings = TelemetrySettings(device_id=DEVICE, resource_interval_s=1.0,
                                 drift=DriftSettings(sample_interval_s=1.0, psi_raise=0.5, psi_clear=0.2))
    assert drift_share(settings) == pytest.approx(0.5)
    draw = RecordDraw(DEVICE, random.Random(5), settings)
    kinds = [r.kind for r in draw.draw(4000) if r.kind != "alert"]
    assert kinds.count("drift") / len(kinds) == pytest.approx(0.5, abs=0.03)
    assert draw.rules[AlertType.PREDICTION_DRIFT].raise_at == 0.5


def _settings(**forward) -> TelemetrySettings:
    return TelemetrySettings(device_id=DEVICE, batch=BatchSettings(linger_s=0.2), ack_timeout_s=0.3,
                             forward=ForwardSettings(**forward), outbox={"max_bytes": 1 << 20})


def test_sim_telemetry_forwards_acknowledged_batches_in_order(tmp_path):
    async def scenario():
        link = FakeLink()
        telemetry = SimTelemetry(DEVICE, tmp_path, link, records_per_s=100.0, settings=_settings(),
                                 rng=random.Random(1))
        tasks = [asyncio.create_task(telemetry.run()), asyncio.create_task(_cloud(link, telemetry, lambda: True))]
        link.connected.set()
        while telemetry.stats().acked < 60:
            await asyncio.sleep(0.01)
        await _stop(tasks, telemetry)
        return link, telemetry

    link, telemetry = asyncio.run(scenario())
    stats = telemetry.stats()
    batches = _batches(link)
    assert all(topic == topics.telemetry(DEVICE) for topic, *_ in link.published)
    assert all(ct == WireFormat.MSGPACK_ZLIB.content_type and corr == b.batch_id.encode()
               for (_, _, ct, corr), b in zip(link.published, batches, strict=True))
    seqs = [r.seq for b in batches for r in b.records]
    assert seqs == list(range(1, len(seqs) + 1))  # batch after batch, in order, none twice
    assert stats.resent_batches == 0 and stats.sent_batches == len(batches)
    assert stats.appended >= seqs[-1] >= stats.acked
    assert len(batches) * 5 < stats.appended  # lingering 0.2 s at 100 records/s: batches of about 20


def test_while_the_fleet_link_is_cut_the_forwarder_resends_with_backoff_as_a_bridged_device(tmp_path):
    """The forwarder links to the device's own broker, which stays up through a fleet cut: an unacknowledged
    batch times out after ack_timeout_s and goes again (the same id and records) after the Sender's backoff;
    the link queues those sendings. After the cut the held batch's ack settles it and forwarding goes on."""

    async def scenario():
        link = FakeLink()
        telemetry = SimTelemetry(DEVICE, tmp_path, link, records_per_s=100.0, settings=_settings(retry_max_s=0.2),
                                 rng=random.Random(1))
        answering = True
        tasks = [asyncio.create_task(telemetry.run()),
                 asyncio.create_task(_cloud(link, telemetry, lambda: answering))]
        link.connected.set()
        while telemetry.stats().acked == 0:
            await asyncio.sleep(0.01)
        answering = False
        link.connected.clear()  # the cut: nothing reaches the cloud, no ack comes back
        sent = telemetry.stats().sent_batches
        while telemetry.stats().sent_batches == sent:
            await asyncio.sleep(0.01)
        held = telemetry.sender.in_flight
        published_before = len(link.published)
        await asyncio.sleep(2.5)  # 0.3 s ack timeouts, backoffs of 0.5, 0.2, 0.2 s ...: resends at 0.8, 1.3, 1.8 s
        during_cut = link.published[published_before:]
        link.connected.set()
        answering = True
        while telemetry.stats().acked <= held.last_seq:
            await asyncio.sleep(0.01)
        await _stop(tasks, telemetry)
        return link, telemetry, held, during_cut

    link, telemetry, held, during_cut = asyncio.run(scenario())
    resends = [decode(TelemetryBatch, payload, content_type) for _, payload, content_type, _ in during_cut]
    assert len(resends) >= 3, "no resends while the fleet link was cut: the ack clock followed the fleet link"
    assert {b.batch_id for b in resends} == {held.batch_id}  # the same batch again, not the next one
    assert all([r.seq for r in b.records] == list(range(held.first_seq, held.last_seq + 1)) for b in resends)
    assert telemetry.stats().resent_batches >= len(resends)
    distinct = {b.batch_id: b for b in _batches(link)}.values()
    seqs = sorted(r.seq for b in distinct for r in b.records)
    assert seqs == list(range(1, len(seqs) + 1))  # resends are copies: no number in two batches


async def _cloud(link: FakeLink, telemetry: SimTelemetry, answering) -> None:
    """Acknowledges each sending as it comes, while answering() says so."""
    acked: set[tuple[str, int]] = set()
    while True:
        await asyncio.sleep(0.01)
        sending = telemetry.sender.in_flight
        if answering() and sending is not None and (sending.batch_id, sending.attempt) not in acked:
            acked.add((sending.batch_id, sending.attempt))
            link.deliver_ack(sending)


async def _stop(tasks: list[asyncio.Task], telemetry: SimTelemetry) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    telemetry.close()


def test_container_cpu_shares_are_drawn_from_beta_2_8_as_betavariate_draws_them():
    """The cheaper draw of a container's CPU share has Beta(2, 8)'s mean and variance (0.2, 16/1100) and
    stays in [0, 1], as random.betavariate(2, 8) does."""
    import statistics

    from edgefleet.simulate.telemetry import _beta_2_8

    rng = random.Random(7)
    draws = [_beta_2_8(rng.random) for _ in range(40_000)]
    assert all(0.0 <= d <= 1.0 for d in draws)
    assert statistics.fmean(draws) == pytest.approx(0.2, abs=0.004)
    assert statistics.variance(draws) == pytest.approx(16 / 1100, rel=0.04)
    assert _beta_2_8(lambda: 0.0) == 0.0  # every uniform 0: no division by zero
