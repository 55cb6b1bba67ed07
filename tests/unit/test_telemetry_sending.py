"""The forwarding protocol (services.telemetry.sending.Sender) on a real outbox file, in this process:
lingering for fuller batches, the ack timeout that counts only time the link is up, the same batch
again after a timeout, the backoff, the dead letter after max_attempts and settling an acknowledgement.
Pure logic: the Sender's ack clock is a clock the test moves; the Forwarder's thread runs over a
stand-in link. The Sender inside the real telemetry process, on real brokers and S3, is in
tests/test_telemetry.py; inside the simulator, tests/test_simulate_telemetry.py."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import paho.mqtt.client as paho
import pytest

from services.telemetry.forwarder import Forwarder
from services.telemetry.outbox import Outbox
from services.telemetry.sending import FIRST_BACKOFF_S, IDLE_S, Outgoing, Sender
from shared import topics
from shared.codec import WireFormat, decode, encode
from shared.config import BatchSettings, ForwardSettings
from shared.schemas import ResourceSample, TelemetryAck, TelemetryBatch

DEVICE = "edge-s"
STORE = "0" * 32


class Clock:
    """A monotonic clock the test moves."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _sample(at: float) -> ResourceSample:
    return ResourceSample(device=DEVICE, cpu_percent=1, memory_percent=2, memory_used_bytes=3, disk_percent=4, at=at)


def _sender(tmp_path, clock=None, ack_timeout_s=10.0, **batch) -> Sender:
    outbox = Outbox(tmp_path / "outbox.db", DEVICE, 1 << 30)
    return Sender(outbox, DEVICE, batch=BatchSettings(**batch), forward=ForwardSettings(max_attempts=3, retry_max_s=4),
                  ack_timeout_s=ack_timeout_s, monotonic=clock or Clock())


def _ack(sending: Outgoing, dead_lettered: bool = False) -> TelemetryAck:
    return TelemetryAck(device=DEVICE, batch_id=sending.batch_id, stored=sending.records,
                        dead_lettered=dead_lettered, at=time.time(), store=STORE)


def _sent(sending: Outgoing) -> TelemetryBatch:
    """The batch as the cloud decodes it."""
    return decode(TelemetryBatch, sending.payload, sending.content_type)


def test_without_linger_a_batch_goes_at_once_and_decodes_as_the_cloud_reads_it(tmp_path):
    sender = _sender(tmp_path)
    assert sender.next() == IDLE_S  # nothing queued
    sender.outbox.append([_sample(time.time())] * 3)
    sending = sender.next()
    assert isinstance(sending, Outgoing) and sending.attempt == 1
    sent = _sent(sending)
    assert sent.batch_id == sending.batch_id and sending.correlation == sent.batch_id.encode()
    assert (sending.first_seq, sending.last_seq, sending.records) == (1, 3, 3)
    assert [r.seq for r in sent.records] == [1, 2, 3] and sender.sent_batches.value == 1


def test_a_short_batch_lingers_until_its_oldest_record_is_linger_s_old(tmp_path):
    sender = _sender(tmp_path, linger_s=5.0, max_records=10)
    oldest = time.time()
    sender.outbox.append([_sample(oldest), _sample(oldest + 1)])
    wait = sender.next(now=oldest + 2)
    assert wait == pytest.approx(3.0)  # the rest of the oldest record's linger
    assert sender.sent_batches.value == 0 and sender.in_flight is None
    sender.outbox.append([_sample(oldest + 3)])
    sending = sender.next(now=oldest + 5)
    assert isinstance(sending, Outgoing)
    assert [r.seq for r in _sent(sending).records] == [1, 2, 3]  # what came while it lingered went with it


def test_a_record_from_the_future_does_not_hold_its_batch(tmp_path):
    sender = _sender(tmp_path, linger_s=5.0)
    now = time.time()
    sender.outbox.append([_sample(now + 3600)])  # made before the clock was set back an hour
    assert isinstance(sender.next(now=now), Outgoing)


def test_a_full_batch_does_not_linger(tmp_path):
    sender = _sender(tmp_path, linger_s=60.0, max_records=4)
    now = time.time()
    sender.outbox.append([_sample(now)] * 6)
    sending = sender.next(now=now)
    assert isinstance(sending, Outgoing) and len(_sent(sending).records) == 4


def test_the_ack_timeout_pauses_while_the_link_is_down_and_resumes_with_what_was_left(tmp_path):
    clock = Clock()
    sender = _sender(tmp_path, clock, ack_timeout_s=10.0)
    sender.outbox.append([_sample(time.time())])
    sending = sender.next()
    assert isinstance(sending, Outgoing)
    clock.now += 8
    assert sender.ack_left(connected=True) == pytest.approx(2.0)
    assert sender.ack_left(connected=False) is None  # cut: no ack can come, the clock stops
    clock.now += 600
    assert sender.ack_left(connected=False) is None  # however long the cut lasts, no resend
    assert sender.ack_left(connected=True) == pytest.approx(2.0)  # back: the 2 s it had left, not a fresh 10
    clock.now += 1
    assert sender.ack_left(connected=True) == pytest.approx(1.0)
    # The broker's session delivers the held acknowledgement after the reconnect: it settles the batch.
    assert sender.settle(_ack(sending))
    assert sender.outbox.stats.records == 0 and sender.resent_batches.value == 0 and sender.acked_records.value == 1


def test_a_flapping_link_still_times_a_sending_out_after_ack_timeout_s_of_up_time(tmp_path):
    """Up 8 s, down 2 s, over and over: a clock restarted on each reconnect would never time out, and the
    batch (its ack lost with a cut) would wait for ever while the outbox fills."""
    clock = Clock()
    sender = _sender(tmp_path, clock, ack_timeout_s=10.0)
    sender.outbox.append([_sample(time.time())])
    first = sender.next()
    assert isinstance(first, Outgoing)
    lefts = []
    for _ in range(2):
        clock.now += 8
        assert sender.ack_left(connected=False) is None  # seen down 8 s after it was seen up
        clock.now += 2
        lefts.append(sender.ack_left(connected=True))
    assert lefts == [pytest.approx(2.0), 0.0]  # 16 s of up-time in all: the 10 s are over
    sender.timed_out()
    again = sender.next()
    assert isinstance(again, Outgoing) and again.batch_id == first.batch_id and sender.resent_batches.value == 1


def test_a_timeout_sends_the_same_batch_again_after_a_growing_backoff_then_gives_it_up(tmp_path):
    clock = Clock()
    sender = _sender(tmp_path, clock, ack_timeout_s=1.0)
    sender.outbox.append([_sample(time.time())] * 2)
    first = sender.next()
    assert isinstance(first, Outgoing)
    clock.now += 1
    assert sender.ack_left(connected=True) == 0.0
    backoffs, ids = [sender.timed_out()], [first.batch_id]
    for _ in range(2):
        again = sender.next()
        assert isinstance(again, Outgoing)
        ids.append(again.batch_id)
        backoffs.append(sender.timed_out())
    assert len(set(ids)) == 1 and sender.resent_batches.value == 2
    assert backoffs == [FIRST_BACKOFF_S, FIRST_BACKOFF_S * 2, FIRST_BACKOFF_S * 4]
    # A fourth sending is past max_attempts (3): given up, and the gap declaring it goes next.
    gap_batch = sender.next()
    assert isinstance(gap_batch, Outgoing) and sender.dead_lettered_batches.value == 1
    [gap] = [r.body for r in _sent(gap_batch).records]
    assert gap.kind == "gap" and (gap.first_seq, gap.last_seq) == (1, 2) and gap.reason == "dead_lettered"
    assert [seq for seq, _, _ in sender.outbox.dead_letters()] == [1, 2]


def test_an_ack_for_another_batch_settles_nothing_and_a_cloud_dead_letter_gives_the_batch_up(tmp_path):
    sender = _sender(tmp_path)
    sender.outbox.append([_sample(time.time())] * 2)
    sending = sender.next()
    assert isinstance(sending, Outgoing)
    stranger = TelemetryAck(device=DEVICE, batch_id=f"{sender.outbox.epoch}-{9:012d}-{9:012d}", stored=1,
                            at=time.time())
    assert not sender.settle(stranger) and sender.in_flight is sending
    assert sender.settle(_ack(sending, dead_lettered=True))
    assert sender.dead_lettered_batches.value == 1 and sender.acked_records.value == 0
    assert [seq for seq, _, _ in sender.outbox.dead_letters()] == [1, 2]


class FakeMqttLink:
    """The MqttLink seam the Forwarder uses (connected, subscribe, publish) without a broker."""

    def __init__(self) -> None:
        self.connected = threading.Event()
        self.published: list[bytes] = []
        self.handlers: dict[str, Callable[[paho.MQTTMessage], None]] = {}

    def subscribe(self, topic: str, handler: Callable[[paho.MQTTMessage], None], qos: int = 1) -> None:
        self.handlers[topic] = handler

    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False, content_type: str | None = None,
                correlation: bytes | None = None) -> None:
        self.published.append(payload)

    def deliver(self, ack: TelemetryAck) -> None:
        """Hands the ack to the subscriber, as the broker would: over a cut link it is lost (the device's
        uplink keeps no session that would hold it)."""
        if not self.connected.is_set():
            return
        message = paho.MQTTMessage(topic=topics.telemetry_ack(DEVICE).encode())
        message.payload = encode(ack)
        self.handlers[topics.telemetry_ack(DEVICE)](message)


def _until(condition: Callable[[], object], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def _forwarder(tmp_path, link: FakeMqttLink, ack_timeout_s: float) -> Forwarder:
    outbox = Outbox(tmp_path / "outbox.db", DEVICE, 1 << 30)
    return Forwarder(outbox, link, DEVICE, batch=BatchSettings(), forward=ForwardSettings(),  # type: ignore[arg-type]
                     ack_timeout_s=ack_timeout_s)


def _ack_of(payload: bytes, records: int) -> TelemetryAck:
    batch = decode(TelemetryBatch, payload, WireFormat.MSGPACK_ZLIB.content_type)
    return TelemetryAck(device=DEVICE, batch_id=batch.batch_id, stored=records, at=time.time(), store=STORE)


def test_the_forwarder_pauses_the_ack_clock_over_a_cut_and_resends_a_lost_ack_s_batch_when_the_rest_runs_out(
        tmp_path, monkeypatch):
    monkeypatch.setattr("services.telemetry.forwarder.LINK_CHECK_S", 0.05)  # notice the cut soon after it comes
    link = FakeMqttLink()
    forwarder = _forwarder(tmp_path, link, ack_timeout_s=1.0)
    forwarder.outbox.append([_sample(time.time())] * 3)
    link.connected.set()
    forwarder.start()
    try:
        _until(lambda: link.published, "the batch sent")
        time.sleep(0.4)  # some of the timeout runs while the link is up
        link.connected.clear()
        link.deliver(_ack_of(link.published[0], 3))  # acknowledged during the cut: lost with it
        time.sleep(1.5)  # longer than the whole timeout: a paused clock sends nothing
        assert len(link.published) == 1 and forwarder.resent_batches.value == 0
        reconnected = time.monotonic()
        link.connected.set()
        _until(lambda: len(link.published) == 2, "the batch sent again once the rest of its timeout ran out")
        # What was left (about 0.6 s, less up to one look's slack) ran after the reconnect, then the backoff.
        assert time.monotonic() - reconnected >= 0.5
        assert _ack_of(link.published[1], 3).batch_id == _ack_of(link.published[0], 3).batch_id  # the same batch
        link.deliver(_ack_of(link.published[1], 3))
        _until(lambda: forwarder.acked_records.value == 3, "the resend's ack settling the batch")
    finally:
        forwarder.stop()
    assert forwarder.resent_batches.value == 1 and forwarder.outbox.stats.records == 0


def test_the_forwarder_keeps_no_ack_of_a_batch_it_settled_before(tmp_path):
    link = FakeMqttLink()
    forwarder = _forwarder(tmp_path, link, ack_timeout_s=30.0)
    link.connected.set()
    forwarder.start()
    try:
        forwarder.outbox.append([_sample(time.time())])
        _until(lambda: len(link.published) == 1, "the first batch sent")
        first = _ack_of(link.published[0], 1)
        link.deliver(first)
        _until(lambda: forwarder.acked_records.value == 1, "the first batch settled")
        link.deliver(first)  # acknowledged twice (the cloud acks each copy of a resent batch)
        forwarder.outbox.append([_sample(time.time())])
        forwarder.wake()
        _until(lambda: len(link.published) == 2, "the second batch sent")
        link.deliver(_ack_of(link.published[1], 1))
        _until(lambda: forwarder.acked_records.value == 2, "the second batch settled")
    finally:
        forwarder.stop()
    assert forwarder._acks == {}  # the second ack of the first batch is not held for ever
