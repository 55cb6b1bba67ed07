"""`edgefleet model distill`, and the training loop pruning's fine-tune shares with it.

The student learns the teacher's soft labels (Hinton et al.: KL divergence between the two softened
by a temperature T, scaled by T^2) and, where a frame has a true label, the cross-entropy on it,
mixed by alpha. Teacher outputs are computed once per frame (and per flip), not per step: the teacher
never changes.

The student here is the teacher with some residual blocks removed and the rest of its weights kept,
the way DistilBERT starts from every other layer of BERT: a student trained from scratch on a few
hundred frames would learn nothing worth shipping. A residual block maps its input to an output of the
same shape, so without it the network still fits together.

BatchNorm statistics and dropout stay frozen (eval mode) while training: batches of a few frames from
a handful of scenes would drag the running statistics away from ImageNet's.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgefleet.models.cost import Cost, cost
from edgefleet.models.derive import install_derived, measure_quality
from edgefleet.models.frames import UNLABELLED, load_inputs, load_labelled
from edgefleet.models.network import export, teacher_for
from edgefleet.progress import QUIET, Reporter
from shared.manifest import ModelManifest, load_verified

# Residual blocks of EfficientNet-Lite0 (stride 1, as many channels out as in), in the order they are
# dropped: first one per stage, deepest stage first, then a second round.
DROPPABLE_BLOCKS = (14, 10, 7, 4, 2, 13, 9, 6, 12)


@dataclass(frozen=True)
class Training:
    epochs: int = 3
    batch: int = 16
    learning_rate: float = 1e-4
    temperature: float = 4.0
    # Weight of the soft (teacher) loss; 1 - alpha goes to the true labels where there are any.
    alpha: float = 0.9
    seed: int = 0

    def recipe(self) -> dict[str, str]:
        return {"epochs": str(self.epochs), "batch": str(self.batch), "learning_rate": str(self.learning_rate),
                "temperature": str(self.temperature), "alpha": str(self.alpha), "seed": str(self.seed),
                "optimizer": "Adam", "augmentation": "horizontal flip"}


@dataclass
class Fit:
    steps: int
    first_loss: float
    last_loss: float
    labelled_frames: int
    frames: int
    seconds: float


def fit(student, teacher, inputs: np.ndarray, labels: np.ndarray, training: Training, title: str, *,
        progress: Reporter = QUIET) -> Fit:
    """Trains `student` on `teacher`'s soft labels (and the true labels where known), one progress unit per step."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(training.seed)
    rng = np.random.default_rng(training.seed)
    started = time.monotonic()
    frames = torch.from_numpy(inputs)
    with torch.no_grad(), progress.task(f"the teacher's soft labels for {len(inputs)} frames"):
        soft = {flip: _batched(teacher, frames.flip(3) if flip else frames) for flip in (False, True)}
    targets = torch.from_numpy(labels)
    student.eval()
    optimizer = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=training.learning_rate)
    t = training.temperature
    losses = []
    steps = training.epochs * -(-len(inputs) // training.batch)
    with progress.task(f"{title}: {training.epochs} epochs", steps) as task:
        for _ in range(training.epochs):
            order = rng.permutation(len(inputs))
            for start in range(0, len(order), training.batch):
                idx = torch.from_numpy(order[start : start + training.batch])
                flip = bool(rng.integers(2))
                x = frames[idx].flip(3) if flip else frames[idx]
                out = student(x)
                loss = F.kl_div(F.log_softmax(out / t, 1), F.softmax(soft[flip][idx] / t, 1),
                                reduction="batchmean") * t * t
                known = targets[idx] != UNLABELLED
                if known.any():
                    loss = (training.alpha * loss
                            + (1 - training.alpha) * F.cross_entropy(out[known], targets[idx][known]))
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
                task.advance()
    return Fit(steps=len(losses), first_loss=losses[0], last_loss=losses[-1],
               labelled_frames=int((labels != UNLABELLED).sum()), frames=len(inputs),
               seconds=time.monotonic() - started)


def _batched(network, frames, batch: int = 32):
    import torch

    return torch.cat([network(frames[i : i + batch]) for i in range(0, len(frames), batch)])


def student_without_blocks(network, drop: int):
    """A copy of the network with `drop` residual blocks removed; every other weight is the teacher's."""
    import copy

    import torch

    if not 0 < drop <= len(DROPPABLE_BLOCKS):
        raise ValueError(f"drop between 1 and {len(DROPPABLE_BLOCKS)} residual blocks, not {drop}")
    student = copy.deepcopy(network)
    gone = set(DROPPABLE_BLOCKS[:drop])
    student._blocks = torch.nn.ModuleList(b for i, b in enumerate(student._blocks) if i not in gone)
    return student


@dataclass
class DistillReport:
    before: Cost
    after: Cost
    dropped_blocks: list[int]
    fit: Fit
    agreement: float = 0.0
    samples: int = 0


def distill(parent_dir: Path, out_dir: Path, frames_dir: Path, eval_dir: Path, drop_blocks: int = 5,
            training: Training = Training(), gate: float = 0.97, frame_limit: int | None = None,
            eval_limit: int | None = None, *, progress: Reporter = QUIET) -> tuple[ModelManifest, DistillReport]:
    """Trains a student without `drop_blocks` residual blocks on the teacher's outputs and installs it with
    its quality gate (module docstring); `progress` shows images read, the conversion, training steps, export."""
    parent, parent_path = load_verified(parent_dir)
    inputs, labels = load_labelled(frames_dir, parent, frame_limit, progress=progress)
    held_out = load_inputs(eval_dir, parent, eval_limit, progress=progress)
    with progress.task("converting the ONNX teacher to torch"):
        network = teacher_for(parent_path, parent.input.name, held_out[:4])
    student = student_without_blocks(network, drop_blocks)
    result = fit(student, network, inputs, labels, training, f"distilling into a {len(student._blocks)}-block student",
                 progress=progress)
    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp) / "model.onnx"
        with progress.task("exporting the student to ONNX"):
            export(student, staged, parent.preprocessing.crop)
        report = DistillReport(before=cost(parent_path), after=cost(staged),
                               dropped_blocks=sorted(DROPPABLE_BLOCKS[:drop_blocks]), fit=result)
        with progress.task(f"measuring agreement with the teacher on {len(held_out)} held-out images"):
            quality = measure_quality(parent_path, staged, parent.input.name, held_out, eval_dir, gate)
        report.agreement, report.samples = quality.value, quality.samples
        recipe = {
            "method": "knowledge distillation (soft labels, KL at temperature T, x T^2; cross-entropy on true labels)",
            "student": f"{parent.name} without residual blocks {report.dropped_blocks}, initialised from the teacher",
            "frames": f"{frames_dir} ({result.frames} frames, {result.labelled_frames} with true labels)",
            **training.recipe(),
        }
        manifest = install_derived(parent, f"{parent.name}-distilled-{len(student._blocks)}blocks", staged, recipe,
                                   quality, out_dir)
    return manifest, report
