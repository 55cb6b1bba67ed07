"""The model manifest: what a model is and exactly how to feed it. Written beside model.onnx as
manifest.json by the model build, read by inference (and later by sync and the operator tools)."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from shared.errors import EdgefleetError
from shared.schemas import ModelRef

MODEL_FILE = "model.onnx"
# What a model folder's artifact may be called: one ONNX model, or a cascade document (shared.cascade).
ARTIFACT_FILES = (MODEL_FILE, "cascade.json")
MANIFEST_FILE = "manifest.json"
MAX_VERSION = 10**9
# A model folder is read by another user than the one who wrote it: the non-root inference container
# (uid 10001) reads what the operator's `edgefleet model build` wrote and mounted. So its files are
# 0644 and its folders 0755 whatever the writer's umask (or mkstemp's 0600) would give: the modes a
# package manager (dpkg, rpm) installs shared read-only data with.
ARTIFACT_FILE_MODE = 0o644
ARTIFACT_DIR_MODE = 0o755

# The same rule as shared.topics.check_id: a name becomes an S3 key level and a folder on the device,
# so it must be path-safe before anything is built from it.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def check_model_name(name: str) -> str:
    """A model name: 1-64 letters, digits, '_', '.', '-', starting with a letter or digit, no '..'.

    :raises ValueError: otherwise.
    """
    if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name:
        raise ValueError(
            f"model name {name!r} must be 1-64 characters of letters, digits, '_', '.', '-', "
            "start with a letter or digit and not contain '..'"
        )
    return name


def check_model_version(version: int) -> int:
    """A model version: an int in 1..10**9.

    :raises ValueError: otherwise.
    """
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= MAX_VERSION:
        raise ValueError(f"model version {version!r} must be an integer from 1 to {MAX_VERSION}")
    return version


# A model's name and version as every manifest, pin and rollout carries them, checked on the way in.
ModelName = Annotated[str, AfterValidator(check_model_name)]
ModelVersion = Annotated[int, AfterValidator(check_model_version)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

class Preprocessing(_Strict):
    """Resize so the shorter side is `resize_shorter`, centre-crop `crop`x`crop`, then (x - mean) / std."""

    resize_shorter: int = Field(gt=0)
    crop: int = Field(gt=0)
    color_order: Literal["RGB", "BGR"]
    interpolation: Literal["linear", "area", "cubic"]
    mean: list[float] = Field(min_length=3, max_length=3)
    std: list[float] = Field(min_length=3, max_length=3)
    layout: Literal["NCHW"] = "NCHW"

    @model_validator(mode="after")
    def _crop_fits(self) -> Preprocessing:
        if self.crop > self.resize_shorter:
            raise ValueError("crop must not exceed resize_shorter")
        if any(s == 0 for s in self.std):
            raise ValueError("std must not be zero")
        return self

class TensorSpec(_Strict):
    name: str
    # A string is a symbolic (dynamic) axis, such as "batch".
    shape: list[int | str]
    dtype: Literal["float32", "float16", "uint8", "int8"]

class Quality(_Strict):
    """The quality gate: how closely a derived model agrees with its parent, and whether that is enough."""

    metric: Literal["top1_agreement"]
    value: float
    threshold: float
    samples: int
    measured_on: str
    passed: bool


class ModelManifest(_Strict):
    name: ModelName
    version: ModelVersion
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size_bytes: int = Field(gt=0)
    # A fixed set of names, never a path: a manifest's file is joined to the folder it is read from.
    file: Literal["model.onnx", "cascade.json"] = "model.onnx"
    opset: int
    input: TensorSpec
    output: TensorSpec
    preprocessing: Preprocessing
    labels: list[str]
    # How it was made, so a result can be reproduced: source weights, exporter, recipe.
    recipe: dict[str, str]
    parent_sha256: str | None = None
    # Absent on a model built from source weights; set on every compressed model. A failed gate means
    # the model must not be published.
    quality: Quality | None = None
    # The oldest edgefleet release that can serve this model; set when it is published.
    min_edgefleet: str | None = None
    created_at: float

    @model_validator(mode="after")
    def _labels_match_output(self) -> ModelManifest:
        classes = self.output.shape[-1]
        if isinstance(classes, int) and classes != len(self.labels):
            raise ValueError(f"{len(self.labels)} labels for {classes} output classes")
        return self

    def ref(self) -> ModelRef:
        return ModelRef(name=self.name, version=self.version, sha256=self.sha256)

class ModelError(EdgefleetError, RuntimeError):
    """A model that must not be served: missing, unreadable, or not what its manifest says."""

def sha256_of(path: Path) -> str:
    """The SHA-256 (hex) of a file, read in 1 MiB chunks.

    :raises OSError: if the file cannot be read.
    """
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()

def make_dirs(path: Path) -> None:
    """`mkdir -p` giving every folder it creates ARTIFACT_DIR_MODE; folders that exist keep theirs (an
    operator's own folder is not ours to open up)."""
    missing = [p for p in (path, *path.parents) if not p.exists()]
    for folder in reversed(missing):
        folder.mkdir(exist_ok=True)
        os.chmod(folder, ARTIFACT_DIR_MODE)


def load_verified(model_dir: Path) -> tuple[ModelManifest, Path]:
    """Reads manifest.json and checks the model file's size and SHA-256 against it.

    :param Path model_dir: a model folder (model.onnx and manifest.json, as `edgefleet model build` writes).
    :returns: the manifest and the model file's path.
    :raises ModelError: if the manifest is missing or invalid, or the model file is missing or not the
        size and SHA-256 the manifest says.
    :raises OSError: if a file that exists cannot be read.
    """
    manifest_path = model_dir / MANIFEST_FILE
    try:
        manifest = ModelManifest.model_validate_json(manifest_path.read_bytes())
    except FileNotFoundError:
        raise ModelError(f"no {MANIFEST_FILE} in {model_dir} (build one with `edgefleet model build`)") from None
    except ValueError as exc:
        raise ModelError(f"{manifest_path} is not a valid manifest: {exc}") from exc
    model_path = model_dir / manifest.file
    if not model_path.is_file():
        raise ModelError(f"{model_path} is missing")
    size = model_path.stat().st_size
    if size != manifest.size_bytes:
        raise ModelError(f"{model_path} is {size} bytes, its manifest says {manifest.size_bytes}")
    actual = sha256_of(model_path)
    if actual != manifest.sha256:
        raise ModelError(f"{model_path} has SHA-256 {actual}, its manifest says {manifest.sha256}")
    return manifest, model_path
