"""Time for a gateway without a real-time clock.

A Raspberry Pi boots with whatever time it last saved (or 1970) until NTP syncs it. Readings are
stamped with the wall clock *and* the monotonic clock; while the wall clock is not known to be
synced they are marked, and once it is, their wall time is recomputed from the monotonic stamp.

Sync sources: `adjtimex` looks for systemd-timesyncd's flag file /run/systemd/timesync/synchronized,
then asks the kernel (NTP daemons — timesyncd, chrony, ntpd — clear its STA_UNSYNC flag when they
have set the time; the shipped unit's seccomp filter refuses that call, so there the flag file
decides); `none` trusts the clock (a VM or container
whose host keeps time); `file` reads a JSON file `{"offset_s": float, "synced": bool}` so tests
and installers can jump the clock of a running agent.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import json
import time
from pathlib import Path
from typing import Protocol

STA_UNSYNC = 0x0040
TIME_ERROR = 5


class Clock(Protocol):
    def wall_ns(self) -> int: ...

    def mono_ns(self) -> int: ...

    def synced(self) -> bool: ...


class _Timex(ctypes.Structure):
    _fields_ = [
        ("modes", ctypes.c_uint),
        ("offset", ctypes.c_long),
        ("freq", ctypes.c_long),
        ("maxerror", ctypes.c_long),
        ("esterror", ctypes.c_long),
        ("status", ctypes.c_int),
        ("constant", ctypes.c_long),
        ("precision", ctypes.c_long),
        ("tolerance", ctypes.c_long),
        ("time_sec", ctypes.c_long),
        ("time_usec", ctypes.c_long),
        ("tick", ctypes.c_long),
        ("ppsfreq", ctypes.c_long),
        ("jitter", ctypes.c_long),
        ("shift", ctypes.c_int),
        ("stabil", ctypes.c_long),
        ("jitcnt", ctypes.c_long),
        ("calcnt", ctypes.c_long),
        ("errcnt", ctypes.c_long),
        ("stbcnt", ctypes.c_long),
        ("tai", ctypes.c_int),
        ("padding", ctypes.c_int * 11),
    ]


TIMESYNCD_FLAG = Path("/run/systemd/timesync/synchronized")


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)  # runs ldconfig: once


def kernel_says_synced() -> bool | None:
    """adjtimex(2) with modes=0 only reads; TIME_ERROR or STA_UNSYNC mean 'not synced'.
    None when the call is refused (a seccomp filter such as systemd's ProtectClock=yes)."""
    libc = _libc()
    timex = _Timex()
    state = libc.adjtimex(ctypes.byref(timex))
    if state == -1:
        return None
    return state != TIME_ERROR and not timex.status & STA_UNSYNC


def clock_is_synced(flag: Path = TIMESYNCD_FLAG) -> bool:
    """systemd-timesyncd's flag file (readable under any sandbox), else the kernel's flag."""
    return flag.exists() or bool(kernel_says_synced())


class SystemClock:
    def __init__(self, check_sync: bool = True, recheck_s: float = 5.0) -> None:
        self.check_sync = check_sync
        self.recheck_s = recheck_s
        self._synced = not check_sync
        self._checked_at = -recheck_s

    def wall_ns(self) -> int:
        return time.time_ns()

    def mono_ns(self) -> int:
        return time.monotonic_ns()

    def synced(self) -> bool:
        if self._synced:
            return True  # once synced, a step by NTP moves the time but keeps it right
        now = time.monotonic()
        if now - self._checked_at >= self.recheck_s:
            self._checked_at = now
            self._synced = clock_is_synced()
        return self._synced


class FileClock:
    """The system clock shifted by `offset_s`, synced or not, as a JSON file says."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._mtime_ns = -1
        self._offset_ns = 0
        self._synced = False

    def _refresh(self) -> None:
        try:
            mtime = self.path.stat().st_mtime_ns
        except FileNotFoundError:
            return
        if mtime != self._mtime_ns:
            try:
                data = json.loads(self.path.read_text())
                self._offset_ns = int(float(data.get("offset_s", 0)) * 1e9)
                self._synced = bool(data.get("synced", False))
            except (ValueError, OSError, AttributeError):
                return  # half-written file: keep the previous reading, try again next time
            self._mtime_ns = mtime

    def wall_ns(self) -> int:
        self._refresh()
        return time.time_ns() + self._offset_ns

    def mono_ns(self) -> int:
        return time.monotonic_ns()

    def synced(self) -> bool:
        self._refresh()
        return self._synced


def boot_id() -> str:
    """Changes at every boot: monotonic stamps from another boot cannot be corrected."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"
