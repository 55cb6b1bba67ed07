"""Real photos for the camera simulator, tests, benchmarks and model evaluation: the ones that
scikit-image, scikit-learn and matplotlib ship inside their wheels. Nothing is downloaded."""

from __future__ import annotations

from functools import cache

import cv2
import numpy as np

# Colour and grey photographs bundled inside the scikit-image wheel: the camera simulator's stills.
BUNDLED = ("chelsea", "coffee", "astronaut", "rocket", "camera", "coins", "immunohistochemistry", "hubble_deep_field")
# More photographs of things ImageNet names, for evaluation and calibration sets.
_FILES = {
    "grace_hopper": ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg"),
    "china": ("sklearn.datasets", "images/china.jpg"),
    "flower": ("sklearn.datasets", "images/flower.jpg"),
}
EVALUATION = BUNDLED + tuple(_FILES)


def photo_rgb(name: str) -> np.ndarray:
    if name in _FILES:
        import importlib
        from pathlib import Path

        package, relative = _FILES[name]
        path = Path(importlib.import_module(package).__file__).parent / relative
        return np.ascontiguousarray(cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB))
    from skimage import data

    image = getattr(data, name)()
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    return np.ascontiguousarray(image[:, :, :3])


@cache
def jpeg(name: str, quality: int = 90) -> bytes:
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(photo_rgb(name), cv2.COLOR_RGB2BGR),
                           [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError(f"OpenCV could not encode the photo {name!r} as JPEG")
    return buf.tobytes()


@cache
def png(name: str) -> bytes:
    ok, buf = cv2.imencode(".png", cv2.cvtColor(photo_rgb(name), cv2.COLOR_RGB2BGR))
    if not ok:
        raise RuntimeError(f"OpenCV could not encode the photo {name!r} as PNG")
    return buf.tobytes()


IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}


def image_files(folder) -> list:
    """The JPEG and PNG files of a folder, sorted by name; none if it is not a folder."""
    from pathlib import Path

    folder = Path(folder)
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []


def bundled_jpegs() -> list[tuple[str, bytes]]:
    return [(name, jpeg(name)) for name in BUNDLED]
