"""`edgefleet bench swap`: the inference service under a steady stream of frames while 20 model swaps
happen, against the same stream with no swap, in one run.

Swaps are requested exactly as the sync service requests them (a ModelSwitch on the device's broker,
answered by ModelSwitched), alternating between two real artifacts of the model.

Goals: frames dropped during swaps = 0; the longest gap between predictions during a swap
≤ 2 × the longest gap of the same stream without swaps; resident memory after 20 swaps within 10 %
of after 1. Throughput with swaps is reported against throughput without.
"""

from __future__ import annotations

import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import psutil

from edgefleet.bench.harness import DEVICE, serving
from edgefleet.bench.report import Goal, emit
from edgefleet.broker import Broker
from edgefleet.models.install import resave
from edgefleet.progress import QUIET, Reporter, Task
from shared import topics
from shared.codec import WireFormat, decode, encode
from shared.manifest import load_verified
from shared.mqtt import content_type_of
from shared.schemas import ModelSwitch, ModelSwitched

SWAPS = 20


def run(quick: bool, json_out: Path | None, model_dir: Path, rate: float = 100.0, *,
        progress: Reporter = QUIET) -> int:
    """The same stream without and with SWAPS hot swaps; `progress` shows each phase and the swaps done."""
    seconds = 6.0 if quick else 40.0  # quick: the 20 swaps back to back, under the same stream
    with tempfile.TemporaryDirectory() as tmp, Broker() as broker, serving(broker, model_dir) as (harness, service):
        other = Path(tmp) / "rebuilt"
        resave(model_dir, other, "rebuilt for the swap benchmark")
        models = [(other, load_verified(other)[0].sha256), (model_dir, load_verified(model_dir)[0].sha256)]
        answers: dict[str, ModelSwitched] = {}
        answered = threading.Condition()

        def on_switched(message) -> None:
            result = decode(ModelSwitched, message.payload, content_type_of(message))
            with answered:
                answers[result.request_id] = result
                answered.notify_all()

        harness.link.subscribe(topics.model_switched(DEVICE), on_switched)
        time.sleep(0.5)
        with progress.task("warming up"):
            harness.paced(rate, 2.0)
        with progress.task(f"{seconds:.0f} s of {rate:g} frames/s without swaps"):
            quiet = _phase(harness, rate, seconds, lambda: None)

        swap_windows: list[tuple[float, float]] = []
        rss: list[int] = []
        process = psutil.Process(service.proc.pid)

        def swaps(done: Task) -> None:
            spacing = seconds / (SWAPS + 1)
            for i in range(SWAPS):
                time.sleep(spacing * 0.5)
                folder, sha = models[i % 2]
                request = ModelSwitch(request_id=uuid.uuid4().hex, model_dir=str(folder.resolve()), sha256=sha,
                                      at=time.time())
                t0 = time.perf_counter()
                harness.link.publish(topics.model_switch(DEVICE), encode(request), qos=1,
                                     content_type=WireFormat.JSON.content_type)
                with answered:
                    answered.wait_for(lambda request=request: request.request_id in answers, timeout=60)
                result = answers.get(request.request_id)
                if result is None or not result.ok:
                    raise RuntimeError(f"swap {i + 1} failed: {result}")
                swap_windows.append((t0, time.perf_counter()))
                time.sleep(spacing * 0.5)
                rss.append(process.memory_info().rss)
                done.advance()

        with progress.task(f"{SWAPS} hot swaps under the same stream", SWAPS) as swapping:
            swapped = _phase(harness, rate, seconds, lambda: swaps(swapping), swap_windows)
        dropped = _dropped(harness)
    rows = [
        {"run": "no swaps", "sent": quiet["sent"], "answered": quiet["answered"], "img/s": quiet["rate"],
         "longest gap ms": quiet["gap_ms"]},
        {"run": f"{SWAPS} swaps", "sent": swapped["sent"], "answered": swapped["answered"], "img/s": swapped["rate"],
         "longest gap ms": swapped["gap_ms"],
         "swap p50 ms": round(float(np.median([(b - a) * 1000 for a, b in swap_windows])), 1)},
        {"run": "resident memory", "after swap 1 MB": round(rss[0] / 1e6, 1),
         f"after swap {SWAPS} MB": round(rss[-1] / 1e6, 1)},
    ]
    print("resident MB after each swap: " + " ".join(f"{r / 1e6:.0f}" for r in rss))
    goals = [
        Goal("frames dropped or unanswered during swaps", float(swapped["sent"] - swapped["answered"] + dropped), 0,
             "frames", "max"),
        Goal("longest gap during swaps / longest gap without", round(swapped["gap_ms"] / quiet["gap_ms"], 3), 2.0,
             "ratio", "max"),
        Goal(f"resident memory after {SWAPS} swaps / after 1", round(rss[-1] / rss[0], 3), 1.10, "ratio", "max"),
        Goal("throughput with swaps / without", round(swapped["rate"] / quiet["rate"], 3), 0.95, "ratio"),
    ]
    return emit("swap", quick, rows, goals, json_out, progress=progress)


def _phase(harness, rate: float, seconds: float, during, windows: list[tuple[float, float]] | None = None) -> dict:
    """Frames at `rate` for `seconds` while `during` runs; the longest gap between predictions, inside
    the swap windows when there are some, else over the whole phase."""
    time.sleep(1.5)  # answers to earlier frames are in before this phase counts
    first_id = next(harness.ids)
    worker = threading.Thread(target=during)
    t0 = time.perf_counter()
    worker.start()
    harness.paced(rate, seconds)
    worker.join()
    t1 = time.perf_counter()
    harness.settle(1.5)  # the last answers (a frame still unanswered by then is lost)
    done = sorted(r[0] for r in harness.window(t0, t1 + 1.5))
    sent = next(harness.ids) - first_id - 1
    gaps = np.diff(done)
    if windows:
        starts = np.array(done[1:])
        inside = np.zeros(len(gaps), dtype=bool)
        for a, b in windows:
            inside |= (starts >= a) & (starts <= b + 0.25)
        gaps = gaps[inside]
    return {"sent": sent, "answered": len(done), "rate": round(len(done) / seconds, 1),
            "gap_ms": round(float(gaps.max()) * 1000, 1) if len(gaps) else 0.0}


def _dropped(harness) -> int:
    return len(harness.sent)  # frames sent and never answered
