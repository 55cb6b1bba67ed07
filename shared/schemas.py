"""Every message that crosses a process boundary, as pydantic v2 models. docs/protocol.md documents them."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

WIRE_VERSION = 1


class _Message(BaseModel):
    # Unknown fields are an error, not silently dropped: a typo in a client shows up at once.
    model_config = ConfigDict(extra="forbid", frozen=True)


class Encoding(StrEnum):
    JPEG = "jpeg"
    PNG = "png"


class FrameEnvelope(_Message):
    """A frame with metadata, msgpack-encoded. Raw JPEG/PNG bytes on the frames topic are also accepted."""

    # Strict where a wrong type would otherwise be coerced: a number is not a frame id, text is not bytes.
    frame_id: Annotated[str, Field(strict=True, min_length=1, max_length=128)]
    encoding: Encoding
    data: Annotated[bytes, Field(strict=True, min_length=1)]
    # The camera's wall clock, seconds since the epoch. Informational only: latency figures come
    # from the receiving service's monotonic clock, because device clocks disagree.
    captured_at: float | None = None


class ClassScore(_Message):
    index: int
    label: str
    score: float


class Timings(_Message):
    """Milliseconds on the inference service's monotonic clock, from the frame's arrival."""

    queued_ms: float
    preprocess_ms: float
    inference_ms: float
    total_ms: float
    batch_size: int


class ModelRef(_Message):
    name: str
    version: int
    sha256: str


class Prediction(_Message):
    v: int = WIRE_VERSION
    device: str
    camera: str
    frame_id: str
    captured_at: float | None
    top: list[ClassScore]
    model: ModelRef
    provider: str
    timings: Timings
    published_at: float


class ErrorReason(StrEnum):
    UNDECODABLE = "undecodable"
    OVERSIZED = "oversized"
    MALFORMED_ENVELOPE = "malformed_envelope"
    EMPTY = "empty"
    PROVIDER_FALLBACK = "provider_fallback"
    INTERNAL = "internal"


class ErrorReport(_Message):
    v: int = WIRE_VERSION
    device: str
    service: str
    reason: ErrorReason
    detail: str
    camera: str | None = None
    frame_id: str | None = None
    at: float


class ServiceState(StrEnum):
    ONLINE = "online"
    OFFLINE = "offline"


class ProviderReport(_Message):
    requested: list[str]
    available: list[str]
    active: str
    fallback: bool


class InferenceStats(_Message):
    frames_received: int = 0
    frames_rejected: int = 0
    frames_dropped: int = 0
    predictions_published: int = 0
    batches: int = 0
    queue_depth: int = 0


class ServiceStatus(_Message):
    v: int = WIRE_VERSION
    device: str
    service: str
    state: ServiceState
    at: float
    edgefleet_version: str
    # Why the service went offline: "shutdown" when it stopped cleanly, "connection lost" from the will.
    reason: str | None = None
    model: ModelRef | None = None
    provider: ProviderReport | None = None
    inference: InferenceStats | None = None
