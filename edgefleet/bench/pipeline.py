"""`edgefleet bench pipeline`: raw ONNX Runtime against the whole path (simulated cameras → Mosquitto →
inference service → predictions subscriber), in one run, on the same model and the same cores.

Raw ONNX Runtime is measured two ways on preprocessed real photos: its defaults (one run at a time on
every core) and the way the service runs it (one single-threaded run per core, in parallel). The
goal's baseline is the better of the two, so the service cannot beat the goal by configuring ONNX
Runtime better than the baseline does; the ratio against each is reported too.

Goals (issue 2): saturated end-to-end throughput ≥ 0.85 × raw ONNX Runtime at its best batch size;
p50 latency added by the path (decode, preprocess, broker, publish: end-to-end minus the model's own
inference time) at half load ≤ 3 ms.
"""

from __future__ import annotations

import itertools
import os
from concurrent.futures import ThreadPoolExecutor
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from edgefleet import photos
from edgefleet.bench.report import Goal, emit
from edgefleet.broker import Broker
from services.inference.decode import decode_bgr
from services.inference.preprocess import Preprocessor
from shared import topics
from shared.codec import WireFormat, decode, encode
from shared.config import CommonSettings
from shared.manifest import load_verified
from shared.mqtt import MqttLink, content_type_of
from shared.schemas import Encoding, FrameEnvelope, Prediction, ServiceState, ServiceStatus

DEVICE = "bench"
CAMERAS = ("cam-1", "cam-2", "cam-3", "cam-4")
BATCHES = (1, 2, 4, 8, 16)


def run(quick: bool, json_out: Path | None, model_dir: Path) -> int:
    seconds = 2.0 if quick else 8.0
    manifest, model_path = load_verified(model_dir)
    tensors = _real_tensors(manifest)
    cores = len(os.sched_getaffinity(0))

    default_rows, default_best, _ = _raw_onnxruntime(model_path, manifest.input.name, tensors, seconds / 2, runs=1)
    parallel_rows, parallel_best, best_batch = _raw_onnxruntime(
        model_path, manifest.input.name, tensors, seconds / 2, runs=cores
    )
    saturated, half = _end_to_end(model_dir, seconds, best_batch)

    saturated["x raw best"] = round(saturated["img/s"] / max(default_best, parallel_best), 3)
    saturated["x raw default"] = round(saturated["img/s"] / default_best, 3)
    saturated["x raw parallel"] = round(saturated["img/s"] / parallel_best, 3)
    rows = default_rows + parallel_rows + [saturated, half]
    goals = [
        Goal("saturated end-to-end throughput / raw ONNX Runtime best batch", saturated["x raw best"], 0.85, "ratio"),
        Goal("p50 latency added by the path at half load", half["added_p50"], 3.0, "ms", "max"),
    ]
    return emit("pipeline", quick, rows, goals, json_out)


def _real_tensors(manifest) -> np.ndarray:
    pre = Preprocessor(manifest.preprocessing)
    crop = manifest.preprocessing.crop
    out = np.empty((len(photos.BUNDLED), 3, crop, crop), dtype=np.float32)
    for i, name in enumerate(photos.BUNDLED):
        pre(decode_bgr(photos.jpeg(name)), out[i])
    return out


def _raw_onnxruntime(model_path: Path, input_name: str, tensors: np.ndarray, seconds: float, runs: int):
    """Images/s on preprocessed real photos. runs=1: ONNX Runtime's defaults, one run at a time.
    runs=N: N single-threaded runs in parallel on one session, as the service does."""
    options = ort.SessionOptions()
    if runs > 1:
        options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    label = "raw ORT defaults" if runs == 1 else f"raw ORT {runs}x1-thread"
    rows, best, best_batch = [], 0.0, 1
    for batch in BATCHES:
        x = np.ascontiguousarray(np.resize(tensors, (batch, *tensors.shape[1:])))
        session.run(None, {input_name: x})

        def loop(_: int) -> list[float]:
            times, deadline = [], time.perf_counter() + seconds
            while time.perf_counter() < deadline or len(times) < 3:
                t0 = time.perf_counter()
                session.run(None, {input_name: x})
                times.append(time.perf_counter() - t0)
            return times

        start = time.perf_counter()
        with ThreadPoolExecutor(runs) as pool:
            per_run = list(pool.map(loop, range(runs)))
        elapsed = time.perf_counter() - start
        per_s = batch * sum(map(len, per_run)) / elapsed
        if per_s > best:
            best, best_batch = per_s, batch
        p50 = float(np.percentile([t for times in per_run for t in times], 50)) * 1000
        rows.append({"run": f"{label}, batch {batch}", "img/s": round(per_s, 1), "p50_ms": round(p50, 2)})
    return rows, best, best_batch


class _Harness:
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
        payload = encode(FrameEnvelope(frame_id=frame_id, encoding=Encoding.JPEG, data=data, captured_at=time.time()), WireFormat.MSGPACK)
        with self.lock:
            self.sent[frame_id] = time.perf_counter()
        self.link.publish(topics.frames(DEVICE, CAMERAS[n % len(CAMERAS)]), payload, qos=0)

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


def _end_to_end(model_dir: Path, seconds: float, max_batch: int) -> tuple[dict, dict]:
    with Broker() as broker, tempfile.TemporaryDirectory() as tmp:
        env = {
            **os.environ,
            "EDGEFLEET_MQTT_URL": broker.url,
            "EDGEFLEET_DEVICE_ID": DEVICE,
            "EDGEFLEET_MODEL_DIR": str(model_dir),
            "EDGEFLEET_MAX_BATCH": str(max_batch),
            "EDGEFLEET_QUEUE_SIZE": "256",
            "EDGEFLEET_LOG_LEVEL": "WARNING",
        }
        log = open(Path(tmp) / "inference.log", "wb")
        service = subprocess.Popen([sys.executable, "-m", "edgefleet", "inference"], env=env, stdout=log, stderr=log)
        harness = _Harness(broker.url)
        try:
            harness.link.start()
            if not harness.online.wait(60):
                raise RuntimeError(f"inference did not come online; see {log.name}")
            # Saturation: a closed loop keeps 4 × max_batch frames in flight (at least 16), so no
            # worker is ever idle and the service never drops.
            harness.refill = True
            for _ in range(max(16, 4 * max_batch)):
                harness.send()
            time.sleep(1.0)  # warm-up
            t0 = time.perf_counter()
            time.sleep(seconds)
            t1 = time.perf_counter()
            harness.refill = False
            done = harness.window(t0, t1)
            sat_rate = len(done) / (t1 - t0)
            time.sleep(1.0)  # let the loop drain
            saturated = {
                "run": f"e2e saturated, batch≤{max_batch}",
                "img/s": round(sat_rate, 1),
                "p50_ms": round(float(np.percentile([r[1] for r in done], 50)) * 1000, 2),
            }
            # Half load: an open loop at half the saturated rate, frames spread evenly.
            period = 2.0 / sat_rate
            t0 = time.perf_counter()
            next_send = t0
            while (now := time.perf_counter()) < t0 + seconds:
                if now >= next_send:
                    harness.send()
                    next_send += period
                time.sleep(max(0.0, min(next_send - time.perf_counter(), 0.002)))
            time.sleep(1.0)
            done = harness.window(t0, t0 + seconds + 1.0)
            e2e = np.array([r[1] * 1000 for r in done])
            added = e2e - np.array([r[2] for r in done])
            half = {
                "run": "e2e half load",
                "img/s": round(len(done) / seconds, 1),
                "p50_ms": round(float(np.percentile(e2e, 50)), 2),
                "p95_ms": round(float(np.percentile(e2e, 95)), 2),
                "added_p50": round(float(np.percentile(added, 50)), 3),
                "added_p95": round(float(np.percentile(added, 95)), 3),
            }
            return saturated, half
        finally:
            harness.link.stop()
            service.terminate()
            service.wait(30)
