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


def resave(source: Path, out: Path, note: str, **changes) -> ModelManifest:
    """The source model saved again with `note` as its ONNX doc string: a new artifact (new SHA-256)
    that computes exactly the same, with manifest fields changed (version, name, labels, ...). What a
    rebuild of the same network gives; the delivery tests and the swap benchmark use it."""
    import onnx

    from shared.manifest import sha256_of

    manifest, path = load_verified(source)
    model = onnx.load(str(path))
    model.doc_string = note
    out.mkdir(parents=True, exist_ok=True)
    staged = out / "staged.onnx"
    onnx.save(model, str(staged))
    fields = {**manifest.model_dump(), "sha256": sha256_of(staged), "size_bytes": staged.stat().st_size, **changes}
    return install(staged, ModelManifest(**fields), out)
