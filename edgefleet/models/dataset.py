"""Evaluation and calibration images made reproducibly from real photos: random crops, flips and scale
changes with fixed seeds, written as JPEGs with an index of how each was made.

The two sets are disjoint: each comes from its own seeded stream and no image appears in both (checked
by content hash). Calibration never sees an evaluation image. Later, the fleet's hard-example frames
can be pointed at as a calibration folder instead; nothing here is random noise.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import cv2
import numpy as np

from edgefleet import photos
from edgefleet.progress import QUIET, Reporter

EVAL_SEED, CALIBRATION_SEED = 2026, 7
INDEX_FILE = "index.json"


def make(out: Path, eval_count: int = 300, calibration_count: int = 128,
         sources: tuple[str, ...] = photos.EVALUATION, *, progress: Reporter = QUIET) -> dict:
    """Writes `eval_count` held-out and `calibration_count` calibration images under `out` (replacing it) and
    their index; `progress` counts the images written."""
    if out.exists():
        shutil.rmtree(out)
    index: dict = {"sources": list(sources), "splits": {}}
    hashes: dict[str, set[str]] = {}
    for split, seed, count in (("eval", EVAL_SEED, eval_count), ("calibration", CALIBRATION_SEED, calibration_count)):
        folder = out / split
        folder.mkdir(parents=True)
        rng = np.random.default_rng(seed)
        entries, hashes[split] = [], set()
        with progress.task(f"making {count} {split} images", count) as task:
            for i in range(count):
                source = sources[i % len(sources)]
                image, recipe = _augment(cv2.cvtColor(photos.photo_rgb(source), cv2.COLOR_RGB2BGR), rng)
                data = _jpeg(image)
                name = f"{i:04d}-{source}.jpg"
                (folder / name).write_bytes(data)
                hashes[split].add(hashlib.sha256(data).hexdigest())
                entries.append({"file": name, "source": source, **recipe})
                task.advance()
        index["splits"][split] = {"seed": seed, "images": entries}
    if hashes["eval"] & hashes["calibration"]:
        raise RuntimeError("evaluation and calibration sets share an image")
    (out / INDEX_FILE).write_text(json.dumps(index, indent=1))
    return index


def crops_of(source: str, count: int, seed: int) -> list[bytes]:
    """JPEGs of `count` augmented crops of one photo: frames for a labelled folder."""
    rng = np.random.default_rng(seed)
    image = cv2.cvtColor(photos.photo_rgb(source), cv2.COLOR_RGB2BGR)
    return [_jpeg(_augment(image, rng)[0]) for _ in range(count)]


def _jpeg(image: np.ndarray) -> bytes:
    return cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 92])[1].tobytes()


def _augment(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """A crop of 35-100 % of the area at an aspect of 3:4 to 4:3, maybe mirrored, rescaled 0.5-1.5x."""
    height, width = image.shape[:2]
    area = rng.uniform(0.35, 1.0) * height * width
    aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
    crop_h = min(height, max(32, round(math.sqrt(area / aspect))))
    crop_w = min(width, max(32, round(math.sqrt(area * aspect))))
    top = int(rng.integers(0, height - crop_h + 1))
    left = int(rng.integers(0, width - crop_w + 1))
    flip = bool(rng.random() < 0.5)
    scale = float(rng.uniform(0.5, 1.5))
    crop = image[top : top + crop_h, left : left + crop_w]
    if flip:
        crop = crop[:, ::-1]
    size = (max(32, round(crop_w * scale)), max(32, round(crop_h * scale)))
    crop = cv2.resize(np.ascontiguousarray(crop), size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    return crop, {"box": [top, left, crop_h, crop_w], "flip": flip, "scale": round(scale, 4)}
