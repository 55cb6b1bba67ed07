"""One rollout as the sync service's shared I/O primitives see it (registry reads, downloads, backoff),
a model's or a plugin's alike: what ends it, which worker's Progress it ticks, and how it reports."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from services.sync.rollout import Superseded
from shared.lifecycle import Progress
from shared.schemas import ModelRef, SyncState


@dataclass(frozen=True)
class Job:
    """One rollout, as SyncService.read_object and download_object take it.

    :param rollout_id: the rollout, for logs.
    :param target: what a report names while the rollout's manifest is not yet known.
    :param superseded: whether a newer rollout or shutdown ends this one (polled between steps).
    :param progress: the worker's Progress, ticked before each bounded wait.
    :param report: publishes (state, target, reason, progress_bytes) on the rollout's own topic.
    """

    rollout_id: str
    target: ModelRef  # what a report names while the rollout's manifest is not yet known
    superseded: Callable[[], bool]
    progress: Progress
    # (state, target, reason, progress_bytes): the retained report on the rollout's own topic
    report: Callable[[SyncState, ModelRef, str | None, int | None], None]

    def check(self) -> None:
        """Raises Superseded if a newer rollout or shutdown ends this one."""
        if self.superseded():
            raise Superseded()
