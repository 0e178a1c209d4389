"""`campus-sim demo` shows live readings within 15 s and leaves nothing running."""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

from tests.conftest import BIN


def descendants_alive(pids: set[int]) -> set[int]:
    return {
        pid
        for pid in pids
        if Path(f"/proc/{pid}").exists()
        and "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()
    }


def children_of(pid: int) -> set[int]:
    found: set[int] = set()
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            text = status.read_text()
        except OSError:
            continue
        if re.search(rf"^PPid:\s+{pid}$", text, re.MULTILINE):
            found.add(int(status.parent.name))
    return found


def test_demo_shows_readings_quickly_and_cleans_up(tmp_path: Path) -> None:
    started = time.monotonic()
    demo = subprocess.Popen(
        [
            str(BIN / "campus-sim"),
            "demo",
            "--plain",
            "--duration",
            "15",
            "--rooms",
            "2",
            "--workdir",
            str(tmp_path / "demo"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert demo.stdout is not None
    first_reading_at = None
    spawned: set[int] = set()
    lines = []
    for line in demo.stdout:
        lines.append(line)
        spawned |= children_of(demo.pid)
        if first_reading_at is None and re.search(r"room-10[12]-env co2=\d+", line):
            first_reading_at = time.monotonic() - started
    assert demo.wait(30) == 0, "".join(lines)
    assert first_reading_at is not None and first_reading_at < 15, "".join(lines[-20:])
    assert "every process stopped" in lines[-1] or "every process stopped" in "".join(lines[-3:])
    assert len(spawned) >= 4  # broker, simulator, fleet, agent
    assert descendants_alive(spawned) == set(), "the demo left processes running"
