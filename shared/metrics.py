"""Counters that several threads bump: the paho network thread, the inference worker, the status timer."""

from __future__ import annotations

import threading


class Counter:
    """An int that only grows, safe to add to from any thread; reading it takes no lock."""

    def __init__(self) -> None:
        self._value = 0
        self._lock = threading.Lock()

    def add(self, n: int = 1) -> None:
        with self._lock:
            self._value += n

    @property
    def value(self) -> int:
        return self._value
