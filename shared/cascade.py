"""A cascade: two models served as one. Stage 1 (small, e.g. INT8) answers every frame; frames whose
stage-1 top-1 margin (or confidence) falls below the threshold are escalated, as one sub-batch, to stage 2
(large, e.g. FP32), whose answer stands.

A cascade is a model folder like any other: its manifest.json names `cascade.json` as its file (so the
manifest's SHA-256 pins the cascade document, and the signature over the manifest covers it), and
cascade.json pins both members by SHA-256. Each member is a whole model folder beside it:

    <folder>/manifest.json       the cascade's manifest (file: cascade.json, labels and input of stage 2)
    <folder>/cascade.json        CascadeSpec: metric, threshold, the members pinned
    <folder>/stage1/             model.onnx, manifest.json (and manifest.sig where installed by sync)
    <folder>/stage2/             the same

In the registry a cascade version holds manifest.json, manifest.sig and cascade.json; its members are
published models of their own (models/<member>/<version>/), each with its own signature, fetched and
verified by sync against the pins before the cascade is installed. So it is published, signed, rolled
out, canaried, hot-swapped and rolled back as one unit, with one SHA-256 (the manifest's) naming it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from shared.manifest import ModelError, ModelManifest, ModelName, ModelVersion, load_verified

CASCADE_FILE = "cascade.json"
STAGE_FOLDERS = ("stage1", "stage2")
# A real cascade.json is ~400 bytes: read whole only up to this, before it is parsed.
MAX_CASCADE_BYTES = 64 << 10


Metric = Literal["margin", "confidence"]


class CascadeMember(BaseModel):
    """A member of a cascade, pinned by the SHA-256 of its model file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    folder: Literal["stage1", "stage2"]
    name: ModelName
    version: ModelVersion
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size_bytes: int = Field(gt=0)


class CascadeSpec(BaseModel):
    """cascade.json: when stage 1's answer stands, and which two models the stages are."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["cascade"] = "cascade"
    # margin: top-1 minus top-2 probability of stage 1; confidence: its top-1 probability.
    metric: Metric
    # Stage 1's answer stands when its metric is >= threshold; below, the frame goes to stage 2.
    threshold: float = Field(ge=0.0, le=1.0)
    stages: list[CascadeMember] = Field(min_length=2, max_length=2)

    @model_validator(mode="after")
    def _stages_in_order(self) -> CascadeSpec:
        if tuple(s.folder for s in self.stages) != STAGE_FOLDERS:
            raise ValueError(f"a cascade's stages are {STAGE_FOLDERS}, in that order")
        return self


def is_cascade(manifest: ModelManifest) -> bool:
    """Whether a manifest describes a cascade (its file is cascade.json) rather than one ONNX model."""
    return manifest.file == CASCADE_FILE


def read_spec(path: Path) -> CascadeSpec:
    """Reads a cascade.json, bounded before it is parsed.

    Args:
        path: the cascade.json file (its SHA-256 already checked against the cascade's manifest).

    Returns:
        The cascade's spec.

    Raises:
        ModelError: larger than MAX_CASCADE_BYTES, missing or not a valid CascadeSpec.
    """
    try:
        with path.open("rb") as f:
            data = f.read(MAX_CASCADE_BYTES + 1)
    except FileNotFoundError:
        raise ModelError(f"{path} is missing") from None
    if len(data) > MAX_CASCADE_BYTES:
        raise ModelError(f"{path} is larger than {MAX_CASCADE_BYTES} bytes: not a cascade document")
    try:
        return CascadeSpec.model_validate_json(data)
    except ValueError as exc:
        raise ModelError(f"{path} is not a valid cascade document: {exc}") from None


def load_members(folder: Path, manifest: ModelManifest) -> tuple[CascadeSpec, list[tuple[ModelManifest, Path]]]:
    """A cascade folder's spec and its members, each verified against its own manifest and its pin.

    Args:
        folder: the cascade's folder (as the module docstring lays it out).
        manifest: the cascade's manifest, already verified (load_verified) against cascade.json.

    Returns:
        (spec, [(member manifest, member model file) for stage1, stage2]).

    Raises:
        ModelError: a member missing, not what its manifest says, not the model its pin names, or with
            other labels or preprocessing than the cascade's manifest.
    """
    spec = read_spec(folder / manifest.file)
    members = []
    for pin in spec.stages:
        member, path = load_verified(folder / pin.folder)
        if (member.name, member.version, member.sha256) != (pin.name, pin.version, pin.sha256):
            raise ModelError(f"{folder / pin.folder} holds {member.name} v{member.version} ({member.sha256[:16]}…); "
                             f"the cascade pins {pin.name} v{pin.version} ({pin.sha256[:16]}…)")
        if member.labels != manifest.labels or member.preprocessing != manifest.preprocessing:
            raise ModelError(f"{pin.folder} ({member.name}) has other labels or preprocessing than the cascade")
        members.append((member, path))
    return spec, members


def verify_folder(folder: Path) -> ModelManifest:
    """Verifies a model folder whole: the manifest against its file and, for a cascade, every member.

    Returns:
        The folder's manifest.

    Raises:
        ModelError: anything missing or not what it claims to be.
        OSError: a file that exists cannot be read.
    """
    manifest, _ = load_verified(folder)
    if is_cascade(manifest):
        load_members(folder, manifest)
    return manifest


def stage1_metric(scores: np.ndarray, metric: Metric) -> np.ndarray:
    """A cascade's per-row metric from stage 1's top-k probabilities, best first (k >= 2).

    Returns:
        (frames,) "margin": top-1 minus top-2 probability; "confidence": top-1 probability.
    """
    top1 = scores[:, 0]
    if metric == "confidence":
        return top1.copy()  # not a view: the escalated rows of `scores` are overwritten with stage 2's
    runner_up = scores[:, 1] if scores.shape[1] > 1 else 0.0  # a one-class model has no runner-up
    return top1 - runner_up
