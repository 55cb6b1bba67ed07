"""How files that a power cut must never leave half-written are changed: write to a temporary, fsync
it, rename it over the old one, fsync the folder. Sync's model store (services/sync/store.py) and plugin
store (services/sync/plugin_store.py) change the disk only through these, and so does
shared.plugin.write_active (the active plugin set, which tools write too): one implementation.

Files are ARTIFACT_FILE_MODE (0644) and folders ARTIFACT_DIR_MODE (0755) before they are renamed into
place, whatever the umask: inference may run as another user than sync. A file that holds a secret is
written with write_atomic(..., mode=0o600): created so, never readable by others on the way.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

from shared.manifest import ARTIFACT_DIR_MODE, ARTIFACT_FILE_MODE

# The suffix of everything half-written: a store's repair() removes what a crash left with it.
TMP = ".tmp"


def write_atomic(path: Path, data: bytes, mode: int = ARTIFACT_FILE_MODE) -> None:
    """Replaces `path` with `data`: a reader sees the old file or the new one, never a part of either.

    :param mode: the file's permissions (default ARTIFACT_FILE_MODE, readable by all; 0o600 for a
        secret). The staging file is created with them (the umask can only narrow them until they are
        set exactly, before any byte is written), so neither it nor the file is ever more open than asked.
    :raises OSError: the disk (the old file is left as it was).
    """
    staging = path.with_name(path.name + TMP)
    with os.fdopen(_create_new(staging, mode), "wb") as f:
        os.fchmod(f.fileno(), mode)
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(staging, path)
    fsync_dir(path.parent)


def _create_new(path: Path, mode: int) -> int:
    """A new file opened for writing, created with `mode`; one a crash left there (a leftover staging
    file, or anything planted in its place: a symlink, a file open to all) is removed, never reused.

    :raises FileExistsError: something created it again between the removal and the creation.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    try:
        return os.open(path, flags, mode)
    except FileExistsError:
        path.unlink()
        return os.open(path, flags, mode)


def fsync_file(path: Path) -> None:
    """Flushes a file to disk, readable by all first (a download's .part, a copied seed: umask modes)."""
    with path.open("rb") as f:
        os.fchmod(f.fileno(), ARTIFACT_FILE_MODE)
        os.fsync(f.fileno())


def make_dir(path: Path) -> None:
    """A new folder (it must not exist), readable by all."""
    path.mkdir()
    os.chmod(path, ARTIFACT_DIR_MODE)


def fsync_dir(path: Path) -> None:
    """Flushes a folder's entries (a rename into it) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def put_in_place(staging: Path, final: Path, verify: Callable[[Path], object]) -> None:
    """Moves a fully written staging folder to `final` in one rename, once `verify` accepts it.

    :param verify: reads the staged folder back and raises if it is not what was meant to be installed.
    :raises: whatever `verify` raises; the staged folder is removed first, nothing is put in place.
    :raises OSError: the disk.
    """
    fsync_dir(staging)
    try:
        verify(staging)
    except Exception:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(final)
    os.replace(staging, final)
    fsync_dir(final.parent)
