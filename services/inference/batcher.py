"""Batch: the bounded backlog between the network thread and the inference workers.

Under overload the oldest frames go first, since a live camera's newest frame is the one worth
answering; the caller counts every drop. Drops are fair across cameras: when the backlog is full the
frame dropped is the oldest of the camera holding the most frames (the one over its share of
capacity / active cameras), so one flooding camera evicts its own frames, never another camera's.
This is Mosquitto's per-client max_queued_messages and Vector's per-source buffers in one deque: a
shared bound, but each sender pays for its own excess. A batch is whatever is queued, in arrival
order across cameras, up to max_batch, optionally waiting up to max_wait after its first frame for more.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque

from services.inference.errors import Closed
from services.inference.intake import Frame


class FrameBacklog:
    """The frames received and not yet taken by a worker, at most `capacity` of them."""

    def __init__(self, capacity: int) -> None:
        self._frames: deque[Frame] = deque()  # arrival order, across cameras
        self._per_camera: Counter[str] = Counter()
        self._capacity = capacity
        self._changed = threading.Condition()
        self._closed = False

    def put(self, frame: Frame) -> Frame | None:
        """Queues a frame without ever blocking.

        Returns:
            None, or the frame dropped to make room when the backlog was full: the oldest frame of
            the camera that holds the most frames, counting this one (possibly this camera's own
            oldest, or this frame itself when the backlog holds a single frame).

        Raises:
            Closed: close() was called; the caller counts the frame dropped.
        """
        with self._changed:
            if self._closed:
                raise Closed()
            self._frames.append(frame)
            self._per_camera[frame.camera] += 1
            dropped = self._drop_from_largest() if len(self._frames) > self._capacity else None
            self._changed.notify()
            return dropped

    def _drop_from_largest(self) -> Frame:
        # Ties go to the camera counted first (Counter keeps insertion order); the newcomer's count
        # already includes its new frame, so a camera at its share that sends more pays for it.
        victim = max(self._per_camera, key=self._per_camera.__getitem__)
        # The flooding camera's oldest frame sits near the front; the scan stops there.
        index = next(i for i, f in enumerate(self._frames) if f.camera == victim)
        dropped = self._frames[index]
        del self._frames[index]
        self._forget(dropped)
        return dropped

    def _forget(self, frame: Frame) -> None:
        left = self._per_camera[frame.camera] - 1
        if left:
            self._per_camera[frame.camera] = left
        else:  # only active cameras count towards the share
            del self._per_camera[frame.camera]

    def take(self, max_batch: int, max_wait_s: float = 0.0, idle_timeout_s: float = 0.5) -> list[Frame] | None:
        """The next batch, oldest frames first, across cameras.

        Args:
            max_batch: most frames to take.
            max_wait_s: how long to wait for more frames after the first queued one arrived.
            idle_timeout_s: how long to wait for a first frame.

        Returns:
            Up to max_batch frames; an empty list if none came within idle_timeout_s; None once
            closed and drained.
        """
        with self._changed:
            if not self._changed.wait_for(lambda: self._frames or self._closed, idle_timeout_s):
                return []
            if not self._frames:
                return None
            if max_wait_s > 0:
                deadline = self._frames[0].received + max_wait_s
                while len(self._frames) < max_batch and not self._closed:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0 or not self._changed.wait(remaining):
                        break
            batch = [self._frames.popleft() for _ in range(min(max_batch, len(self._frames)))]
            for frame in batch:
                self._forget(frame)
            if self._frames:  # several workers share the backlog: let the next one start
                self._changed.notify()
            return batch

    def close(self) -> None:
        """No more frames will come: take() hands out what is left, then None."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()

    def __len__(self) -> int:
        return len(self._frames)


class CameraCounts:
    """Counts per camera, naming at most `max_keys` cameras (the first seen) and summing the rest under
    "_other": camera ids come from topics, so a client inventing ids must not grow the map (or the
    retained status) without end."""

    OTHER = "_other"

    def __init__(self, max_keys: int) -> None:
        self._counts: dict[str, int] = {}
        self._max_keys = max_keys
        self._lock = threading.Lock()

    def add(self, camera: str, n: int = 1) -> None:
        """Adds n to the camera's count (to "_other" once max_keys other cameras are named)."""
        with self._lock:
            key = camera if camera in self._counts or len(self._counts) < self._max_keys else self.OTHER
            self._counts[key] = self._counts.get(key, 0) + n

    def snapshot(self) -> dict[str, int]:
        """A copy of the counts by camera."""
        with self._lock:
            return dict(self._counts)
