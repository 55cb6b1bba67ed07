"""The store-and-forward outbox: a durable queue on disk (SQLite in WAL mode, synchronous=FULL, so a
committed record survives SIGKILL and a power cut) between what the device learns and the cloud.

- Every record gets the next per-device sequence number at commit; the cloud proves completeness by
  it. A record is only deleted once the cloud acknowledged the batch holding it (ack), or on purpose:
  when the outbox is over its byte cap (the oldest go first, by default) or a record outlived its
  class's TTL. Either way the loss is counted and written as a gap record, which is forwarded like
  any other, so the cloud knows which sequence numbers will never come and why.
- The batch in flight is remembered on disk: after a restart the same records go again as the same
  batch, so the cloud's idempotent writes leave no duplicate; nothing in flight is ever dropped.
- Writes are batched by the caller (append takes many records per transaction): flash is not worn by
  one fsync per record.
- A damaged file is never deleted: at open, a failed integrity check moves it aside, copies every row
  that can still be read into a fresh file, and records the unreadable ones as a `damaged` gap.
- Every outbox file has an epoch, a random id made with it and kept in it. Sequence numbers count
  within an epoch; batch ids and S3 keys carry it. A deleted or lost file is created again with a new
  epoch, and a repaired one gets a new epoch with its kept records renumbered from 1, so numbers that
  start again can never overwrite what an earlier epoch stored.
- Nothing invalid gets in (append validates every record as the cloud will) and nothing stalls the
  queue: a stored row that no longer decodes, a batch the cloud dead-lettered, or one unacknowledged
  after N attempts moves to the `dead_letters` table with its reason and leaves a `dead_lettered` gap,
  which is forwarded. (Greengrass stream manager and Azure edgeHub likewise give a message up after a
  bounded number of tries rather than block the queue behind it.) A gap record among what is given up
  is appended again under a new number: the loss it declares must still reach the cloud, or the audit
  would show those numbers missing with no reason.
- Records taken into memory but not committed because a write failed (disk full) are counted in a
  side file whose bytes were allocated when it was made, so the count can be written when nothing
  else can; the next start turns it into a `write_failed` gap.
- Which store acknowledged what: one range per run of consecutive sequence numbers acknowledged by the
  same telemetry store (its id, TelemetryAck.store), never spanning a number the device dropped itself,
  kept in the same transaction as the deletion the acknowledgement allows. Every batch carries the
  latest ranges (AckRange), so a store set up after the device sent its first records (an emptied
  bucket, a new fleet) can tell them from records it lost, from any one of the device's batches it holds.

Why SQLite and not a queue library: persist-queue and diskcache offer no byte cap with a drop policy,
no per-record TTL and no in-flight batch that survives a restart; SQLite gives the transactions all of
them are built on.
"""

from __future__ import annotations

import functools
import logging
import os
import secrets
import sqlite3
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Concatenate, ParamSpec, TypeVar

from services.telemetry.errors import TelemetryError
from shared.codec import WireFormat, decode, encode
from shared.logs import fields
from shared.schemas import MAX_ACK_RANGES, AckRange, Gap, GapReason, RecordBody, TelemetryRecord

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    seq INTEGER PRIMARY KEY, kind TEXT NOT NULL, expires REAL, size INTEGER NOT NULL, body BLOB NOT NULL,
    queued_at REAL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS dead_letters (
    seq INTEGER NOT NULL, epoch TEXT NOT NULL, body BLOB NOT NULL, reason TEXT NOT NULL, at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS acknowledged (
    first_seq INTEGER PRIMARY KEY, last_seq INTEGER NOT NULL, store TEXT NOT NULL);
"""
P = ParamSpec("P")
R = TypeVar("R")
# queued_at: when the row was committed, the age of a record whose body no longer decodes (files made
# before the column have it added, empty: see Outbox.oldest_at).
_INSERT = "INSERT INTO records (seq, kind, expires, size, body, queued_at) VALUES (?,?,?,?,?,?)"
_Row = tuple[int, str, float | None, int, bytes, float]  # a records row, in _INSERT's order
_LOST = struct.Struct("<q")  # the side file: records lost to a failed write, not yet recorded as a gap


class OutboxError(TelemetryError, ValueError):
    """The outbox cannot be opened as asked (an unknown drop policy)."""


def _locked(method: Callable[Concatenate[Outbox, P], R]) -> Callable[Concatenate[Outbox, P], R]:
    """The writer and the forwarder share one connection: one operation at a time. An operation that
    fails leaves the file in a state the in-memory mirrors may not match (a rolled-back or half-done
    transaction): they are forgotten, and read again from the file when next needed."""

    @functools.wraps(method)
    def wrapper(outbox: Outbox, /, *args: P.args, **kwargs: P.kwargs) -> R:
        with outbox._lock:
            try:
                return method(outbox, *args, **kwargs)
            except BaseException:
                outbox._forget()
                raise

    return wrapper


@dataclass
class OutboxStats:
    records: int = 0
    bytes: int = 0
    next_seq: int = 1
    dropped: dict[str, int] = field(default_factory=dict)  # by reason
    repaired: str | None = None
    refused: int = 0  # invalid records refused at append


class Outbox:
    def __init__(self, path: Path, device: str, max_bytes: int, ttl_s: dict[str, float] | None = None,
                 drop: str = "oldest") -> None:
        if drop not in ("oldest", "newest"):
            raise OutboxError(f"drop policy must be 'oldest' or 'newest', not {drop!r}")
        self.path, self.device, self.max_bytes, self.drop = path, device, max_bytes, drop
        self.ttl_s = ttl_s or {}
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        # Mirrors of what this connection last wrote or read (the outbox's file has one writer: this
        # object, under its lock), so a hot path asks SQLite only to write. `_meta`: the meta table's
        # values (None: no row); `_ranges`: the acknowledged table's latest MAX_ACK_RANGES rows, oldest
        # first, with `_parsed` their AckRange (None: unreadable); None: not read yet, or forgotten.
        self._meta: dict[str, int | None] = {}
        self._ranges: list[tuple[int, int, str]] | None = None
        self._parsed: list[AckRange | None] = []
        self.stats = OutboxStats()
        self.stats.repaired = self._open_checked()
        if self._get("epoch", -1) < 0:
            self._set("epoch", secrets.randbits(32))
        self.epoch = f"{self._get('epoch', 0):08x}"
        self._load_counters()
        self.acknowledged = self._load_acknowledged()
        self._oldest: tuple[int, float] | None = None  # (seq, at) of the oldest record, as last read
        self._lost_path = Path(f"{path}.lost")
        self._record_lost_writes()

    # -- opening, and repair ------------------------------------------------------------------------

    def _connect(self, path: Path) -> sqlite3.Connection:
        db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.executescript(_SCHEMA)
        if "queued_at" not in {row[1] for row in db.execute("PRAGMA table_info(records)")}:
            db.execute("ALTER TABLE records ADD COLUMN queued_at REAL")
        return db

    def _open_checked(self) -> str | None:
        try:
            self.db = self._connect(self.path)
            if self.db.execute("PRAGMA quick_check").fetchone()[0] == "ok":
                return None
            problem = "integrity check failed"
        except sqlite3.DatabaseError as exc:
            problem = str(exc)
        return self._salvage(problem)

    def _salvage(self, problem: str) -> str:
        """Moves the damaged file aside, copies what is readable into a new one, records the rest as a gap."""
        try:
            self.db.close()
        except (sqlite3.Error, AttributeError):
            pass
        aside = self.path.with_name(f"{self.path.name}.damaged-{int(time.time())}")
        for suffix in ("", "-wal", "-shm"):
            source = Path(str(self.path) + suffix)
            if source.exists():
                os.replace(source, Path(str(aside) + suffix))
        self.db = self._connect(self.path)  # a fresh file: it gets a new epoch
        self._forget()
        kept, lost, highest = self._copy_readable(aside)
        self._set("next_seq", highest + 1)
        if lost:
            self._append_gap(lost[0], lost[-1], len(lost), GapReason.DAMAGED)
        note = f"{problem}: kept {kept} records, lost {len(lost)}; the damaged file is kept as {aside.name}"
        log.error("outbox repaired", extra=fields(path=str(self.path), detail=note))
        return note

    def _copy_readable(self, damaged: Path) -> tuple[int, list[int], int]:
        kept, readable, highest = 0, set(), 0
        try:
            old = sqlite3.connect(f"file:{damaged}?mode=ro", uri=True)
        except sqlite3.DatabaseError:
            return 0, [], 0
        try:
            highest = int(old.execute("SELECT value FROM meta WHERE key='next_seq'").fetchone()[0]) - 1
        except (sqlite3.DatabaseError, TypeError):
            pass
        # Row by row by sequence number: a bad page costs the rows on it, not the whole table.
        try:
            top = old.execute("SELECT max(seq) FROM records").fetchone()[0] or 0
        except sqlite3.DatabaseError:
            top = highest
        highest = max(highest, top)
        low = 1
        try:
            low = old.execute("SELECT min(seq) FROM records").fetchone()[0] or 1
        except sqlite3.DatabaseError:
            pass
        # The new epoch numbers from 1: what the cloud acknowledged (below `low`) belongs to the old one.
        offset = low - 1
        for seq in range(low, top + 1):
            try:
                row = old.execute("SELECT seq, kind, expires, size, body FROM records WHERE seq=?", (seq,)).fetchone()
                if row is None:
                    continue
                record = decode(TelemetryRecord, row[4], WireFormat.MSGPACK.content_type)
            except (sqlite3.DatabaseError, ValueError):
                continue
            blob = encode(record.model_copy(update={"seq": seq - offset}), WireFormat.MSGPACK) if offset else row[4]
            self.db.execute(_INSERT.replace("INSERT", "INSERT OR IGNORE", 1),
                            (seq - offset, row[1], row[2], len(blob), blob, time.time()))
            readable.add(seq)
            kept += 1
        old.close()
        lost = [s - offset for s in range(low, highest + 1) if s not in readable]
        return kept, lost, highest - offset

    def _load_counters(self) -> None:
        row = self.db.execute("SELECT count(*), coalesce(sum(size), 0) FROM records").fetchone()
        self.stats.records, self.stats.bytes = row
        self.stats.next_seq = self._get("next_seq", 1)
        for reason in GapReason:
            self.stats.dropped[reason.value] = self._get(f"dropped_{reason.value}", 0)

    def _load_acknowledged(self) -> list[AckRange]:
        """The latest MAX_ACK_RANGES ranges, oldest first. A row that is not a range (not a store id) is
        left out: no claim is better than a wrong one (the audit fails closed)."""
        rows = self.db.execute("SELECT first_seq, last_seq, store FROM acknowledged ORDER BY first_seq DESC LIMIT ?",
                               (MAX_ACK_RANGES,)).fetchall()
        self._ranges = [(first, last, store) for first, last, store in reversed(rows)]
        self._parsed = [_parsed_range(row) for row in self._ranges]
        return [parsed for parsed in self._parsed if parsed is not None]

    def _latest_ranges(self) -> list[tuple[int, int, str]]:
        """The mirror of the acknowledged table's latest rows (read from the file if not held)."""
        if self._ranges is None:
            self._load_acknowledged()
        return self._ranges if self._ranges is not None else []

    def _forget(self) -> None:
        """Drops the in-memory mirrors of the file (see __init__): the next use reads the file again."""
        self._meta.clear()
        self._ranges = None

    def _acknowledged_by(self, store: str, first: int, last: int) -> None:
        """Records that `store` acknowledged exactly first..last, every number of it (in the caller's
        transaction): the latest range grows only when this run continues it without a hole and the same
        store acknowledged it; else a range starts. A range never spans a number the store did not
        acknowledge (one the device dropped, whose gap record may still be queued): the audit would call
        that number lost by the store. Past MAX_ACK_RANGES the oldest ranges go, which only leaves numbers
        unexplained (missing), never wrongly explained."""
        ranges = self._latest_ranges()
        latest = ranges[-1] if ranges else None  # the row with the highest first_seq
        if latest is not None and first <= latest[1]:  # an old acknowledgement arriving late claims nothing new
            return
        if latest is not None and latest[2] == store and first == latest[1] + 1:
            self.db.execute("UPDATE acknowledged SET last_seq = ? WHERE first_seq = ?", (last, latest[0]))
            ranges[-1] = (latest[0], last, store)
            self._parsed[-1] = _parsed_range(ranges[-1])
            return
        self.db.execute("INSERT INTO acknowledged VALUES (?, ?, ?)", (first, last, store))
        self.db.execute("DELETE FROM acknowledged WHERE first_seq NOT IN "
                        "(SELECT first_seq FROM acknowledged ORDER BY first_seq DESC LIMIT ?)", (MAX_ACK_RANGES,))
        ranges.append((first, last, store))  # first > every first_seq held: it is the newest row
        self._parsed.append(_parsed_range(ranges[-1]))
        del ranges[:-MAX_ACK_RANGES], self._parsed[:-MAX_ACK_RANGES]

    def _get(self, key: str, default: int) -> int:
        if key not in self._meta:
            row = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
            self._meta[key] = int(row[0]) if row else None
        value = self._meta[key]
        return default if value is None else value

    def _set(self, key: str, value: int) -> None:
        self._set_many((key, value))

    def _set_many(self, *items: tuple[str, int]) -> None:
        """Writes meta values in one statement: outside a transaction, one atomic commit of its own."""
        self.db.execute("INSERT INTO meta VALUES " + ", ".join(["(?, ?)"] * len(items))  # noqa: S608  placeholders only
                        + " ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                        [part for item in items for part in item])
        self._meta.update(items)

    # -- writing ------------------------------------------------------------------------------------

    def _rows(self, bodies: list[RecordBody], first: int) -> list[_Row]:
        """The rows of the records that decode as the cloud will decode them, numbered from `first` in
        order (a refused record takes no number). A model built in code is not validated again
        (model_copy skips validation), so an `at=inf` could otherwise get in and poison every batch it
        rides in. Each record is encoded once: the blob checked is the blob stored."""
        rows: list[_Row] = []
        now = time.time()
        for body in bodies:
            seq = first + len(rows)
            try:
                blob = encode(TelemetryRecord(seq=seq, body=body), WireFormat.MSGPACK)
                decode(TelemetryRecord, blob, WireFormat.MSGPACK.content_type)
            except ValueError as exc:  # DecodeError and pydantic's errors are ValueErrors
                self.stats.refused += 1
                log.error("invalid record refused", extra=fields(kind=getattr(body, "kind", "?"), error=str(exc)[:300]))
                continue
            ttl = self.ttl_s.get(body.kind)
            rows.append((seq, body.kind, now + ttl if ttl else None, len(blob), blob, now))
        return rows

    @_locked
    def append(self, bodies: list[RecordBody]) -> list[int]:
        """Commits the valid records in one transaction; returns their sequence numbers.

        Raises:
            sqlite3.Error: the write failed (disk full, I/O error); nothing of this call is stored, and
                the caller should count the records with `lost_in_write` and stop.
        """
        # next_seq as this connection last wrote it (one writer: this object, under its lock)
        first = self._get("next_seq", 1)
        rows = self._rows(bodies, first)
        if not rows:
            return []
        self.db.execute("BEGIN IMMEDIATE")
        try:
            if self.drop == "newest" and self.stats.bytes + sum(r[3] for r in rows) > self.max_bytes:
                self.db.execute("ROLLBACK")
                self._refuse(len(rows))
                return []
            self.db.executemany(_INSERT, rows)
            self._set("next_seq", first + len(rows))
            self.stats.bytes += sum(r[3] for r in rows)
            self.stats.records += len(rows)
            self._enforce_cap()
            self.db.execute("COMMIT")
        except BaseException:
            self._forget()  # the file is what counts now, not what this call wrote
            try:  # SQLite may already have rolled back (SQLITE_FULL does): the original error is what counts
                self.db.execute("ROLLBACK")
                self._load_counters()
            except sqlite3.Error:
                pass
            raise
        self.stats.next_seq = first + len(rows)
        return [r[0] for r in rows]

    def _enforce_cap(self) -> None:
        """Drops the oldest records not in flight until under the cap, then records the gap."""
        if self.stats.bytes <= self.max_bytes:
            return
        inflight_last = self._get("inflight_last", 0)
        dropped: list[tuple[int, int]] = []
        excess = self.stats.bytes - self.max_bytes
        for seq, size in self.db.execute(
            "SELECT seq, size FROM records WHERE seq > ? AND kind != 'gap' ORDER BY seq", (inflight_last,)
        ):
            if excess <= 0:
                break
            dropped.append((seq, size))
            excess -= size
        if not dropped:
            return
        first, last = dropped[0][0], dropped[-1][0]
        self.db.execute("DELETE FROM records WHERE seq BETWEEN ? AND ? AND kind != 'gap'", (first, last))
        self.stats.bytes -= sum(size for _, size in dropped)
        self.stats.records -= len(dropped)
        self._count_dropped(GapReason.QUEUE_FULL, len(dropped))
        self._append_gap(first, last, len(dropped), GapReason.QUEUE_FULL)

    def _refuse(self, count: int) -> None:
        """The drop-newest policy: the records offered now are the ones lost."""
        self.db.execute("BEGIN IMMEDIATE")
        first = self._get("next_seq", 1)
        self._set("next_seq", first + count)  # their numbers are used up, so the gap is visible
        self._count_dropped(GapReason.QUEUE_FULL, count)
        self._append_gap(first, first + count - 1, count, GapReason.QUEUE_FULL)
        self.db.execute("COMMIT")
        self.stats.next_seq = self._get("next_seq", 1)

    def _append_gap(self, first: int, last: int, count: int, reason: GapReason, detail: str | None = None) -> None:
        gap = Gap(device=self.device, first_seq=first, last_seq=last, count=count, reason=reason, at=time.time(),
                  detail=detail[:1000] if detail else None)
        self._insert_gap(gap)
        log.warning("outbox gap", extra=fields(first=first, last=last, count=count, reason=reason.value, detail=detail))

    def _insert_gap(self, gap: Gap) -> int:
        """Appends a gap record under the next sequence number (inside the caller's transaction); returns it."""
        seq = self._get("next_seq", 1)
        blob = encode(TelemetryRecord(seq=seq, body=gap), WireFormat.MSGPACK)
        self.db.execute(_INSERT, (seq, "gap", None, len(blob), blob, time.time()))
        self._set("next_seq", seq + 1)
        self.stats.bytes += len(blob)
        self.stats.records += 1
        return seq

    def _declare_again(self, rows: list[tuple[int, str, bytes, int]]) -> None:
        """The gap records among rows being given up: each declared a loss the cloud may never have heard
        of, and giving the record up would lose that declaration with it (the audit would then show its
        numbers as missing with no reason). So each one's gap is appended again under a new number and
        forwarded like any record; the cloud's audit counts a declaration it gets twice once."""
        for seq, kind, body, _ in rows:
            if kind != "gap":
                continue
            try:
                gap = decode(TelemetryRecord, body, WireFormat.MSGPACK.content_type).body
            except ValueError:  # a row that no longer decodes cannot be declared again: it is in dead_letters
                continue
            if not isinstance(gap, Gap):  # a row of kind "gap" holds a Gap: anything else is not a declaration
                continue
            again = self._insert_gap(gap)
            log.warning("outbox gap declared again",
                        extra=fields(first=gap.first_seq, last=gap.last_seq, count=gap.count, reason=gap.reason.value,
                                     was_seq=seq, seq=again))

    def _count_dropped(self, reason: GapReason, count: int) -> None:
        total = self._get(f"dropped_{reason.value}", 0) + count
        self._set(f"dropped_{reason.value}", total)
        self.stats.dropped[reason.value] = total

    @_locked
    def expire(self, now: float | None = None) -> int:
        """Deletes records past their TTL (never the batch in flight); returns how many."""
        now = now or time.time()
        self.db.execute("BEGIN IMMEDIATE")
        inflight_last = self._get("inflight_last", 0)
        rows = self.db.execute("SELECT seq, size FROM records WHERE expires < ? AND seq > ? ORDER BY seq",
                               (now, inflight_last)).fetchall()
        if rows:
            self.db.execute("DELETE FROM records WHERE expires < ? AND seq > ?", (now, inflight_last))
            self.stats.bytes -= sum(size for _, size in rows)
            self.stats.records -= len(rows)
            self._count_dropped(GapReason.EXPIRED, len(rows))
            self._append_gap(rows[0][0], rows[-1][0], len(rows), GapReason.EXPIRED)
        self.db.execute("COMMIT")
        self.stats.next_seq = self._get("next_seq", 1)
        return len(rows)

    # -- forwarding -----------------------------------------------------------------------------------

    @_locked
    def next_batch(self, max_records: int, max_bytes: int) -> list[TelemetryRecord]:
        """The batch in flight if there is one (the same records again), else the oldest records.
        A stored row that no longer decodes is dead-lettered here, never sent and never retried."""
        first, last = self._get("inflight_first", 0), self._get("inflight_last", 0)
        if last:
            rows = self.db.execute("SELECT seq, body FROM records WHERE seq BETWEEN ? AND ? ORDER BY seq",
                                   (first, last)).fetchall()
            if rows:
                return self._decoded(rows)
        rows, size = [], 0
        for seq, body in self.db.execute("SELECT seq, body FROM records ORDER BY seq LIMIT ?", (max_records,)):
            if rows and size + len(body) > max_bytes:
                break
            rows.append((seq, body))
            size += len(body)
        batch = self._decoded(rows)
        if batch:  # one statement: one transaction
            self._set_many(("inflight_first", batch[0].seq), ("inflight_last", batch[-1].seq), ("inflight_attempts", 0))
        return batch

    def _decoded(self, rows: list[tuple[int, bytes]]) -> list[TelemetryRecord]:
        batch = []
        for seq, body in rows:
            try:
                batch.append(decode(TelemetryRecord, body, WireFormat.MSGPACK.content_type))
            except ValueError as exc:
                self.dead_letter(seq, seq, f"record {seq} does not validate: {exc}")
        return batch

    @_locked
    def attempt(self) -> int:
        """Counts one more sending of the batch in flight (kept on disk: a restart does not reset it)."""
        attempts = self._get("inflight_attempts", 0) + 1
        self._set("inflight_attempts", attempts)  # one statement: one transaction
        return attempts

    @_locked
    def dead_letter(self, first: int, last: int, reason: str) -> int:
        """Gives records first..last up: moves them to the dead-letter table with the reason, clears the
        batch in flight, and appends a `dead_lettered` gap (forwarded like any record). A gap record among
        them is appended again (see _declare_again): a declaration of loss is never given up. Returns how many."""
        self.db.execute("BEGIN IMMEDIATE")
        rows = self.db.execute("SELECT seq, kind, body, size FROM records WHERE seq BETWEEN ? AND ? ORDER BY seq",
                               (first, last)).fetchall()
        now = time.time()
        self.db.executemany("INSERT INTO dead_letters VALUES (?,?,?,?,?)",
                            [(q, self.epoch, b, reason, now) for q, _, b, _ in rows])
        self.db.execute("DELETE FROM records WHERE seq BETWEEN ? AND ?", (first, last))
        self._set_many(("inflight_first", 0), ("inflight_last", 0), ("inflight_attempts", 0))
        self.stats.bytes -= sum(size for *_, size in rows)
        self.stats.records -= len(rows)
        if rows:
            self._count_dropped(GapReason.DEAD_LETTERED, len(rows))
            self._append_gap(rows[0][0], rows[-1][0], len(rows), GapReason.DEAD_LETTERED, reason)
            self._declare_again(rows)
        self.db.execute("COMMIT")
        self.stats.next_seq = self._get("next_seq", 1)
        log.error("dead-lettered", extra=fields(first=first, last=last, count=len(rows), reason=reason[:300]))
        return len(rows)

    def dead_letters(self) -> list[tuple[int, str, str]]:
        """(seq, epoch, reason) of every record given up, oldest first."""
        with self._lock:
            return self.db.execute("SELECT seq, epoch, reason FROM dead_letters ORDER BY rowid").fetchall()

    # -- records lost to a failed write ---------------------------------------------------------------

    def lost_in_write(self, count: int) -> None:
        """Counts records taken into memory whose commit failed. Writes in place into bytes allocated
        when the side file was made, so it works on a full disk; the next start records the gap."""
        try:
            fd = os.open(self._lost_path, os.O_RDWR)
        except OSError as exc:
            log.error("cannot count lost records", extra=fields(count=count, error=str(exc)))
            return
        try:
            total = _LOST.unpack(os.pread(fd, _LOST.size, 0))[0] + count
            os.pwrite(fd, _LOST.pack(total), 0)
            os.fsync(fd)
            log.error("records lost in a failed write", extra=fields(count=count, total=total))
        except (OSError, struct.error) as exc:
            log.error("cannot count lost records", extra=fields(count=count, error=str(exc)))
        finally:
            os.close(fd)

    def _record_lost_writes(self) -> None:
        lost = 0
        try:
            lost = _LOST.unpack(self._lost_path.read_bytes()[: _LOST.size])[0]
        except (OSError, struct.error):
            pass
        if lost > 0:  # their numbers were never given: give them now, to the gap that says they are gone
            self.db.execute("BEGIN IMMEDIATE")
            first = self._get("next_seq", 1)
            self._set("next_seq", first + lost)
            self._count_dropped(GapReason.WRITE_FAILED, lost)
            self._append_gap(first, first + lost - 1, lost, GapReason.WRITE_FAILED,
                             "the outbox's write failed (disk full?)")
            self.db.execute("COMMIT")
            self._load_counters()
        with open(self._lost_path, "wb") as f:  # allocated now, while there is room
            f.write(_LOST.pack(0))
            f.flush()
            os.fsync(f.fileno())

    @_locked
    def ack(self, first: int, last: int, store: str | None = None) -> int:
        """The cloud stored records first..last: delete them and clear the batch in flight.

        :param int first: the batch's first sequence number.
        :param int last: its last.
        :param store: the id of the store that acknowledged it (TelemetryAck.store): first..last joins
            that store's range. None (an ingest older than store ids) claims nothing.
        :returns: how many records were deleted.
        """
        self.db.execute("BEGIN IMMEDIATE")
        # RETURNING gives the deleted rows in no set order: sorted, they are the rows the batch held
        held = sorted(self.db.execute("DELETE FROM records WHERE seq BETWEEN ? AND ? RETURNING seq, size",
                                      (first, last)).fetchall())
        size, count = sum(row[1] for row in held), len(held)
        if (self._get("inflight_first", 0), self._get("inflight_last", 0)) == (first, last):
            self._set_many(("inflight_first", 0), ("inflight_last", 0), ("inflight_attempts", 0))
        if store is not None:  # the numbers the batch held: first..last may have holes the device dropped
            for run_first, run_last in _runs([row[0] for row in held]):
                self._acknowledged_by(store, run_first, run_last)
        self.db.execute("COMMIT")
        if store is not None:  # the ranges as committed (mirrored, or read again if not yet read)
            self.acknowledged = (self._load_acknowledged() if self._ranges is None
                                 else [parsed for parsed in self._parsed if parsed is not None])
        self.stats.bytes -= size
        self.stats.records -= count
        return int(count)

    @_locked
    def oldest_at(self) -> float | None:
        """When the oldest record still held was made (its body's `at`), None only when empty. Cheap: one
        primary-key lookup, and the record is decoded only when the oldest one has changed since.

        A body that no longer decodes still has an age (it is dead-lettered only when sent, so while the
        link is down it is exactly the record that sits there): the row's queued_at, or, in a row written
        before that column, the first time this process found it, so the age grows and the outbox-stuck
        alert can fire."""
        row = self.db.execute("SELECT seq, queued_at FROM records ORDER BY seq LIMIT 1").fetchone()
        if row is None:
            self._oldest = None
            return None
        if self._oldest is None or self._oldest[0] != row[0]:
            body = self.db.execute("SELECT body FROM records WHERE seq = ?", (row[0],)).fetchone()[0]
            try:
                at = decode(TelemetryRecord, body, WireFormat.MSGPACK.content_type).body.at
            except ValueError:
                at = row[1] if row[1] is not None else time.time()
            self._oldest = (row[0], at)
        return self._oldest[1]

    @property
    def store_seen(self) -> bool:
        """Whether a telemetry store has acknowledged records of this outbox by its id: proof that the
        cloud's ingest knows the messages added since WIRE_VERSION 1 (DriftSample among them)."""
        return bool(self.acknowledged)

    @_locked
    def close(self) -> None:
        self.db.close()


def _parsed_range(row: tuple[int, int, str]) -> AckRange | None:
    """An acknowledged row as an AckRange; None (logged) when it is not one (not a store id)."""
    first, last, store = row
    try:
        return AckRange(store=store, first_seq=first, last_seq=last)
    except ValueError:
        log.warning("acknowledged range unreadable; not sent", extra=fields(first=first, store=str(store)[:80]))
        return None


def _runs(numbers: list[int]) -> list[tuple[int, int]]:
    """The runs of consecutive numbers in an ascending list: [1, 2, 3, 7, 8] → [(1, 3), (7, 8)]."""
    runs: list[tuple[int, int]] = []
    for n in numbers:
        if runs and runs[-1][1] == n - 1:
            runs[-1] = (runs[-1][0], n)
        else:
            runs.append((n, n))
    return runs
