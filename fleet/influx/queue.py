"""The sink's durable queue: line protocol in the fleet database until InfluxDB took it.

Rules: `push()` runs inside the ingest transaction, so the points of a reading exist exactly when
the reading does; `ack()` deletes what was written and counts it in one transaction, so a crash
before it means the batch is written again (InfluxDB keeps one point per series and timestamp: a
repeat overwrites, it does not double). Rows leave in id order. Beyond `max_points` the oldest rows
go (counted as evicted), except the batch being written. Counters live in `influx_status`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fleet.store import Store

STATUS_ROW = "sink"
REJECTS_KEPT = 1000


@dataclass(frozen=True, slots=True)
class Batch:
    """Rows `first_id..last_id` of the queue, their lines in order."""

    first_id: int
    last_id: int
    lines: list[str]


class InfluxQueue:
    def __init__(self, store: Store, max_points: int) -> None:
        self.store = store
        self.conn = store.conn
        self.max_points = max_points
        self.in_flight_through = 0  # the last id of the batch being written (not evicted)
        with store.transaction():
            self.conn.execute(
                "INSERT OR IGNORE INTO influx_status (name) VALUES (?)", (STATUS_ROW,)
            )
            # The counter is kept in step with the rows; this heals a database edited by hand.
            self.conn.execute(
                "UPDATE influx_status SET queued = "
                "(SELECT coalesce(sum(points), 0) FROM influx_queue) WHERE name = ?",
                (STATUS_ROW,),
            )

    def push(self, lines: Sequence[str], skipped: int = 0) -> int:
        """Queues the lines as one row; call inside the ingest transaction. Returns the points
        now queued."""
        if lines:
            self.conn.execute(
                "INSERT INTO influx_queue (points, lines, queued_ns) VALUES (?, ?, ?)",
                (len(lines), "\n".join(lines), time.time_ns()),
            )
        (queued,) = self.conn.execute(
            "UPDATE influx_status SET enqueued = enqueued + ?, queued = queued + ?, "
            "skipped = skipped + ? WHERE name = ? RETURNING queued",
            (len(lines), len(lines), skipped, STATUS_ROW),
        ).fetchone()
        if queued > self.max_points:
            queued -= self._evict(queued - self.max_points)
        return int(queued)

    def _evict(self, excess: int) -> int:
        """Deletes the oldest rows (not the one in flight) holding at least `excess` points."""
        through, evicted = 0, 0
        cursor = self.conn.execute(
            "SELECT id, points FROM influx_queue WHERE id > ? ORDER BY id",
            (self.in_flight_through,),
        )
        for row_id, points in cursor:
            through, evicted = row_id, evicted + points
            if evicted >= excess:
                break
        cursor.close()
        if not evicted:
            return 0
        self.conn.execute(
            "DELETE FROM influx_queue WHERE id > ? AND id <= ?", (self.in_flight_through, through)
        )
        self.conn.execute(
            "UPDATE influx_status SET evicted = evicted + ?, queued = queued - ? WHERE name = ?",
            (evicted, evicted, STATUS_ROW),
        )
        return evicted

    def queued(self) -> int:
        row = self.conn.execute(
            "SELECT queued FROM influx_status WHERE name = ?", (STATUS_ROW,)
        ).fetchone()
        return int(row[0]) if row else 0

    def head(self, max_points: int) -> Batch | None:
        """The oldest rows, up to `max_points` points (at least one row, however large); they
        are in flight (not evicted) until `ack()` or `failed()`."""
        first_id, last_id, count = 0, 0, 0
        lines: list[str] = []
        cursor = self.conn.execute("SELECT id, points, lines FROM influx_queue ORDER BY id")
        for row_id, points, text in cursor:
            if lines and count + points > max_points:
                break
            first_id = first_id or row_id
            last_id, count = row_id, count + points
            lines.extend(text.split("\n"))
            if count >= max_points:
                break
        cursor.close()
        if not lines:
            return None
        self.in_flight_through = last_id
        return Batch(first_id, last_id, lines)

    def ack(self, batch: Batch, written: int, rejects: Sequence[tuple[str, str]] = ()) -> None:
        """The batch is done: `written` points went in, `rejects` (line, server's message) were
        refused and will not be tried again."""
        now = time.time_ns()
        self.in_flight_through = 0
        with self.store.transaction():
            self.conn.execute(
                "DELETE FROM influx_queue WHERE id BETWEEN ? AND ?",
                (batch.first_id, batch.last_id),
            )
            self.conn.execute(
                "UPDATE influx_status SET written = written + ?, rejected = rejected + ?, "
                "queued = max(0, queued - ?), last_success_ns = ?, failing_since_ns = NULL "
                "WHERE name = ?",
                (written, len(rejects), len(batch.lines), now, STATUS_ROW),
            )
            if rejects:
                self.conn.executemany(
                    "INSERT INTO influx_rejects (ts_ns, line, error) VALUES (?, ?, ?)",
                    [(now, line[:4000], error[:2000]) for line, error in rejects],
                )
                self.conn.execute(
                    "DELETE FROM influx_rejects "
                    "WHERE id <= (SELECT max(id) FROM influx_rejects) - ?",
                    (REJECTS_KEPT,),
                )

    def failed(self, message: str) -> None:
        """A write failed and will be tried again: remember why and since when."""
        now = time.time_ns()
        self.in_flight_through = 0
        with self.store.transaction():
            self.conn.execute(
                "UPDATE influx_status SET last_error = ?, last_error_ns = ?, "
                "failing_since_ns = coalesce(failing_since_ns, ?) WHERE name = ?",
                (message[:2000], now, now, STATUS_ROW),
            )


def read_status(store: Store, rejects: int = 5) -> dict[str, Any] | None:
    """The counters, the oldest waiting point and the latest rejects (None: the sink never ran
    on this database)."""
    conn = store.conn
    tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    if "influx_status" not in tables:
        return None
    cursor = conn.execute("SELECT * FROM influx_status WHERE name = ?", (STATUS_ROW,))
    row = cursor.fetchone()
    if row is None:
        return None
    status = dict(zip([d[0] for d in cursor.description], row, strict=True))
    status.pop("name")
    status["oldest_queued_ns"] = conn.execute(
        "SELECT queued_ns FROM influx_queue ORDER BY id LIMIT 1"
    ).fetchone()
    if status["oldest_queued_ns"] is not None:
        status["oldest_queued_ns"] = status["oldest_queued_ns"][0]
    status["recent_rejects"] = [
        {"ts_ns": ts, "line": line, "error": error}
        for ts, line, error in conn.execute(
            "SELECT ts_ns, line, error FROM influx_rejects ORDER BY id DESC LIMIT ?", (rejects,)
        )
    ]
    return status
