"""The telemetry service's error base: every error telemetry raises on purpose derives from
TelemetryError (and so from shared.errors.EdgefleetError). Beneath it: OutboxError (outbox.py)."""

from __future__ import annotations

from shared.errors import EdgefleetError


class TelemetryError(EdgefleetError):
    """Base of the telemetry service's deliberate errors: its message is meant for a person."""
