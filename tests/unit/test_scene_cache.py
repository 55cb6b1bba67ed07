"""The scene cache on real photos (edgefleet.photos) with sensor noise made here: a static camera's
frames differ in every byte but show the same scene. No model runs: the answers remembered are typed
Predictions as the model would publish them, since the cache only stores and hands them back."""

from __future__ import annotations

import struct
import time
import zlib
from functools import cache

import cv2
import numpy as np
import pytest

from edgefleet import photos
from services.inference.cache import Hit, Probe, SceneCache, difference
from services.inference.decode import decode_bgr, grey_thumbnail
from services.inference.intake import Frame
from services.inference.pixel_digest import pixel_digest
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


def test_an_unsure_answer_is_never_reused_and_its_camera_skips_the_thumbnail_until_a_sure_one():
    scene_cache = SceneCache(settings(min_margin=0.08))
    first = frame("door-1", noisy_jpeg("chelsea", seed=1))
    probe = scene_cache.check(first, V1)
    assert isinstance(probe, Probe) and probe.thumbnail is not None
    unsure = answer(first).model_copy(update={"top": [ClassScore(index=281, label="tabby", score=0.40),
                                                      ClassScore(index=282, label="tiger cat", score=0.36)]})
    scene_cache.remember(first, probe, unsure)
    # Same scene, fresh noise: the margin 0.04 is under the floor, so the model sees the frame, and
    # no thumbnail is decoded for a check that could only miss.
    second = frame("door-2", noisy_jpeg("chelsea", seed=2), at=0.25)
    probe = scene_cache.check(second, V1)
    assert isinstance(probe, Probe) and probe.thumbnail is None
    scene_cache.remember(second, probe, answer(second))
    # Its answer is sure (0.8 alone): remembering it decodes the thumbnail the check skipped, so the very
    # next frame is answered from it, with no second model run to get a reference.
    assert hit(scene_cache, frame("door-3", noisy_jpeg("chelsea", seed=3), at=0.5)).source.frame_id == "door-2"


def test_an_unsure_answer_to_a_frame_whose_thumbnail_was_skipped_stays_without_one():
    scene_cache = SceneCache(settings(min_margin=0.08))
    doubt = {"top": [ClassScore(index=281, label="tabby", score=0.40), ClassScore(index=282, label="tiger cat",
                                                                                  score=0.36)]}
    for n in range(1, 4):  # every answer unsure: no frame after the first decodes a thumbnail, not even remembered
        current = frame(f"door-{n}", noisy_jpeg("chelsea", seed=n), at=n * 0.25)
        probe = scene_cache.check(current, V1)
        assert isinstance(probe, Probe) and (probe.thumbnail is None) == (n > 1)
        scene_cache.remember(current, probe, answer(current).model_copy(update=doubt))
    assert scene_cache._scenes["door"].thumbnail is None


def test_an_unsure_answer_of_another_model_does_not_skip_the_thumbnail():
    scene_cache = SceneCache(settings(min_margin=0.08))
    first = frame("door-1", noisy_jpeg("chelsea", seed=1))
    probe = scene_cache.check(first, V1)
    assert isinstance(probe, Probe)
    scene_cache.remember(first, probe, answer(first).model_copy(update={"top": [
        ClassScore(index=281, label="tabby", score=0.40), ClassScore(index=282, label="tiger cat", score=0.36)]}))
    # V1's doubt says nothing of V2: its answer to this frame becomes a full reference.
    model_runs(scene_cache, frame("door-2", noisy_jpeg("chelsea", seed=2), at=0.25), model=V2)
    assert hit(scene_cache, frame("door-3", noisy_jpeg("chelsea", seed=3), at=0.5), V2).source.frame_id == "door-2"


def test_past_its_camera_bound_the_least_recently_seen_camera_is_forgotten():
    scene_cache = SceneCache(settings(), cameras=2)
    for at, camera in enumerate(("door", "yard", "gate")):  # a third camera: door, the oldest, is forgotten
        model_runs(scene_cache, frame(f"{camera}-1", noisy_jpeg("coffee", seed=at), at=at * 0.1, camera=camera))
    model_runs(scene_cache, frame("door-2", noisy_jpeg("coffee", seed=9), at=0.4, camera="door"))
    hit(scene_cache, frame("gate-2", noisy_jpeg("coffee", seed=10), at=0.5, camera="gate"))


def test_a_camera_kept_alive_by_exact_repeats_alone_is_not_the_one_forgotten():
    scene_cache = SceneCache(settings(), cameras=2)
    still = noisy_jpeg("coffee", seed=0)
    model_runs(scene_cache, frame("door-1", still))
    model_runs(scene_cache, frame("yard-1", noisy_jpeg("coffee", seed=1), 0.1, "yard"))
    assert hit(scene_cache, frame("door-2", still, at=0.2)).source.match == "exact"  # door seen after yard
    model_runs(scene_cache, frame("gate-1", noisy_jpeg("coffee", seed=2), 0.3, "gate"))  # past the bound
    assert hit(scene_cache, frame("door-3", noisy_jpeg("coffee", seed=3), at=0.4)).source.frame_id == "door-1"
    assert isinstance(scene_cache.check(frame("yard-2", noisy_jpeg("coffee", seed=4), 0.5, "yard"), V1), Probe)


def test_a_camera_kept_alive_by_backing_off_alone_is_not_the_one_forgotten():
    scene_cache = SceneCache(settings(), cameras=2)
    for i, scene in enumerate(("chelsea", "coffee", "rocket")):  # two changes in a row: door backs off
        model_runs(scene_cache, frame(f"door-{i}", noisy_jpeg(scene, seed=i), at=i / 10))
    model_runs(scene_cache, frame("yard-1", noisy_jpeg("coffee", seed=5), 0.3, "yard"))
    assert scene_cache.check(frame("door-3", noisy_jpeg("chelsea", seed=6), at=0.4), V1) is None  # unchecked
    model_runs(scene_cache, frame("gate-1", noisy_jpeg("coffee", seed=7), 0.5, "gate"))  # past the bound
    # door's reference (door-2, rocket) survived: rocket again is answered from it; yard was forgotten.
    assert hit(scene_cache, frame("door-4", noisy_jpeg("rocket", seed=8), at=0.6)).source.frame_id == "door-2"
    assert isinstance(scene_cache.check(frame("yard-2", noisy_jpeg("coffee", seed=9), 0.7, "yard"), V1), Probe)


# -- exact: what decides the pixels, not every byte ---------------------------------------------------------


def jpeg_segment(marker: int, payload: bytes) -> bytes:
    return bytes([0xFF, marker]) + struct.pack(">H", len(payload) + 2) + payload


def exif(orientation: int, stamp: bytes) -> bytes:
    """An APP1 Exif segment as a camera writes one: IFD0 with Orientation and DateTime (little-endian)."""
    date_at = 8 + 2 + 2 * 12 + 4  # after the TIFF header and the two-entry IFD0
    ifd = (struct.pack("<H", 2) + struct.pack("<HHIHH", 0x0112, 3, 1, orientation, 0)
           + struct.pack("<HHII", 0x0132, 2, 20, date_at) + struct.pack("<I", 0))
    tiff = b"II\x2a\x00" + struct.pack("<I", 8) + ifd + stamp[:19].ljust(19, b"\x00") + b"\x00"
    return jpeg_segment(0xE1, b"Exif\x00\x00" + tiff)


def stamped(jpeg: bytes, *segments: bytes) -> bytes:
    """The JPEG with `segments` inserted after its SOI marker, as a camera stamps each frame."""
    return jpeg[:2] + b"".join(segments) + jpeg[2:]


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def with_chunk(png: bytes, chunk: bytes) -> bytes:
    """The PNG with `chunk` inserted after its IHDR (signature 8 bytes, IHDR 25)."""
    return png[:33] + chunk + png[33:]


def exact_outcome(reference: bytes, other: bytes) -> Hit | Probe | None:
    """What the cache says of `other` from another camera (no scene reference) once the model answered `reference`."""
    scene_cache = SceneCache(settings())
    model_runs(scene_cache, frame("door-1", reference))
    return scene_cache.check(frame("lobby-1", other, 0.1, "lobby"), V1)


def test_jpegs_differing_only_in_comments_and_exif_stamps_are_exact_repeats():
    photo = photos.jpeg("chelsea")
    first = stamped(photo, jpeg_segment(0xFE, b"frame 1"), exif(1, b"2026:12:07 08:00:01"),
                    jpeg_segment(0xE5, b"counter 0001"))
    second = stamped(photo, jpeg_segment(0xFE, b"frame 2 of the day"), exif(1, b"2026:12:07 08:00:02"),
                     jpeg_segment(0xE5, b"counter 0002"))
    assert first != second
    found = exact_outcome(first, second)
    assert isinstance(found, Hit) and found.source.match == "exact"


def _left_out_variants() -> list[tuple[str, bytes, bytes]]:
    """(what, a frame, the same frame with only what the digest leaves out changed)."""
    jpeg, png = photos.jpeg("chelsea"), photos.png("coins")
    noise = bytes(range(256)) * 8
    return [
        ("JPEG comment", stamped(jpeg, jpeg_segment(0xFE, b"frame 1")), stamped(jpeg, jpeg_segment(0xFE, b"frame 22"))),
        ("JPEG Exif DateTime", stamped(jpeg, exif(6, b"2026:12:07 08:00:01")),
         stamped(jpeg, exif(6, b"2027:01:01 00:00:00"))),
        ("JPEG APP2 ICC profile", jpeg, stamped(jpeg, jpeg_segment(0xE2, b"ICC_PROFILE\x00\x01\x01" + noise))),
        ("JPEG APP5 counter", stamped(jpeg, jpeg_segment(0xE5, b"0001")), stamped(jpeg, jpeg_segment(0xE5, b"0002"))),
        ("JPEG APP13 Photoshop", jpeg, stamped(jpeg, jpeg_segment(0xED, b"Photoshop 3.0\x00" + noise))),
        ("PNG tEXt", png, with_chunk(png, png_chunk(b"tEXt", b"Comment\x00frame 2"))),
        ("PNG zTXt", png, with_chunk(png, png_chunk(b"zTXt", b"Comment\x00\x00" + zlib.compress(noise)))),
        ("PNG iTXt", png, with_chunk(png, png_chunk(b"iTXt", b"Comment\x00\x00\x00en\x00\x00frame 2"))),
        ("PNG tIME", png, with_chunk(png, png_chunk(b"tIME", struct.pack(">HBBBBB", 2026, 12, 7, 8, 0, 1)))),
        ("PNG pHYs", png, with_chunk(png, png_chunk(b"pHYs", struct.pack(">IIB", 3780, 3780, 1)))),
    ]


@pytest.mark.parametrize("what, first, second", _left_out_variants(), ids=lambda v: v if isinstance(v, str) else "")
def test_what_the_exact_digest_leaves_out_decodes_to_the_same_pixels(what, first, second):
    """The exact match's premise, pinned to the OpenCV installed: should a decoder start applying one of
    these (an ICC profile, a PNG's text), this fails before the cache can give a wrong answer."""
    assert first != second and pixel_digest(first) == pixel_digest(second), what
    for min_side in (0, 256):  # the full decode, and the scaled one the service uses
        assert np.array_equal(decode_bgr(first, min_side), decode_bgr(second, min_side)), (what, min_side)
    assert np.array_equal(grey_thumbnail(first, 32), grey_thumbnail(second, 32)), what


def test_jpegs_whose_pixels_differ_are_not_exact_repeats():
    photo = photos.jpeg("chelsea")
    ok, requantised = cv2.imencode(".jpg", _photo_bgr("chelsea"), [cv2.IMWRITE_JPEG_QUALITY, 70])
    assert ok
    assert isinstance(exact_outcome(photo, requantised.tobytes()), Probe)
    # The same scan under another EXIF orientation: OpenCV turns the picture, so it is another image.
    upright, turned = stamped(photo, exif(1, b"2026:12:07")), stamped(photo, exif(6, b"2026:12:07"))
    shapes = [cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR).shape for data in (upright, turned)]
    assert shapes[0] != shapes[1]
    assert isinstance(exact_outcome(upright, turned), Probe)
    # One byte of the scan changed (one block's coefficients): the pixels differ.
    flipped = bytearray(photo)
    flipped[len(photo) // 2] ^= 0x01
    assert isinstance(exact_outcome(photo, bytes(flipped)), Probe)


def test_a_png_with_a_text_chunk_added_is_an_exact_repeat_but_not_one_with_an_exif_orientation():
    png = photos.png("coins")
    found = exact_outcome(png, with_chunk(png, png_chunk(b"tEXt", b"Comment\x00frame 2")))
    assert isinstance(found, Hit) and found.source.match == "exact"
    turned_tiff = (b"MM\x00\x2a" + struct.pack(">IH", 8, 1) + struct.pack(">HHIHH", 0x0112, 3, 1, 6, 0)
                   + struct.pack(">I", 0))
    turned = with_chunk(png, png_chunk(b"eXIf", turned_tiff))
    assert cv2.imdecode(np.frombuffer(turned, np.uint8), cv2.IMREAD_COLOR).shape[:2] == (
        cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR).shape[1::-1])  # OpenCV turns it
    assert isinstance(exact_outcome(png, turned), Probe)


def test_a_png_made_undecodable_by_a_text_chunk_between_its_image_data_is_not_an_exact_repeat():
    png = photos.png("coins")
    idats, i = [], 8
    while i < len(png):
        (length,) = struct.unpack_from(">I", png, i)
        if png[i + 4:i + 8] == b"IDAT":
            idats.append(i)
        i += 12 + length
    split = png[:idats[1]] + png_chunk(b"tEXt", b"Comment\x00frame 2") + png[idats[1]:]
    assert cv2.imdecode(np.frombuffer(split, np.uint8), cv2.IMREAD_COLOR) is None  # libpng: not enough image data
    assert pixel_digest(split) != pixel_digest(png)


def test_malformed_frames_are_digested_whole_without_raising():
    photo = stamped(photos.jpeg("chelsea"), jpeg_segment(0xFE, b"frame 1"))
    restamped = stamped(photos.jpeg("chelsea"), jpeg_segment(0xFE, b"frame 2"))
    overlong = photo[:2] + b"\xff\xfe\xff\xf0" + photo[2:]  # a COM segment claiming 65 KB, past the end
    bad_marker = photo[:2] + b"\x12\x34" + photo[2:]
    largest_exif = exif(1, b"2026:12:07")  # not malformed: an Exif segment of the largest length there is
    largest_exif = largest_exif[:2] + b"\xff\xff" + largest_exif[4:].ljust(0xFFFF - 2, b"\x00")
    png = photos.png("coins")
    for data in (photo[:2], photo[:3], photo[:40], overlong, bad_marker, png[:20], png[:100], b"", b"GIF89a",
                 stamped(photo, largest_exif)):
        assert len(pixel_digest(data)) == 16 and pixel_digest(data) == pixel_digest(bytes(data))
    # Truncated before the scan, the walk cannot tell what decides the pixels: only the same bytes match.
    assert pixel_digest(photo[:60]) != pixel_digest(restamped[:60])
    assert pixel_digest(photo) == pixel_digest(restamped)  # whole, they do
    assert pixel_digest(overlong) != pixel_digest(photo)
