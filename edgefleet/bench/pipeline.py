"""`edgefleet bench pipeline`: raw ONNX Runtime against the whole path (simulated cameras → Mosquitto →
inference service → predictions subscriber), in one run, on the same model and the same cores.

Raw ONNX Runtime is measured two ways on preprocessed real photos: its defaults (one run at a time on
every core) and the way the service runs it (one single-threaded run per core, in parallel). The
goal's baseline is the better of the two, so the service cannot beat the goal by configuring ONNX
Runtime better than the baseline does; the ratio against each is reported too.

Goals: saturated end-to-end throughput ≥ 0.85 × raw ONNX Runtime at its best batch size;
p50 latency added by the path (decode, preprocess, broker, publish: end-to-end minus the model's own
inference time) at half load ≤ 3 ms.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime as ort

from edgefleet import photos
from edgefleet.bench.harness import serving
from edgefleet.bench.report import Goal, emit
from edgefleet.broker import Broker
from services.inference.decode import decode_bgr
from services.inference.preprocess import Preprocessor
from shared.manifest import load_verified

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

        def loop(_: int, x: np.ndarray = x) -> list[float]:
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


def _end_to_end(model_dir: Path, seconds: float, max_batch: int) -> tuple[dict, dict]:
    with Broker() as broker, serving(broker, model_dir, max_batch=max_batch) as (harness, _):
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
        t0 = time.perf_counter()
        harness.paced(sat_rate / 2, seconds)
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
