"""The edge inference path end to end: real Mosquitto, the real `edgefleet inference` process, the
real model, real photos."""

from __future__ import annotations

import json
import signal
import subprocess

import cv2
import numpy as np

from edgefleet import photos
from edgefleet.broker import Broker
from shared import topics
from shared.codec import WireFormat
from shared.config import InferenceSettings, load
from shared.manifest import load_verified
from tests.support import Device, ServiceProcess, wait_until, zlib_bomb

CATS = {"tabby", "tiger cat", "Persian cat", "Siamese cat", "Egyptian cat"}
COFFEE = {"espresso", "cup", "coffee mug"}


def test_mosquitto_pub_jpeg_gets_a_prediction_on_mosquitto_sub(broker, start_inference, tmp_path):
    """Third-party interop: Debian's own clients, a JPEG file in, JSON with a content type out."""
    _, device = start_inference(broker)
    photo = tmp_path / "chelsea.jpg"
    photo.write_bytes(photos.jpeg("chelsea"))
    sub = subprocess.Popen(
        ["mosquitto_sub", "-h", "127.0.0.1", "-p", str(broker.port), "-V", "mqttv5", "-C", "1", "-W", "60",
         "-t", topics.predictions(device.device_id, "cam-1"), "-F", "%C\t%p"],
        stdout=subprocess.PIPE, text=True,
    )
    # mosquitto_sub says nothing when its subscription is in place: publish until it has a prediction.
    for _ in range(30):
        subprocess.run(
            ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(broker.port),
             "-t", topics.frames(device.device_id, "cam-1"), "-f", str(photo)],
            check=True, timeout=30,
        )
        try:
            out, _ = sub.communicate(timeout=1)
            break
        except subprocess.TimeoutExpired:
            continue
    content_type, payload = out.rstrip("\n").split("\t", 1)
    prediction = json.loads(payload)
    assert content_type == "application/json"
    assert prediction["camera"] == "cam-1" and prediction["frame_id"].startswith("cam-1-")
    assert prediction["top"][0]["label"] in CATS, prediction["top"]


def test_envelope_png_answered_in_msgpack_naming_the_model(broker, start_inference, model_dir):
    _, device = start_inference(broker, prediction_format="msgpack")
    device.publish_envelope("door", "door-42", photos.png("coffee"))
    prediction = device.prediction_for("door-42")
    manifest, _ = load_verified(model_dir)
    assert device.content_types == ["application/msgpack"]
    assert prediction.top[0].label in COFFEE and len(prediction.top) == 5
    assert prediction.captured_at is not None
    assert (prediction.model.name, prediction.model.version, prediction.model.sha256) == (
        manifest.name, manifest.version, manifest.sha256,
    )
    assert prediction.provider == "CPUExecutionProvider"
    t = prediction.timings
    assert t.inference_ms > 0 and t.preprocess_ms > 0 and t.total_ms >= t.inference_ms + t.preprocess_ms


def test_frames_from_several_cameras_share_a_batch(broker, start_inference):
    _, device = start_inference(broker, max_batch=4, max_wait_ms=500, inference_workers=1)
    for i, camera in enumerate(("north", "south", "east", "west")):
        device.publish_envelope(camera, f"{camera}-{i}", photos.jpeg("chelsea"), qos=0)
    predictions = [device.prediction_for(f"{c}-{i}") for i, c in enumerate(("north", "south", "east", "west"))]
    assert {p.timings.batch_size for p in predictions} == {4}
    assert {p.camera for p in predictions} == {"north", "south", "east", "west"}


def test_provider_fallback_runs_on_cpu_and_says_so(broker, start_inference):
    _, device = start_inference(broker, providers="cuda,cpu")
    status = device.latest_status()
    assert status.provider.requested[0] == "CUDAExecutionProvider"
    assert status.provider.active == "CPUExecutionProvider" and status.provider.fallback
    alert = wait_until(lambda: next((e for e in device.errors if e.reason == "provider_fallback"), None), 10,
                       "a fallback alert")
    assert "CUDAExecutionProvider" in alert.detail
    device.publish_envelope("cam", "after-fallback", photos.jpeg("coffee"))
    assert device.prediction_for("after-fallback").provider == "CPUExecutionProvider"


def test_strict_provider_policy_refuses_to_start(broker, start_inference):
    service, _ = start_inference(broker, wait_online=False, providers="cuda", provider_policy="strict")
    assert service.proc.wait(60) == 3
    log = service.log()
    assert "CUDAExecutionProvider" in log and "strict" in log


def test_a_missing_model_is_a_clear_refusal(broker, start_inference, tmp_path):
    service, _ = start_inference(broker, wait_online=False, model_dir=str(tmp_path / "nothing-here"))
    assert service.proc.wait(60) == 3
    assert "manifest.json" in service.log()


def test_broker_killed_midstream_then_restarted(broker, start_inference):
    service, device = start_inference(broker)
    pid = service.proc.pid
    for i in range(5):
        device.publish_envelope("cam", f"before-{i}", photos.jpeg("chelsea"))
    device.prediction_for("before-4")
    onlines_before = sum(s.state == "online" for s in device.statuses)

    broker.kill()  # SIGKILL: no goodbye to anyone
    wait_until(lambda: "lost broker" in service.log(), 30, "the service to notice the broker is gone")
    broker.start()  # same port, a fresh broker with no sessions or retained messages

    # The service reconnects and resubscribes by itself and announces itself online again.
    wait_until(lambda: sum(s.state == "online" for s in device.statuses) > onlines_before, 30,
               "the online status again")
    wait_until(device.link.connected.is_set, 30, "the test client to reconnect")
    for i in range(5):
        device.publish_envelope("cam", f"after-{i}", photos.jpeg("coffee"))
    assert device.prediction_for("after-4").top[0].label in COFFEE
    assert service.alive() and service.proc.pid == pid


def test_sigterm_answers_every_accepted_frame_then_exits_zero(broker, start_inference):
    service, device = start_inference(broker, queue_size=500, max_batch=4)
    sent = [f"f{i}" for i in range(60)]
    for frame_id in sent:
        device.publish_envelope("cam", frame_id, photos.jpeg("astronaut"))
    service.proc.send_signal(signal.SIGTERM)
    assert service.proc.wait(60) == 0

    final = wait_until(
        lambda: (s := device.latest_status()) and s.state == "offline" and s.reason == "shutdown" and s, 10,
        "the final status",
    )
    stats = final.inference
    wait_until(lambda: len(device.predictions) >= stats.predictions_published, 10, "every prediction")
    answered = [p.frame_id for p in device.predictions]
    assert len(answered) == len(set(answered)) == stats.predictions_published
    assert stats.predictions_published == stats.frames_received - stats.frames_dropped - stats.frames_rejected
    # Frames still at the broker when the subscription ended were never accepted (nor acknowledged):
    # every frame the service did accept got its answer, none was dropped.
    assert stats.frames_dropped == 0 and 0 < stats.frames_received <= len(sent)
    assert set(answered) <= set(sent)
    drained = [json.loads(line) for line in service.log().splitlines() if '"draining"' in line]
    assert drained and drained[0]["queued"] > 0, "the test must stop the service with frames still queued"


def test_a_service_started_before_its_broker_waits_for_it(model_dir, tmp_path):
    broker = Broker()  # its port is chosen, nothing listens yet
    settings = load(InferenceSettings, None, mqtt_url=broker.url, device_id="early", model_dir=model_dir,
                    mqtt_reconnect_max_s=1)
    service = ServiceProcess(settings, tmp_path / "inference.log")
    try:
        # It gets as far as serving (its workers up, connecting with backoff) with no broker there.
        wait_until(lambda: '"serving"' in service.log() or not service.alive(), 60, "the service to start serving")
        assert service.alive(), service.log()
        broker.start()
        device = Device(broker.url, "early")
        try:
            wait_until(lambda: (st := device.latest_status()) is not None and st.state == "online", 30, "online")
            device.publish_envelope("cam", "late-1", photos.jpeg("coffee"))
            assert device.prediction_for("late-1").top[0].label in COFFEE
        finally:
            device.close()
    finally:
        service.kill()
        broker.close()


def _peak_rss(service: ServiceProcess) -> int:
    """The process's high-water mark of resident memory (VmHWM): what a bomb cost, even if freed since."""
    status = open(f"/proc/{service.proc.pid}/status").read()
    return int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1]) * 1024


def test_zlib_bombs_are_refused_and_the_next_frame_is_answered(broker, start_inference):
    """A 3 MB bomb (inflating to ~3 GB): without a content type it is never inflated;
    declared msgpack+zlib it inflates at most to max_frame_bytes. Neither stalls the service."""
    service, device = start_inference(broker)
    bomb = zlib_bomb(3000)
    assert bomb[:1] == b"\x78" and len(bomb) < 4 * 1024 * 1024
    device.publish_frame("bomb-raw", bomb)
    device.link.publish(
        topics.frames(device.device_id, "bomb-zlib"), bomb, qos=1, content_type=WireFormat.MSGPACK_ZLIB.content_type,
    ).wait_for_publish(10)
    for camera in ("bomb-raw", "bomb-zlib"):
        assert device.error_for(camera).reason in {"malformed_envelope", "oversized"}
    assert "cap of" in device.error_for("bomb-zlib").detail
    device.publish_envelope("cam", "after-bombs", photos.jpeg("coffee"))
    assert device.prediction_for("after-bombs").top[0].label in COFFEE
    assert service.alive()
    assert _peak_rss(service) < 1024**3, "a bomb was inflated past its cap"


def test_a_png_declaring_8000x8000_is_refused_as_oversized_before_decoding(broker, start_inference):
    _, device = start_inference(broker)
    huge = cv2.imencode(".png", np.zeros((8000, 8000), np.uint8), [cv2.IMWRITE_PNG_COMPRESSION, 9])[1].tobytes()
    assert len(huge) < 300_000
    device.publish_envelope("huge", "huge-1", huge)
    report = device.error_for("huge")
    assert (report.reason, report.frame_id) == ("oversized", "huge-1") and "8000x8000" in report.detail
    device.publish_envelope("cam", "normal", photos.jpeg("chelsea"))
    assert device.prediction_for("normal").top[0].label in CATS
    assert not [p for p in device.predictions if p.frame_id == "huge-1"]


def test_predictions_the_mqtt_client_refuses_are_counted_lost_not_published(broker, start_inference):
    """QoS 0 predictions while the broker is down never leave paho: counted as lost, and the counter
    identity of docs/protocol.md holds once the backlog is answered."""
    service, device = start_inference(broker, prediction_qos=0, queue_size=500, max_batch=1, inference_workers=1)
    for i in range(150):
        device.publish_envelope("cam", f"q-{i}", photos.jpeg("astronaut"))
    device.prediction_for("q-0")
    broker.kill()  # the service still has most of its backlog to answer
    wait_until(lambda: '"prediction lost"' in service.log(), 60, "a prediction refused by the MQTT client")
    seen_before_restart = len(device.statuses)
    broker.start()

    def settled():  # nothing queued, nothing in the worker: every frame received is accounted for
        s = device.latest_status() if len(device.statuses) > seen_before_restart else None
        i = s.inference if s and s.state == "online" else None
        return i and i.queue_depth == 0 and i.frames_received == (
            i.predictions_published + i.predictions_lost + i.frames_dropped + i.frames_rejected
        ) and i
    stats = wait_until(settled, 90, f"the counter identity in a status after the restart ({device.latest_status()})")
    assert stats.predictions_lost > 0, stats
    assert not [e for e in device.errors if e.reason != "provider_fallback"]
