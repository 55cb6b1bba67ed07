"""The cloud_ingest service's error base, beneath shared.errors.EdgefleetError. What ingest refuses today
is a payload (shared.codec.DecodeError, dead-lettered with its reason) or a store that does not answer
(botocore's errors, retried once running; at start, StoreUnreachable); an error ingest itself raises on
purpose derives from IngestError."""

from __future__ import annotations

from shared.errors import EdgefleetError


class IngestError(EdgefleetError):
    """Base of the cloud_ingest service's deliberate errors: its message is meant for a person."""


class StoreUnreachable(IngestError):
    """The telemetry bucket cannot be reached or created at start: the service cannot do its one job."""
