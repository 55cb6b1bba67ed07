"""The two queues of a frame's way, one class with two overflow policies.

- The backlog between the network thread and the decoder: bounded, and under overload the oldest frame
  goes, since a live camera's newest frame is the one worth answering. Every drop is counted by the caller.
- The batcher between the decoder and the inference worker: small and blocking, so a busy model
  holds the decoder back and the backlog (not memory) absorbs the excess.

A batch is whatever is queued, up to max_batch, optionally waiting up to max_wait after its first item.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Generic, Protocol, TypeVar


class _Timed(Protocol):
    @property
    def received(self) -> float: ...


T = TypeVar("T", bound=_Timed)


class Closed(Exception):
    """put() on a queue that was closed."""


class BatchQueue(Generic[T]):
    def __init__(self, capacity: int, drop_oldest: bool) -> None:
        self._items: deque[T] = deque()
        self._capacity = capacity
        self._drop_oldest = drop_oldest
        self._changed = threading.Condition()
        self._closed = False

    def put(self, item: T) -> T | None:
        """Queues an item. Drop-oldest: returns the item dropped to make room, if any. Blocking:
        waits for room. Raises Closed once close() was called."""
        with self._changed:
            if not self._drop_oldest:
                self._changed.wait_for(lambda: len(self._items) < self._capacity or self._closed)
            if self._closed:
                raise Closed()
            dropped = self._items.popleft() if len(self._items) >= self._capacity else None
            self._items.append(item)
            self._changed.notify_all()
            return dropped

    def take(self, max_batch: int, max_wait_s: float = 0.0, idle_timeout_s: float = 0.5) -> list[T] | None:
        """Up to max_batch items; empty if none came within idle_timeout_s; None once closed and drained."""
        with self._changed:
            if not self._changed.wait_for(lambda: self._items or self._closed, idle_timeout_s):
                return []
            if not self._items:
                return None
            if max_wait_s > 0:
                deadline = self._items[0].received + max_wait_s
                while len(self._items) < max_batch and not self._closed:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0 or not self._changed.wait(remaining):
                        break
            batch = [self._items.popleft() for _ in range(min(max_batch, len(self._items)))]
            self._changed.notify_all()
            return batch

    def close(self) -> None:
        """No more items will come: take() hands out what is left, then None."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()

    def __len__(self) -> int:
        return len(self._items)
