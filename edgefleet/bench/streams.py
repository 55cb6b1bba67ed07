"""Camera streams the benches make from real photos, frame by frame, ahead of the measurement.

- static_camera: fixed cameras. Each camera watches one scene (a real photo); every frame is that photo
  with fresh Gaussian sensor noise, encoded again as a JPEG (so no two frames have the same bytes, as
  with a real sensor), and every `change_every_s` seconds each camera cuts to another photo.
- recognised: the photos a model recognises (a sure top-1 on the clean photo), the scenes of a fixed
  camera that watches what its model was chosen for.
- changing: every frame shows something else (augmented crops of the photos, round robin), none repeated.

Frames are made before they are sent, so the world's core only publishes during a run.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from edgefleet import photos
from edgefleet.models import dataset
from services.inference.decode import decode_bgr
from services.inference.postprocess import top_k
from services.inference.preprocess import Preprocessor
from services.inference.session import ModelSession
from shared.manifest import load_verified

JPEG_QUALITY = 90  # as photos.jpeg, what the camera simulator sends
# A scene counts as recognised when the model's top-1 probability on its clean photo is at least this:
# so sure an answer does not flip with the static stream's sensor noise (sigma 2), and a cache that reuses
# it answers what the model would have. Unsure answers do flip: on two noisy frames of one unsure photo
# the model agrees with itself 91 % of the time. EfficientNet-Lite0 FP32 on the 11 photos.EVALUATION
# (2026-12-07): 2 pass, coffee (espresso 0.949) and camera (tripod 0.959); on 40 noisy frames of each its
# top-1 never changed, stayed >= 0.95 and led the runner-up by >= 0.94. The other 9 score 0.106-0.381
# (chelsea 0.381, rocket 0.309, china 0.295, flower 0.266, grace_hopper 0.257, hubble_deep_field 0.195,
# astronaut 0.179, immunohistochemistry 0.115, coins 0.106).
RECOGNISED_TOP1 = 0.5


@dataclass(frozen=True)
class StreamFrame:
    camera: str
    data: bytes  # JPEG
    scene: str  # the photo it shows


def static_camera(cameras: Sequence[str], rate_hz: float, seconds: float, *, change_every_s: float,
                  noise_sigma: float, seed: int = 13, scenes: Sequence[str] = photos.EVALUATION) -> list[StreamFrame]:
    """Frames of fixed cameras, in send order (round robin over the cameras) at `rate_hz` in all.

    Args:
        cameras: the camera ids; camera i starts on scene i.
        rate_hz: frames per second over all cameras (the time base of the scene changes).
        seconds: the stream's length.
        change_every_s: every this many seconds each camera moves on to the next scene.
        noise_sigma: the sensor noise's standard deviation, in grey levels (0-255), fresh every frame.
        seed: the noise's seed (the stream is reproducible).
        scenes: the photos, by edgefleet.photos name.

    Returns:
        round(rate_hz * seconds) frames.

    Raises:
        ValueError: no cameras or scenes, or a rate, length or change interval that is not positive.
    """
    if not cameras or not scenes or min(rate_hz, seconds, change_every_s) <= 0 or noise_sigma < 0:
        raise ValueError("a static-camera stream needs cameras, scenes, and positive rate, length and interval")
    rng = np.random.default_rng(seed)
    pictures = {name: cv2.cvtColor(photos.photo_rgb(name), cv2.COLOR_RGB2BGR) for name in scenes}
    frames = []
    for n in range(round(rate_hz * seconds)):
        camera = n % len(cameras)
        scene = scenes[(camera + int(n / rate_hz // change_every_s)) % len(scenes)]
        frames.append(StreamFrame(cameras[camera], _noisy_jpeg(pictures[scene], noise_sigma, rng), scene))
    return frames


def recognised(model_dir: Path, scenes: Sequence[str] = photos.EVALUATION,
               min_top1: float = RECOGNISED_TOP1) -> dict[str, float]:
    """The scenes a model recognises: those whose clean photo (the JPEG the camera simulator sends) gets a
    top-1 probability of at least `min_top1`, run as the service runs it (its scaled decode, preprocessing,
    session and softmax).

    Args:
        model_dir: a single model's folder (not a cascade), verified before it runs.
        scenes: the candidate photos, by edgefleet.photos name.
        min_top1: the least top-1 probability.

    Returns:
        Each recognised scene's top-1 probability, in the order of `scenes`.

    Raises:
        ValueError: fewer than 2 scenes pass (a static-camera stream needs two to change between); the
            message gives every scene's top-1.
        ModelError: the model does not verify.
    """
    manifest, path = load_verified(model_dir)
    session = ModelSession.open(manifest, path, ["cpu"], False, intra_op_threads=1)
    pre = Preprocessor(manifest.preprocessing)
    crop = manifest.preprocessing.crop
    x = np.empty((len(scenes), 3, crop, crop), dtype=np.float32)
    for i, name in enumerate(scenes):
        pre(decode_bgr(photos.jpeg(name), manifest.preprocessing.resize_shorter), x[i])
    top1 = {name: float(p) for name, p in zip(scenes, top_k(session.run(x), 1)[1][:, 0], strict=True)}
    sure = {name: p for name, p in top1.items() if p >= min_top1}
    if len(sure) < 2:
        raise ValueError(f"the model in {model_dir} recognises {len(sure)} of {len(scenes)} scenes (top-1 >= "
                         f"{min_top1:g}), a static-camera stream needs 2; top-1: "
                         + ", ".join(f"{name} {p:.3f}" for name, p in top1.items()))
    return sure


def changing(cameras: Sequence[str], count: int, seed: int = 29,
             sources: Sequence[str] = photos.EVALUATION) -> list[StreamFrame]:
    """`count` frames that all differ: augmented crops (35-100 % of the area, flips, 0.5-1.5x scale) of the
    photos, round robin, and round robin over the cameras, so consecutive frames of a camera show
    different photos.

    Raises:
        ValueError: no cameras or sources, or a count below 1.
    """
    if not cameras or not sources or count < 1:
        raise ValueError("a changing stream needs cameras, sources and at least one frame")
    per_source = -(-count // len(sources))
    crops = [dataset.crops_of(source, per_source, seed + i) for i, source in enumerate(sources)]
    ordered = (crops[i % len(sources)][i // len(sources)] for i in range(count))
    return [StreamFrame(cameras[n % len(cameras)], data, sources[n % len(sources)]) for n, data in enumerate(ordered)]


def cycle(frames: Sequence[StreamFrame]) -> Iterator[tuple[str, bytes]]:
    """The frames as a harness sends them, (camera, bytes), over and over."""
    return ((f.camera, f.data) for f in itertools.cycle(frames))


def _noisy_jpeg(bgr: np.ndarray, sigma: float, rng: np.random.Generator) -> bytes:
    noise = rng.standard_normal(bgr.shape, dtype=np.float32)
    noise *= sigma
    noise += bgr
    noise += 0.5  # so the conversion below rounds rather than truncates
    noisy = np.clip(noise, 0, 255, out=noise).astype(np.uint8)
    ok, buf = cv2.imencode(".jpg", noisy, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise RuntimeError("OpenCV could not encode a frame as JPEG")
    return bytes(buf.tobytes())
