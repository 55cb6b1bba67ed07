"""`edgefleet bench ep`: which execution providers this machine has, the model's latency on each one
asked for, and a loud line for every provider that is not really the one running (ONNX Runtime falls
back to the CPU with only a log line). Uses the inference service's own provider check."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from rich.console import Console

from edgefleet import photos
from edgefleet.bench.report import Goal, emit
from edgefleet.progress import QUIET, Reporter, Task
from services.inference.decode import decode_bgr
from services.inference.preprocess import Preprocessor
from services.inference.session import ModelSession, provider_name
from shared.manifest import ModelManifest, load_verified

DEFAULT_PROVIDERS = ("tensorrt", "cuda", "openvino", "cpu")


def run(quick: bool, json_out: Path | None, model_dir: Path, providers: list[str], *,
        progress: Reporter = QUIET) -> int:
    """Opens the model on each provider asked for and times it; `progress` counts the timed runs."""
    console = Console()
    manifest, path = load_verified(model_dir)
    crop = manifest.preprocessing.crop
    x = np.empty((1, 3, crop, crop), dtype=np.float32)
    Preprocessor(manifest.preprocessing)(decode_bgr(photos.jpeg("coffee")), x[0])
    available = ort.get_available_providers()
    console.print(f"ONNX Runtime {ort.__version__}; providers available here: {', '.join(available)}")
    rows, expected, detected = [], 0, 0
    runs = 20 if quick else 200
    with progress.task(f"{runs} timed runs on each of {len(providers)} providers", runs * len(providers)) as timed:
        for requested in providers:
            rows.append(_provider_row(console, manifest, path, requested, available, x, runs, timed))
            expected += provider_name(requested) not in available
            detected += bool(rows[-1]["fell back"])
    goals = [Goal("provider fallbacks detected / providers asked for but not available",
                  detected / expected if expected else 1.0, 1.0, "ratio")]
    return emit("ep", quick, rows, goals, json_out, progress=progress)


def _provider_row(console: Console, manifest: ModelManifest, path: Path, requested: str, available: list[str],
                  x: np.ndarray, runs: int, timed: Task) -> dict[str, object]:
    """One provider: opened as the service opens it, a loud line if it fell back, `runs` timed runs."""
    session = ModelSession.open(manifest, path, [requested], strict=False)
    report = session.provider
    if report.fallback:
        console.print(f"[bold red]FALLBACK: {report.requested[0]} was asked for, {report.active} is running[/]")
    times = []
    for _ in range(5):
        session.run(x)
    for _ in range(runs):
        t0 = time.perf_counter()
        session.run(x)
        times.append((time.perf_counter() - t0) * 1000)
        timed.advance()
    return {
        "requested": report.requested[0], "available": provider_name(requested) in available,
        "active": report.active, "fell back": report.fallback,
        "p50 ms": round(float(np.percentile(times, 50)), 3), "p95 ms": round(float(np.percentile(times, 95)), 3),
    }
