"""Overload: frames arrive far faster than the model can answer. The backlog stays bounded, the oldest
frames of the flooding camera are dropped and counted, every frame is accounted for by the status
counters, and the service recovers when the load ends.

How fast and how lean it stays (latency and memory over a long overload) is measured by
`edgefleet bench overload`, not asserted here: a shared CI machine makes timings a coin toss."""

from __future__ import annotations

import threading
import time

import cv2

from edgefleet import photos
from shared.schemas import InferenceStats, ServiceStatus
from tests.support import Device, wait_until

QUEUE_SIZE = 16
MAX_BATCH = 4


def _small_jpeg() -> bytes:
    # A camera-sized still keeps the sender cheap, so the overload is the service's, not the test's.
    image = cv2.resize(cv2.cvtColor(photos.photo_rgb("chelsea"), cv2.COLOR_RGB2BGR), (320, 240))
    return cv2.imencode(".jpg", image)[1].tobytes()


def _identity_holds(s: InferenceStats) -> bool:
    """docs/protocol.md: received = published + lost + dropped + rejected + queued (none in a worker)."""
    return s.frames_received == (
        s.predictions_published + s.predictions_lost + s.frames_dropped + s.frames_rejected + s.queue_depth
    )


def _settled_after(device: Device, sentinel: str) -> ServiceStatus:
    """The first status published after the sentinel frame (sent last) was answered. With one worker
    and frames taken in arrival order, nothing is queued or in a worker any more: its counters are final."""
    device.prediction_for(sentinel, timeout=60)
    answered_at = time.time()
    latest = device.latest_status
    wait_until(lambda: (s := latest()) and s.at > answered_at and s.inference.queue_depth == 0, 30, "a later status")
    # A worker bumps its counter just after it publishes: a status taken in between is off by one
    # for a moment. The identity must hold in the statuses that follow, or this times out and fails.
    return wait_until(lambda: (s := latest()) and _identity_holds(s.inference) and s, 5,
                      f"the counter identity in {latest()}")


def test_a_flood_is_dropped_counted_and_every_frame_accounted_for(broker, start_inference):
    service, device = start_inference(
        broker, queue_size=QUEUE_SIZE, max_batch=MAX_BATCH, prediction_qos=1, inference_workers=1,
    )
    frame = _small_jpeg()
    depths: list[int] = []
    stop = threading.Event()

    def watch():
        while not stop.wait(0.1):
            if (status := device.latest_status()) is not None and status.inference:
                depths.append(status.inference.queue_depth)

    watcher = threading.Thread(target=watch)
    watcher.start()
    sent = 600
    for n in range(sent):  # as fast as the client can: far beyond what one model worker answers
        device.publish_envelope("cam", f"o-{n}", frame, qos=0)
    device.publish_envelope("cam", "sentinel", frame)
    status = _settled_after(device, "sentinel")
    stop.set()
    watcher.join()
    stats = status.inference

    assert stats.frames_dropped > 0, "the flood must overload the service for this test to mean anything"
    # Every frame is accounted for, exactly: answered, lost by the MQTT client, dropped, or rejected.
    assert _identity_holds(stats), stats
    assert stats.frames_received == (
        stats.predictions_published + stats.predictions_lost + stats.frames_dropped + stats.frames_rejected
    )
    assert stats.dropped_by_camera == {"cam": stats.frames_dropped}
    wait_until(lambda: len(device.predictions) >= stats.predictions_published, 30, "every published prediction")
    assert len(device.predictions) == stats.predictions_published
    # The backlog never held more than its bound.
    assert depths and max(depths) <= QUEUE_SIZE

    # Recovery: at a gentle rate every frame is answered again, with nothing dropped.
    for i in range(5):
        device.publish_envelope("cam", f"calm-{i}", frame)
        device.prediction_for(f"calm-{i}")
    after = _settled_after(device, "calm-4").inference
    assert after.frames_dropped == stats.frames_dropped
    assert service.alive()


def test_a_flooding_camera_does_not_evict_another_cameras_frames(broker, start_inference):
    # The quiet camera's 5 frames and sentinel stay within its share (16 / 2 cameras) even if the
    # worker takes nothing during the flood: then every drop must be the flood's, whatever the timing.
    _, device = start_inference(broker, queue_size=16, max_batch=2, inference_workers=1)
    frame = _small_jpeg()
    quiet = [f"b-{i}" for i in range(5)]
    for n in range(400):
        device.publish_envelope("flood", f"a-{n}", frame, qos=0)
        if n % 80 == 40:  # amid the flood: dozens of flood frames arrive while each quiet one waits
            device.publish_envelope("quiet", quiet[n // 80], frame)
    device.publish_envelope("quiet", "sentinel", frame)
    stats = _settled_after(device, "sentinel").inference

    assert stats.frames_dropped > 0
    assert stats.dropped_by_camera == {"flood": stats.frames_dropped}, (stats, device.errors)
    answered = {p.frame_id for p in device.predictions}
    assert set(quiet) <= answered, (sorted(set(quiet) - answered), stats, device.errors)
    assert _identity_holds(stats), stats
