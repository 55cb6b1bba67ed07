"""The model is real: EfficientNet-Lite0 with ImageNet weights, exported with a dynamic batch axis and
a manifest that says exactly how to feed it."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from edgefleet import photos
from edgefleet.models.build import build
from edgefleet.models.install import resave
from services.inference.decode import decode_bgr
from services.inference.postprocess import top_k
from services.inference.preprocess import Preprocessor
from shared.manifest import MANIFEST_FILE, MODEL_FILE, ModelError, load_verified
from tests.support import CONTAINER_UID, unreadable_by

CATS = {"tabby", "tiger cat", "Persian cat", "Siamese cat", "Egyptian cat"}
COFFEE = {"espresso", "cup", "coffee mug"}


def _top5(model_dir, *images: bytes) -> list[list[str]]:
    manifest, path = load_verified(model_dir)
    pre = Preprocessor(manifest.preprocessing)
    crop = manifest.preprocessing.crop
    batch = np.empty((len(images), 3, crop, crop), dtype=np.float32)
    for i, data in enumerate(images):
        pre(decode_bgr(data), batch[i])
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    indices, _ = top_k(session.run(None, {manifest.input.name: batch})[0], 5)
    return [[manifest.labels[i] for i in row] for row in indices]


def test_real_photos_get_real_classes_in_one_batch(model_dir):
    chelsea, coffee = _top5(model_dir, photos.jpeg("chelsea"), photos.png("coffee"))
    assert CATS & set(chelsea), chelsea
    assert COFFEE & set(coffee), coffee


def test_manifest_describes_the_model(model_dir):
    manifest, path = load_verified(model_dir)
    graph = onnx.load(str(path)).graph
    (graph_input,) = graph.input
    dims = [d.dim_param or d.dim_value for d in graph_input.type.tensor_type.shape.dim]
    assert graph_input.name == manifest.input.name
    assert dims == manifest.input.shape == ["batch", 3, 224, 224]
    assert len(manifest.labels) == 1000 and manifest.labels[281] == "tabby"
    assert manifest.preprocessing.color_order == "RGB" and manifest.preprocessing.mean == [127.0] * 3
    assert {"weights", "network", "exporter", "labels"} <= set(manifest.recipe)


def test_a_second_build_is_cached_and_the_command_says_so_in_one_line(model_dir):
    from typer.testing import CliRunner

    from edgefleet import cli

    manifest, built = build(model_dir)
    assert built is False and manifest.sha256 == load_verified(model_dir)[0].sha256
    # Off a terminal no progress is drawn: the command's whole output is its summary line.
    result = CliRunner().invoke(cli.app, ["model", "build", "--out", str(model_dir)])
    assert result.exit_code == 0 and result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"cached {manifest.name} v{manifest.version} → {model_dir}: ")
    assert f"sha256 {manifest.sha256[:16]}…" in line and line.endswith(" s")


def test_a_tampered_model_is_refused(model_dir, tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(model_dir, copy)
    with (copy / MODEL_FILE).open("r+b") as f:
        f.seek(1000)
        f.write(b"\x00\x01\x02\x03")
    with pytest.raises(ModelError, match="SHA-256"):
        load_verified(copy)
    (copy / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(ModelError, match="not a valid manifest"):
        load_verified(copy)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def strict_umask():
    """umask 077, as a hardened operator shell has: what the tools write must not depend on 022."""
    old = os.umask(0o077)
    yield
    os.umask(old)


@pytest.fixture
def host_dir():
    """A folder a host would mount into a container (its parent is /tmp, open to all, unlike tmp_path's)."""
    folder = Path(tempfile.mkdtemp(prefix="efh-model-", dir="/tmp"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder)


def test_a_written_model_folder_is_readable_by_the_containers_user(model_dir, host_dir, strict_umask):
    """The install every tool shares (build, quantize, prune, distill, resave): files 0644, new folders
    0755, whatever the umask; readable by uid 10001, the images' user, which mounts it read-only."""
    out = host_dir / "models" / "m"
    resave(model_dir, out, "copy for the mode test")
    assert {p.name: oct(_mode(p)) for p in out.iterdir()} == {MANIFEST_FILE: "0o644", MODEL_FILE: "0o644"}
    assert oct(_mode(out)) == oct(_mode(out.parent)) == "0o755"
    if os.geteuid() == 0:
        assert unreadable_by(CONTAINER_UID, out / MANIFEST_FILE, out / MODEL_FILE) == []


def test_a_cached_build_left_unreadable_by_an_older_build_is_made_readable(model_dir):
    (model_dir / MANIFEST_FILE).chmod(0o600)  # what `edgefleet model build` wrote before (mkstemp's mode)
    _, built = build(model_dir)
    assert built is False
    assert oct(_mode(model_dir / MANIFEST_FILE)) == oct(_mode(model_dir / MODEL_FILE)) == "0o644"
    if os.geteuid() == 0:
        assert unreadable_by(CONTAINER_UID, model_dir / MANIFEST_FILE, model_dir / MODEL_FILE) == []
