"""`edgefleet model evaluate`: what each model costs and how closely it follows the float teacher, on
held-out real images. Agreement is given overall and split by the teacher's own confidence: where the
teacher's top two classes nearly tie, any change flips its answer, and the split shows that plainly."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from rich.console import Console
from rich.table import Table

from edgefleet.models.frames import UNLABELLED, load_labelled
from edgefleet.models.outputs import logits, session, softmax
from edgefleet.progress import QUIET, Reporter
from shared.manifest import load_verified

CONFIDENT = 0.5  # the teacher's top-1 probability above which an image counts as clearly decided


@dataclass
class Evaluation:
    model: str
    size_mb: float
    top1_agreement: float
    top5_agreement: float
    top1_agreement_confident: float
    confident_samples: int
    samples: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    best_images_per_s: float
    best_batch: int
    gate: str
    # Top-1 accuracy on the held-out images that have a true label (a sub-folder named after a class).
    accuracy: float | None = None
    labelled_samples: int = 0


def evaluate(model_dirs: list[Path], teacher_dir: Path, eval_dir: Path, threads: int = 0, runs: int = 100, *,
             throughput_s: float = 1.0, throughput_runs: int = 3, progress: Reporter = QUIET) -> list[Evaluation]:
    """Each model against the teacher on the images in `eval_dir`.

    Args:
        model_dirs: the models' folders (each with its manifest); the teacher may be one of them.
        teacher_dir: the float model every agreement is measured against.
        eval_dir: held-out images (`edgefleet model dataset`), sub-folders named after a class where known.
        threads: ONNX Runtime intra-op threads (0: its default).
        runs: timed runs at batch 1 for the latency percentiles.
        throughput_s: seconds each batch size runs for the best images/s (at least `throughput_runs` runs each,
            after one untimed).
        throughput_runs: the fewest timed runs at each batch size.
        progress: shown the images read and each model measured.

    Returns:
        One Evaluation per model, in `model_dirs`' order.

    Raises:
        ModelError: a folder without a valid manifest or model.
    """
    teacher, teacher_path = load_verified(teacher_dir)
    inputs, labels = load_labelled(eval_dir, teacher, progress=progress)
    with progress.task(f"running the teacher {teacher.name} on {len(inputs)} images"):
        reference = logits(session(teacher_path, threads), teacher.input.name, inputs)
    probs = softmax(reference)
    confident = probs.max(1) >= CONFIDENT
    results = []
    with progress.task(f"measuring {len(model_dirs)} models", len(model_dirs)) as measured:
        for model_dir in model_dirs:
            results.append(_evaluate_one(model_dir, inputs, labels, reference, confident, threads, runs,
                                         throughput_s, throughput_runs, progress))
            measured.advance()
    return results


def _evaluate_one(model_dir: Path, inputs: np.ndarray, labels: np.ndarray, reference: np.ndarray,
                  confident: np.ndarray, threads: int, runs: int, throughput_s: float, throughput_runs: int,
                  progress: Reporter) -> Evaluation:
    labelled = labels != UNLABELLED
    manifest, path = load_verified(model_dir)
    runner = session(path, threads)
    with progress.task(f"{manifest.name}: agreement, latency, throughput"):
        outputs = logits(runner, manifest.input.name, inputs)
        agree = outputs.argmax(1) == reference.argmax(1)
        top5 = np.array([reference[i].argmax() in np.argsort(-outputs[i])[:5] for i in range(len(outputs))])
        times = latencies(runner, manifest.input.name, inputs[:1], runs)
        best_batch, best_rate = _best_throughput(runner, manifest.input.name, inputs, throughput_s, throughput_runs)
    gate = "n/a" if manifest.quality is None else ("passed" if manifest.quality.passed else "FAILED")
    return Evaluation(
        model=f"{manifest.name} v{manifest.version}" + _float_layers(manifest.recipe),
        size_mb=round(manifest.size_bytes / 1e6, 2),
        top1_agreement=round(float(agree.mean()), 4),
        top5_agreement=round(float(top5.mean()), 4),
        top1_agreement_confident=round(float(agree[confident].mean()), 4) if confident.any() else float("nan"),
        confident_samples=int(confident.sum()),
        samples=len(inputs),
        p50_ms=round(float(np.percentile(times, 50)), 3),
        p95_ms=round(float(np.percentile(times, 95)), 3),
        p99_ms=round(float(np.percentile(times, 99)), 3),
        best_images_per_s=round(best_rate, 1),
        best_batch=best_batch,
        gate=gate,
        accuracy=round(float((outputs.argmax(1) == labels)[labelled].mean()), 4) if labelled.any() else None,
        labelled_samples=int(labelled.sum()),
    )


def _float_layers(recipe: dict[str, str]) -> str:
    kept = recipe.get("float_layers", "none")
    return "" if kept == "none" else f" ({len(kept.split(','))} layers float)"


def latencies(runner: ort.InferenceSession, name: str, one: np.ndarray, runs: int) -> np.ndarray:
    for _ in range(5):
        runner.run(None, {name: one})
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        runner.run(None, {name: one})
        times.append((time.perf_counter() - t0) * 1000)
    return np.array(times)


def _best_throughput(runner: ort.InferenceSession, name: str, inputs: np.ndarray, seconds: float,
                     min_runs: int = 3) -> tuple[int, float]:
    best = (1, 0.0)
    for batch in (1, 4, 8, 16):
        x = np.ascontiguousarray(np.resize(inputs, (batch, *inputs.shape[1:])))
        runner.run(None, {name: x})
        n, t0 = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - t0) < seconds or n < min_runs:
            runner.run(None, {name: x})
            n += 1
        rate = batch * n / elapsed
        best = max(best, (batch, rate), key=lambda b: b[1])
    return best


def write(results: list[Evaluation], json_out: Path | None, markdown_out: Path | None) -> None:
    table = Table(title="edgefleet model evaluate")
    with_labels = any(r.accuracy is not None for r in results)
    for column in ("model", "MB", "top-1 agree", "top-1 (sure)", "top-5 agree", "p50/p95/p99 ms", "img/s (batch)",
                   "gate") + (("accuracy",) if with_labels else ()):
        table.add_column(column)
    for r in results:
        table.add_row(
            r.model, f"{r.size_mb:.1f}", f"{r.top1_agreement:.1%}",
            f"{r.top1_agreement_confident:.1%} of {r.confident_samples}", f"{r.top5_agreement:.1%}",
            f"{r.p50_ms:.2f}/{r.p95_ms:.2f}/{r.p99_ms:.2f}", f"{r.best_images_per_s:.0f} ({r.best_batch})", r.gate,
            *((f"{r.accuracy:.1%} of {r.labelled_samples}",) if with_labels else ()),
        )
    Console().print(table)
    columns = list(asdict(results[0]))
    if json_out:
        json_out.write_text(json.dumps([asdict(r) for r in results], indent=1))
    if markdown_out:
        lines = ["| " + " | ".join(c.replace("_", " ") for c in columns) + " |", "|" + " --- |" * len(columns)]
        lines += ["| " + " | ".join(str(v) for v in asdict(r).values()) + " |" for r in results]
        markdown_out.write_text("\n".join(lines) + "\n")
