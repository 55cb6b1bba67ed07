"""A simulated device's rollout.Io: what the real state machine (services.sync.rollout.Machine) asks of
the world, answered the way the device's own sync service answers it, except for inference.

- The registry: the real RegistryIo (size-capped signed manifests verified against the trusted keys,
  resumable ranged GETs into the device's own store, SHA-256 checked, backoff, the paced rollout's pause).
- Reports: SyncReport, retained, QoS 1, on the device's sync/state topic, as SyncService publishes them.
- Inference is skipped: the simulated inference (SimInference) serves a folder the moment it is asked
  (no load, no smoke test: see skip_smoke_test), and its predictions are drawn from the recorded
  distribution (predictions.Draw) when the canary asks for a window.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from edgefleet.simulate.link import DeviceLink
from edgefleet.simulate.predictions import Draw
from services.sync import canary
from services.sync.membership import supersedes
from services.sync.registry_io import RegistryIo, RegistrySteps
from services.sync.rollout import Superseded
from services.sync.store import ModelStore
from shared import topics
from shared.codec import WireFormat, encode
from shared.config import SyncSettings
from shared.lifecycle import Progress
from shared.manifest import MANIFEST_FILE, ModelManifest
from shared.schemas import MAX_STR, CanaryVerdict, ModelRef, Rollout, SyncReport, SyncState

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from mypy_boto3_s3 import S3Client

JSON = WireFormat.JSON.content_type


def skip_smoke_test(folder: Path) -> None:
    """The simulated device's smoke test: none. Inference is what the simulator skips; the folder was
    already verified whole (size, SHA-256, signature) by the store's install."""


class SimInference:
    """What a simulated device's inference serves, and for how long each model has served.

    :param ModelRef serving: the model at start (the store's `current`).
    :param Draw draw: the device's predictions, drawn from the recording.
    """

    __slots__ = ("model", "_since", "_served", "draw")

    def __init__(self, serving: ModelRef, draw: Draw) -> None:
        self.model, self._since, self.draw = serving, time.monotonic(), draw
        self._served: dict[str, float] = {}  # seconds each model served before, by SHA-256

    def serve(self, model: ModelRef) -> None:
        """Serves `model` from now on: at once, as inference is skipped."""
        now = time.monotonic()
        self._served[self.model.sha256] = self.serving_s(self.model.sha256, now)
        self.model, self._since = model, now

    def serving_s(self, sha256: str, now: float | None = None) -> float:
        """How long the model with this SHA-256 has served in all (0 if never)."""
        before = self._served.get(sha256, 0.0)
        if sha256 != self.model.sha256:
            return before
        return before + (now if now is not None else time.monotonic()) - self._since


class SimSyncIo(RegistrySteps):
    """rollout.Io for one simulated device (see the module's doc).

    :param str device: the device id.
    :param SyncSettings settings: shared by every device of the process (the device id is not read from it).
    :param s3: the process's S3 client (shared; boto3 clients are thread-safe).
    :param trusted: the operators' public keys, shared.
    :param ModelStore store: the device's own store.
    :param DeviceLink link: the device's MQTT session.
    :param SimInference inference: the device's simulated inference.
    :param threading.Event stopping: set at shutdown (every device's waits end).
    :param reported: called with every state this device reports (the process's stats).
    :param downloaded: called with the bytes each download step fetched (the process's registry counter).
    """

    def __init__(self, device: str, settings: SyncSettings, s3: S3Client, trusted: dict[str, Ed25519PublicKey],
                 store: ModelStore, link: DeviceLink, inference: SimInference, stopping: threading.Event,
                 reported: Callable[[str, SyncState], None], downloaded: Callable[[int], None]) -> None:
        self.device, self.settings, self.link, self.inference = device, settings, link, inference
        self.stopping = stopping
        self.changed = threading.Condition()
        self.latest: Rollout | None = None  # the newest rollout message (guarded by `changed`)
        self._reported = reported
        self.registry = RegistryIo(settings, s3, trusted, store, self.superseded, self.changed,
                                   Progress(device), self.report, downloaded)

    # -- the registry: the real code -----------------------------------------------------------------

    # -- reports -------------------------------------------------------------------------------------

    def report(self, state: SyncState, rollout_id: str | None, target: ModelRef | None = None,
               reason: str | None = None, canary: CanaryVerdict | None = None, progress: int | None = None) -> None:
        report = SyncReport(device=self.device, rollout_id=rollout_id, state=state, target=target,
                            serving=self.inference.model, reason=reason[:MAX_STR] if reason else reason,
                            progress_bytes=progress, canary=canary, at=time.time())
        self.link.publish(topics.sync_state(self.device), encode(report), qos=1, retain=True, content_type=JSON)
        self._reported(self.device, state)

    # -- the simulated inference ---------------------------------------------------------------------

    def switch(self, folder: Path, sha256: str) -> None:
        manifest = ModelManifest.model_validate_json((folder / MANIFEST_FILE).read_bytes())
        self.inference.serve(ModelRef(name=manifest.name, version=manifest.version, sha256=sha256))

    def wait_for_samples(self, rollout: Rollout, sha256: str, count: int, timeout_s: float) -> canary.Window:
        draw, deadline = self.inference.draw, time.monotonic() + timeout_s
        with self.changed:
            while (draw.count(served := self.inference.serving_s(sha256)) < count
                   and (left := deadline - time.monotonic()) > 0 and not self.superseded(rollout)):
                until_enough = draw.seconds_for(count) - served if sha256 == self.inference.model.sha256 else left
                self.changed.wait(timeout=min(left, max(0.05, until_enough)))
        if self.stopping.is_set():
            raise Superseded()  # shutdown: the pending canary record makes a restart roll back
        return draw.window(self.settings.canary.window, self.inference.serving_s(sha256))

    def serving_changed(self, sha256: str) -> None:
        """Nothing to do: the simulated inference never fails, so no failure is charged to any model."""

    def inference_serving(self) -> ModelRef | None:
        return self.inference.model

    def superseded(self, rollout: Rollout) -> bool:
        return self.stopping.is_set() or supersedes(self.latest, rollout)
