"""Sync's smoke test on cascade folders: each member verified against the cascade's pin and run on
the reference input, the real model (its members here: the FP32 model and a resaved copy, a new
artifact that computes the same)."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgefleet.models.cascade import assemble
from edgefleet.models.install import install, resave
from services.sync.smoke import SmokeFailed, smoke_test
from shared.manifest import MODEL_FILE, load_verified, sha256_of


@pytest.fixture(scope="module")
def small_dir(model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("small") / "resaved"
    resave(model_dir, out, "stage 1 of a test cascade", name="lite0-small")
    return out


def _cascade(small: Path, large: Path, out: Path, name: str = "lite0-cascade") -> Path:
    assemble(small, large, out, name=name, version=1, metric="margin", threshold=0.3)
    return out


def test_a_cascade_whose_members_verify_and_run_passes(small_dir, model_dir, tmp_path):
    smoke_test(_cascade(small_dir, model_dir, tmp_path / "cascade"))


def test_a_cascade_with_a_tampered_member_fails_before_any_member_runs(small_dir, model_dir, tmp_path):
    folder = _cascade(small_dir, model_dir, tmp_path / "cascade")
    onnx = folder / "stage2" / MODEL_FILE
    data = bytearray(onnx.read_bytes())
    data[len(data) // 2] ^= 0xFF
    onnx.write_bytes(bytes(data))

    with pytest.raises(SmokeFailed, match="does not verify: .*stage2.*its manifest says"):
        smoke_test(folder)


def test_a_cascade_whose_member_is_not_the_model_it_pins_fails(small_dir, model_dir, tmp_path):
    folder = _cascade(small_dir, model_dir, tmp_path / "cascade")
    resave(small_dir, folder / "stage1", "another build of the same network")

    with pytest.raises(SmokeFailed, match="the cascade pins"):
        smoke_test(folder)


def test_a_cascade_member_that_does_not_run_fails_and_is_named(small_dir, model_dir, tmp_path):
    # A member whose manifest vouches for its bytes, and the cascade pins them, but they are no model.
    broken = tmp_path / "broken"
    manifest, _ = load_verified(small_dir)
    staged = tmp_path / "staged.onnx"
    staged.write_bytes(b"not an ONNX model" * 64)
    install(staged, manifest.model_copy(update={"sha256": sha256_of(staged), "size_bytes": staged.stat().st_size}),
            broken)
    folder = _cascade(broken, model_dir, tmp_path / "cascade")

    with pytest.raises(SmokeFailed, match="cascade member stage1 .*lite0-small.*does not load or run"):
        smoke_test(folder)


def test_a_cascade_whose_member_is_a_cascade_fails(small_dir, model_dir, tmp_path):
    inner = _cascade(small_dir, model_dir, tmp_path / "inner")
    folder = _cascade(inner, model_dir, tmp_path / "outer", name="outer")

    with pytest.raises(SmokeFailed, match="stage1 of the cascade is a cascade itself"):
        smoke_test(folder)
