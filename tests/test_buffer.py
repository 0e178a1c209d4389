"""The agent's SQLite buffer: gap-free sequence numbers that survive restarts, SIGKILL, damaged
files and full disks; eviction in the documented order."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.buffer import Buffer, BufferError, Priority, Stamp
from wire.models import Event, Quality

GOOD = Stamp(1_000, 10, 0)


def opened(path: Path, **kwargs: object) -> Buffer:
    buffer = Buffer(path, **kwargs)  # type: ignore[arg-type]
    buffer.open()
    return buffer


def events(buffer: Buffer) -> list[Event]:
    rows = buffer.db.execute("SELECT payload FROM events ORDER BY id").fetchall()
    return [Event.model_validate_json(row[0]) for row in rows]


def test_sequence_numbers_are_given_at_commit_and_never_reused(tmp_path: Path) -> None:
    buffer = opened(tmp_path / "b.db")
    for i in range(5):
        buffer.add(Stamp(1000 + i, i, 0), "room-1", "co2", 400 + i)
    assert buffer.take(0, 10) == []  # not committed yet
    assert buffer.commit() == 5
    rows = buffer.take(0, 10)
    assert [r[0] for r in rows] == [1, 2, 3, 4, 5]
    assert rows[0] == (1, 1000, "room-1", "co2", 400, 0)
    assert buffer.take(3, 1) == [rows[3]]
    assert buffer.take(0, 10, upto_seq=2) == rows[:2]
    assert buffer.delete_range(1, 5) == 5
    buffer.close()

    reopened = opened(tmp_path / "b.db")
    reopened.add(GOOD, "room-1", "temperature", 21.5)
    reopened.add(GOOD, "room-1", "state", "on")
    reopened.commit()
    assert [r[0] for r in reopened.take(0, 10)] == [6, 7]
    assert reopened.take(0, 10)[1][4] == "on"
    stats = reopened.stats()
    assert (stats.depth, stats.last_seq, stats.pending) == (2, 7, 0)
    reopened.close()


def test_a_deleted_buffer_continues_above_its_reservation(tmp_path: Path) -> None:
    buffer = opened(tmp_path / "b.db")
    buffer.add(GOOD, "room-1", "co2", 1)
    buffer.commit()
    buffer.close()
    for suffix in ("", "-wal", "-shm"):
        Path(f"{tmp_path / 'b.db'}{suffix}").unlink(missing_ok=True)
    fresh = opened(tmp_path / "b.db")
    fresh.add(GOOD, "room-1", "co2", 2)
    fresh.commit()
    seq = fresh.take(0, 1)[0][0]
    assert seq > 1, "a new buffer must never reuse sequence numbers the fleet has seen"
    fresh.close()


def test_the_jump_above_the_reservation_survives_a_restart_before_any_reading(
    tmp_path: Path,
) -> None:
    first = opened(tmp_path / "b.db")
    first.add(GOOD, "room-1", "co2", 1)
    first.commit()
    first.close()
    for suffix in ("", "-wal", "-shm"):
        Path(f"{tmp_path / 'b.db'}{suffix}").unlink(missing_ok=True)
    opened(tmp_path / "b.db").close()  # new file, stopped before its first reading
    again = opened(tmp_path / "b.db")
    again.add(GOOD, "room-1", "co2", 2)
    again.commit()
    assert again.take(0, 1)[0][0] > 1
    again.close()


def test_a_foreign_sqlite_file_is_kept_aside_and_a_fresh_buffer_started(tmp_path: Path) -> None:
    path = tmp_path / "b.db"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE photos (id INTEGER)")
    buffer = opened(path)
    assert buffer.reset_from is not None and buffer.reset_from.exists()
    with sqlite3.connect(buffer.reset_from) as db:  # untouched, for someone to look at
        assert db.execute("SELECT name FROM sqlite_master").fetchall() == [("photos",)]
    [event] = events(buffer)
    assert event.kind == "buffer_reset"
    assert "foreign SQLite file" in event.message
    buffer.add(GOOD, "room-1", "co2", 1)
    assert buffer.commit() == 1
    buffer.close()


def test_garbage_at_the_buffer_path_is_kept_aside(tmp_path: Path) -> None:
    path = tmp_path / "b.db"
    path.write_bytes(b"this is not a database" * 100)
    buffer = opened(path)
    assert buffer.reset_from is not None
    assert buffer.reset_from.read_bytes().startswith(b"this is not a database")
    assert "file is not a database" in events(buffer)[0].message
    buffer.close()


def test_a_locked_buffer_is_an_error_not_damage(tmp_path: Path) -> None:
    path = tmp_path / "b.db"
    opened(path).close()
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")  # e.g. a second agent on the same file
    try:
        with pytest.raises(BufferError, match="locked"):
            Buffer(path, lock_timeout_s=0.2).open()
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert not list(tmp_path.glob("*.bad-*")), "a locked buffer must not be moved aside"


def fill(buffer: Buffer, count: int, priority: int, point: str = "co2") -> None:
    for i in range(count):
        buffer.add(GOOD, "room-1", point, i, priority)
    buffer.commit()


def test_eviction_takes_low_priority_first_then_oldest_and_alarms_last(tmp_path: Path) -> None:
    buffer = opened(tmp_path / "b.db", max_bytes=400_000)
    fill(buffer, 2000, Priority.HIGH, "alarm")  # oldest of all, but alarms
    fill(buffer, 2000, Priority.LOW, "noise")
    fill(buffer, 2000, Priority.NORMAL, "co2")
    assert buffer.evicted == 0
    for _ in range(10):  # a long outage: keep committing past the cap
        fill(buffer, 1000, Priority.NORMAL, "co2")
    assert buffer.evicted > 0
    assert buffer.used_bytes() <= 400_000
    remaining = dict(
        buffer.db.execute("SELECT point, count(*) FROM readings GROUP BY point").fetchall()
    )
    assert remaining["alarm"] == 2000, "alarms are evicted last"
    assert "noise" not in remaining, "low priority goes first"
    normal = [r[0] for r in buffer.db.execute("SELECT seq FROM readings WHERE point='co2'")]
    assert normal == list(range(normal[0], 16_001)), "the oldest normal readings go first"
    assert buffer.depth == sum(remaining.values())
    first = [e for e in events(buffer) if e.kind == "buffer_eviction"]
    assert len(first) == 1, "the first eviction is reported at once, the rest once a minute"
    evicted = buffer.evicted
    buffer.close()
    reopened = opened(tmp_path / "b.db")
    assert reopened.evicted == evicted, "the count is persistent"
    reported = [e for e in events(reopened) if e.kind == "buffer_eviction"]
    assert len(reported) == 2, "what was left unreported is summed up at close"
    assert sum(e.data["count"] for e in reported) == evicted == reported[-1].data["total"]
    reopened.close()


def test_a_full_disk_evicts_instead_of_failing(tmp_path: Path) -> None:
    buffer = opened(tmp_path / "b.db")
    fill(buffer, 5000, Priority.NORMAL)
    pages = buffer.db.execute("PRAGMA page_count").fetchone()[0]
    buffer.db.execute(f"PRAGMA max_page_count = {pages + 2}")  # the SD card is now full
    fill(buffer, 3000, Priority.NORMAL)
    assert buffer.last_seq == 8000, "new readings were committed"
    assert buffer.evicted > 0 and buffer.lost == 0
    assert buffer.take(0, 100_000)[-1][0] == 8000
    buffer.close()


def test_unsynced_readings_are_corrected_from_monotonic_time(tmp_path: Path) -> None:
    buffer = opened(tmp_path / "b.db", boot_id="boot-a")
    unsynced = int(Quality.CLOCK_UNSYNCED)
    buffer.add(Stamp(5, 1_000_000_000, unsynced), "room-1", "co2", 500)  # 1970 + 5 ns
    buffer.add(Stamp(6, 2_000_000_000, unsynced), "room-1", "co2", 501)
    buffer.add(Stamp(1_800_000_000_000_000_000, 3_000_000_000, 0), "room-1", "co2", 502)
    buffer.commit()
    offset = 1_799_999_997_000_000_000  # wall - mono once synced
    assert buffer.correct_unsynced(offset, unsynced, int(Quality.CLOCK_CORRECTED)) == 2
    rows = buffer.take(0, 10)
    assert [r[1] for r in rows] == [
        1_799_999_998_000_000_000,
        1_799_999_999_000_000_000,
        1_800_000_000_000_000_000,
    ]
    assert [r[5] for r in rows] == [2, 2, 0]
    buffer.close()
    # After a reboot the monotonic clock restarted: old unsynced readings cannot be corrected.
    other = opened(tmp_path / "b.db", boot_id="boot-b")
    other.add(Stamp(7, 5, unsynced), "room-1", "co2", 1)
    other.commit()
    assert other.correct_unsynced(offset, unsynced, 2) == 1
    other.close()


WRITER = """
import sys, time
from pathlib import Path
from agent.buffer import Buffer, Stamp
buffer = Buffer(Path(sys.argv[1]))
buffer.open()
while True:
    for i in range(200):
        buffer.add(Stamp(time.time_ns(), time.monotonic_ns(), 0), "room-1", "co2", i)
    buffer.commit()
    print(buffer.last_seq, flush=True)
"""


def test_sigkill_mid_write_loses_nothing_committed(tmp_path: Path) -> None:
    path = tmp_path / "b.db"
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True
    )
    assert writer.stdout is not None
    committed = 0
    deadline = time.monotonic() + 20
    while committed < 20_000 and time.monotonic() < deadline:
        committed = int(writer.stdout.readline())
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    writer.stdout.close()

    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    buffer = opened(path)
    seqs = [row[0] for row in buffer.take(0, 10_000_000)]
    assert len(seqs) >= committed, "a reading reported committed is missing"
    assert seqs == list(range(1, len(seqs) + 1))
    assert buffer.last_seq == len(seqs)
    buffer.close()
