"""The inference service's errors: one base, InferenceError, beneath edgefleet's EdgefleetError.

A start-up path names InferenceError (with shared's ModelError) where it means "ours, already worded for
a person", and anything else surfaces as a traceback: a bug. As Roboflow's camera/exceptions.py keeps
StreamError under its package, each error here keeps the built-in base its callers already catch
(ValueError, RuntimeError) beside InferenceError.
"""

from __future__ import annotations

from shared.errors import EdgefleetError
from shared.schemas import ErrorReason


class InferenceError(EdgefleetError):
    """Base of every error the inference service raises on purpose."""


class FrameRejected(InferenceError):
    """A frame refused at receive; the service answers it on the error topic and goes on.

    Attributes:
        reason: the wire reason the error report carries.
        detail: what was wrong, for a person (also the exception's message).
        frame_id: the frame's id where one was read (an envelope's, or the one given to a raw frame).
    """

    def __init__(self, reason: ErrorReason, detail: str, frame_id: str | None = None) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
        self.frame_id = frame_id


class UndecodableFrame(InferenceError, ValueError):
    """Bytes that OpenCV cannot turn into a whole image: corrupt, truncated, or not JPEG/PNG."""


class Closed(InferenceError):
    """put() on a backlog that was closed: the service is draining and takes no more frames."""


class UnknownProvider(InferenceError, ValueError):
    """An execution provider name that ONNX Runtime does not know (a typo in the config)."""


class ProviderRefused(InferenceError, RuntimeError):
    """The strict policy and a session that is not on the first requested provider."""


class SwitchLate(InferenceError, RuntimeError):
    """The switch's deadline passed before the new model was ready; it is discarded."""
