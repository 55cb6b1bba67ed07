"""The scenes the pipeline bench's scene-cache goal runs on: chosen by running the real model on the clean
photos (edgefleet.bench.streams.recognised), and stable under the static stream's sensor noise, which is
why they are chosen."""

from __future__ import annotations

import numpy as np
import pytest

from edgefleet import photos
from edgefleet.bench import streams
from edgefleet.models.outputs import logits, session, softmax
from services.inference.decode import decode_bgr
from services.inference.preprocess import Preprocessor
from shared.manifest import load_verified


def _probabilities(model_dir, jpegs: list[bytes]) -> np.ndarray:
    # Through edgefleet.models.outputs, not the ModelSession recognised() uses: a second path to the answer.
    manifest, path = load_verified(model_dir)
    pre = Preprocessor(manifest.preprocessing)
    crop = manifest.preprocessing.crop
    x = np.empty((len(jpegs), 3, crop, crop), dtype=np.float32)
    for i, data in enumerate(jpegs):
        pre(decode_bgr(data, manifest.preprocessing.resize_shorter), x[i])
    runner = session(path, threads=1)
    return softmax(logits(runner, runner.get_inputs()[0].name, x).astype(np.float64))


def test_recognised_keeps_exactly_the_photos_with_a_sure_top1_and_noise_does_not_flip_them(model_dir):
    sure = streams.recognised(model_dir)
    clean = _probabilities(model_dir, [photos.jpeg(n) for n in photos.EVALUATION])
    by_name = dict(zip(photos.EVALUATION, clean, strict=True))
    assert list(sure) == [n for n in photos.EVALUATION if by_name[n].max() >= streams.RECOGNISED_TOP1]
    assert len(sure) >= 2 and all(p == pytest.approx(by_name[n].max(), abs=1e-4) for n, p in sure.items())
    # What the rule is for: the bench's σ 2 sensor noise leaves a recognised scene's answer as it is.
    frames = streams.static_camera(["fixed"], 1.0, 4 * len(sure), change_every_s=4, noise_sigma=2.0,
                                   scenes=tuple(sure))
    noisy = _probabilities(model_dir, [f.data for f in frames]).argmax(1)
    assert [int(t) for t in noisy] == [int(by_name[f.scene].argmax()) for f in frames]


def test_recognised_refuses_a_stream_with_fewer_than_two_scenes_and_names_every_top1(model_dir):
    expected = rf"recognises 0 of {len(photos.EVALUATION)} scenes .*needs 2; top-1: {photos.EVALUATION[0]} 0\."
    with pytest.raises(ValueError, match=expected):
        streams.recognised(model_dir, min_top1=1.0)
