"""Batch: the bounded backlog between the network thread and the inference workers.

Under overload the oldest frames go first, since a live camera's newest frame is the one worth
answering; the caller counts every drop. A batch is whatever is queued, across cameras, up to
max_batch, optionally waiting up to max_wait after its first frame for more.
"""

from __future__ import annotations

import threading
import time
from collections import deque

from services.inference.intake import Frame


class Closed(Exception):
    """put() on a backlog that was closed."""


class FrameBacklog:
    def __init__(self, capacity: int) -> None:
        self._frames: deque[Frame] = deque()
        self._capacity = capacity
        self._changed = threading.Condition()
        self._closed = False

    def put(self, frame: Frame) -> Frame | None:
        """Queues a frame; returns the oldest frame, dropped to make room, if the backlog was full.
        Raises Closed once close() was called."""
        with self._changed:
            if self._closed:
                raise Closed()
            dropped = self._frames.popleft() if len(self._frames) >= self._capacity else None
            self._frames.append(frame)
            self._changed.notify()
            return dropped

    def take(self, max_batch: int, max_wait_s: float = 0.0, idle_timeout_s: float = 0.5) -> list[Frame] | None:
        """Up to max_batch frames; empty if none came within idle_timeout_s; None once closed and drained."""
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
