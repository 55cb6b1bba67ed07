"""The inference service's hot path in process: the real model on real photos, the service's real
threads, and an in-memory broker link in place of MQTT (the one fake: a link is a seam of pure
plumbing, and tests/test_inference.py covers the real broker). The model loads once for the module;
each test then takes a fraction of a second."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeVar

import cv2
import numpy as np
import paho.mqtt.client as paho
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from pydantic import BaseModel

from edgefleet import photos
from services.inference import pipeline
from services.inference.batcher import FrameBacklog
from services.inference.counters import Counters
from services.inference.decode import decode_bgr
from services.inference.errors import (
    Closed,
    FrameRejected,
    InferenceError,
    ProviderRefused,
    SwitchLate,
    UndecodableFrame,
    UnknownProvider,
)
from services.inference.features import summarise
from services.inference.intake import Frame
from services.inference.pipeline import Worker
from services.inference.publisher import Publisher
from services.inference.service import START_ERRORS, InferenceService
from services.inference.swap import ModelLoader, ServedModel, warm
from services.inference.wasm import WasmHost
from shared import topics
from shared.codec import WireFormat, decode, encode
from shared.config import InferenceSettings
from shared.errors import EdgefleetError
from shared.schemas import Encoding, ErrorReport, FrameEnvelope, InferenceStats, Prediction, ServiceStatus
from tests.support import wait_until

M = TypeVar("M", bound=BaseModel)
DEVICE = "unit-1"
CATS = {"tabby", "tiger cat", "Persian cat", "Siamese cat", "Egyptian cat"}
LOADER = ModelLoader(providers=["cpu"], strict=False, threads_per_run=1, scaled_decode=True)


@dataclass(frozen=True)
class Published:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    content_type: str | None


class MemoryLink:
    """shared.mqtt.MqttLink's calls, in memory. Records what the service publishes; deliver() hands a
    message to the subscribed handler on the caller's thread, as paho's network thread would.

    For the overload test, predictions can be held (`hold` cleared: a publish waits, as a worker would
    on a slow network) and refused (`refuse`: the next n return paho's queue-full code)."""

    def __init__(self) -> None:
        self.connected = threading.Event()
        self.sent: list[Published] = []
        self.hold = threading.Event()
        self.hold.set()
        self.held = 0  # prediction publishes waiting on `hold` now
        self.refuse = 0
        self.fail_topic: str | None = None  # a publish on it raises, as paho's does for a topic too long
        self._handlers: list[tuple[str, Callable[[paho.MQTTMessage], None]]] = []
        self._lock = threading.Lock()

    def subscribe(self, topic_filter: str, handler: Callable[[paho.MQTTMessage], None], qos: int = 1) -> None:
        self._handlers.append((topic_filter, handler))

    def unsubscribe(self, topic_filter: str, timeout: float = 5.0) -> bool:
        self._handlers = [(f, h) for f, h in self._handlers if f != topic_filter]
        return True

    def start(self) -> None:
        self.connected.set()

    def stop(self, final_status: bytes | None = None, timeout: float = 5.0) -> None:
        if final_status is not None:
            self.sent.append(Published(topics.status(DEVICE, "inference"), final_status, 1, True, None))
        self.connected.clear()

    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False,
                content_type: str | None = None) -> paho.MQTTMessageInfo:
        info = paho.MQTTMessageInfo(0)
        if topic == self.fail_topic:
            raise ValueError("Publish topic is too long.")
        if paho.topic_matches_sub(topics.all_predictions(DEVICE), topic):
            with self._lock:
                self.held += 1
            assert self.hold.wait(30), "a prediction held for 30 s"
            with self._lock:
                self.held -= 1
                if self.refuse:
                    self.refuse -= 1
                    info.rc = paho.MQTT_ERR_QUEUE_SIZE
                    return info
        with self._lock:
            self.sent.append(Published(topic, payload, qos, retain, content_type))
        return info

    def deliver(self, topic: str, payload: bytes, content_type: str | None = None) -> None:
        message = paho.MQTTMessage(topic=topic.encode())
        message.payload, message.qos = payload, 1
        if content_type is not None:
            message.properties = Properties(PacketTypes.PUBLISH)
            message.properties.ContentType = content_type
        for topic_filter, handler in list(self._handlers):
            if paho.topic_matches_sub(topic_filter, topic):
                handler(message)

    def messages(self, topic_filter: str, schema: type[M]) -> list[tuple[str, M]]:
        with self._lock:
            sent = list(self.sent)
        return [(p.topic, decode(schema, p.payload, p.content_type)) for p in sent
                if paho.topic_matches_sub(topic_filter, p.topic)]


@pytest.fixture(scope="module")
def model(model_dir: Path) -> ServedModel:
    """The real EfficientNet-Lite0 on the CPU, loaded and warmed once for the module."""
    served = LOADER(model_dir)
    warm(served)
    return served


@contextmanager
def serving(model: ServedModel, host: WasmHost | None = None,
            **changes: object) -> Iterator[tuple[InferenceService, MemoryLink]]:
    """The service running on its own threads over a MemoryLink (with `host`, its plugin host); stopped
    and drained at the end."""
    link = MemoryLink()
    settings = InferenceSettings(device_id=DEVICE, status_interval_s=60, **changes)
    service = InferenceService(link=link, model=model, load_model=LOADER, settings=settings, workers=1,
                               plugins=host)
    runner = threading.Thread(target=service.run, name="service")
    runner.start()
    try:
        _soon(link.connected.is_set, "the service to start its link")
        yield service, link
    finally:
        link.hold.set()
        service.stop()
        runner.join(10)
        assert not runner.is_alive(), "the service did not drain"


T = TypeVar("T")


def _soon(check: Callable[[], T], what: str) -> T:
    return wait_until(check, 10, what, interval=0.002)


def _envelope(frame_id: str, data: bytes) -> bytes:
    encoding = Encoding.PNG if data.startswith(b"\x89PNG") else Encoding.JPEG
    return encode(FrameEnvelope(frame_id=frame_id, encoding=encoding, data=data, captured_at=time.time()),
                  WireFormat.MSGPACK)


def _predictions(link: MemoryLink) -> list[tuple[str, Prediction]]:
    return link.messages(topics.all_predictions(DEVICE), Prediction)


def _errors(link: MemoryLink) -> list[ErrorReport]:
    return [report for _, report in link.messages(topics.errors(DEVICE), ErrorReport)]


def _prediction_for(link: MemoryLink, frame_id: str) -> tuple[str, Prediction]:
    return _soon(lambda: next((tp for tp in _predictions(link) if tp[1].frame_id == frame_id), None),
                 f"a prediction for {frame_id}")


def _balanced(s: InferenceStats) -> bool:
    """docs/protocol.md: received = published + lost + dropped + rejected + queued (+ in a worker)."""
    return s.frames_received == (
        s.predictions_published + s.predictions_lost + s.frames_dropped + s.frames_rejected + s.queue_depth
    )


def test_a_frame_becomes_one_prediction_on_its_cameras_topic_with_its_frame_id(model):
    with serving(model) as (service, link):
        link.deliver(topics.frames(DEVICE, "door"), _envelope("door-42", photos.jpeg("chelsea")))
        link.deliver(topics.frames(DEVICE, "cam-1"), photos.jpeg("chelsea"))  # raw: the service names it
        raw_topic, raw = _prediction_for(link, "cam-1-1")  # sent after door-42, on the same worker
        door = [(t, p) for t, p in _predictions(link) if p.frame_id == "door-42"]
        stats = service.stats()

    assert len(door) == 1, door
    topic, prediction = door[0]
    assert topic == topics.predictions(DEVICE, "door") and prediction.camera == "door"
    assert prediction.top[0].label in CATS and len(prediction.top) == 5, prediction.top
    assert prediction.model == model.ref and prediction.captured_at is not None
    assert (raw_topic, raw.camera) == (topics.predictions(DEVICE, "cam-1"), "cam-1")
    assert raw.top[0].label in CATS
    assert (stats.frames_received, stats.predictions_published, stats.frames_rejected) == (2, 2, 0)


def test_a_malformed_frame_becomes_an_error_report_and_the_counters_say_so(model):
    with serving(model) as (service, link):
        link.deliver(topics.frames(DEVICE, "bad"), b"neither an image nor an envelope")
        # Receive answers on the network thread: the report is out before deliver() returns.
        assert [(e.reason, e.camera) for e in _errors(link)] == [("malformed_envelope", "bad")]

        jpeg = photos.jpeg("chelsea")
        truncated = jpeg[: len(jpeg) // 2]  # its header passes receive; the decode stage refuses it
        link.deliver(topics.frames(DEVICE, "cut"), _envelope("cut-1", truncated))
        undecodable = _soon(lambda: next((e for e in _errors(link) if e.camera == "cut"), None), "the decode error")
        stats = _soon(lambda: (s := service.stats()).frames_rejected == 2 and s, "two frames counted rejected")

    assert undecodable.reason == "undecodable" and undecodable.frame_id == "cut-1"
    assert "truncated JPEG" in undecodable.detail
    assert (stats.frames_received, stats.frames_rejected, stats.predictions_published, stats.batches) == (2, 2, 0, 0)
    assert _predictions(link) == []


def test_an_oversized_frame_is_refused_at_receive_before_any_decode(model):
    small, big = photos.jpeg("chelsea"), photos.jpeg("astronaut")
    limit = len(small) + 512  # the sentinel's envelope fits; the bigger photo does not
    assert len(big) > limit
    # A PNG header declaring 8000x8000 pixels in a few bytes: decoding it would allocate 192 MB, and
    # with no image data after the header a decode attempt would answer "undecodable", not "oversized".
    ihdr = b"IHDR" + (8000).to_bytes(4, "big") * 2 + bytes([8, 2, 0, 0, 0])  # 8-bit RGB
    huge_png = b"\x89PNG\r\n\x1a\n" + (13).to_bytes(4, "big") + ihdr
    with serving(model, max_frame_bytes=limit) as (service, link):
        link.deliver(topics.frames(DEVICE, "hd"), big)
        link.deliver(topics.frames(DEVICE, "bomb"), _envelope("bomb-1", huge_png))
        refused = _errors(link)  # both answered before deliver() returned, on the receiving thread
        link.deliver(topics.frames(DEVICE, "ok"), _envelope("ok-1", small))
        _prediction_for(link, "ok-1")
        stats = _soon(lambda: (s := service.stats()).predictions_published == 1 and s, "the sentinel counted")

    assert [(e.reason, e.camera) for e in refused] == [("oversized", "hd"), ("oversized", "bomb")]
    assert f"over the limit of {limit}" in refused[0].detail and "8000x8000 pixels" in refused[1].detail
    assert refused[1].frame_id == "bomb-1"
    # Only the sentinel ever reached a worker: one batch, one prediction, no other error.
    assert [p.frame_id for _, p in _predictions(link)] == ["ok-1"] and len(_errors(link)) == 2
    assert (stats.frames_received, stats.frames_rejected, stats.batches) == (3, 2, 1)


def test_every_frame_received_is_counted_once_published_lost_dropped_or_rejected(model):
    with serving(model, queue_size=2) as (service, link):
        link.hold.clear()
        link.deliver(topics.frames(DEVICE, "cam"), _envelope("f0", photos.jpeg("chelsea")))
        _soon(lambda: link.held == 1, "the worker publishing f0, held")
        for i in range(1, 6):  # a backlog of 2: f1, f2 and f3 are dropped for f4 and f5
            link.deliver(topics.frames(DEVICE, "cam"), _envelope(f"f{i}", photos.jpeg("coffee")))
        link.deliver(topics.frames(DEVICE, "cam"), b"garbage")
        during = service.stats()
        link.refuse = 1  # f0's prediction, released next, is refused by the client: lost
        link.hold.set()
        after = _soon(lambda: (s := service.stats()).predictions_published == 2 and s, "f4 and f5 published")
        answered = sorted(p.frame_id for _, p in _predictions(link))
    offline = link.messages(topics.status(DEVICE, "inference"), ServiceStatus)

    assert (during.frames_received, during.frames_dropped, during.frames_rejected, during.queue_depth) == (7, 3, 1, 2)
    assert not _balanced(during)  # f0 is in the worker: the one term the status cannot show
    assert (after.predictions_published, after.predictions_lost, after.frames_dropped) == (2, 1, 3)
    assert after.frames_rejected == 1 and after.queue_depth == 0 and after.dropped_by_camera == {"cam": 3}
    assert _balanced(after)
    assert answered == ["f4", "f5"]
    final = offline[-1][1]  # the status run() leaves on shutdown carries the same counters
    assert final.state == "offline" and final.reason == "shutdown" and final.inference == after


def test_a_frame_whose_prediction_cannot_be_published_costs_only_its_own_answer(model):
    with serving(model, max_batch=4) as (service, link):
        link.hold.clear()
        link.deliver(topics.frames(DEVICE, "cam"), _envelope("first", photos.jpeg("chelsea")))
        _soon(lambda: link.held == 1, "the worker publishing the first frame, held")
        link.fail_topic = topics.predictions(DEVICE, "boom")
        for frame_id, camera in (("a", "cam"), ("b", "boom"), ("c", "cam")):  # queued: the next batch, together
            link.deliver(topics.frames(DEVICE, camera), _envelope(frame_id, photos.jpeg("coffee")))
        link.hold.set()
        _prediction_for(link, "c")  # after b in its batch: a failure that left the batch would lose it
        stats = _soon(lambda: (s := service.stats()).frames_rejected == 1 and _balanced(s) and s,
                      "b counted rejected, every frame accounted for")
        answered = sorted(p.frame_id for _, p in _predictions(link))

    errors = _errors(link)
    assert [(e.reason, e.camera, e.frame_id) for e in errors] == [("internal", "boom", "b")]
    assert "publishing its prediction failed" in errors[0].detail
    assert answered == ["a", "c", "first"]
    assert (stats.frames_received, stats.predictions_published, stats.batches) == (4, 3, 2)


def test_frames_the_scene_cache_answers_are_never_fully_decoded(model, monkeypatch):
    """docs/protocol.md: the cache decides before the frame's full decode (a reduced-scale one at most)."""
    full_decodes: list[int] = []
    real_decode = pipeline.decode_bgr

    def counted(data: bytes, min_side: int = 0):
        full_decodes.append(len(data))
        return real_decode(data, min_side)

    monkeypatch.setattr(pipeline, "decode_bgr", counted)
    still = photos.jpeg("camera")  # a scene the model is sure of (top-1 0.96)
    photo = photos.photo_rgb("camera").astype(np.int16)
    noisy = photo + np.random.default_rng(1).integers(-3, 4, photo.shape)  # the same scene, fresh sensor noise
    ok, again = cv2.imencode(".jpg", cv2.cvtColor(np.clip(noisy, 0, 255).astype(np.uint8), cv2.COLOR_RGB2BGR))
    assert ok
    with serving(model, cache_enabled=True) as (_, link):
        link.deliver(topics.frames(DEVICE, "door"), _envelope("f0", still))
        _prediction_for(link, "f0")
        link.deliver(topics.frames(DEVICE, "door"), _envelope("f1", still))
        link.deliver(topics.frames(DEVICE, "door"), _envelope("f2", again.tobytes()))
        _, exact = _prediction_for(link, "f1")
        _, scene = _prediction_for(link, "f2")

    assert exact.cache is not None and exact.cache.match == "exact"
    assert scene.cache is not None and scene.cache.match == "scene"
    assert full_decodes == [len(still)]  # f0's, for the model; none for the two answered from the cache


def test_a_malformed_switch_request_is_reported_and_frames_are_still_answered(model):
    with serving(model) as (_, link):
        link.deliver(topics.model_switch(DEVICE), b"{not json", WireFormat.JSON.content_type)
        link.deliver(topics.frames(DEVICE, "cam"), _envelope("after", photos.jpeg("chelsea")))
        _, prediction = _prediction_for(link, "after")

    assert [e.reason for e in _errors(link)] == ["malformed_command"]
    assert prediction.model == model.ref


@pytest.mark.parametrize("error, builtin", [
    (FrameRejected, Exception), (UndecodableFrame, ValueError), (Closed, Exception),
    (UnknownProvider, ValueError), (ProviderRefused, RuntimeError), (SwitchLate, RuntimeError),
])
def test_every_deliberate_error_is_an_inference_error_and_keeps_its_builtin_base(error, builtin):
    assert issubclass(error, InferenceError) and issubclass(InferenceError, EdgefleetError)
    assert issubclass(error, builtin)


def test_start_up_refusals_are_start_errors(model_dir):
    with pytest.raises(START_ERRORS) as unknown:
        replace(LOADER, providers=["tpu"])(model_dir)
    with pytest.raises(START_ERRORS) as strict:
        replace(LOADER, providers=["cuda"], strict=True)(model_dir)

    assert isinstance(unknown.value, UnknownProvider) and "tpu" in str(unknown.value)
    assert isinstance(strict.value, ProviderRefused) and "strict" in str(strict.value)
    assert InferenceError in START_ERRORS and ValueError not in START_ERRORS


# One batch straight through Worker.answer (no threads): what each frame's prediction is made of


MIXED = [("a", "chelsea"), ("b", "coffee"), ("bad", None), ("c", "astronaut"), ("d", "rocket")]


def _mixed_frames(received: float | None = None) -> list[Frame]:
    """Frames of different photos with an undecodable one in the middle (its header passes, its data not)."""
    frames = []
    for frame_id, name in MIXED:
        data = photos.jpeg(name) if name is not None else photos.jpeg("coins")[:400]
        frame = Frame("cam", frame_id, data, None)
        if received is not None:
            frame = replace(frame, received=received)
        frames.append(frame)
    return frames


def _answer(model: ServedModel, frames: list[Frame]) -> MemoryLink:
    """Answers the frames as one batch, as a worker does; returns the link that carries the answers."""
    link, counters, settings = MemoryLink(), Counters(), InferenceSettings(device_id=DEVICE)
    publisher = Publisher(link, device=DEVICE, wire=settings.prediction_format, qos=settings.prediction_qos,
                          counters=counters)
    worker = Worker(backlog=FrameBacklog(settings.queue_size), serving=lambda: model, publisher=publisher,
                    counters=counters, device=DEVICE, max_batch=len(frames), max_wait_s=0.0, top_k=5,
                    max_image_pixels=settings.max_frame_pixels, max_image_bytes=settings.max_frame_bytes)
    worker.answer(frames)
    assert counters.batches.value == 1
    return link


def _own_summary(model: ServedModel, data: bytes) -> np.ndarray:
    """features.summarise of the frame's own preprocessed input, alone and in float64."""
    crop = model.manifest.preprocessing.crop
    slot = np.empty((3, crop, crop), dtype=np.float32)
    model.preprocess(decode_bgr(data, model.decode_min_side), slot)
    return np.asarray(summarise(slot[None].astype(np.float64))[0])


def test_each_prediction_carries_its_own_frames_input_summary(model):
    frames = _mixed_frames()
    link = _answer(model, frames)
    features = {p.frame_id: np.array(p.features) for _, p in _predictions(link)}

    assert [e.frame_id for e in _errors(link)] == ["bad"]
    assert sorted(features) == ["a", "b", "c", "d"]
    own = {f.frame_id: _own_summary(model, f.data) for f in frames if f.frame_id != "bad"}
    for frame_id, summary in own.items():  # rounded to 4 decimals on the wire; float32 adds ~1e-6
        assert np.abs(features[frame_id] - summary).max() <= 6e-5, (frame_id, features[frame_id], summary)
    # The photos' summaries differ far beyond that: another frame's row would fail above.
    assert min(np.abs(own[x] - own[y]).max() for x in own for y in own if x < y) > 1e-2


class SteppingClock:
    """The pipeline's clock, standing still except for one second per input summary (pure logic: where
    the summaries' time is counted)."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.time = time.time

    def monotonic(self) -> float:
        return self.now


def test_a_frames_queue_wait_leaves_out_its_batchs_input_summaries(model, monkeypatch):
    clock = SteppingClock()
    summarised = pipeline.summarise

    def slow_summary(batch: np.ndarray) -> np.ndarray:
        clock.now += 1.0
        return summarised(batch)

    monkeypatch.setattr(pipeline, "time", clock)
    monkeypatch.setattr(pipeline, "summarise", slow_summary)
    link = _answer(model, _mixed_frames(received=clock.now))
    timings = {p.frame_id: p.timings for _, p in _predictions(link)}

    assert sorted(timings) == ["a", "b", "c", "d"]
    # All four summaries ran before the batch's model run, and none of them is waiting: the frames
    # waited no time at all on this clock; their totals count the four seconds.
    assert {t.queued_ms for t in timings.values()} == {0.0}
    assert {t.total_ms for t in timings.values()} == {4000.0}
