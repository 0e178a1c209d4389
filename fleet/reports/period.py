"""The period a usage report covers: a calendar month in a time zone, and the lesson time in it.

Rules: the month runs from local midnight on its first day to local midnight on the first day of
the next month (so a month with a DST change is an hour longer or shorter); a month not over yet
ends now. Lesson time is the lesson ranges on the chosen weekdays, in local wall time, clipped to
the period. Every parser raises `ReportError` with a message naming the option and the form.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

NS = 1_000_000_000
DAY_NAMES = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
MINUTES_PER_DAY = 1440

_MONTH = re.compile(r"^(\d{4})-(\d{2})$")
_RANGE = re.compile(r"^(\d{1,2}):(\d{2})-(\d{1,2}):(\d{2})$")

Interval = tuple[int, int]  # [start_ns, end_ns)


class ReportError(Exception):
    """A report that cannot be made as asked; the message says what is wrong."""


def parse_month(text: str) -> tuple[int, int]:
    """'2026-11' → (2026, 11)."""
    match = _MONTH.match(text.strip())
    if not match or not 1 <= int(match[2]) <= 12 or int(match[1]) < 1970:
        raise ReportError(f"--month {text!r} must be a month YYYY-MM, e.g. 2026-11")
    return int(match[1]), int(match[2])


def parse_lessons(text: str) -> tuple[tuple[int, int], ...]:
    """'08:00-12:00,13:30-17:00' → minutes after midnight, [(480, 720), (810, 1020)]. An end
    of 24:00 is midnight at the end of the day; ranges must be in order and must not overlap."""
    ranges: list[tuple[int, int]] = []
    for part in text.split(","):
        match = _RANGE.match(part.strip())
        if not match:
            raise ReportError(
                f"--lessons {text!r}: {part.strip()!r} is not a range HH:MM-HH:MM "
                "(e.g. 08:00-17:00, or 08:00-12:00,13:30-17:00)"
            )
        start_h, start_m, end_h, end_m = (int(group) for group in match.groups())
        start = _minutes(start_h, start_m, allow_midnight_end=False, text=text)
        end = _minutes(end_h, end_m, allow_midnight_end=True, text=text)
        if end <= start:
            raise ReportError(f"--lessons {text!r}: {part.strip()} ends before it starts")
        if ranges and start < ranges[-1][1]:
            raise ReportError(
                f"--lessons {text!r}: {part.strip()} overlaps or comes before the range before it"
            )
        ranges.append((start, end))
    return tuple(ranges)


def _minutes(hour: int, minute: int, *, allow_midnight_end: bool, text: str) -> int:
    if allow_midnight_end and (hour, minute) == (24, 0):
        return MINUTES_PER_DAY
    if hour > 23 or minute > 59:
        raise ReportError(f"--lessons {text!r}: {hour:02d}:{minute:02d} is not a time of day")
    return hour * 60 + minute


def parse_days(text: str) -> frozenset[int]:
    """'mon-fri', 'mon,tue,thu', 'sun-thu' (ranges may wrap past sunday) → weekdays, 0 = monday."""
    days: set[int] = set()
    for part in text.lower().split(","):
        first, dash, last = part.strip().partition("-")
        if first not in DAY_NAMES or (dash and last not in DAY_NAMES):
            raise ReportError(
                f"--days {text!r}: {part.strip()!r} is not a day or a range of days "
                f"({', '.join(DAY_NAMES)}; e.g. mon-fri or mon,tue,thu,fri)"
            )
        start = DAY_NAMES.index(first)
        stop = DAY_NAMES.index(last) if dash else start
        days.update((start + step) % 7 for step in range((stop - start) % 7 + 1))
    return frozenset(days)


def parse_zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name.strip())
    except (ZoneInfoNotFoundError, ValueError):
        raise ReportError(f"unknown time zone {name!r} (an IANA name, e.g. Europe/Paris)") from None


def days_text(days: Iterable[int]) -> str:
    """{0, 1, 2, 3, 4} → 'mon-fri', {0, 2, 6} → 'mon,wed,sun'."""
    runs: list[list[int]] = []
    for day in sorted(set(days)):
        if runs and runs[-1][-1] == day - 1:
            runs[-1].append(day)
        else:
            runs.append([day])
    return ",".join(_run_text(run) for run in runs)


def _run_text(run: list[int]) -> str:
    if len(run) >= 3:
        return f"{DAY_NAMES[run[0]]}-{DAY_NAMES[run[-1]]}"
    return ",".join(DAY_NAMES[day] for day in run)


def lessons_text(ranges: Iterable[tuple[int, int]]) -> str:
    return ",".join(f"{_hhmm(start)}-{_hhmm(end)}" for start, end in ranges)


def _hhmm(minutes: int) -> str:
    return f"{minutes // 60:02d}:{minutes % 60:02d}"


@dataclass(frozen=True)
class Period:
    """The month as UTC nanoseconds, with its lesson intervals (sorted, disjoint)."""

    month: str
    zone: ZoneInfo
    start_ns: int
    end_ns: int  # now, for a month not over yet
    month_end_ns: int
    lessons: tuple[Interval, ...]
    lesson_ranges: tuple[tuple[int, int], ...]
    days: frozenset[int]

    @property
    def complete(self) -> bool:
        return self.end_ns == self.month_end_ns

    @property
    def length_ns(self) -> int:
        return self.end_ns - self.start_ns

    @property
    def lesson_ns(self) -> int:
        return sum(end - start for start, end in self.lessons)

    @property
    def school_days(self) -> int:
        return len({_local_date(start, self.zone) for start, _ in self.lessons})


def month_period(
    month: str,
    zone: ZoneInfo,
    lesson_ranges: tuple[tuple[int, int], ...],
    days: frozenset[int],
    now_ns: int,
) -> Period:
    year, number = parse_month(month)
    first = date(year, number, 1)
    following = date(year + number // 12, number % 12 + 1, 1)
    start_ns = _local_ns(first, 0, zone)
    month_end_ns = _local_ns(following, 0, zone)
    if start_ns >= now_ns:
        raise ReportError(f"--month {month}: the month has not begun yet")
    end_ns = min(month_end_ns, now_ns)
    lessons: list[Interval] = []
    day = first
    while day < following:
        if day.weekday() in days:
            for start, end in lesson_ranges:
                span = (
                    max(_local_ns(day, start, zone), start_ns),
                    min(_local_ns(day, end, zone), end_ns),
                )
                if span[0] < span[1]:
                    lessons.append(span)
        day += timedelta(days=1)
    return Period(
        month=f"{year:04d}-{number:02d}",
        zone=zone,
        start_ns=start_ns,
        end_ns=end_ns,
        month_end_ns=month_end_ns,
        lessons=tuple(lessons),
        lesson_ranges=lesson_ranges,
        days=days,
    )


def _local_ns(day: date, minutes: int, zone: ZoneInfo) -> int:
    """Wall time `minutes` after local midnight of `day` (aware arithmetic is wall-clock
    arithmetic; a wall time skipped by DST is read with the offset before the change)."""
    moment = datetime(day.year, day.month, day.day, tzinfo=zone) + timedelta(minutes=minutes)
    return int(moment.timestamp()) * NS


def _local_date(ts_ns: int, zone: ZoneInfo) -> date:
    return datetime.fromtimestamp(ts_ns // NS, tz=UTC).astimezone(zone).date()


def host_zone() -> ZoneInfo | None:
    """The fleet host's zone by its IANA name: $TZ, else the /etc/localtime link (None when
    neither names one)."""
    candidates = [os.environ.get("TZ", "").lstrip(":")]
    parts = Path("/etc/localtime").resolve().parts
    if "zoneinfo" in parts:
        candidates.append("/".join(parts[parts.index("zoneinfo") + 1 :]))
    for name in candidates:
        if name:
            try:
                return ZoneInfo(name)
            except (ZoneInfoNotFoundError, ValueError):
                continue
    return None
