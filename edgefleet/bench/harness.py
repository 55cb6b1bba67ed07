"""The benchmarks' side of a device: an inference service as a child process (the command the
containers run), and one MQTT link that plays the cameras and collects the predictions."""

from __future__ import annotations

import contextlib
import itertools
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from edgefleet import photos
from edgefleet.broker import Broker
from edgefleet.spawner import Child
from shared import topics
from shared.codec import WireFormat, decode, encode
from shared.config import CommonSettings, InferenceSettings, load
from shared.mqtt import MqttLink, content_type_of
from shared.schemas import Encoding, FrameEnvelope, Prediction, ServiceState, ServiceStatus

DEVICE = "bench"
CAMERAS = ("cam-1", "cam-2", "cam-3", "cam-4")


class Harness:
    """The bench's camera and predictions subscriber, on one MQTT link."""

    def __init__(self, url: str) -> None:
        self.link = MqttLink(CommonSettings(mqtt_url=url, device_id=DEVICE), "bench", unique=True)
        self.frames = itertools.cycle([(n, photos.jpeg(n)) for n in photos.BUNDLED])
        self.ids = itertools.count()
        self.sent: dict[str, float] = {}
        self.results: list[tuple[float, float, float]] = []  # (received_at, e2e_s, inference_ms)
        self.online = threading.Event()
        self.refill = False
        self.lock = threading.Lock()
        self.link.subscribe(topics.all_predictions(DEVICE), self._on_prediction)
        self.link.subscribe(topics.status(DEVICE, "inference"), self._on_status)

    def send(self) -> None:
        n = next(self.ids)
        frame_id = f"f{n}"
        _, data = next(self.frames)
        frame = FrameEnvelope(frame_id=frame_id, encoding=Encoding.JPEG, data=data, captured_at=time.time())
        payload = encode(frame, WireFormat.MSGPACK)
        with self.lock:
            self.sent[frame_id] = time.perf_counter()
        self.link.publish(topics.frames(DEVICE, CAMERAS[n % len(CAMERAS)]), payload, qos=0)

    def paced(self, rate: float, seconds: float) -> None:
        """An open loop: frames at `rate` per second, spread evenly, for `seconds`."""
        period = 1.0 / rate
        t0 = next_send = time.perf_counter()
        while (now := time.perf_counter()) < t0 + seconds:
            if now >= next_send:
                self.send()
                next_send += period
            time.sleep(max(0.0, min(next_send - time.perf_counter(), 0.002)))

    def _on_prediction(self, message) -> None:
        now = time.perf_counter()
        prediction = decode(Prediction, message.payload, content_type_of(message))
        with self.lock:
            sent = self.sent.pop(prediction.frame_id, None)
        if sent is not None:
            self.results.append((now, now - sent, prediction.timings.inference_ms))
        if self.refill:  # closed loop: every answer lets the next frame in
            self.send()

    def _on_status(self, message) -> None:
        if decode(ServiceStatus, message.payload, content_type_of(message)).state is ServiceState.ONLINE:
            self.online.set()

    def window(self, start: float, end: float) -> list[tuple[float, float, float]]:
        return [r for r in self.results if start <= r[0] < end]



@contextlib.contextmanager
def serving(broker: Broker, model_dir: Path, **keys: Any) -> Iterator[tuple[Harness, Child]]:
    """`edgefleet inference` on the broker, online, with a harness connected to it.

    Args:
        broker: the broker the service and the harness meet on.
        model_dir: the model served.
        keys: more inference settings by their flat names (max_batch=4), over the bench's defaults.

    Yields:
        The harness, and the service's process.

    Raises:
        RuntimeError: the service did not come online within 60 s (its log's tail is in the message).
    """
    settings = load(InferenceSettings, None, **{
        "mqtt_url": broker.url, "device_id": DEVICE, "model_dir": model_dir, "queue_size": 256,
        "log_level": "WARNING", **keys})
    with tempfile.TemporaryDirectory() as tmp:
        service = Child("inference", Path(tmp) / "inference.log", settings)
        harness = Harness(broker.url)
        try:
            harness.link.start()
            if not harness.online.wait(60):
                raise RuntimeError(f"inference did not come online: {service.log()[-2000:]}")
            yield harness, service
        finally:
            harness.link.stop()
            service.stop()
