"""What every derived model (quantized, pruned, distilled) gets: a manifest that names its parent and
its exact recipe, and the quality gate measured against the parent on held-out images."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from edgefleet.models.install import install
from edgefleet.models.outputs import logits
from shared.manifest import ModelManifest, Quality, sha256_of


def top1_agreement(reference: np.ndarray, candidate: np.ndarray) -> float:
    return float((candidate.argmax(1) == reference.argmax(1)).mean())


def measure_quality(parent_path: Path, candidate_path: Path, input_name: str, held_out: np.ndarray, eval_dir: Path,
         threshold: float) -> Quality:
    agreement = top1_agreement(logits(parent_path, input_name, held_out), logits(candidate_path, input_name, held_out))
    return Quality(
        metric="top1_agreement", value=round(agreement, 4), threshold=threshold,
        samples=len(held_out), measured_on=str(eval_dir), passed=agreement >= threshold,
    )


def install_derived(parent: ModelManifest, name: str, staged: Path, recipe: dict[str, str], quality: Quality,
                    out_dir: Path) -> ModelManifest:
    """Installs the staged model under out_dir with the parent's interface (input, preprocessing, labels)."""
    manifest = ModelManifest(
        **{
            **parent.model_dump(exclude={"sha256", "size_bytes", "recipe", "parent_sha256", "quality", "created_at",
                                         "name"}),
            "name": name,
            "sha256": sha256_of(staged),
            "size_bytes": staged.stat().st_size,
            "recipe": recipe,
            "parent_sha256": parent.sha256,
            "quality": quality,
            "created_at": time.time(),
        }
    )
    return install(staged, manifest, out_dir)
