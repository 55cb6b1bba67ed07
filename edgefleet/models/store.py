"""Writing a model folder: model.onnx first, manifest.json last, each fsynced and renamed into place,
so a crash never leaves a manifest vouching for a missing or partial model."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from shared.manifest import MANIFEST_FILE, ModelManifest, load_verified


def install(staged_model: Path, manifest: ModelManifest, out_dir: Path) -> ModelManifest:
    out_dir.mkdir(parents=True, exist_ok=True)
    _replace(staged_model, out_dir / manifest.file)
    with tempfile.NamedTemporaryFile("w", dir=out_dir, suffix=".json", delete=False) as f:
        f.write(json.dumps(manifest.model_dump(mode="json"), indent=1))
    _replace(Path(f.name), out_dir / MANIFEST_FILE)
    return load_verified(out_dir)[0]


def _replace(staged: Path, final: Path) -> None:
    with staged.open("rb") as f:
        os.fsync(f.fileno())
    os.replace(staged, final)
