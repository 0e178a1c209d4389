"""The agent's store-and-forward buffer: every reading and event, on disk, until the broker took it.

Rules:
- Readings are queued in memory and committed in batches (`commit()`); the sequence number is given
  at commit, so numbers on disk are gap-free and never reused (the last one lives in `meta`, and a
  reservation in the `<buffer>.seq` side file lets a replaced buffer continue above it).
- WAL with `synchronous=FULL`: a commit is on disk when `commit()` returns, so a power cut costs at
  most the readings not yet committed (one commit interval), never a corrupt file. One fsync per
  batch, not per reading, keeps SD cards alive.
- Rows leave through `delete_range()` (the forwarder, after a successful PUBACK) or eviction: past
  `max_bytes`, the lowest priority goes first and, within a priority, the oldest; events go last.
  Every eviction is counted and summarised in a `buffer_eviction` event.
- A file that is not our buffer, or is damaged, is moved aside and a fresh buffer started.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import IntEnum
from pathlib import Path
from typing import Any

from drivers.base import Value
from wire.models import EventKind

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2
APPLICATION_ID = 0x43494F54  # "CIOT": tells our buffer from a foreign SQLite file
SEQ_RESERVATION = 100_000
EVICTION_TARGET = 0.95  # evict down to this share of the cap, not just under it
EVICTION_EVENT_EVERY_S = 60.0
ASSUMED_ROW_BYTES = 200  # before there are rows to measure: generous, so checks come early

Row = tuple[int, int, str, str, Value, int]  # seq, ts_ns, device, point, value, quality


class Priority(IntEnum):
    LOW = 0
    NORMAL = 1
    HIGH = 2  # alarms: evicted only when nothing else is left


class BufferError(Exception):
    """The buffer file cannot be used."""


@dataclass(frozen=True, slots=True)
class Stamp:
    ts_ns: int
    mono_ns: int
    quality: int


@dataclass(frozen=True, slots=True)
class BufferStats:
    depth: int
    bytes: int
    last_seq: int
    evicted: int
    lost: int
    pending: int
    events: int


@dataclass(slots=True)
class _EvictionSummary:
    count: int = 0
    first_seq: int | None = None
    last_seq: int | None = None


class Buffer:
    def __init__(
        self,
        path: Path,
        *,
        max_bytes: int | None = None,
        boot_id: str = "unknown",
        wall_ns: Callable[[], int] = time.time_ns,
        lock_timeout_s: float = 5.0,
    ) -> None:
        self.path = path
        self.lock_timeout_s = lock_timeout_s
        self.max_bytes = max_bytes
        self.boot_id = boot_id
        self.seq_file = path.with_name(path.name + ".seq")
        self._db: sqlite3.Connection | None = None
        self._pending: list[tuple[int, int, str, str, Value, int, int]] = []
        self._pending_events: list[str] = []
        self._reserved = 0
        self._eviction = _EvictionSummary()
        self._last_eviction_report: float | None = None
        self.wall_ns = wall_ns
        self.last_seq = 0
        self.depth = 0
        self.evicted = 0
        self.lost = 0
        self.boot = 0
        self.commits = 0
        self.reset_from: Path | None = None
        self._created = False
        self._rows_until_cap_check = 0
        #: Called when the first reading (or an event) waits to be committed.
        self.on_pending: Callable[[], None] = lambda: None

    # -- lifecycle -----------------------------------------------------------------------------

    def open(self, *, reset_damaged: bool = True) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = self._connect()
        except (sqlite3.DatabaseError, BufferError) as exc:
            if not reset_damaged or not is_damage(exc):
                raise BufferError(f"{self.path}: {exc}") from exc
            self.reset_from = self._move_aside(str(exc))
            self._db = self._connect()
            self._raise(
                EventKind.BUFFER_RESET,
                f"buffer was unusable ({exc}); kept aside as {self.reset_from.name}",
                kept_as=str(self.reset_from),
            )
        self._reserved = max(self._reserved, self._read_reservation())
        if self._created and self._reserved > self.last_seq:
            # A replaced or deleted buffer: continue above anything the lost file held.
            log.warning(
                "new buffer file: sequence numbers continue at %d (reserved in %s)",
                self._reserved + 1,
                self.seq_file,
            )
            self.last_seq = self._reserved
            self.db.execute("UPDATE meta SET value = ? WHERE key = 'last_seq'", (self.last_seq,))
        self.commit()

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(
            self.path, isolation_level=None, check_same_thread=False, timeout=self.lock_timeout_s
        )
        try:
            self._prepare(db)
        except BaseException:
            db.close()
            raise
        return db

    def _prepare(self, db: sqlite3.Connection) -> None:
        app_id = db.execute("PRAGMA application_id").fetchone()[0]
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        self._created = not tables
        if tables and app_id != APPLICATION_ID:
            raise BufferError("not a campus-agent buffer (a foreign SQLite file)")
        if tables and db.execute("PRAGMA quick_check(1)").fetchone()[0] != "ok":
            raise BufferError("the file is damaged (quick_check failed)")
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        # Keep the WAL small next to the cap: checkpoint after 1/8 of it (4 MB at most), and
        # truncate the WAL file back after a checkpoint.
        wal_pages = 1000 if self.max_bytes is None else max(16, min(1000, self.max_bytes // 32768))
        db.execute(f"PRAGMA wal_autocheckpoint={wal_pages}")
        db.execute(f"PRAGMA journal_size_limit={wal_pages * 4096 * 2}")
        db.execute(f"PRAGMA application_id={APPLICATION_ID}")
        db.executescript(
            """
            CREATE TABLE IF NOT EXISTS readings (
                seq INTEGER PRIMARY KEY,
                ts_ns INTEGER NOT NULL,
                mono_ns INTEGER NOT NULL,
                boot INTEGER NOT NULL,
                device TEXT NOT NULL,
                point TEXT NOT NULL,
                value,
                quality INTEGER NOT NULL DEFAULT 0,
                priority INTEGER NOT NULL DEFAULT 1
            );
            CREATE INDEX IF NOT EXISTS readings_by_priority ON readings (priority, seq);
            CREATE INDEX IF NOT EXISTS readings_unsynced ON readings (seq) WHERE quality & 1 != 0;
            CREATE TABLE IF NOT EXISTS events (id INTEGER PRIMARY KEY, payload TEXT NOT NULL);
            CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value);
            """
        )
        db.execute(
            "INSERT OR IGNORE INTO meta VALUES ('schema', ?), ('last_seq', 0), ('evicted', 0), "
            "('lost', 0), ('boot', 0), ('boot_id', '')",
            (SCHEMA_VERSION,),
        )
        meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
        if meta["schema"] != SCHEMA_VERSION:
            raise BufferError(f"buffer schema {meta['schema']} is not {SCHEMA_VERSION}")
        max_seq = db.execute("SELECT max(seq) FROM readings").fetchone()[0] or 0
        self.last_seq = max(int(meta["last_seq"]), max_seq)
        self.evicted = int(meta["evicted"])
        self.lost = int(meta["lost"])
        self.boot = int(meta["boot"])
        if meta["boot_id"] != self.boot_id:
            self.boot += 1
            db.execute("UPDATE meta SET value = ? WHERE key = 'boot'", (self.boot,))
            db.execute("UPDATE meta SET value = ? WHERE key = 'boot_id'", (self.boot_id,))
        self.depth = db.execute("SELECT count(*) FROM readings").fetchone()[0]

    def _move_aside(self, reason: str) -> Path:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        aside = self.path.with_name(f"{self.path.name}.bad-{stamp}")
        for suffix in ("", "-wal", "-shm"):
            source = Path(str(self.path) + suffix)
            if source.exists():
                source.rename(Path(str(aside) + suffix))
        log.error(
            "buffer %s unusable (%s): moved to %s, starting a fresh one", self.path, reason, aside
        )
        return aside

    def close(self) -> None:
        if self._db is None:
            return
        self._maybe_report_eviction(force=True)
        self.commit()
        self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self._db.close()
        self._db = None

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            yield
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:  # SQLite may have rolled back itself (e.g. disk full)
                db.execute("ROLLBACK")
            raise

    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            raise BufferError("buffer is not open")
        return self._db

    # -- the sequence reservation --------------------------------------------------------------

    def _read_reservation(self) -> int:
        try:
            return int(self.seq_file.read_text().strip() or 0)
        except (OSError, ValueError):
            return 0

    def _reserve(self, upto: int) -> None:
        """Writes (fsynced, atomically) a bound above every seq that will be committed."""
        if upto <= self._reserved:
            return
        try:
            self._write_reservation(upto + SEQ_RESERVATION)
        except OSError as exc:  # e.g. the disk is full: meta.last_seq still keeps numbers rising
            log.error("cannot write %s: %s", self.seq_file, exc)

    def _write_reservation(self, reserved: int) -> None:
        temporary = self.seq_file.with_name(self.seq_file.name + ".tmp")
        with temporary.open("w") as handle:
            handle.write(f"{reserved}\n")
            handle.flush()
            os.fsync(handle.fileno())
        temporary.replace(self.seq_file)
        with contextlib.suppress(OSError):
            directory = os.open(self.seq_file.parent, os.O_RDONLY)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)
        self._reserved = reserved

    # -- writing -------------------------------------------------------------------------------

    def add(
        self,
        stamp: Stamp,
        device: str,
        point: str,
        value: Value,
        priority: int = Priority.NORMAL,
    ) -> None:
        self._pending.append(
            (stamp.ts_ns, stamp.mono_ns, device, point, value, stamp.quality, priority)
        )
        if len(self._pending) == 1:
            self.on_pending()

    def add_many(
        self,
        stamp: Stamp,
        device: str,
        values: list[tuple[str, Value]],
        priorities: dict[str, int],
    ) -> None:
        """The readings of one poll (one stamp); points missing from `priorities` are normal."""
        if not values:
            return
        first = not self._pending
        ts, mono, quality = stamp.ts_ns, stamp.mono_ns, stamp.quality
        self._pending.extend(
            (ts, mono, device, point, value, quality, priorities.get(point, Priority.NORMAL))
            for point, value in values
        )
        if first:
            self.on_pending()

    def add_event(self, payload: str) -> None:
        self._pending_events.append(payload)
        self.on_pending()

    @property
    def pending(self) -> int:
        return len(self._pending)

    def commit(self) -> int:
        """Writes queued readings and events in one transaction; returns how many readings."""
        if not self._pending and not self._pending_events:
            return 0
        self._reserve(self.last_seq + len(self._pending))
        to_evict = max(2 * len(self._pending), self.depth // 10, 64)
        for attempt in range(4):
            try:
                written = self._write()
                break
            except sqlite3.OperationalError as exc:
                if "full" not in str(exc):
                    raise
                if attempt == 3 or not (self._evict_rows(to_evict) or self._evict_events(64)):
                    written = self._drop_pending(str(exc))
                    break
                log.error("buffer storage full (%s): evicted %d readings", exc, to_evict)
                to_evict *= 2
        self._enforce_cap()
        return written

    def _write(self) -> int:
        rows, events = self._pending, self._pending_events
        first = self.last_seq + 1
        db = self.db
        with self._transaction():
            db.executemany(
                "INSERT INTO readings "
                "(seq, ts_ns, mono_ns, boot, device, point, value, quality, priority) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (first + i, ts, mono, self.boot, dev, pt, val, q, prio)
                    for i, (ts, mono, dev, pt, val, q, prio) in enumerate(rows)
                ],
            )
            db.executemany("INSERT INTO events (payload) VALUES (?)", [(e,) for e in events])
            last = first + len(rows) - 1
            db.execute("UPDATE meta SET value = ? WHERE key = 'last_seq'", (last,))
        self._pending = []
        self._pending_events = []
        self.last_seq = last
        self.depth += len(rows)
        self._rows_until_cap_check -= len(rows) + len(events)
        self.commits += 1
        return len(rows)

    def _drop_pending(self, reason: str) -> int:
        """Storage is full even after eviction: the queued readings cannot be kept."""
        dropped = len(self._pending)
        self.lost += dropped
        self._pending = []
        log.error(
            "buffer still full (%s): %d readings lost (%d in all)", reason, dropped, self.lost
        )
        with contextlib.suppress(sqlite3.OperationalError):
            self.db.execute("UPDATE meta SET value = ? WHERE key = 'lost'", (self.lost,))
        self._raise(
            EventKind.BUFFER_EVICTION,
            f"storage full: {dropped} readings lost",
            lost=dropped,
            total_lost=self.lost,
        )
        return 0

    # -- eviction ------------------------------------------------------------------------------

    def used_bytes(self) -> int:
        db = self.db
        pages = db.execute("PRAGMA page_count").fetchone()[0]
        free = db.execute("PRAGMA freelist_count").fetchone()[0]
        size = db.execute("PRAGMA page_size").fetchone()[0]
        return int((pages - free) * size)

    def _enforce_cap(self) -> None:
        """Evicts down to the cap. Measuring costs three PRAGMAs, so it is done only once the
        rows added since the last measurement could have used half the room that was left."""
        if self.max_bytes is None:
            return
        if self._rows_until_cap_check > 0:
            return
        for _ in range(16):
            used = self.used_bytes()
            per_row = used / self.depth if self.depth else ASSUMED_ROW_BYTES
            if used <= self.max_bytes:
                self._rows_until_cap_check = int((self.max_bytes - used) / per_row / 2)
                break
            excess = used - self.max_bytes * EVICTION_TARGET
            if not self._evict_rows(max(64, math.ceil(excess / per_row))):
                self._evict_events(64)
        self._maybe_report_eviction()

    def _evict_rows(self, count: int) -> int:
        db = self.db
        priority = db.execute("SELECT min(priority) FROM readings").fetchone()[0]
        if priority is None:
            return 0
        first, last, n = db.execute(
            "SELECT min(seq), max(seq), count(*) FROM (SELECT seq FROM readings "
            "WHERE priority = ? ORDER BY seq LIMIT ?)",
            (priority, count),
        ).fetchone()
        with self._transaction():
            db.execute("DELETE FROM readings WHERE priority = ? AND seq <= ?", (priority, last))
            db.execute("UPDATE meta SET value = value + ? WHERE key = 'evicted'", (n,))
        self.depth -= n
        self.evicted += n
        summary = self._eviction
        summary.first_seq = min(first, summary.first_seq or first)
        summary.last_seq = max(last, summary.last_seq or last)
        summary.count += n
        log.debug("evicted %d readings of priority %d (seq %d..%d)", n, priority, first, last)
        return int(n)

    def _evict_events(self, count: int) -> int:
        cursor = self.db.execute(
            "DELETE FROM events WHERE id IN (SELECT id FROM events ORDER BY id LIMIT ?)", (count,)
        )
        return cursor.rowcount

    def _maybe_report_eviction(self, force: bool = False) -> None:
        """One event for the first eviction, then at most one a minute summing up the rest
        (and one at close for what is left)."""
        summary = self._eviction
        now = time.monotonic()
        if summary.count == 0:
            return
        last = self._last_eviction_report
        if not force and last is not None and now - last < EVICTION_EVENT_EVERY_S:
            return
        log.warning(
            "buffer over its cap of %d bytes: evicted %d readings (seq %s..%s), %d in all",
            self.max_bytes or 0,
            summary.count,
            summary.first_seq,
            summary.last_seq,
            self.evicted,
        )
        self._raise(
            EventKind.BUFFER_EVICTION,
            f"buffer over its cap: {summary.count} readings evicted",
            count=summary.count,
            first_seq=summary.first_seq,
            last_seq=summary.last_seq,
            total=self.evicted,
        )
        self._eviction = _EvictionSummary()
        self._last_eviction_report = now

    def _raise(self, kind: EventKind, message: str, **data: Any) -> None:
        self.add_event(event_json(self.wall_ns(), kind, message, **data))

    # -- clock correction ----------------------------------------------------------------------

    def correct_unsynced(self, offset_ns: int, unsynced: int, corrected: int) -> int:
        """Recomputes wall time from monotonic time for this boot's unsynced readings."""
        self.commit()
        assert unsynced == 1, "the partial index readings_unsynced is on quality & 1"
        cursor = self.db.execute(
            "UPDATE readings SET ts_ns = mono_ns + ?, quality = (quality & ~1) | ? "
            "WHERE quality & 1 != 0 AND boot = ?",
            (offset_ns, corrected, self.boot),
        )
        return cursor.rowcount

    # -- reading and acknowledging -------------------------------------------------------------

    def take(self, after_seq: int, limit: int, upto_seq: int | None = None) -> list[Row]:
        """Up to `limit` readings with after_seq < seq (<= upto_seq), oldest first."""
        return self.db.execute(
            "SELECT seq, ts_ns, device, point, value, quality FROM readings "
            "WHERE seq > ? AND seq <= ? ORDER BY seq LIMIT ?",
            (after_seq, upto_seq if upto_seq is not None else 2**63 - 1, limit),
        ).fetchall()

    def delete_range(self, first_seq: int, last_seq: int) -> int:
        cursor = self.db.execute(
            "DELETE FROM readings WHERE seq BETWEEN ? AND ?", (first_seq, last_seq)
        )
        self.depth -= cursor.rowcount
        return cursor.rowcount

    def take_event(self) -> tuple[int, str] | None:
        row = self.db.execute("SELECT id, payload FROM events ORDER BY id LIMIT 1").fetchone()
        return (int(row[0]), str(row[1])) if row else None

    def delete_event(self, event_id: int) -> None:
        self.db.execute("DELETE FROM events WHERE id = ?", (event_id,))

    def stats(self) -> BufferStats:
        db = self.db
        events = db.execute("SELECT count(*) FROM events").fetchone()[0]
        pages = db.execute("PRAGMA page_count").fetchone()[0]
        size = db.execute("PRAGMA page_size").fetchone()[0]
        return BufferStats(
            self.depth, pages * size, self.last_seq, self.evicted, self.lost, self.pending, events
        )


def is_damage(error: Exception) -> bool:
    """A file that is not (or no longer) a usable campus-agent buffer — as opposed to one that is
    locked by another process or that we may not open, which must not be moved aside."""
    if isinstance(error, BufferError):
        return True
    text = str(error)
    return isinstance(error, sqlite3.DatabaseError) and (
        "not a database" in text or "malformed" in text or "corrupt" in text
    )


def event_json(
    ts_ns: int, kind: EventKind, message: str, device: str | None = None, **data: Any
) -> str:
    """A wire `Event` as JSON (the same fields as `wire.models.Event`)."""
    event: dict[str, Any] = {"v": 1, "ts_ns": ts_ns, "kind": kind.value, "message": message}
    if device is not None:
        event["device"] = device
    event["data"] = data
    return json.dumps(event, separators=(",", ":"))
