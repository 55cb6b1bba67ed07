"""A simulator process's use of the machine: its allocator, its open-file limit, and what it measures of
itself (peak RSS, the bytes its devices' state folders hold)."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import resource
import sys
from pathlib import Path


class Malloc:
    """glibc's allocator, tamed for a process of many short-lived worker threads (no-op elsewhere).

    Each thread that allocates gets its own malloc arena (up to 8 per core), and an arena keeps what
    it once held: a rollout's workers each read 1 MiB download chunks, and the freed chunks stayed
    resident, 1.6 MB per device after a rollout of a 1 MiB model. Two arenas, and free memory handed
    back to the system every second, keep the process near what its devices really hold (the peak,
    which trimming does not lower, is reported beside it: peak_rss_bytes).
    """

    M_ARENA_MAX = -8  # mallopt's parameter number (malloc.h)

    def __init__(self) -> None:
        self._libc = None
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            libc.mallopt(self.M_ARENA_MAX, 2)
            libc.malloc_trim.argtypes = [ctypes.c_size_t]
            self._libc = libc
        except (OSError, AttributeError):  # not glibc (musl, macOS): its allocator is left as it is
            pass

    def trim(self) -> None:
        """Hands free heap memory back to the system (glibc's malloc_trim)."""
        if self._libc is not None:
            self._libc.malloc_trim(0)


def raise_open_files() -> int:
    """RLIMIT_NOFILE's soft limit raised to its hard limit (each device holds a socket and files).

    :returns: the limit now.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def peak_rss_bytes() -> int:
    """The process's highest resident set size so far (VmHWM; ru_maxrss where there is no /proc)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def state_bytes(folder: Path) -> int:
    """The bytes the files under `folder` occupy (allocated blocks: what tmpfs holds in memory), a file
    hard-linked from many places (the seed model every store's fallback links to) counted once.

    :param Path folder: the devices' state folder.
    :returns: the bytes; 0 if it does not exist.
    """
    seen: set[tuple[int, int]] = set()
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                st = os.lstat(os.path.join(root, name))
            except OSError:  # removed meanwhile (a download's part file renamed, a SQLite journal)
                continue
            if (key := (st.st_dev, st.st_ino)) not in seen:
                seen.add(key)
                total += st.st_blocks * 512
    return total
