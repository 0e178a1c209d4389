"""The agent's SQLite buffer: gap-free sequence numbers that survive restarts and SIGKILL."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.buffer import Buffer, BufferError


def test_sequence_numbers_are_given_at_commit_and_never_reused(tmp_path: Path) -> None:
    buffer = Buffer(tmp_path / "b.db")
    buffer.open()
    for i in range(5):
        buffer.add(1000 + i, "room-1", "co2", 400 + i)
    assert buffer.take(0, 10) == []  # not committed yet
    assert buffer.commit() == 5
    rows = buffer.take(0, 10)
    assert [r[0] for r in rows] == [1, 2, 3, 4, 5]
    assert rows[0] == (1, 1000, "room-1", "co2", 400, 0)
    assert buffer.take(3, 1) == [rows[3]]
    assert buffer.delete_range(1, 5) == 5
    buffer.close()

    reopened = Buffer(tmp_path / "b.db")
    reopened.open()
    reopened.add(2000, "room-1", "temperature", 21.5)
    reopened.add(2001, "room-1", "state", "on")
    reopened.commit()
    assert [r[0] for r in reopened.take(0, 10)] == [6, 7]
    assert reopened.take(0, 10)[1][4] == "on"
    stats = reopened.stats()
    assert (stats.depth, stats.last_seq, stats.pending) == (2, 7, 0)
    reopened.close()


def test_a_foreign_sqlite_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "b.db"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE photos (id INTEGER)")
    with pytest.raises(BufferError, match="not a campus-agent buffer"):
        Buffer(path).open()


def test_garbage_at_the_buffer_path_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "b.db"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(BufferError, match="file is not a database"):
        Buffer(path).open()


WRITER = """
import sys, time
from pathlib import Path
from agent.buffer import Buffer
buffer = Buffer(Path(sys.argv[1]))
buffer.open()
while True:
    for i in range(200):
        buffer.add(time.time_ns(), "room-1", "co2", i)
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
    buffer = Buffer(path)
    buffer.open()
    seqs = [row[0] for row in buffer.take(0, 10_000_000)]
    assert len(seqs) >= committed, "a reading reported committed is missing"
    assert seqs == list(range(1, len(seqs) + 1))
    assert buffer.last_seq == len(seqs)
    buffer.close()
