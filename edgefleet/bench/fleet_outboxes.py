"""The simulated devices' outboxes as the fleet bench reads them once the simulators stopped: which
sequence numbers each device still holds, and the next it would have given (everything below it was
made), so the audit can account for every record a device ever made, its last batch's too."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class OutboxState:
    """A stopped device's outbox.

    Attributes:
        epoch: its epoch as batch ids spell it (8 hex digits).
        held: the sequence numbers it still holds (not acknowledged by the store).
        next_seq: the number its next record would get: 1 .. next_seq - 1 were all made in this epoch.
    """

    epoch: str
    held: frozenset[int]
    next_seq: int

    def made(self) -> range:
        return range(1, self.next_seq)


def read_outbox(path: Path) -> OutboxState | None:
    """What a stopped device's outbox holds; None when there is no outbox file. Read-only: the file is left
    as the device left it.

    Raises:
        sqlite3.Error: the file is not an outbox.
    """
    if not path.exists():
        return None
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        meta = dict(db.execute("SELECT key, value FROM meta WHERE key IN ('epoch', 'next_seq')").fetchall())
        held = frozenset(row[0] for row in db.execute("SELECT seq FROM records"))
    finally:
        db.close()
    epoch = f"{int(meta['epoch']):08x}" if "epoch" in meta else ""
    return OutboxState(epoch, held, int(meta.get("next_seq", 1)))
