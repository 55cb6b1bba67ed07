"""Writing a model folder: model.onnx first, manifest.json last, each fsynced and renamed into place,
so a crash never leaves a manifest vouching for a missing or partial model. Files land 0644 and new
folders 0755 (shared.manifest.ARTIFACT_FILE_MODE): the non-root containers read what this wrote."""

from __future__ import annotations

import json
import os
import stat
import tempfile
from pathlib import Path

from shared.manifest import ARTIFACT_FILE_MODE, MANIFEST_FILE, ModelManifest, load_verified, make_dirs


def install(staged_model: Path, manifest: ModelManifest, out_dir: Path) -> ModelManifest:
    make_dirs(out_dir)
    _replace(staged_model, out_dir / manifest.file)
    with tempfile.NamedTemporaryFile("w", dir=out_dir, suffix=".json", delete=False) as f:
        f.write(json.dumps(manifest.model_dump(mode="json"), indent=1))
    _replace(Path(f.name), out_dir / MANIFEST_FILE)
    return load_verified(out_dir)[0]


def make_readable(model_dir: Path, manifest: ModelManifest) -> None:
    """Gives a folder an older edgefleet wrote (its manifest.json 0600) the modes install() gives now;
    files owned by another user are left as they are."""
    for path in (model_dir / manifest.file, model_dir / MANIFEST_FILE):
        info = path.stat()
        if info.st_uid == os.geteuid() and stat.S_IMODE(info.st_mode) != ARTIFACT_FILE_MODE:
            os.chmod(path, ARTIFACT_FILE_MODE)


def _replace(staged: Path, final: Path) -> None:
    with staged.open("rb") as f:
        # Before the rename: the file appears readable or not at all (mkstemp made the manifest 0600).
        os.fchmod(f.fileno(), ARTIFACT_FILE_MODE)
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
    make_dirs(out)
    staged = out / "staged.onnx"
    onnx.save(model, str(staged))
    fields = {**manifest.model_dump(), "sha256": sha256_of(staged), "size_bytes": staged.stat().st_size, **changes}
    return install(staged, ModelManifest(**fields), out)
