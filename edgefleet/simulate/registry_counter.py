"""The registry (S3) traffic of a simulator process's devices, counted on their shared boto3 client
through botocore's event hooks, and the bytes their downloads really fetched (RegistryIo's callback)."""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any

from edgefleet.simulate.stats import RegistryStats


class RegistryCounter:
    """Counts a boto3 S3 client's request attempts by operation (every sending, retries and failures
    included), its failed ones by kind, and the body bytes downloads fetched. Thread-safe: the rollout
    workers share the client.

    :param client: a boto3 S3 client; the counter registers itself on it.
    """

    def __init__(self, client: Any) -> None:
        self._lock = threading.Lock()
        self._requests: Counter[str] = Counter()
        self._errors: Counter[str] = Counter()
        self._bytes = 0
        events = client.meta.events
        events.register("before-send.s3", self._before_send)
        events.register("after-call.s3", self._after_call)
        events.register("after-call-error.s3", self._after_call_error)

    def downloaded(self, nbytes: int) -> None:
        """RegistryIo's `downloaded` callback: bytes a download step fetched and kept (a cut-short body
        counts what was read, not its Content-Length).

        :param int nbytes: the bytes.
        """
        with self._lock:
            self._bytes += nbytes

    def _before_send(self, event_name: str = "", **_: Any) -> None:
        with self._lock:
            self._requests[event_name.rsplit(".", 1)[-1]] += 1

    def _after_call(self, http_response: Any = None, parsed: Any = None, **_: Any) -> None:
        """An answer arrived; an HTTP error (404 NoSuchKey, 503 SlowDown) is a failed request too."""
        status = getattr(http_response, "status_code", 200)
        if status >= 400:
            code = parsed.get("Error", {}).get("Code") if isinstance(parsed, dict) else None
            with self._lock:
                self._errors[str(code or f"HTTP {status}")] += 1

    def _after_call_error(self, exception: BaseException | None = None, **_: Any) -> None:
        """No answer: a timeout, a reset connection, a refused connect."""
        with self._lock:
            self._errors[type(exception).__name__ if exception is not None else "unknown"] += 1

    def stats(self) -> RegistryStats:
        """What was counted so far."""
        with self._lock:
            return RegistryStats(requests=dict(self._requests), errors=dict(self._errors), bytes=self._bytes)
