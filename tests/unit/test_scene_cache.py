"""The scene cache on real photos (edgefleet.photos) with sensor noise made here: a static camera's
frames differ in every byte but show the same scene. No model runs: the answers remembered are typed
Predictions as the model would publish them, since the cache only stores and hands them back."""

from __future__ import annotations

import time
from functools import cache

import cv2
import numpy as np
import pytest

from edgefleet import photos
from services.inference.cache import Hit, Probe, SceneCache, difference
from services.inference.decode import grey_thumbnail
from services.inference.intake import Frame
from shared.config import CacheSettings
from shared.schemas import ClassScore, ModelRef, Prediction, Timings

V1 = ModelRef(name="efficientnet-lite0", version=1, sha256="1" * 64)
V2 = ModelRef(name="efficientnet-lite0", version=2, sha256="2" * 64)
T0 = 1000.0  # monotonic arrival of the first frame; the others are placed after it


@cache
def _photo_bgr(name: str) -> np.ndarray:
    return cv2.cvtColor(photos.photo_rgb(name), cv2.COLOR_RGB2BGR)


def noisy_jpeg(name: str, seed: int, sigma: float = 4.0) -> bytes:
    """The photo as a fixed camera would send it again: Gaussian sensor noise, then JPEG at quality 90."""
    image = _photo_bgr(name).astype(np.float32)
    image += np.random.default_rng(seed).normal(0.0, sigma, image.shape).astype(np.float32)
    ok, buf = cv2.imencode(".jpg", np.clip(image, 0, 255).astype(np.uint8), [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    return buf.tobytes()


def frame(frame_id: str, data: bytes, at: float = 0.0, camera: str = "door") -> Frame:
    return Frame(camera=camera, frame_id=frame_id, data=data, captured_at=None, received=T0 + at)


def answer(f: Frame, model: ModelRef = V1, label: str = "tabby") -> Prediction:
    """The model's prediction for `f`, as BatchRun publishes it."""
    return Prediction(device="unit-1", camera=f.camera, frame_id=f.frame_id, captured_at=None,
                      top=[ClassScore(index=281, label=label, score=0.8)], model=model,
                      provider="CPUExecutionProvider",
                      timings=Timings(queued_ms=0.1, preprocess_ms=1.5, inference_ms=9.0, total_ms=11.0, batch_size=1),
                      published_at=time.time(), features=[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7])


def model_runs(scene_cache: SceneCache, f: Frame, model: ModelRef = V1, label: str = "tabby") -> Prediction:
    """Checks `f`, expects a miss, and remembers the model's answer, as the worker does."""
    probe = scene_cache.check(f, model)
    assert isinstance(probe, Probe), f"{f.frame_id} should have gone to the model, got {probe!r}"
    prediction = answer(f, model, label)
    scene_cache.remember(f, probe, prediction)
    return prediction


def hit(scene_cache: SceneCache, f: Frame, model: ModelRef = V1) -> Hit:
    found = scene_cache.check(f, model)
    assert isinstance(found, Hit), f"{f.frame_id} should have been answered from the cache, got {found!r}"
    return found


def settings(**overrides: object) -> CacheSettings:
    return CacheSettings.model_validate({"enabled": True, **overrides})


def test_an_unchanged_scene_with_sensor_noise_is_answered_from_the_cache_naming_its_source():
    scene_cache = SceneCache(settings())
    first = frame("door-1", noisy_jpeg("chelsea", seed=1))
    reference = model_runs(scene_cache, first)
    again = frame("door-2", noisy_jpeg("chelsea", seed=2), at=0.25)
    assert again.data != first.data  # noise: not an exact repeat

    found = hit(scene_cache, again)
    prediction = found.prediction(again, taken=again.received + 0.001, checked_s=0.0003)

    assert prediction.cached and prediction.cache is not None
    assert (prediction.cache.frame_id, prediction.cache.match, prediction.cache.age_ms) == ("door-1", "scene", 250.0)
    assert (prediction.frame_id, prediction.camera) == ("door-2", "door")
    assert (prediction.top, prediction.model, prediction.provider, prediction.features) == (
        reference.top, reference.model, reference.provider, reference.features)
    assert prediction.timings.inference_ms == 0 and prediction.timings.batch_size == 0
    assert prediction.timings.preprocess_ms == 0.3
    # The wire form says the same (the schema's rule: a cached prediction names its source).
    assert Prediction.model_validate_json(prediction.model_dump_json()).cache == prediction.cache


def test_each_camera_has_its_own_reference():
    scene_cache = SceneCache(settings())
    model_runs(scene_cache, frame("door-1", noisy_jpeg("chelsea", seed=1)))
    model_runs(scene_cache, frame("yard-1", noisy_jpeg("chelsea", seed=2), camera="yard"))
    assert hit(scene_cache, frame("yard-2", noisy_jpeg("chelsea", seed=3), 0.1, "yard")).source.frame_id == "yard-1"


def test_a_scene_change_goes_to_the_model_and_becomes_the_new_reference():
    scene_cache = SceneCache(settings())
    model_runs(scene_cache, frame("door-1", noisy_jpeg("chelsea", seed=1)))
    changed = frame("door-2", noisy_jpeg("coffee", seed=2), at=0.1)
    assert difference(grey_thumbnail(changed.data, 32), grey_thumbnail(noisy_jpeg("chelsea", 3), 32)) > 10
    model_runs(scene_cache, changed, label="espresso")

    found = hit(scene_cache, frame("door-3", noisy_jpeg("coffee", seed=3), at=0.2))
    assert found.source.frame_id == "door-2" and found.reference.top[0].label == "espresso"


def test_a_camera_whose_scene_keeps_changing_is_checked_less_often_until_it_holds_still():
    scene_cache = SceneCache(settings())
    outcomes: dict[int, str] = {}

    def stream(first: int, last: int, scene) -> None:
        for i in range(first, last):
            f = frame(f"door-{i}", noisy_jpeg(scene(i), seed=i), at=i / 100)
            found = scene_cache.check(f, V1)
            if isinstance(found, Probe):
                scene_cache.remember(f, found, answer(f))
            outcomes[i] = "unchecked" if found is None else "model" if isinstance(found, Probe) else "cached"

    stream(0, 16, lambda i: ("chelsea", "coffee", "rocket")[i % 3])  # every frame another scene
    # The first change costs nothing; from the second in a row 1, 3, 7 frames go to the model unchecked.
    assert [i for i, o in outcomes.items() if o == "model"] == [0, 1, 2, 4, 8]
    assert all(outcomes[i] == "unchecked" for i in (3, 5, 6, 7, *range(9, 16)))
    stream(16, 34, lambda i: "astronaut")  # then it holds still
    # door-16 is the fifth change in a row: 15 frames unchecked, then door-32 finds the scene unchanged.
    assert outcomes[16] == "model" and all(outcomes[i] == "unchecked" for i in range(17, 32))
    assert outcomes[32] == outcomes[33] == "cached"  # and, a hit having ended the changes, every frame is checked


def test_a_reference_older_than_max_age_is_not_given_again():
    scene_cache = SceneCache(settings(max_age_s=2.0))
    model_runs(scene_cache, frame("door-1", noisy_jpeg("chelsea", seed=1)))
    assert hit(scene_cache, frame("door-2", noisy_jpeg("chelsea", seed=2), at=2.0)).source.age_ms == 2000.0
    model_runs(scene_cache, frame("door-3", noisy_jpeg("chelsea", seed=3), at=2.01))  # 2.01 s old: the model runs
    assert hit(scene_cache, frame("door-4", noisy_jpeg("chelsea", seed=4), at=2.5)).source.frame_id == "door-3"


def test_at_most_max_consecutive_cached_answers_in_a_row_then_the_model_runs():
    scene_cache = SceneCache(settings(max_consecutive=3))
    model_runs(scene_cache, frame("door-0", noisy_jpeg("chelsea", seed=0)))
    for i in range(1, 4):
        found = hit(scene_cache, frame(f"door-{i}", noisy_jpeg("chelsea", seed=i), at=i / 10))
        assert found.source.frame_id == "door-0"
    model_runs(scene_cache, frame("door-4", noisy_jpeg("chelsea", seed=4), at=0.4))  # the fourth in a row
    assert hit(scene_cache, frame("door-5", noisy_jpeg("chelsea", seed=5), at=0.5)).source.frame_id == "door-4"


def test_a_model_swap_invalidates_every_answer():
    scene_cache = SceneCache(settings())
    same = noisy_jpeg("chelsea", seed=1)
    model_runs(scene_cache, frame("door-1", same))
    # Another model (as a worker still on the old one could leave behind): neither exact nor scene.
    model_runs(scene_cache, frame("door-2", same, at=0.1), model=V2)
    # The service clears the cache when it installs a model; a batch checked before the clear and
    # remembered after it leaves nothing behind.
    late = frame("door-3", noisy_jpeg("coffee", seed=3), at=0.2)
    stale = scene_cache.check(late, V2)
    assert isinstance(stale, Probe)
    scene_cache.clear()
    scene_cache.remember(late, stale, answer(late, V2))
    assert isinstance(scene_cache.check(frame("door-4", same, at=0.3), V2), Probe)
    assert isinstance(scene_cache.check(frame("door-5", noisy_jpeg("coffee", seed=5), at=0.4), V2), Probe)


def test_exact_repeats_are_answered_across_cameras_without_counting_against_the_cap_until_max_age():
    scene_cache = SceneCache(settings(max_consecutive=1, max_age_s=1.0))
    still = noisy_jpeg("astronaut", seed=1)
    model_runs(scene_cache, frame("door-1", still))
    for i in range(2, 6):  # far past max_consecutive: the same bytes give the same answer
        found = hit(scene_cache, frame(f"door-{i}", still, at=i / 10))
        assert (found.source.match, found.source.frame_id) == ("exact", "door-1")
    assert hit(scene_cache, frame("lobby-1", still, 0.6, camera="lobby")).source.match == "exact"
    # The exact hits did not use up the scene's one cached answer...
    assert hit(scene_cache, frame("door-6", noisy_jpeg("astronaut", seed=6), at=0.7)).source.match == "scene"
    # ...and they expire like any answer.
    model_runs(scene_cache, frame("door-7", still, at=1.5))


def test_the_exact_table_is_bounded_and_can_be_off():
    scene_cache = SceneCache(settings(exact_entries=2, max_consecutive=1))
    frames = [frame(f"{name}-1", photos.jpeg(name), camera=name) for name in ("chelsea", "coffee", "rocket")]
    for f in frames:
        model_runs(scene_cache, f)
    assert hit(scene_cache, frame("rocket-2", frames[2].data, 0.1, "rocket")).source.match == "exact"
    # chelsea's bytes fell out of the two entries: only its scene answers (once, max_consecutive 1).
    assert hit(scene_cache, frame("chelsea-2", frames[0].data, 0.1, "chelsea")).source.match == "scene"
    assert isinstance(scene_cache.check(frame("chelsea-3", frames[0].data, 0.2, "chelsea"), V1), Probe)

    no_exact = SceneCache(settings(exact_entries=0))
    model_runs(no_exact, frames[0])
    assert hit(no_exact, frame("chelsea-2", frames[0].data, 0.1, "chelsea")).source.match == "scene"


def test_a_truncated_frame_is_left_for_the_decoder_to_refuse():
    scene_cache = SceneCache(settings())
    data = noisy_jpeg("chelsea", seed=1)
    model_runs(scene_cache, frame("door-1", data))
    # OpenCV would decode the first half grey-filled, close enough to the scene to be answered.
    assert scene_cache.check(frame("door-2", data[: len(data) // 2], at=0.1), V1) is None


@pytest.mark.parametrize("name", photos.BUNDLED)
def test_the_reduced_decode_thumbnail_is_the_full_decode_one_within_the_default_threshold(name):
    data = photos.jpeg(name)
    full = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE)
    expected = cv2.resize(full, (32, 32), interpolation=cv2.INTER_AREA)
    # Whichever way a frame's thumbnail were made, it would be judged the same scene.
    assert difference(grey_thumbnail(data, 32), expected) <= CacheSettings().threshold
    # A PNG has no scaled decode: its thumbnail is the full decode's.
    png = photos.png(name)
    full_png = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_GRAYSCALE)
    assert np.array_equal(grey_thumbnail(png, 32), cv2.resize(full_png, (32, 32), interpolation=cv2.INTER_AREA))


def test_an_unsure_answer_is_never_reused_for_an_unchanged_scene():
    scene_cache = SceneCache(settings(min_margin=0.08))
    first = frame("door-1", noisy_jpeg("chelsea", seed=1))
    probe = scene_cache.check(first, V1)
    assert isinstance(probe, Probe)
    unsure = answer(first).model_copy(update={"top": [ClassScore(index=281, label="tabby", score=0.40),
                                                      ClassScore(index=282, label="tiger cat", score=0.36)]})
    scene_cache.remember(first, probe, unsure)
    # Same scene, fresh noise: the margin 0.04 is under the floor, so the model sees the frame.
    model_runs(scene_cache, frame("door-2", noisy_jpeg("chelsea", seed=2), at=0.25))
    # Its answer is sure (0.8 alone): the next frame of the scene is answered from the cache.
    hit(scene_cache, frame("door-3", noisy_jpeg("chelsea", seed=3), at=0.5))


def test_past_its_camera_bound_the_least_recently_seen_camera_is_forgotten():
    scene_cache = SceneCache(settings(), cameras=2)
    for at, camera in enumerate(("door", "yard", "gate")):  # a third camera: door, the oldest, is forgotten
        model_runs(scene_cache, frame(f"{camera}-1", noisy_jpeg("coffee", seed=at), at=at * 0.1, camera=camera))
    model_runs(scene_cache, frame("door-2", noisy_jpeg("coffee", seed=9), at=0.4, camera="door"))
    hit(scene_cache, frame("gate-2", noisy_jpeg("coffee", seed=10), at=0.5, camera="gate"))
