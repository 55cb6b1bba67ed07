"""The camera simulator: publishes real images at a fixed rate for one or many cameras, raw or enveloped."""

from __future__ import annotations

import itertools
import logging
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import cv2

from edgefleet import photos
from shared import topics
from shared.codec import WireFormat, encode
from shared.config import CameraSettings
from shared.mqtt import MqttLink
from shared.schemas import Encoding, FrameEnvelope

log = logging.getLogger(__name__)


def load_source(source: str) -> list[bytes] | cv2.VideoCapture:
    """Encoded images from 'bundled', a folder or a single image; else a capture (video file or device)."""
    if source == "bundled":
        return [data for _, data in photos.bundled_jpegs()]
    path = Path(source)
    if path.is_dir():
        files = photos.image_files(path)
        if not files:
            raise ValueError(f"no .jpg/.jpeg/.png images in {path}")
        return [p.read_bytes() for p in files]
    if path.suffix.lower() in photos.IMAGE_SUFFIXES:
        return [path.read_bytes()]
    capture = cv2.VideoCapture(int(source) if source.isdigit() else source)
    if not capture.isOpened():
        raise ValueError(f"cannot open {source!r} as a folder, an image, a video file or a capture device")
    return capture


def frames_from(source: list[bytes] | cv2.VideoCapture, offset: int) -> Iterator[bytes]:
    if isinstance(source, list):
        yield from itertools.islice(itertools.cycle(source), offset, None)
        return
    while True:
        ok, image = source.read()
        if not ok:  # a video file ended: loop it; a device failed: stop
            if source.set(cv2.CAP_PROP_POS_FRAMES, 0) and (again := source.read())[0]:
                image = again[1]
            else:
                return
        yield cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()


def run(settings: CameraSettings, stop: threading.Event | None = None) -> int:
    stop = stop or threading.Event()
    source = load_source(settings.source)
    # A live capture is one stream: every camera shares it. Stills are staggered across cameras.
    shared_stream = frames_from(source, 0) if not isinstance(source, list) else None
    streams = {cam: shared_stream or frames_from(source, i) for i, cam in enumerate(settings.cameras)}
    link = MqttLink(settings, "camera", unique=True)
    link.start()
    if not link.wait_connected(30):
        log.error("no broker at %s", settings.mqtt.url)
        return 1
    period = 1.0 / settings.rate_hz
    next_tick = time.monotonic()
    for n in itertools.count(1):
        if stop.is_set() or (settings.count and n > settings.count):
            break
        for camera, stream in streams.items():
            data = next(stream, None)
            if data is None:
                stop.set()
                break
            link.publish(topics.frames(settings.device_id, camera), _payload(settings, camera, n, data))
        next_tick += period
        stop.wait(max(0.0, next_tick - time.monotonic()))
    link.stop()
    return 0


def _payload(settings: CameraSettings, camera: str, n: int, data: bytes) -> bytes:
    if not settings.envelope:
        return data
    encoding = Encoding.PNG if data.startswith(b"\x89PNG") else Encoding.JPEG
    envelope = FrameEnvelope(frame_id=f"{camera}-{n}", encoding=encoding, data=data, captured_at=time.time())
    return encode(envelope, WireFormat.MSGPACK)


def main(settings: CameraSettings) -> int:
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    return run(settings, stop)
