"""The outbox's oldest-record age (what EdgefleetOutboxStuck watches) on a real SQLite file: a record
whose body no longer decodes is exactly the one that can sit at the head while the link is down, so its
age is never hidden."""

from __future__ import annotations

import sqlite3
import time

from services.telemetry.outbox import Outbox
from shared.schemas import ResourceSample


def _sample(at: float) -> ResourceSample:
    return ResourceSample(device="edge-o", cpu_percent=1, memory_percent=2, memory_used_bytes=3, disk_percent=4, at=at)


def test_an_undecodable_oldest_record_still_has_its_age(tmp_path):
    outbox = Outbox(tmp_path / "outbox.db", "edge-o", 1 << 30)
    before = time.time()
    outbox.append([_sample(before - 3600), _sample(before)])
    assert outbox.oldest_at() == before - 3600  # the body's own time while it decodes
    outbox.db.execute("UPDATE records SET body = ? WHERE seq = 1", (b"\xc1not msgpack",))
    outbox.close()
    reopened = Outbox(tmp_path / "outbox.db", "edge-o", 1 << 30)
    oldest = reopened.oldest_at()
    assert oldest is not None and before <= oldest <= time.time(), "its queued time, not None (age 0)"
    reopened.close()


def test_a_row_written_before_the_queued_time_column_ages_from_when_it_was_found(tmp_path):
    path = tmp_path / "outbox.db"
    Outbox(path, "edge-o", 1 << 30).close()
    db = sqlite3.connect(path)  # an outbox file as the previous release made it: no queued_at column
    db.executescript("DROP TABLE records; CREATE TABLE records (seq INTEGER PRIMARY KEY, kind TEXT NOT NULL, "
                     "expires REAL, size INTEGER NOT NULL, body BLOB NOT NULL);")
    db.execute("INSERT INTO records VALUES (1, 'metric', NULL, 3, x'c1c1c1')")
    db.execute("INSERT OR REPLACE INTO meta VALUES ('next_seq', 2)")
    db.commit()
    db.close()
    outbox = Outbox(path, "edge-o", 1 << 30)  # the column is added on open
    found = outbox.oldest_at()
    assert found is not None and found <= time.time()
    assert outbox.oldest_at() == found, "it keeps ageing from when it was found"
    outbox.append([_sample(time.time())])  # and new rows are written with the column
    outbox.close()
