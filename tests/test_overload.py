"""Overload: frames arrive far faster than the model can answer. The backlog stays bounded, the oldest
frames are dropped and counted, the latency of what is answered does not grow with the overload's
length, memory does not grow, and the service recovers when the load ends."""

from __future__ import annotations

import threading
import time

import cv2
import numpy as np

from edgefleet import photos
from tests.support import wait_until

QUEUE_SIZE = 16
MAX_BATCH = 4


def _small_jpeg() -> bytes:
    # A camera-sized still keeps the sender cheap, so the overload is the service's, not the test's.
    image = cv2.resize(cv2.cvtColor(photos.photo_rgb("chelsea"), cv2.COLOR_RGB2BGR), (320, 240))
    return cv2.imencode(".jpg", image)[1].tobytes()


def test_ten_times_the_sustainable_rate(broker, start_inference):
    service, device = start_inference(broker, queue_size=QUEUE_SIZE, max_batch=MAX_BATCH, prediction_qos=1)
    frame = _small_jpeg()

    # The sustainable rate, measured here: a burst the backlog can hold, answered as fast as possible.
    t0 = time.monotonic()
    for i in range(QUEUE_SIZE):
        device.publish_envelope("cam", f"warm-{i}", frame)
    device.prediction_for(f"warm-{QUEUE_SIZE - 1}")
    sustainable = QUEUE_SIZE / (time.monotonic() - t0)

    rate, duration = 10 * sustainable, 8.0
    sent: dict[str, float] = {}
    rss: list[tuple[float, int]] = []
    depths: list[int] = []
    stop = threading.Event()

    def watch():
        while not stop.wait(0.25):
            rss.append((time.monotonic(), service.rss))
            if (status := device.latest_status()) is not None and status.inference:
                depths.append(status.inference.queue_depth)

    watcher = threading.Thread(target=watch)
    watcher.start()
    start = time.monotonic()
    n = 0
    while (now := time.monotonic()) < start + duration:
        if n < (now - start) * rate:
            sent[f"o-{n}"] = now
            device.publish_envelope("cam", f"o-{n}", frame, qos=0)
            n += 1
        else:
            time.sleep(0.0005)
    end = time.monotonic()
    stop.set()
    watcher.join()
    achieved = n / (end - start)

    # Wait until everything the service took is answered and its counters stand still.
    def settled():
        s = device.latest_status()
        return s and s.inference.queue_depth == 0 and s.inference.frames_received >= n + QUEUE_SIZE - 5 and s
    wait_until(settled, 60, "the backlog to drain")
    time.sleep(1.0)
    stats = device.latest_status().inference

    answered = {p.frame_id: p for p in device.predictions if p.frame_id.startswith("o-")}
    assert achieved > 5 * sustainable, f"the test could only send {achieved:.0f}/s against {sustainable:.0f}/s sustainable"
    assert stats.frames_dropped > 0
    # Every frame is accounted for: answered, dropped (counted) or rejected.
    assert stats.frames_received == stats.predictions_published + stats.frames_dropped + stats.frames_rejected
    assert len(device.predictions) == stats.predictions_published
    # The backlog never held more than its bound (plus the batches being formed).
    assert max(depths) <= QUEUE_SIZE + 2 * MAX_BATCH
    # Latency of what is answered is bounded: the last third waits no longer than the first third
    # (an unbounded queue would make it grow with the overload's length).
    ordered = sorted(answered.values(), key=lambda p: sent[p.frame_id])
    third = len(ordered) // 3
    first = np.percentile([p.timings.total_ms for p in ordered[:third]], 90)
    last = np.percentile([p.timings.total_ms for p in ordered[-third:]], 90)
    assert last <= 2 * first, (first, last)
    # Memory does not grow: the second half of the overload uses no more than the first.
    half = start + duration / 2
    early = max(r for t, r in rss if t < half)
    late = max(r for t, r in rss if t >= half)
    assert late <= early * 1.1 + 16 * 2**20, (early, late)

    # Recovery: at a gentle rate every frame is answered again, with nothing dropped.
    dropped = stats.frames_dropped
    for i in range(5):
        device.publish_envelope("cam", f"calm-{i}", frame)
        device.prediction_for(f"calm-{i}")
    assert device.latest_status().inference.frames_dropped == dropped
    assert service.alive()
