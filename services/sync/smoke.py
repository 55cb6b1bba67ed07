"""The smoke test a model passes before inference is asked to serve it: it loads, runs on a reference
input, and its output has the shape and the label count its manifest promises.

A cascade folder (shared.cascade) passes when both members verify against the cascade's pins and
agree with its labels and preprocessing (load_members), and each member passes the test on its own."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from services.sync.errors import SyncError
from shared.cascade import is_cascade, load_members
from shared.manifest import ModelError, ModelManifest, load_verified


class SmokeFailed(SyncError, RuntimeError):
    """The model does not load, does not run on the reference input, or its output is not what its
    manifest promises: it must not be switched to."""


def reference_input(crop: int, mean: list[float], std: list[float]) -> np.ndarray:
    """A smooth colour gradient, preprocessed like a frame: deterministic and free of any file."""
    ramp = np.linspace(0, 255, crop, dtype=np.float32)
    image = np.stack([np.add.outer(ramp, ramp) / 2, np.tile(ramp, (crop, 1)), np.tile(ramp[:, None], (1, crop))])
    return ((image - np.array(mean, np.float32)[:, None, None]) / np.array(std, np.float32)[:, None, None])[None]


def smoke_test(model_dir: Path) -> None:
    """Loads the model folder and runs it (a cascade: each member) on the reference input.

    Args:
        model_dir: an installed model folder, or a cascade folder.

    Raises:
        SmokeFailed: the folder does not verify (a cascade member tampered with, or not the one its pin
            names), a model does not load or run, or its output is not what its manifest promises.
    """
    try:
        manifest, path = load_verified(model_dir)
        if not is_cascade(manifest):
            _run_member(manifest, path)
            return
        _, members = load_members(model_dir, manifest)
    except (ModelError, OSError) as exc:
        raise SmokeFailed(f"the model does not verify: {exc}") from None
    for member, member_path in members:
        if is_cascade(member):
            raise SmokeFailed(f"{member_path.parent.name} of the cascade is a cascade itself: a member is one model")
        try:
            _run_member(member, member_path)
        except SmokeFailed as exc:
            raise SmokeFailed(f"cascade member {member_path.parent.name} ({member.name} v{member.version}): {exc}") \
                from None


def _run_member(manifest: ModelManifest, path: Path) -> None:
    """Runs one ONNX model on the reference input; raises SmokeFailed if it fails or its output is wrong."""
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        p = manifest.preprocessing
        outputs = session.run(None, {manifest.input.name: reference_input(p.crop, p.mean, p.std)})
    # ONNX Runtime's errors (Fail, InvalidGraph, InvalidProtobuf, ...) derive from Exception alone.
    except Exception as exc:
        raise SmokeFailed(f"the model does not load or run: {exc}") from None
    logits = outputs[0]
    if logits.shape != (1, len(manifest.labels)):
        raise SmokeFailed(f"output shape {logits.shape}, the manifest promises (1, {len(manifest.labels)}) "
                          "for its labels")
    if not np.isfinite(logits).all():
        raise SmokeFailed("the model's output on the reference input is not finite")
