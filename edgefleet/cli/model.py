"""`edgefleet model ...`: build, make data sets, quantize, prune, distil, evaluate and publish models."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from edgefleet.cli.common import BenchJson, ConfigFile, fail, load_settings, reported
from edgefleet.progress import shown
from shared.config import DEFAULT_KEY_DIR, DEFAULT_MODEL_DIR, StoreSettings, describe_keys
from shared.errors import EdgefleetError

if TYPE_CHECKING:
    from rich.table import Table

    from edgefleet.models.distill import Training
    from edgefleet.models.evaluate import Evaluation
    from edgefleet.models.prune import PruneReport
    from edgefleet.models.quantize import Report as QuantizeReport
    from shared.manifest import ModelManifest

app = typer.Typer(no_args_is_help=True, help="Build and manage models.")

DATA_DIR = Path("var/data")

Epochs = Annotated[int, typer.Option(min=1, help="Passes over the frames.")]
Batch = Annotated[int, typer.Option(min=1, help="Frames per training step.")]
LearningRate = Annotated[float, typer.Option(min=0, help="Adam's learning rate.")]
Temperature = Annotated[float, typer.Option(min=0.1, help="Softens teacher and student outputs.")]
Alpha = Annotated[float, typer.Option(
    min=0, max=1, help="Weight of the teacher's soft labels (the rest: true labels, where a frame has one).")]
Gate = Annotated[float, typer.Option(min=0, max=1, help="Least top-1 agreement with the parent to pass.")]
Frames = Annotated[Path, typer.Option(
    help="Training frames; a sub-folder named after a label gives its frames that true label.")]
EvalDir = Annotated[Path, typer.Option("--eval", help="Held-out images for the quality gate.")]

# What a model command may fail on, worded for a person: a bad or missing model (ModelError), a missing
# frames folder, an out-of-range recipe value.
MODEL_ERRORS = (EdgefleetError, FileNotFoundError, ValueError)


@app.command("build")
def model_build(
    out: Annotated[Path, typer.Option(help="Where model.onnx and manifest.json go.")] = DEFAULT_MODEL_DIR,
    force: Annotated[bool, typer.Option(help="Rebuild even if a verified model is there.")] = False,
) -> None:
    """Export EfficientNet-Lite0 (real ImageNet weights) to ONNX with a manifest; cached once built."""
    from edgefleet.models.build import build

    with reported("model build", EdgefleetError), shown() as progress:
        manifest, built = build(out, force, progress=progress)
        progress.summary(f"{'built' if built else 'cached'} {manifest.name} v{manifest.version} → {out}: "
                         f"{_mb(manifest.size_bytes)}, sha256 {manifest.sha256[:16]}…")


@app.command("dataset")
def model_dataset(
    out: Annotated[Path, typer.Option(help="Where eval/ and calibration/ go.")] = DATA_DIR,
    eval_count: Annotated[int, typer.Option(min=1, help="Held-out evaluation images.")] = 300,
    calibration_count: Annotated[int, typer.Option(min=1, help="Calibration images.")] = 128,
) -> None:
    """Make the evaluation and calibration images from real photos (fixed seeds, disjoint sets)."""
    from edgefleet.models import dataset

    with shown() as progress:
        index = dataset.make(out, eval_count, calibration_count, progress=progress)
        counts = {split: len(v["images"]) for split, v in index["splits"].items()}
        progress.summary(f"wrote {counts} images to {out}")


@app.command("quantize")
def model_quantize(
    mode: Annotated[str, typer.Option(help="static (QDQ, per-channel, calibrated) or dynamic.")] = "static",
    parent: Annotated[Path, typer.Option(help="The float model's folder.")] = DEFAULT_MODEL_DIR,
    out: Annotated[Path | None, typer.Option(help="Where the INT8 model goes (default: beside the parent).")] = None,
    calibration: Annotated[Path, typer.Option(
        help="Real frames to calibrate on (e.g. the fleet's hard examples).")] = DATA_DIR / "calibration",
    eval_dir: EvalDir = DATA_DIR / "eval",
    method: Annotated[str, typer.Option(help="minmax, entropy or percentile.")] = "minmax",
    weight_type: Annotated[str, typer.Option(help="qint8 or quint8.")] = "qint8",
    gate: Gate = 0.97,
    max_float_layers: Annotated[int, typer.Option(
        min=0, help="Mixed precision: most layers kept in float, worst first, until half the held-out images meet "
        "the gate (the other half alone measures it; 0: none, and the whole set measures it).")] = 24,
) -> None:
    """INT8 with onnxruntime.quantization; writes model.onnx and a manifest with recipe and quality gate."""
    from edgefleet.models.quantize import Method, Mode, WeightType, derived_name, quantize

    with reported("model quantize", ValueError, code=2):
        chosen = Mode(mode), Method(method), WeightType(weight_type)
    target = out or parent.with_name(derived_name(parent.name, chosen[0], chosen[1]))
    with reported("model quantize", *MODEL_ERRORS), shown() as progress:
        manifest, report = quantize(parent, target, chosen[0], eval_dir, calibration, chosen[1], chosen[2], gate,
                                    max_float_layers, progress=progress)
        _quantize_details(manifest, report)
        progress.summary(f"quantized {parent.name} → {target}: {_mb(manifest.size_bytes)} "
                         f"(was {_mb(_model_bytes(parent))}), {_verdict(manifest)}")


def _quantize_details(manifest: ModelManifest, report: QuantizeReport) -> None:
    """What the quantizer left in float and why, and a failed gate's warning: the lines above the summary."""
    typer.echo(f"{manifest.name}: {_gate_line(manifest)}; left in float (no INT8 rule): {report.left_in_float()}",
               err=True)
    for name, shift, agreement in report.float_layers:
        typer.echo(f"  kept in float: {name} (output shift KL {shift:.4f} when quantized alone; "
                   f"selection-half agreement {agreement:.1%} with it in float)", err=True)
    if report.selection_samples:
        typer.echo(f"held-out split: {report.selection_samples} images chose the float layers "
                   f"({report.selection_agreement:.1%} agreement), the other {report.samples} alone measured the "
                   "gate", err=True)
    if warning := report.warning():
        typer.secho(f"WARNING: {manifest.name} is not publishable: {warning}", err=True, fg="red")


@app.command("prune")
def model_prune(
    parent: Annotated[Path, typer.Option(help="The float model's folder.")] = DEFAULT_MODEL_DIR,
    out: Annotated[Path | None, typer.Option(help="Where the pruned model goes (default: beside the parent).")] = None,
    ratio: Annotated[float, typer.Option(
        min=0.01, max=0.95, help="Share of channels (structured) or weights (unstructured) removed.")] = 0.2,
    unstructured: Annotated[bool, typer.Option(
        help="Zero single weights instead of removing channels (no speed-up; for comparison).")] = False,
    frames: Frames = DATA_DIR / "calibration",
    eval_dir: EvalDir = DATA_DIR / "eval",
    threads: Annotated[int, typer.Option(min=0, help="ONNX Runtime threads for the latency figures.")] = 1,
    epochs: Epochs = 3, batch: Batch = 16, learning_rate: LearningRate = 1e-4,
    temperature: Temperature = 4.0, alpha: Alpha = 0.9, gate: Gate = 0.97,
) -> None:
    """Structured channel pruning (torch-pruning), fine-tuned on the parent's outputs, exported smaller."""
    from edgefleet.models.prune import prune

    kind = "unstructured" if unstructured else "structured"
    target = out or parent.with_name(f"{parent.name}-pruned-{kind}-{round(ratio * 100)}")
    with reported("model prune", *MODEL_ERRORS), shown() as progress:
        manifest, report = prune(parent, target, frames, eval_dir, ratio, not unstructured,
                                 _training(epochs, batch, learning_rate, temperature, alpha), gate, threads,
                                 progress=progress)
        console = progress.console
        console.print(prune_table(f"{manifest.name}: {kind} pruning, {ratio:.0%}", report, threads))
        if report.note:
            console.print(f"[yellow]NOTE: {report.note}[/]")
        typer.echo(f"{manifest.name}: {_gate_line(manifest)}; fine-tune {report.fit.steps} steps, loss "
                   f"{report.fit.first_loss:.3f} -> {report.fit.last_loss:.3f}", err=True)
        progress.summary(f"pruned {parent.name} ({kind}, {ratio:.0%}) → {target}: {_mb(report.after.size_bytes)} "
                         f"(was {_mb(report.before.size_bytes)}), p50 {report.after.p50_ms:.2f} ms "
                         f"(was {report.before.p50_ms:.2f}), {_verdict(manifest)}")


@app.command("distill")
def model_distill(
    parent: Annotated[Path, typer.Option("--teacher", help="The float teacher's folder.")] = DEFAULT_MODEL_DIR,
    out: Annotated[Path | None, typer.Option(help="Where the student goes (default: beside the teacher).")] = None,
    drop_blocks: Annotated[int, typer.Option(min=1, max=9, help="Residual blocks the student goes without.")] = 5,
    frames: Frames = DATA_DIR / "calibration",
    eval_dir: EvalDir = DATA_DIR / "eval",
    epochs: Epochs = 3, batch: Batch = 16, learning_rate: LearningRate = 1e-4,
    temperature: Temperature = 4.0, alpha: Alpha = 0.9, gate: Gate = 0.97,
) -> None:
    """Trains a smaller student on the teacher's soft labels (and true labels where there are any)."""
    from edgefleet.models.distill import distill

    target = out or parent.with_name(f"{parent.name}-distilled-{16 - drop_blocks}blocks")
    with reported("model distill", *MODEL_ERRORS), shown() as progress:
        manifest, report = distill(parent, target, frames, eval_dir, drop_blocks,
                                   _training(epochs, batch, learning_rate, temperature, alpha), gate,
                                   progress=progress)
        typer.echo(
            f"{manifest.name}: without blocks {report.dropped_blocks}; parameters {report.before.parameters:,} -> "
            f"{report.after.parameters:,}, MMACs {report.before.macs / 1e6:.0f} -> {report.after.macs / 1e6:.0f}; "
            f"{report.fit.frames} frames ({report.fit.labelled_frames} labelled), loss {report.fit.first_loss:.3f} "
            f"-> {report.fit.last_loss:.3f}; {_gate_line(manifest)}", err=True,
        )
        progress.summary(f"distilled {parent.name} → {target}: {_mb(manifest.size_bytes)} "
                         f"(was {_mb(_model_bytes(parent))}), {report.after.macs / 1e6:.0f} MMACs "
                         f"(was {report.before.macs / 1e6:.0f}), {_verdict(manifest)}")


@app.command("publish", epilog=describe_keys(StoreSettings))
def model_publish(
    model: Annotated[Path, typer.Argument(
        help="The model's folder (model.onnx and manifest.json), or a cascade's (`model cascade`).")],
    key: Annotated[Path, typer.Option(help="The operator's Ed25519 private key.")] = DEFAULT_KEY_DIR / "operator.key",
    name: Annotated[str | None, typer.Option(help="Publish under this name (default: the manifest's).")] = None,
    version: Annotated[int | None, typer.Option(
        min=1, max=10**9, help="Version number (default: one past every version in the registry; if a racing "
        "publish takes that one first, the next free one).")] = None,
    config: ConfigFile = None,
) -> None:
    """Sign and upload a model to the S3 registry as the next free version of its name (or --version, if
    free), and print the version (a cascade: its members first, where the registry lacks them). Refuses
    gate-failed models, taken and stale versions. Keys:"""
    import time

    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TaskID, TextColumn, TransferSpeedColumn

    from edgefleet.publish import publish
    from shared import s3

    settings = load_settings(StoreSettings, config)
    started = time.monotonic()
    bars = Progress(TextColumn("uploading {task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                    console=Console(stderr=True), transient=True)
    tasks: dict[str, TaskID] = {}

    def uploaded(key: str, done: int, total: int) -> None:
        if key not in tasks:
            tasks[key] = bars.add_task(key, total=total)
        bars.update(tasks[key], completed=done)

    # PublishRefused and ModelError are EdgefleetErrors; ValueError: a bad name or key.
    with bars, reported("model publish: refused", EdgefleetError, ValueError, FileNotFoundError):
        done = publish(s3.client(settings), settings.registry_bucket, model, key, name, version, progress=uploaded)
    for member in done.members:
        typer.echo(f"published the member {member.name} v{member.version} (sha256 {member.sha256[:16]}…)", err=True)
    sent = sum(bars.tasks[i].completed for i in tasks.values())
    typer.echo(f"published {done.name} v{done.version} (sha256 {done.sha256[:16]}…, signed by key {done.key_id}) "
               f"at s3://{settings.registry_bucket}/{done.prefix}; {sent / 1e6:.1f} MB in "
               f"{time.monotonic() - started:.1f} s", err=True)
    typer.echo(done.version)  # stdout: the version alone, for a script (`V=$(edgefleet model publish …)`)


@app.command("evaluate")
def model_evaluate(
    models: Annotated[list[Path], typer.Argument(help="Model folders to compare.")],
    teacher: Annotated[Path, typer.Option(help="The float model agreement is measured against.")] = DEFAULT_MODEL_DIR,
    eval_dir: Annotated[Path, typer.Option("--eval", help="Held-out images.")] = DATA_DIR / "eval",
    threads: Annotated[int, typer.Option(min=0, help="ONNX Runtime threads (0: all cores).")] = 0,
    json_out: BenchJson = None,
    markdown: Annotated[Path | None, typer.Option(help="Write a Markdown table here.")] = None,
    plot: Annotated[Path | None, typer.Option(
        help="Write a PNG of agreement against latency, Pareto front marked.")] = None,
) -> None:
    """Size, agreement with the float teacher, latency p50/p95/p99 and best throughput, on held-out images."""
    from edgefleet.models.evaluate import evaluate, write

    with reported("model evaluate", EdgefleetError, FileNotFoundError), shown() as progress:
        results = evaluate(models, teacher, eval_dir, threads, progress=progress)
        write(results, json_out, markdown)
        if plot is not None:
            from edgefleet.models.plot import save

            save(results, plot)
        progress.summary(_evaluated(results, [p for p in (json_out, markdown, plot) if p is not None]))


@app.command("cascade")
def model_cascade(
    small: Annotated[Path, typer.Argument(help="Stage 1's folder: the fast model (e.g. static INT8).")],
    large: Annotated[Path, typer.Argument(help="Stage 2's folder: the model the cascade must agree with.")],
    gate: Annotated[float, typer.Option(min=0, max=1, help="Least top-1 agreement with LARGE to pass.")] = 0.99,
    metric: Annotated[str, typer.Option(
        help="Stage 1's certainty: margin (top-1 minus top-2 probability) or confidence (top-1).")] = "margin",
    eval_dir: EvalDir = DATA_DIR / "eval",
    out: Annotated[Path | None, typer.Option(help="Where the cascade folder goes (default: beside LARGE).")] = None,
    name: Annotated[str | None, typer.Option(help="The cascade's name (default: LARGE's name + -cascade).")] = None,
    version: Annotated[int, typer.Option(min=1, max=10**9, help="The cascade's version.")] = 1,
    plot: Annotated[Path | None, typer.Option(
        help="The curve's PNG (default: beside the folder, <out>-curve.png; the CSV beside it).")] = None,
) -> None:
    """Two models served as one: the cheapest stage-1 threshold whose agreement with LARGE meets the gate
    plus one standard error on the held-out images (so the gate holds on images the choice did not see)."""
    from edgefleet.models import cascade, curve

    if metric not in ("margin", "confidence"):
        raise fail("model cascade", f"--metric is margin or confidence, not {metric!r}", code=2)
    chosen_metric: cascade.Metric = "margin" if metric == "margin" else "confidence"
    target = out or large.with_name(f"{large.name}-cascade")
    picture = plot or target.with_name(f"{target.name}-curve.png")
    with reported("model cascade", *MODEL_ERRORS), shown() as progress:
        manifest, choice = cascade.build(small, large, target, eval_dir, name=name, version=version,
                                         metric=chosen_metric, gate=gate, progress=progress)
        progress.console.print(curve.table(choice, f"{manifest.name}: {choice.metric} of {choice.small.model}"))
        curve.save(choice, picture)
        curve.write_csv(choice, picture.with_suffix(".csv"))
        if not choice.passed:
            typer.secho(f"WARNING: {manifest.name} is not publishable: {choice.cross_checked:.1%} agreement, each "
                        f"image judged by the threshold chosen on the other half of {choice.samples} held-out "
                        f"images, is below the gate {gate:.0%}.", err=True, fg="red")
        c = choice.chosen
        progress.summary(
            f"{manifest.name} v{manifest.version}: {choice.metric} >= {c.threshold:.4g} stands, {c.escalated:.1%} "
            f"escalated; agreement with {choice.large.model} {c.agreement:.1%} in sample, "
            f"{choice.cross_checked:.1%} cross-checked (gate {gate:.0%}: "
            f"{'passed' if choice.passed else 'FAILED, not publishable'}); {c.ms_batched:.2f} ms/img at batch "
            f"{choice.large.batch} = {c.ms_batched / choice.large.batched_ms:.2f} x {choice.large.model} -> {target}, "
            f"curve {picture}")


def _training(epochs: int, batch: int, learning_rate: float, temperature: float, alpha: float) -> Training:
    from edgefleet.models.distill import Training

    return Training(epochs=epochs, batch=batch, learning_rate=learning_rate, temperature=temperature, alpha=alpha)


def _mb(size_bytes: int) -> str:
    return f"{size_bytes / 1e6:.1f} MB"


def _model_bytes(folder: Path) -> int:
    """The size of a (verified) model folder's model file, for a "was" figure."""
    from shared.manifest import MODEL_FILE

    return (folder / MODEL_FILE).stat().st_size


def _verdict(manifest: ModelManifest) -> str:
    """'held-out agreement 95.3% on 300 images (gate 90%) ✓': a derived model's quality gate, for a summary."""
    q = manifest.quality
    if q is None:
        return "no quality gate"
    mark = "✓" if q.passed else "✗ FAILED, not publishable"
    return f"held-out agreement {q.value:.1%} on {q.samples} images (gate {q.threshold:.0%}) {mark}"


def _evaluated(results: list[Evaluation], written: list[Path]) -> str:
    """'evaluated 3 model(s) on 300 held-out images: …': the closest to the teacher, the fastest, what was written."""
    closest = max(results, key=lambda r: r.top1_agreement)
    fastest = min(results, key=lambda r: r.p50_ms)
    files = f"; wrote {', '.join(map(str, written))}" if written else ""
    return (f"evaluated {len(results)} model(s) on {results[0].samples} held-out images: closest to the teacher "
            f"{closest.model} ({closest.top1_agreement:.1%} top-1), fastest {fastest.model} "
            f"({fastest.p50_ms:.2f} ms p50){files}")


def _gate_line(manifest: ModelManifest) -> str:
    q = manifest.quality
    return (f"top-1 agreement with the parent {q.value:.1%} on {q.samples} held-out images "
            f"(gate {q.threshold:.0%}: {'passed' if q.passed else 'FAILED, not publishable'})")


def prune_table(title: str, report: PruneReport, threads: int) -> Table:
    """The model before and after pruning: parameters, zero weights, MACs, file size, latency."""
    from rich.table import Table

    table = Table(title=title)
    for column in ("", "parameters", "zero weights", "MMACs / image", "file MB",
                   f"p50 ms, batch 1, {threads} thread(s)"):
        table.add_column(column, justify="right")
    for label, f in (("before", report.before), ("after", report.after)):
        table.add_row(label, f"{f.cost.parameters:,}", f"{f.cost.zero_parameters:,}", f"{f.cost.macs / 1e6:.0f}",
                      f"{f.size_bytes / 1e6:.2f}", f"{f.p50_ms:.2f}")
    return table
