"""Batch: the bounded backlog between the network thread and the inference worker.

Under overload the oldest frames go first, since a live camera's newest frame is the one worth
answering, and every drop is counted. A batch is whatever is queued, up to max_batch, optionally
waiting up to max_wait after its first frame for more.
"""

from __future__ import annotations

import threading
import time
from collections import deque

from services.inference.intake import Frame


class FrameBacklog:
    def __init__(self, capacity: int) -> None:
        self._frames: deque[Frame] = deque()
        self._capacity = capacity
        self._ready = threading.Condition()
        self._closed = False

    def put(self, frame: Frame) -> Frame | None:
        """Queues a frame; returns the frame dropped to make room, if any."""
        with self._ready:
            dropped = self._frames.popleft() if len(self._frames) >= self._capacity else None
            self._frames.append(frame)
            self._ready.notify()
            return dropped

    def take(self, max_batch: int, max_wait_s: float, idle_timeout_s: float) -> list[Frame] | None:
        """Up to max_batch frames; empty if none came within idle_timeout_s; None once the backlog is
        closed and drained."""
        with self._ready:
            if not self._ready.wait_for(lambda: self._frames or self._closed, idle_timeout_s):
                return []
            if not self._frames:
                return None
            if max_wait_s > 0 and not self._closed:
                deadline = self._frames[0].received + max_wait_s if self._frames else time.monotonic()
                while len(self._frames) < max_batch and not self._closed:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0 or not self._ready.wait(remaining):
                        break
            n = min(max_batch, len(self._frames))
            return [self._frames.popleft() for _ in range(n)]

    def close(self) -> None:
        """No more frames will come; take() returns what is left, then empty lists."""
        with self._ready:
            self._closed = True
            self._ready.notify_all()

    def __len__(self) -> int:
        return len(self._frames)
