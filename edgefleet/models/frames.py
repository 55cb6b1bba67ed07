"""Images from a folder as model inputs, through the inference service's own decode and preprocessing,
so calibration and evaluation see exactly what production sees."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgefleet.photos import image_files
from services.inference.decode import decode_bgr
from services.inference.preprocess import Preprocessor
from shared.manifest import ModelManifest



def load_inputs(folder: Path, manifest: ModelManifest, limit: int | None = None) -> np.ndarray:
    files = image_files(folder)
    if not files:
        raise FileNotFoundError(f"no .jpg/.jpeg/.png images in {folder} (make them with `edgefleet model dataset`)")
    files = files[:limit]
    pre = Preprocessor(manifest.preprocessing)
    crop = manifest.preprocessing.crop
    inputs = np.empty((len(files), 3, crop, crop), dtype=np.float32)
    for i, path in enumerate(files):
        pre(decode_bgr(path.read_bytes(), manifest.preprocessing.resize_shorter), inputs[i])
    return inputs
