"""Fresh S3 servers without the wait: every test still gets its own moto_server process, new and never
used by another test, but each is started while the test before it runs. Starting one costs ~1 s (moto's
imports, measured 0.83–0.96 s here), which some 80 tests would otherwise spend waiting."""

from __future__ import annotations

import contextlib
import threading
from concurrent.futures import Future, ThreadPoolExecutor

from edgefleet.s3server import S3Server


def _started() -> S3Server:
    server = S3Server()
    try:
        return server.start()
    except BaseException:
        server.close()
        raise


class _Spares:
    def __init__(self) -> None:
        self._starter = ThreadPoolExecutor(1, thread_name_prefix="s3-spare")
        self._next: Future[S3Server] | None = None
        self._lock = threading.Lock()

    def take(self) -> S3Server:
        """A started server of the caller's own (close it when done); the next one starts behind it."""
        with self._lock:
            ready, self._next = self._next, self._starter.submit(_started)
        with contextlib.suppress(Exception):  # a spare that failed to start or died: start one now
            if ready is not None and (server := ready.result(60)).process and server.process.poll() is None:
                return server
        return _started()

    def close(self) -> None:
        with self._lock:
            spare, self._next = self._next, None
        with contextlib.suppress(Exception):
            if spare is not None:
                spare.result(60).close()
        self._starter.shutdown(wait=True)


_spares = _Spares()
take = _spares.take
close = _spares.close
