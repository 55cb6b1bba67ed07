"""`edgefleet model cascade`: two models served as one (shared.cascade), its threshold chosen on held-out
images.

Both models run once on the held-out set. Stage 1's metric (margin: top-1 minus top-2 probability;
confidence: top-1 probability) is computed per image, and every distinct value of it is a place to cut:
images below the cut go to stage 2. For each cut the curve gives the share escalated, the top-1 agreement
of the cascade's answer with stage 2's own, and the mean model time per image, t_small + share × t_large,
from per-image model times measured here on one ONNX Runtime thread (the service runs one single-threaded
run per core) at batch 1 and at the service's default batch. The chosen threshold is the cheapest whose
agreement reaches the gate's target (below). Thresholds sit halfway between neighbouring distinct
values, so the split is the one measured and a rounding difference in how the service computes the metric
cannot move an image across it. The agreement a threshold must reach on the images it is chosen on is the
gate plus one standard error of a share measured on as many fresh images (`derive.gate_target`), so that
the gate holds on images it did not see: chosen exactly at 99 % on 150 held-out images, a threshold gave
98.8 % on the other 150 (mean of 400 random splits), chosen at the target 99.5 %.

Choosing on the set that then measures the choice flatters it. So the held-out set is also split in two
(even and odd files: the data set cycles through its photos, so each half sees all of them), the threshold
chosen on each half and measured on the other; the pooled result, every image judged by a threshold it
had no part in choosing, is the cascade's quality gate, and both folds and the in-sample figure are in
the manifest's recipe.

`serve()` runs a cascade as the inference service does, stage 1 on the whole batch and stage 2 on the
escalated frames as one sub-batch; `edgefleet bench cascade` times it against stage 2 alone.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

from edgefleet.models.derive import gate_target
from edgefleet.models.frames import load_inputs
from edgefleet.models.install import install
from edgefleet.models.outputs import logits, session
from edgefleet.progress import QUIET, Reporter
from services.inference.postprocess import top_k
from shared.cascade import CASCADE_FILE, STAGE_FOLDERS, CascadeMember, CascadeSpec, Metric, load_members, stage1_metric
from shared.manifest import MANIFEST_FILE, ModelError, ModelManifest, Quality, load_verified, make_dirs, sha256_of

# The service's default max batch (shared.config InferenceSettings.max_batch): the batched time basis.
SERVICE_BATCH = 8
# One ONNX Runtime thread per run, as the service's workers run (one single-threaded run per core).
THREADS = 1


@dataclass(frozen=True)
class Timing:
    """A model's measured model time per image on this machine."""

    model: str
    batch1_ms: float
    batched_ms: float
    batch: int


@dataclass(frozen=True)
class Point:
    """One threshold of the curve: stage 1's answer stands where its metric is >= threshold."""

    threshold: float
    escalated: float  # share of images sent to stage 2
    agreement: float  # the cascade's top-1 against stage 2's own
    ms_batch1: float  # mean model time per image, t_small + share × t_large, at batch 1
    ms_batched: float  # the same at the timings' batch


@dataclass(frozen=True)
class Fold:
    """The threshold chosen on one half of the held-out set, measured on the other."""

    chosen_on: str
    threshold: float
    agreement: float
    escalated: float
    samples: int


@dataclass
class Choice:
    """What `choose` measured and decided."""

    metric: Metric
    gate: float
    samples: int
    small: Timing
    large: Timing
    points: list[Point]
    chosen: Point
    folds: list[Fold] = field(default_factory=list)

    @property
    def cross_checked(self) -> float:
        """Agreement with every image judged by the threshold chosen on the other half (the in-sample
        figure where the set was too small to split): the quality gate's value."""
        if not self.folds:
            return self.chosen.agreement
        return sum(f.agreement * f.samples for f in self.folds) / sum(f.samples for f in self.folds)

    @property
    def passed(self) -> bool:
        return round(self.cross_checked, 4) >= self.gate


def scores(stage1_logits: np.ndarray, metric: Metric) -> np.ndarray:
    """Stage 1's metric per image (shared.cascade.CascadeSpec), as the inference service computes it: top-1
    probability, or top-1 minus top-2.

    Args:
        stage1_logits: (images, classes) raw outputs of stage 1.
        metric: "confidence" or "margin".

    Returns:
        (images,) float64 scores in [0, 1].
    """
    # The service's own computation (float32 softmax, top 2), so the values chosen on are those it serves by.
    return stage1_metric(top_k(stage1_logits, 2)[1], metric).astype(np.float64)


def cuts(values: np.ndarray) -> np.ndarray:
    """Thresholds that realise every split of `values` at a distinct value, each halfway between two
    neighbouring distinct values: 0 (nothing escalated) first, everything escalated last where the
    largest value is below 1."""
    distinct = np.unique(values)
    inner = (distinct[1:] + distinct[:-1]) / 2
    top = [(distinct[-1] + 1.0) / 2] if distinct[-1] < 1.0 else []
    return np.concatenate([[0.0], inner, top])


def sweep(values: np.ndarray, small_top1: np.ndarray, large_top1: np.ndarray, small: Timing,
          large: Timing) -> list[Point]:
    """The curve: for every cut of stage 1's metric, share escalated, agreement with stage 2, mean time.

    Args:
        values: stage 1's metric per image (`scores`).
        small_top1, large_top1: each stage's top-1 class per image.
        small, large: each stage's measured time per image.

    Returns:
        One Point per threshold, lowest threshold (nothing escalated) first.
    """
    thresholds = cuts(values)
    # Sorted once, so the sweep is O(n log n) whatever the set's size: below a cut k images escalate, and
    # the disagreements left are those of the images above it.
    order = np.argsort(values, kind="stable")
    disagree = np.concatenate([[0], np.cumsum(small_top1[order] != large_top1[order])])
    below = np.searchsorted(values[order], thresholds, side="left")
    shares = below / len(values)
    agreements = 1 - (disagree[-1] - disagree[below]) / len(values)
    return [Point(float(t), float(s), float(a), small.batch1_ms + s * large.batch1_ms,
                  small.batched_ms + s * large.batched_ms)
            for t, s, a in zip(thresholds, shares, agreements, strict=True)]


def cheapest(points: list[Point], gate: float) -> Point:
    """The cheapest point whose agreement reaches the gate; where none does, the most agreeing one
    (the caller marks the gate failed)."""
    passing = [p for p in points if p.agreement >= gate]
    if passing:
        return min(passing, key=lambda p: (p.ms_batch1, -p.agreement))
    return max(points, key=lambda p: (p.agreement, -p.ms_batch1))


def cross_check(values: np.ndarray, small_top1: np.ndarray, large_top1: np.ndarray, gate: float,
                small: Timing, large: Timing) -> list[Fold]:
    """The threshold chosen on the even images and measured on the odd ones, and the other way round.

    Returns:
        Two Folds (chosen on even, chosen on odd); none where the set has fewer than two images.
    """
    if len(values) < 2:
        return []
    halves = {"even": np.arange(0, len(values), 2), "odd": np.arange(1, len(values), 2)}
    folds = []
    for chose, measured in (("even", "odd"), ("odd", "even")):
        c, m = halves[chose], halves[measured]
        points = sweep(values[c], small_top1[c], large_top1[c], small, large)
        threshold = cheapest(points, gate_target(gate, len(m))).threshold
        escalated = values[m] < threshold
        agrees = escalated | (small_top1[m] == large_top1[m])
        folds.append(Fold(chose, threshold, float(agrees.mean()), float(escalated.mean()), len(m)))
    return folds


def measure_time(runner: ort.InferenceSession, input_name: str, inputs: np.ndarray, name: str,
                 batch: int = SERVICE_BATCH, seconds: float = 1.0) -> Timing:
    """A model's time per image at batch 1 (median single run) and at `batch` (median batch run / batch).

    Args:
        runner: the model's session (THREADS threads).
        input_name: its input.
        inputs: real preprocessed images; cycled to fill a batch.
        name: what the Timing calls the model.
        batch: the batched basis.
        seconds: about how long each basis runs (at least 5 runs each).
    """
    def median_ms(x: np.ndarray) -> float:
        runner.run(None, {input_name: x})  # warm-up: the first run allocates
        times: list[float] = []
        t_end = time.perf_counter() + seconds
        while len(times) < 5 or time.perf_counter() < t_end:
            t0 = time.perf_counter()
            runner.run(None, {input_name: x})
            times.append(time.perf_counter() - t0)
        return float(np.median(times)) * 1000 / len(x)

    batched = np.ascontiguousarray(np.resize(inputs, (batch, *inputs.shape[1:])))
    return Timing(name, round(median_ms(inputs[:1]), 4), round(median_ms(batched), 4), batch)


def choose(small_dir: Path, large_dir: Path, eval_dir: Path, metric: Metric = "margin", gate: float = 0.99, *,
           limit: int | None = None, seconds: float = 1.0,
           progress: Reporter = QUIET) -> Choice:
    """Runs both models on the held-out images, sweeps stage 1's metric and picks the cheapest threshold
    whose agreement with stage 2 reaches the gate (module docstring).

    Args:
        small_dir, large_dir: stage 1's and stage 2's model folders.
        eval_dir: held-out images (`edgefleet model dataset`).
        metric: stage 1's metric.
        gate: least top-1 agreement with stage 2.
        limit: use at most this many images.
        seconds: about how long each timing runs.
        progress: shown the images read and each long step (running, timing the models).

    Returns:
        The curve, the chosen point, the 2-fold cross-check and the timings.

    Raises:
        ModelError: a folder that does not verify, or models with other labels or preprocessing.
        FileNotFoundError: no images in eval_dir.
    """
    small, small_path = load_verified(small_dir)
    large, large_path = load_verified(large_dir)
    _same_interface(small, large)
    inputs = load_inputs(eval_dir, large, limit, progress=progress)
    runners = session(small_path, THREADS), session(large_path, THREADS)
    with progress.task(f"running {small.name} on {len(inputs)} images"):
        small_logits = logits(runners[0], small.input.name, inputs)
    with progress.task(f"running {large.name} on {len(inputs)} images"):
        large_logits = logits(runners[1], large.input.name, inputs)
    with progress.task("timing both models"):
        timings = (measure_time(runners[0], small.input.name, inputs, small.name, seconds=seconds),
                   measure_time(runners[1], large.input.name, inputs, large.name, seconds=seconds))
    values = scores(small_logits, metric)
    tops = small_logits.argmax(1), large_logits.argmax(1)
    points = sweep(values, *tops, *timings)
    return Choice(metric, gate, len(inputs), *timings, points, cheapest(points, gate_target(gate, len(inputs))),
                  cross_check(values, *tops, gate, *timings))


def _same_interface(small: ModelManifest, large: ModelManifest) -> None:
    if small.labels != large.labels or small.preprocessing != large.preprocessing:
        raise ModelError(f"{small.name} and {large.name} have other labels or preprocessing: not one cascade")


def quality_of(choice: Choice, eval_dir: Path) -> Quality:
    """The cascade's quality gate: agreement with stage 2, every image judged by a threshold chosen on the
    other half of the held-out set (the in-sample figure would pass by construction)."""
    return Quality(metric="top1_agreement", value=round(choice.cross_checked, 4), threshold=choice.gate,
                   samples=choice.samples,
                   measured_on=f"{eval_dir} (2-fold: threshold chosen on one half, measured on the other)",
                   passed=choice.passed)


def recipe_of(choice: Choice) -> dict[str, str]:
    """How the threshold was chosen, for the manifest: the gate, the in-sample point, both folds, the timings."""
    c = choice.chosen
    recipe = {
        "chosen_on": f"{choice.samples} held-out images: the cheapest of {len(choice.points)} thresholds whose "
                     f"agreement with stage 2 reaches {_target_words(choice.gate, choice.samples)}",
        "in_sample": f"agreement {c.agreement:.4f}, escalated {c.escalated:.4f}",
        "model_ms_per_image": f"{c.ms_batch1:.3f} at batch 1, {c.ms_batched:.3f} at batch {choice.small.batch} "
                              f"(stage 1 {choice.small.batch1_ms:.3f}/{choice.small.batched_ms:.3f}, stage 2 "
                              f"{choice.large.batch1_ms:.3f}/{choice.large.batched_ms:.3f}; {THREADS} thread)",
    }
    for f in choice.folds:
        recipe[f"cross_check_{f.chosen_on}"] = (
            f"threshold {f.threshold:.6g} chosen on the {f.chosen_on} half; on the other {f.samples} images: "
            f"agreement {f.agreement:.4f}, escalated {f.escalated:.4f}")
    return recipe


def _target_words(gate: float, samples: int) -> str:
    """'0.9957 (the gate 0.99 plus one standard error)', or '1 (the gate 0.99 plus one standard error,
    capped at all of them)' on a small set."""
    target = gate_target(gate, samples)
    capped = target >= 1.0 and 0 < gate < 1
    return f"{target:.4g} (the gate {gate:g} plus one standard error{', capped at all of them' if capped else ''})"


def build(small_dir: Path, large_dir: Path, out_dir: Path, eval_dir: Path, *, name: str | None = None, version: int = 1,
          metric: Metric = "margin", gate: float = 0.99, limit: int | None = None, seconds: float = 1.0,
          progress: Reporter = QUIET) -> tuple[ModelManifest, Choice]:
    """`choose`, then `assemble` the cascade folder with the chosen threshold, its quality gate and recipe.

    Args:
        name: the cascade's name (default: stage 2's name + "-cascade"); the rest as `choose`/`assemble`.

    Returns:
        The cascade's verified manifest and the choice behind it.

    Raises:
        ModelError, FileNotFoundError: as `choose` and `assemble`.
    """
    choice = choose(small_dir, large_dir, eval_dir, metric, gate, limit=limit, seconds=seconds, progress=progress)
    name = name or f"{load_verified(large_dir)[0].name}-cascade"
    manifest = assemble(small_dir, large_dir, out_dir, name=name, version=version, metric=metric,
                        threshold=choice.chosen.threshold, quality=quality_of(choice, eval_dir),
                        recipe=recipe_of(choice))
    return manifest, choice


@dataclass(frozen=True)
class Served:
    """A cascade's answers on a set of frames, run as the service runs it."""

    top1: np.ndarray
    escalated: int
    seconds: float  # model time only: both stages' runs and the metric between them


def serve(stage1: ort.InferenceSession, stage2: ort.InferenceSession, input_name: str, inputs: np.ndarray,
          metric: Metric, threshold: float, batch: int = SERVICE_BATCH) -> Served:
    """Runs the cascade batch by batch: stage 1 on the whole batch, then stage 2 once on the sub-batch of
    frames whose metric is below the threshold.

    Args:
        stage1, stage2: the members' sessions.
        input_name: the (shared) input name.
        inputs: preprocessed frames.
        metric, threshold: as the cascade's spec.
        batch: frames per batch.
    """
    top1 = np.empty(len(inputs), dtype=np.int64)
    escalated, seconds = 0, 0.0
    for start in range(0, len(inputs), batch):
        x = inputs[start : start + batch]
        t0 = time.perf_counter()
        first = stage1.run(None, {input_name: x})[0]
        unsure = scores(first, metric) < threshold
        answer = first.argmax(1)
        if unsure.any():
            answer[unsure] = stage2.run(None, {input_name: np.ascontiguousarray(x[unsure])})[0].argmax(1)
        seconds += time.perf_counter() - t0
        top1[start : start + len(x)] = answer
        escalated += int(unsure.sum())
    return Served(top1, escalated, seconds)


def assemble(small_dir: Path, large_dir: Path, out_dir: Path, *, name: str, version: int,
             metric: Metric, threshold: float, quality: Quality | None = None,
             recipe: dict[str, str] | None = None) -> ModelManifest:
    """Writes a cascade folder: both members copied whole, cascade.json pinning them, its manifest last.

    Args:
        small_dir: stage 1's model folder (answers when its metric clears the threshold).
        large_dir: stage 2's model folder (answers the escalated frames); its labels, input and
            preprocessing become the cascade's.
        out_dir: where the cascade folder goes (replaced if it exists).
        name, version: the cascade's own name and version.
        metric, threshold: when stage 1's answer stands (shared.cascade.CascadeSpec).
        quality: the cascade's quality gate (agreement with the large model on held-out images).
        recipe: how the threshold was chosen, for the manifest.

    Returns:
        The cascade's verified manifest.

    Raises:
        ModelError: a member that does not verify, members with other labels or preprocessing, or an
            out_dir that holds something other than a cascade (or a member itself): nothing is replaced.
    """
    small, _ = load_verified(small_dir)
    large, _ = load_verified(large_dir)
    if small.labels != large.labels or small.preprocessing != large.preprocessing:
        raise ModelError(f"{small.name} and {large.name} have other labels or preprocessing: not one cascade")
    spec = CascadeSpec(metric=metric, threshold=threshold, stages=[
        CascadeMember(folder=folder, name=m.name, version=m.version, sha256=m.sha256, size_bytes=m.size_bytes)
        for folder, m in zip(STAGE_FOLDERS, (small, large), strict=True)
    ])
    _replaceable(out_dir, small_dir, large_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    make_dirs(out_dir)
    for folder, source in zip(STAGE_FOLDERS, (small_dir, large_dir), strict=True):
        make_dirs(out_dir / folder)
        for file in (source / MANIFEST_FILE, source / load_verified(source)[0].file):
            shutil.copy2(file, out_dir / folder / file.name)
    with tempfile.NamedTemporaryFile("w", dir=out_dir, suffix=".json", delete=False) as f:
        f.write(spec.model_dump_json(indent=1))
    staged = Path(f.name)
    manifest = ModelManifest(**{
        **large.model_dump(exclude={"name", "version", "sha256", "size_bytes", "file", "recipe", "parent_sha256",
                                    "quality", "created_at"}),
        "name": name, "version": version, "file": CASCADE_FILE,
        "sha256": sha256_of(staged), "size_bytes": staged.stat().st_size,
        "recipe": {"kind": "cascade", "stage1": f"{small.name} v{small.version}",
                   "stage2": f"{large.name} v{large.version}", "metric": metric, "threshold": f"{threshold:.6g}",
                   **(recipe or {})},
        "parent_sha256": large.sha256, "quality": quality, "created_at": time.time(),
    })
    installed = install(staged, manifest, out_dir)
    load_members(out_dir, installed)
    return installed


def _replaceable(out_dir: Path, *members: Path) -> None:
    """Refuses an out_dir whose replacement would lose something: a member's own folder or one holding
    it, or an existing folder that is not an earlier cascade (an operator's typo must not delete a model)."""
    out = out_dir.resolve()
    for member in members:
        if out == member.resolve() or out in member.resolve().parents:
            raise ModelError(f"{out_dir} holds the member {member}: the cascade goes in a folder of its own")
    if not out_dir.exists() or (out_dir.is_dir() and not any(out_dir.iterdir())):
        return
    try:
        earlier = ModelManifest.model_validate_json((out_dir / MANIFEST_FILE).read_bytes())
    except (OSError, ValueError):
        earlier = None
    if earlier is None or earlier.file != CASCADE_FILE:
        raise ModelError(f"{out_dir} exists and is not a cascade folder: not replaced (choose another --out)")
