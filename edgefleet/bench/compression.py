"""`edgefleet bench compression`: the float model against every compressed variant, each built and
measured in one run on the same held-out real images and the same threads.

Goals: static INT8 (mixed precision where needed) latency at batch 1 <= 0.5 x FP32, top-1
agreement with FP32 >= 97 %, file <= 30 % of FP32; the pruned and the distilled models each on the
Pareto front of agreement against latency (alone or quantized after), or a plain line saying they are
not. Dynamic INT8 is reported as measured.

`--quick` builds and measures every model and writes every goal, on less: 16 held-out and 8
calibration images, static INT8 with every layer quantized (no sensitivity pass, which re-quantizes the
model once per layer), a one-epoch fine-tune, and shorter timings (throughput: 0.05 s or one timed run
at each batch size, not 1 s and at least three). It shows that the bench runs and
what it reports; its figures are not the ones to quote.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from edgefleet.bench.report import Goal, emit
from edgefleet.models import dataset
from edgefleet.models.distill import Training, distill
from edgefleet.models.evaluate import Evaluation, evaluate
from edgefleet.models.plot import pareto_front
from edgefleet.models.prune import prune
from edgefleet.models.quantize import Method, Mode, quantize
from edgefleet.progress import QUIET, Reporter


@dataclass(frozen=True)
class Scale:
    """How much of everything one run uses."""

    eval_images: int
    calibration_images: int
    # Layers static INT8 may keep in float, chosen by measured sensitivity (0: no sensitivity pass).
    float_layers: int
    training: Training
    latency_runs: int
    throughput_s: float
    throughput_runs: int  # the fewest timed runs at each batch size


FULL = Scale(300, 128, 24, Training(), 100, 1.0, 3)
QUICK = Scale(16, 8, 0, Training(epochs=1, batch=8), 10, 0.05, 1)


def run(quick: bool, json_out: Path | None, model_dir: Path, threads: int = 1, *,
        progress: Reporter = QUIET) -> int:
    """Builds every compressed variant and measures them all; `progress` counts the models built and shows
    each one's steps."""
    scale = QUICK if quick else FULL
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = work / "data"
        dataset.make(data, eval_count=scale.eval_images, calibration_count=scale.calibration_images,
                     progress=progress)
        held_out, frames = data / "eval", data / "calibration"

        def int8(parent: Path, out: str, float_layers: int = 0):
            return quantize(parent, work / out, Mode.STATIC, held_out, frames, Method.MINMAX,
                            max_float_layers=float_layers, progress=progress)

        with progress.task("building 6 compressed models", 6) as built_so_far:
            _, mixed = int8(model_dir, "static", scale.float_layers)
            built_so_far.advance()
            quantize(model_dir, work / "dynamic", Mode.DYNAMIC, held_out, progress=progress)
            built_so_far.advance()
            prune(model_dir, work / "pruned", frames, held_out, training=scale.training, threads=threads,
                  progress=progress)
            built_so_far.advance()
            int8(work / "pruned", "pruned-int8")
            built_so_far.advance()
            distill(model_dir, work / "distilled", frames, held_out, training=scale.training, progress=progress)
            built_so_far.advance()
            int8(work / "distilled", "distilled-int8")
            built_so_far.advance()
        names = ["FP32", "static INT8", "dynamic INT8", "pruned", "pruned + INT8", "distilled", "distilled + INT8"]
        built = ("static", "dynamic", "pruned", "pruned-int8", "distilled", "distilled-int8")
        folders = [model_dir] + [work / f for f in built]
        evaluated = evaluate(folders, model_dir, held_out, threads=threads, runs=scale.latency_runs,
                             throughput_s=scale.throughput_s, throughput_runs=scale.throughput_runs,
                             progress=progress)
        results = dict(zip(names, evaluated, strict=True))
    front = pareto_front(list(results.values()))
    rows = [
        {
            "model": name, "MB": r.size_mb, "top-1 agree": r.top1_agreement, "top-1 sure": r.top1_agreement_confident,
            "top-5 agree": r.top5_agreement, "p50 ms": r.p50_ms, "p99 ms": r.p99_ms, "img/s": r.best_images_per_s,
            "Pareto": "yes" if r in front else "", "gate": r.gate,
        }
        for name, r in results.items()
    ]
    fp32, static, dynamic = results["FP32"], results["static INT8"], results["dynamic INT8"]
    goals = [
        Goal("static INT8 latency at batch 1 / FP32", round(static.p50_ms / fp32.p50_ms, 3), 0.5, "ratio", "max"),
        Goal("static INT8 top-1 agreement with FP32", static.top1_agreement, 0.97, "fraction"),
        Goal("static INT8 file size / FP32", round(static.size_mb / fp32.size_mb, 3), 0.30, "ratio", "max"),
    ]
    for family in ("pruned", "distilled"):
        members = [results[family], results[f"{family} + INT8"]]
        on_front = float(any(m in front for m in members))
        goals.append(Goal(f"{family} model on the Pareto front (alone or + INT8)", on_front, 1.0, "yes=1"))
        for name, member in zip((family, f"{family} + INT8"), members, strict=True):
            print(_verdict(name, member, front, results))
    kept = ", ".join(n for n, _, _ in mixed.float_layers) or "none"
    print(f"static INT8 keeps {len(mixed.float_layers)} layers in float: {kept}")
    print(
        f"dynamic INT8, as measured: latency {dynamic.p50_ms / fp32.p50_ms:.1f} x FP32, "
        f"top-1 agreement {dynamic.top1_agreement:.1%}, size {dynamic.size_mb / fp32.size_mb:.0%} of FP32"
    )
    return emit("compression", quick, rows, goals, json_out, progress=progress)


def _verdict(name: str, model: Evaluation, front: list[Evaluation], results: dict[str, Evaluation]) -> str:
    if model in front:
        return f"{name}: ON the Pareto front ({model.p50_ms:.2f} ms, {model.top1_agreement:.1%} agreement)"
    better = next(
        other for other, r in results.items()
        if r in front and r.p50_ms <= model.p50_ms and r.top1_agreement >= model.top1_agreement
    )
    r = results[better]
    return (f"{name}: NOT on the Pareto front: {better} is at least as fast ({r.p50_ms:.2f} vs {model.p50_ms:.2f} ms) "
            f"and agrees at least as well ({r.top1_agreement:.1%} vs {model.top1_agreement:.1%})")
