"""The inference service's model loader (services/inference/swap.py ModelLoader) reads a model through
the device store's `current` link, which the sync service re-points: what it verifies must be what it
serves, whichever way the link turns meanwhile. The real model; the link turned from inside the load."""

from __future__ import annotations

import shutil
from pathlib import Path

from services.inference import swap
from services.inference.session import ModelSession
from services.inference.swap import ModelLoader

LOADER = ModelLoader(providers=["cpu"], strict=False, threads_per_run=1, scaled_decode=True)


def test_a_link_re_pointed_during_a_load_does_not_change_the_file_served(model_dir, tmp_path, monkeypatch):
    first, second = tmp_path / "v1", tmp_path / "v2"
    shutil.copytree(model_dir, first)
    shutil.copytree(model_dir, second)
    current = tmp_path / "current"
    current.symlink_to(first)
    opened: list[Path] = []
    real_open = ModelSession.open

    def open_after_a_switch(manifest, path, *args, **kwargs):
        # The sync service switches between the loader's digest and ONNX Runtime opening the file.
        current.unlink()
        current.symlink_to(second)
        opened.append(Path(path).resolve())
        return real_open(manifest, path, *args, **kwargs)

    monkeypatch.setattr(swap.ModelSession, "open", open_after_a_switch)
    served = LOADER(current)

    assert opened == [(first / served.manifest.file).resolve()]
