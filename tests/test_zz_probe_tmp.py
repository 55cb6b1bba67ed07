import time
from tests.support import wait_until
from tests.test_telemetry import _beside

def test_drift_is_raised_after_the_minimum_samples_and_resolved_when_it_ends(broker, start_inference, tmp_path):
    import cv2

    from edgefleet import photos
    from shared import topics
    from shared.codec import decode
    from shared.mqtt import content_type_of
    from shared.schemas import Alert

    _, device = start_inference(broker, device_id="edge-drift")
    alerts = []
    device.link.subscribe(topics.alerts("edge-drift"), lambda m: alerts.append(decode(Alert, m.payload, content_type_of(m))))
    telemetry = _beside(broker, device, tmp_path, drift_baseline=96, drift_window=48, drift_min_samples=40)
    try:
        normal = [photos.jpeg(name) for name in photos.BUNDLED]
        dark = [cv2.imencode(".jpg", (cv2.imdecode(__import__("numpy").frombuffer(j, "uint8"), cv2.IMREAD_COLOR) * 0.25).astype("uint8"))[1].tobytes()
                for j in normal]
        sent = 0

        def stream(frames, count):
            nonlocal sent
            for i in range(count):
                device.publish_envelope("cam", f"f{sent}", frames[i % len(frames)])
                sent += 1
                time.sleep(0.01)
            try:
                wait_until(lambda: len(device.predictions) >= sent, 60, "the predictions")
            except AssertionError:
                st = device.latest_status("inference")
                print("PROBE sent", sent, "preds", len(device.predictions), "status", st.model_dump_json() if st else None)
                raise

        stream(normal, 96)  # the model's baseline
        stream(dark, 35)  # a shift, but fewer records than the minimum: no verdict yet
        time.sleep(1)
        assert alerts == [], [a.detail for a in alerts]
        stream(dark, 30)
        raised = wait_until(lambda: [a for a in alerts if a.state == "raised"], 30, "a drift alert")
        feature = next(a for a in raised if a.type == "feature_drift")
        assert feature.value > feature.threshold and feature.window >= 40
        stream(normal, 96)
        wait_until(lambda: {a.alert_id for a in alerts if a.state == "resolved"} >= {a.alert_id for a in raised}, 30,
                   "every incident to end")
        assert len([a for a in alerts if a.type == "feature_drift" and a.state == "raised"]) == 1, "one incident, one alert"
        before = len(alerts)
        stream(normal, 96 * 5)  # a long unshifted stream: nothing
        time.sleep(1)
        assert alerts[before:] == [], [a.detail for a in alerts[before:]]
    finally:
        telemetry.kill()


