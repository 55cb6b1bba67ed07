"""Images from a folder as model inputs, through the inference service's own decode and preprocessing,
so calibration and evaluation see exactly what production sees."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgefleet.photos import image_files
from edgefleet.progress import QUIET, Reporter
from services.inference.decode import decode_bgr
from services.inference.preprocess import Preprocessor
from shared.manifest import ModelManifest


def load_inputs(folder: Path, manifest: ModelManifest, limit: int | None = None, *,
                progress: Reporter = QUIET) -> np.ndarray:
    """The images in `folder` (the first `limit`), decoded and preprocessed as the service does, one
    progress unit each."""
    files = image_files(folder)
    if not files:
        raise FileNotFoundError(f"no .jpg/.jpeg/.png images in {folder} (make them with `edgefleet model dataset`)")
    files = files[:limit]
    pre = Preprocessor(manifest.preprocessing)
    crop = manifest.preprocessing.crop
    inputs = np.empty((len(files), 3, crop, crop), dtype=np.float32)
    with progress.task(f"reading {len(files)} images from {folder}", len(files)) as task:
        for i, path in enumerate(files):
            pre(decode_bgr(path.read_bytes(), manifest.preprocessing.resize_shorter), inputs[i])
            task.advance()
    return inputs


UNLABELLED = -1


def load_labelled(folder: Path, manifest: ModelManifest, limit: int | None = None, *,
                  progress: Reporter = QUIET) -> tuple[np.ndarray, np.ndarray]:
    """Frames and their true class indices. Images directly in `folder` have no label (-1); images in a
    sub-folder named after one of the model's labels (`folder/tabby/x.jpg`) have that label."""
    index = {label: i for i, label in enumerate(manifest.labels)}
    parts, labels = [], []
    if image_files(folder):
        parts.append(load_inputs(folder, manifest, limit, progress=progress))
        labels += [UNLABELLED] * len(parts[-1])
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []:
        if sub.name in index and image_files(sub):
            parts.append(load_inputs(sub, manifest, limit, progress=progress))
            labels += [index[sub.name]] * len(parts[-1])
    if not parts:
        raise FileNotFoundError(f"no .jpg/.jpeg/.png images in {folder} or in its label-named sub-folders")
    return np.concatenate(parts)[:limit], np.array(labels[:limit], dtype=np.int64)
