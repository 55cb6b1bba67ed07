"""What both of sync's stores (store.py: models, plugin_store.py: plugins) keep on disk: the newest
installed versions, never the one in use or the one to go back to; and only the downloads still wanted."""

from __future__ import annotations

import shutil
from collections.abc import Collection, Iterable
from pathlib import Path


def prune(installed: Iterable[Path], keep_versions: int, keep: Collection[Path]) -> list[Path]:
    """Removes installed version folders beyond the newest `keep_versions` (by modification time).

    :param installed: the store's installed version folders.
    :param keep_versions: how many of the newest to keep whatever they are.
    :param keep: folders never removed (the active and the previous version), compared resolved.
    :returns: the folders removed.
    :raises OSError: the disk.
    """
    kept = {p.resolve() for p in keep}
    newest_first = sorted(installed, key=lambda p: p.stat().st_mtime, reverse=True)
    removed = [p for p in newest_first[keep_versions:] if p.resolve() not in kept]
    for folder in removed:
        shutil.rmtree(folder)
    return removed


def discard_parts(staging: Path, keep: Collection[Path] = ()) -> None:
    """Deletes every download (`*.part`) in `staging` but those in `keep`."""
    for part in staging.glob("*.part"):
        if part not in keep:
            part.unlink(missing_ok=True)
