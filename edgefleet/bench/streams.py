"""Camera streams the benches make from real photos, frame by frame, ahead of the measurement.

- static_camera: fixed cameras. Each camera watches one scene (a real photo); every frame is that photo
  with fresh Gaussian sensor noise, encoded again as a JPEG (so no two frames have the same bytes, as
  with a real sensor), and every `change_every_s` seconds each camera cuts to another photo.
- changing: every frame shows something else (augmented crops of the photos, round robin), none repeated.

Frames are made before they are sent, so the world's core only publishes during a run.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from edgefleet import photos
from edgefleet.models import dataset

JPEG_QUALITY = 90  # as photos.jpeg, what the camera simulator sends


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
