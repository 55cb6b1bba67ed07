"""Hot swap: the model being served, and the thread that replaces it on request.

A new model is loaded and warmed beside the old one (the old keeps serving meanwhile), then swapped in
by one reference assignment. Each worker takes the reference once per batch, so a batch is decoded,
run and labelled by one model from start to end, and its predictions name that model. The old model's
session is freed when the last batch holding it finishes.

Freed is not returned: glibc keeps the heap pages an ONNX Runtime session released, and resident
memory grew by a third over 20 swaps (216 -> 298 MB, `edgefleet bench swap`). Once the old model is
really gone, malloc_trim hands those pages back (measured in isolation: +79 % over 20 session
replacements without it, +2 % with it).

A cascade folder (shared.cascade) is served as one model: a session per member, both loaded, verified
against the cascade's pins and warmed before the one swap, so a cascade swaps and rolls back as a unit.
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
from typing import Generic, Protocol, TypeVar

import numpy as np

from services.inference.errors import SwitchLate
from services.inference.preprocess import Preprocessor
from services.inference.session import ModelSession
from shared.cascade import CascadeSpec, is_cascade, load_members
from shared.logs import fields
from shared.manifest import ModelError, ModelManifest, load_verified
from shared.schemas import MAX_STR, ModelRef, ModelSwitch, ModelSwitched, PluginSwitch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Escalation:
    """A cascade's second stage: where the frames stage 1 is unsure of go, and when.

    Attributes:
        session: stage 2's session (the large model).
        spec: the cascade's metric and threshold.
        small, large: the members' refs, named in every CascadeAnswer (built once).
    """

    session: ModelSession
    spec: CascadeSpec
    small: ModelRef
    large: ModelRef


@dataclass(frozen=True)
class ServedModel:
    """A model as the workers serve it; for a cascade, `session` is stage 1 and `escalation` stage 2."""

    manifest: ModelManifest  # a cascade's own manifest: its ref, labels and preprocessing
    session: ModelSession
    ref: ModelRef  # named in every prediction: built once
    preprocess: Preprocessor
    decode_min_side: int  # 0: decode every pixel
    escalation: Escalation | None = None  # None: one model, every frame answered by `session`


class Deadlined(Protocol):
    """A request with a deadline: a ModelSwitch, or a PluginSwitch (plugins.py)."""

    @property
    def at(self) -> float: ...

    @property
    def timeout_s(self) -> float | None: ...


class LoadModel(Protocol):
    """What the service loads models with: the first one at start and each one a switch names."""

    def __call__(self, model_dir: Path, *, sha256: str | None = None) -> ServedModel: ...


@dataclass(frozen=True, kw_only=True)
class ModelLoader:
    """Loads a model folder the way this service serves it (a LoadModel).

    Attributes:
        providers: execution providers in order of preference.
        strict: refuse a session that is not on the first of them.
        threads_per_run: ONNX Runtime threads per run (0: its default).
        scaled_decode: decode large JPEGs at a reduced scale, down to the model's resize_shorter.
    """

    providers: list[str]
    strict: bool
    threads_per_run: int
    scaled_decode: bool

    def __call__(self, model_dir: Path, *, sha256: str | None = None) -> ServedModel:
        """The model in `model_dir`, verified against its manifest, with its session open (not warmed).

        A cascade folder gets a session per member, each member verified against its own manifest and
        the cascade's SHA-256 pin first (shared.cascade.load_members).

        Args:
            model_dir: a folder holding manifest.json and the model file it names (or a cascade folder).
            sha256: the model file's digest the caller expects (a switch request's; for a cascade, its
                cascade.json's); None: any.

        Returns:
            The model ready to serve.

        Raises:
            ModelError: missing, unreadable, not what its manifest says, or not the expected digest; a
                cascade member missing, tampered with, not the model its pin names, or itself a cascade.
            UnknownProvider: a provider name ONNX Runtime does not know.
            ProviderRefused: `strict` and the first provider is not the active one.
        """
        # Resolved once: through the store's `current` link, the digest would be taken of one version and
        # the members and the file ONNX Runtime opens read from whichever version the link names by then.
        model_dir = model_dir.resolve()
        manifest, path = load_verified(model_dir)
        if sha256 is not None and manifest.sha256 != sha256:
            raise ModelError(f"{model_dir} holds {manifest.sha256[:16]}…, the switch asked for {sha256[:16]}…")
        escalation = None
        if is_cascade(manifest):
            spec, members = load_members(model_dir, manifest)
            (small, small_path), (large, large_path) = members
            session = self._open(small, small_path)
            escalation = Escalation(session=self._open(large, large_path), spec=spec, small=small.ref(),
                                    large=large.ref())
        else:
            session = self._open(manifest, path)
        return ServedModel(
            manifest=manifest, session=session, ref=manifest.ref(), preprocess=Preprocessor(manifest.preprocessing),
            decode_min_side=manifest.preprocessing.resize_shorter if self.scaled_decode else 0, escalation=escalation,
        )

    def _open(self, manifest: ModelManifest, path: Path) -> ModelSession:
        if is_cascade(manifest):  # ONNX Runtime would fail on cascade.json with a parse error that says less
            raise ModelError(f"{path.parent} is a cascade inside a cascade: a member must be one ONNX model")
        return ModelSession.open(manifest, path, self.providers, strict=self.strict,
                                 intra_op_threads=self.threads_per_run)


def warm(model: ServedModel) -> None:
    """One run at batch 1 on every session (both stages of a cascade), so the first real batch (or the
    first escalated sub-batch) does not pay for ONNX Runtime's lazy set-up."""
    crop = model.manifest.preprocessing.crop
    zeros = np.zeros((1, 3, crop, crop), dtype=np.float32)
    model.session.run(zeros)
    if model.escalation is not None:
        model.escalation.session.run(zeros)


def _release_when_gone(old: weakref.ref[ServedModel], timeout_s: float = 10.0) -> None:
    """Waits for the last batch holding the old model to finish, then returns freed memory to the OS."""
    deadline = time.monotonic() + timeout_s
    while old() is not None and time.monotonic() < deadline:
        gc.collect()
        time.sleep(0.01)
    if _malloc_trim is not None:
        _malloc_trim(0)


def _find_malloc_trim() -> Callable[[int], int] | None:
    try:  # glibc only; musl and macOS have no malloc_trim and need none of this
        trim: Callable[[int], int] = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    return trim


_malloc_trim = _find_malloc_trim()


R = TypeVar("R", ModelSwitch, PluginSwitch)


class SwitchThread(Generic[R]):
    """Owns one thread that handles switch requests in arrival order, each with its receipt time (its
    deadline runs from there too); the model Swapper and the PluginSwitcher are its two kinds."""

    def __init__(self, name: str) -> None:
        self._requests: queue.Queue[tuple[R, float] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name=name)

    def start(self) -> None:
        self._thread.start()

    def request(self, switch: R) -> None:
        """Queues a switch; its deadline runs from `switch.at` and from now (the receipt), whichever ends first."""
        self._requests.put((switch, time.monotonic()))

    def stop(self) -> None:
        """Lets a switch in progress complete, starts none after it, and joins the thread."""
        self._requests.put(None)
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        while (item := self._requests.get()) is not None:
            self._switch(*item)

    def _switch(self, switch: R, received: float) -> None:
        raise NotImplementedError


class Swapper(SwitchThread[ModelSwitch]):
    """Owns the swap thread: takes switch requests, loads and warms off the frame path, installs.

    Args:
        load: loads the model a switch names (its folder, checked against its digest).
        install: serves a model from the next batch on and returns the one it replaces.
        serving: the model served now, named in a refusal.
        reply: publishes the answer to each request, accepted or refused.
    """

    def __init__(self, *, load: LoadModel, install: Callable[[ServedModel], ServedModel],
                 serving: Callable[[], ModelRef], reply: Callable[[ModelSwitched], None]) -> None:
        super().__init__("swapper")
        self._load, self._install, self._serving, self._reply = load, install, serving, reply

    def _switch(self, switch: ModelSwitch, received: float) -> None:
        started = time.monotonic()
        try:
            in_time(switch, received)
            model = self._load(Path(switch.model_dir), sha256=switch.sha256)
            warm(model)
            # sync has given up on a late load: installing it would disagree with the store
            in_time(switch, received)
        except Exception as exc:  # a bad model must never stop the service: the old one keeps serving
            log.warning("model switch refused", extra=fields(request=switch.request_id, error=str(exc)))
            self._reply(ModelSwitched(request_id=switch.request_id, ok=False, serving=self._serving(),
                                      error=str(exc)[:MAX_STR], at=time.time()))  # schemas bound every string
            return
        old = weakref.ref(self._install(model))
        serving = model.ref
        del model
        load_ms = round((time.monotonic() - started) * 1000, 1)
        log.info("model switched", extra=fields(request=switch.request_id, model=serving.name,
                                                version=serving.version, load_ms=load_ms))
        self._reply(ModelSwitched(request_id=switch.request_id, ok=True, serving=serving, load_ms=load_ms,
                                  at=time.time()))
        _release_when_gone(old)


def in_time(switch: Deadlined, received: float) -> None:
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
        raise SwitchLate(f"late: the switch's deadline ({switch.timeout_s:g} s) passed {late_by:.3f} s ago; "
                         "the load is discarded")
