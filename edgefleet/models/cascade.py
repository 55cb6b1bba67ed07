"""`edgefleet model cascade`: two models served as one (shared.cascade). This module writes the cascade
folder; choosing the threshold on held-out images and drawing the curve comes with the command."""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Literal

from edgefleet.models.install import install
from shared.cascade import CASCADE_FILE, STAGE_FOLDERS, CascadeMember, CascadeSpec, load_members
from shared.manifest import MANIFEST_FILE, ModelError, ModelManifest, Quality, load_verified, make_dirs, sha256_of


def assemble(small_dir: Path, large_dir: Path, out_dir: Path, *, name: str, version: int,
             metric: Literal["margin", "confidence"], threshold: float, quality: Quality | None = None,
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
        ModelError: a member that does not verify, or members with other labels or preprocessing.
    """
    small, _ = load_verified(small_dir)
    large, _ = load_verified(large_dir)
    if small.labels != large.labels or small.preprocessing != large.preprocessing:
        raise ModelError(f"{small.name} and {large.name} have other labels or preprocessing: not one cascade")
    spec = CascadeSpec(metric=metric, threshold=threshold, stages=[
        CascadeMember(folder=folder, name=m.name, version=m.version, sha256=m.sha256, size_bytes=m.size_bytes)
        for folder, m in zip(STAGE_FOLDERS, (small, large), strict=True)
    ])
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
