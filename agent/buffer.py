"""The agent's store-and-forward buffer: every reading, on disk, until the broker acknowledged it.

Rules:
- Readings are queued in memory and committed in batches (`commit()`); the sequence number is given
  at commit, so numbers on disk are gap-free and never reused (the last one lives in `meta`).
- WAL with `synchronous=FULL`: a commit is on disk when `commit()` returns, so a power cut costs at
  most the readings not yet committed (one commit interval), never a corrupt file. One fsync per
  batch, not per reading, keeps SD cards alive.
- Rows leave only through `delete_range()`, called by the forwarder after a successful PUBACK.
"""

from __future__ import annotations

import logging
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from drivers.base import Value

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
APPLICATION_ID = 0x43494F54  # "CIOT": tells our buffer from a foreign SQLite file

Row = tuple[int, int, str, str, Value, int]  # seq, ts_ns, device, point, value, quality


class BufferError(Exception):
    """The buffer file cannot be used."""


@dataclass(frozen=True, slots=True)
class BufferStats:
    depth: int
    bytes: int
    last_seq: int
    evicted: int
    pending: int


class Buffer:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._db: sqlite3.Connection | None = None
        self._pending: list[tuple[int, str, str, Value, int]] = []
        self.last_seq = 0
        self.evicted = 0
        self.commits = 0

    # -- lifecycle -----------------------------------------------------------------------------

    def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            self._prepare(db)
        except sqlite3.DatabaseError as exc:
            db.close()
            raise BufferError(f"{self.path}: {exc}") from exc
        self._db = db

    def _prepare(self, db: sqlite3.Connection) -> None:
        app_id = db.execute("PRAGMA application_id").fetchone()[0]
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if tables and app_id != APPLICATION_ID:
            raise sqlite3.DatabaseError("not a campus-agent buffer (foreign SQLite file)")
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute(f"PRAGMA application_id={APPLICATION_ID}")
        db.executescript(
            """
            CREATE TABLE IF NOT EXISTS readings (
                seq INTEGER PRIMARY KEY,
                ts_ns INTEGER NOT NULL,
                device TEXT NOT NULL,
                point TEXT NOT NULL,
                value,
                quality INTEGER NOT NULL DEFAULT 0
            );
            CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
            """
        )
        db.execute(
            "INSERT OR IGNORE INTO meta VALUES ('schema', ?), ('last_seq', 0), ('evicted', 0)",
            (SCHEMA_VERSION,),
        )
        meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
        if meta["schema"] != SCHEMA_VERSION:
            raise sqlite3.DatabaseError(f"buffer schema {meta['schema']} is not {SCHEMA_VERSION}")
        max_seq = db.execute("SELECT max(seq) FROM readings").fetchone()[0] or 0
        self.last_seq = max(meta["last_seq"], max_seq)
        self.evicted = meta["evicted"]

    def close(self) -> None:
        if self._db is None:
            return
        self.commit()
        self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self._db.close()
        self._db = None

    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            raise BufferError("buffer is not open")
        return self._db

    # -- writing -------------------------------------------------------------------------------

    def add(self, ts_ns: int, device: str, point: str, value: Value, quality: int = 0) -> None:
        self._pending.append((ts_ns, device, point, value, quality))

    @property
    def pending(self) -> int:
        return len(self._pending)

    def commit(self) -> int:
        """Writes queued readings in one transaction; returns how many."""
        if not self._pending:
            return 0
        rows = self._pending
        first = self.last_seq + 1
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany(
                "INSERT INTO readings (seq, ts_ns, device, point, value, quality) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                [(first + i, *row) for i, row in enumerate(rows)],
            )
            last = first + len(rows) - 1
            db.execute("UPDATE meta SET value = ? WHERE key = 'last_seq'", (last,))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        self._pending = []
        self.last_seq = last
        self.commits += 1
        return len(rows)

    # -- reading and acknowledging -------------------------------------------------------------

    def take(self, after_seq: int, limit: int) -> list[Row]:
        """Up to `limit` readings with seq > after_seq, oldest first."""
        return self.db.execute(
            "SELECT seq, ts_ns, device, point, value, quality FROM readings "
            "WHERE seq > ? ORDER BY seq LIMIT ?",
            (after_seq, limit),
        ).fetchall()

    def delete_range(self, first_seq: int, last_seq: int) -> int:
        cursor = self.db.execute(
            "DELETE FROM readings WHERE seq BETWEEN ? AND ?", (first_seq, last_seq)
        )
        return cursor.rowcount

    def stats(self) -> BufferStats:
        db = self.db
        depth = db.execute("SELECT count(*) FROM readings").fetchone()[0]
        page_count = db.execute("PRAGMA page_count").fetchone()[0]
        page_size = db.execute("PRAGMA page_size").fetchone()[0]
        return BufferStats(depth, page_count * page_size, self.last_seq, self.evicted, self.pending)
