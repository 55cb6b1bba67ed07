"""The inference service's counters, in one object: bumped by paho's network thread (received,
rejected at receive, dropped) and the workers (rejected at decode, published, lost, batches), read
by the status timer and, at scrape time, by the Prometheus collector (metrics.py). Every frame
received is counted once more, in exactly one of rejected, dropped, published, lost or dropped by a
plugin, or it is still queued or in a worker (docs/protocol.md)."""

from __future__ import annotations

from dataclasses import dataclass, field

from services.inference.batcher import CameraCounts
from shared.metrics import Counter
from shared.schemas import MAX_CAMERA_KEYS, ErrorReason, InferenceStats


def _camera_counts() -> CameraCounts:
    return CameraCounts(MAX_CAMERA_KEYS)


def _by_reason(cameras: int = MAX_CAMERA_KEYS) -> dict[ErrorReason, CameraCounts]:
    return {reason: CameraCounts(cameras) for reason in ErrorReason}  # every reason made here: the map never grows


@dataclass(frozen=True)
class Counters:
    received: Counter = field(default_factory=Counter)
    rejected: Counter = field(default_factory=Counter)
    dropped: Counter = field(default_factory=Counter)
    published: Counter = field(default_factory=Counter)
    lost: Counter = field(default_factory=Counter)
    batches: Counter = field(default_factory=Counter)
    escalated: Counter = field(default_factory=Counter)  # of `published`: answered by a cascade's stage 2
    cached: Counter = field(default_factory=Counter)  # of `published`: answered by the scene cache, no model run
    dropped_by_plugins: Counter = field(default_factory=Counter)  # answered, but a plugin said not to publish
    dropped_by_camera: CameraCounts = field(default_factory=_camera_counts)
    # For the metrics only (the status carries the totals above): each bounded like dropped_by_camera.
    received_by_camera: CameraCounts = field(default_factory=_camera_counts)
    published_by_camera: CameraCounts = field(default_factory=_camera_counts)
    rejected_by_reason: dict[ErrorReason, CameraCounts] = field(default_factory=_by_reason)  # each by camera
    cached_exact: Counter = field(default_factory=Counter)  # of `cached`: the same pixels as an answered frame
    cached_scene: Counter = field(default_factory=Counter)  # of `cached`: a scene within the change threshold
    stage1: Counter = field(default_factory=Counter)  # of `published`: a cascade's stage 1 stood (model run)
    swaps_ok: Counter = field(default_factory=Counter)
    swaps_failed: Counter = field(default_factory=Counter)

    @classmethod
    def capped(cls, cameras: int) -> Counters:
        """Counters that name at most `cameras` cameras per count (the rest under CameraCounts.OTHER)."""
        return cls(dropped_by_camera=CameraCounts(cameras), received_by_camera=CameraCounts(cameras),
                   published_by_camera=CameraCounts(cameras), rejected_by_reason=_by_reason(cameras))

    def receive(self, camera: str) -> None:
        """Counts one frame of `camera` received."""
        self.received.add()
        self.received_by_camera.add(camera)

    def reject(self, reason: ErrorReason, camera: str | None) -> None:
        """Counts one frame of `camera` (None: none known, counted under CameraCounts.OTHER) answered with an
        error report for `reason`."""
        self.rejected.add()
        self.rejected_by_reason[reason].add(camera or CameraCounts.OTHER)

    def drop(self, camera: str) -> None:
        """Counts one frame of `camera` dropped unanswered (overload, or arrived while draining)."""
        self.dropped.add()
        self.dropped_by_camera.add(camera)

    def snapshot(self, queue_depth: int) -> InferenceStats:
        """The counters as the status message carries them.

        Args:
            queue_depth: frames queued now, not yet taken by a worker.

        Returns:
            The wire form (shared.schemas.InferenceStats).
        """
        return InferenceStats(
            frames_received=self.received.value,
            frames_rejected=self.rejected.value,
            frames_dropped=self.dropped.value,
            predictions_published=self.published.value,
            predictions_lost=self.lost.value,
            batches=self.batches.value,
            predictions_escalated=self.escalated.value,
            predictions_cached=self.cached.value,
            predictions_dropped_by_plugins=self.dropped_by_plugins.value,
            queue_depth=queue_depth,
            dropped_by_camera=self.dropped_by_camera.snapshot(),
        )
