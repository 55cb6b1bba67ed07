"""The sync service's error base: every error sync raises on purpose derives from SyncError (and so from
shared.errors.EdgefleetError), whatever other base it keeps for callers that already catch that one.

Beneath it: StepFailed and Rejected, Superseded (rollout.py), DownloadFailed, DownloadInterrupted and
Cancelled (download.py), SmokeFailed (smoke.py)."""

from __future__ import annotations

from shared.errors import EdgefleetError


class SyncError(EdgefleetError):
    """Base of the sync service's deliberate errors: its message is meant for a person (a sync report)."""
