"""Hot swap: the model being served, and the thread that replaces it on request.

A new model is loaded and warmed beside the old one (the old keeps serving meanwhile), then swapped in
by one reference assignment. Each worker takes the reference once per batch, so a batch is decoded,
run and labelled by one model from start to end, and its predictions name that model. The old model's
session is freed when the last batch holding it finishes.

Freed is not returned: glibc keeps the heap pages an ONNX Runtime session released, and resident
memory grew by a third over 20 swaps (216 -> 298 MB, `edgefleet bench swap`). Once the old model is
really gone, malloc_trim hands those pages back (measured in isolation: +79 % over 20 session
replacements without it, +2 % with it).
"""

from __future__ import annotations

import ctypes
import gc
import logging
import queue
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from services.inference.preprocess import Preprocessor
from services.inference.session import ModelSession
from shared.logs import fields
from shared.manifest import ModelError, ModelManifest, load_verified
from shared.schemas import MAX_STR, ModelRef, ModelSwitch, ModelSwitched

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServedModel:
    manifest: ModelManifest
    session: ModelSession
    ref: ModelRef  # named in every prediction: built once
    preprocess: Preprocessor
    decode_min_side: int  # 0: decode every pixel


def load(model_dir: Path, providers: list[str], strict: bool, threads: int, scaled_decode: bool,
         expected_sha256: str | None = None) -> ServedModel:
    manifest, path = load_verified(model_dir)
    if expected_sha256 is not None and manifest.sha256 != expected_sha256:
        raise ModelError(f"{model_dir} holds {manifest.sha256[:16]}…, the switch asked for {expected_sha256[:16]}…")
    session = ModelSession.open(manifest, path, providers, strict=strict, intra_op_threads=threads)
    return ServedModel(
        manifest=manifest, session=session, ref=manifest.ref(), preprocess=Preprocessor(manifest.preprocessing),
        decode_min_side=manifest.preprocessing.resize_shorter if scaled_decode else 0,
    )


def warm(model: ServedModel) -> None:
    """One run at batch 1, so the first real batch does not pay for ONNX Runtime's lazy set-up."""
    crop = model.manifest.preprocessing.crop
    model.session.run(np.zeros((1, 3, crop, crop), dtype=np.float32))


def _release_when_gone(old: weakref.ref, timeout_s: float = 10.0) -> None:
    """Waits for the last batch holding the old model to finish, then returns freed memory to the OS."""
    deadline = time.monotonic() + timeout_s
    while old() is not None and time.monotonic() < deadline:
        gc.collect()
        time.sleep(0.01)
    if _malloc_trim is not None:
        _malloc_trim(0)


def _find_malloc_trim():
    try:  # glibc only; musl and macOS have no malloc_trim and need none of this
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None


_malloc_trim = _find_malloc_trim()


class Swapper:
    """Owns the swap thread: takes switch requests, loads and warms off the frame path, installs."""

    def __init__(self, loader: Callable[[ModelSwitch], ServedModel], install: Callable[[ServedModel], ServedModel],
                 serving: Callable[[], ModelRef], reply: Callable[[ModelSwitched], None]) -> None:
        self._loader, self._install, self._serving, self._reply = loader, install, serving, reply
        self._requests: queue.Queue[tuple[ModelSwitch, float] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="swapper")

    def start(self) -> None:
        self._thread.start()

    def request(self, switch: ModelSwitch) -> None:
        """Queues a switch; its deadline runs from `switch.at` and from now (the receipt), whichever ends first."""
        self._requests.put((switch, time.monotonic()))

    def stop(self) -> None:
        self._requests.put(None)
        self._thread.join()

    def _run(self) -> None:
        while (item := self._requests.get()) is not None:
            switch, received = item
            started = time.monotonic()
            try:
                _in_time(switch, received)
                model = self._loader(switch)
                warm(model)
                _in_time(switch, received)  # sync has given up on a late load: installing it would disagree with the store
            except Exception as exc:  # a bad model must never stop the service: the old one keeps serving
                log.warning("model switch refused", extra=fields(request=switch.request_id, error=str(exc)))
                self._reply(ModelSwitched(request_id=switch.request_id, ok=False, serving=self._serving(),
                                          error=str(exc)[:MAX_STR], at=time.time()))  # schemas bound every string
                continue
            old = weakref.ref(self._install(model))
            serving = model.ref
            del model
            load_ms = round((time.monotonic() - started) * 1000, 1)
            log.info("model switched", extra=fields(request=switch.request_id, model=serving.name,
                                                    version=serving.version, load_ms=load_ms))
            self._reply(ModelSwitched(request_id=switch.request_id, ok=True, serving=serving, load_ms=load_ms, at=time.time()))
            _release_when_gone(old)


class SwitchLate(RuntimeError):
    """The switch's deadline passed before the new model was ready; it is discarded."""


def _in_time(switch: ModelSwitch, received: float) -> None:
    """Raises SwitchLate when the request's deadline has passed.

    The deadline is `timeout_s` from the sender's `at` (wall clock: sync and inference share the
    device's clock, and this catches a request delivered late from a broker queue) and from receipt
    (monotonic, immune to clock steps), whichever ends first. Like a gRPC deadline, the one who asked
    stops waiting at the deadline, so the one who answers must not act after it.
    """
    if switch.timeout_s is None:
        return
    late_by = max(time.time() - (switch.at + switch.timeout_s), time.monotonic() - (received + switch.timeout_s))
    if late_by > 0:
        raise SwitchLate(f"late: the switch's deadline ({switch.timeout_s:g} s) passed {late_by:.3f} s ago; the load is discarded")
