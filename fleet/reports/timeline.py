"""Time integration over readings and device events: pure, no SQL, no clock.

Rules: a reading holds its value from its timestamp until the next reading of the same series,
for at most `cap` (GAP_FACTOR × the poll interval) and never past a device_down event; time that
no reading holds is unknown, never counted as on, up or comfortable. A device is up while a
reading (or a device_up event) holds, down from a device_down event until it is seen again, and
unknown otherwise. All times are UTC nanoseconds; windows are half-open [start, end).
"""

from __future__ import annotations

import heapq
import math
from bisect import bisect_left
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from fleet.reports.period import Interval

GAP_FACTOR = 3

# Display power: PJLink's POWR states (0 standby, 1 on, 2 cooling, 3 warming), which include a
# boolean's 0 and 1, and their names as drivers report them. A lamp warming up counts as on (it
# was switched on), cooling down as off. Any other value is unknown: neither on nor off.
POWER_ON = frozenset({"on", "warming", "warm-up", "warm_up", "warmup", "true", "1", "3"})
POWER_OFF = frozenset({"off", "standby", "cooling", "cool-down", "cool_down", "false", "0", "2"})


def overlap(start: int, end: int, window: Interval) -> int:
    """Length of [start, end) inside the window."""
    return max(0, min(end, window[1]) - max(start, window[0]))


def power_on(value: object) -> bool | None:
    """True (on), False (off) or None (a value the rule does not know)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        if isinstance(value, float) and not value.is_integer():
            return None
        value = str(int(value))
    if isinstance(value, str):
        word = value.strip().lower()
        if word in POWER_ON:
            return True
        if word in POWER_OFF:
            return False
    return None


def number(value: object) -> float | None:
    """A reading's value as a number for statistics (bools, text and NaN are not numbers)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return None


Sink = Callable[[int, int, float], None]


class Series:
    """One series (a device's point), fed in time order: each value is handed to `sink` as the
    segment [ts, until) it holds, until = min(next reading, ts + cap, next stop, end). Values
    that are None (not usable) still end the previous segment but are not handed on."""

    def __init__(self, cap_ns: int, stops: Sequence[int], end_ns: int, sink: Sink) -> None:
        self.cap_ns = cap_ns
        self.stops = stops
        self.end_ns = end_ns
        self.sink = sink
        self._ts: int | None = None
        self._value: float | None = None

    def add(self, ts_ns: int, value: float | None) -> None:
        if self._ts is not None and self._value is not None:
            self._hand_on(self._ts, ts_ns, self._value)
        self._ts, self._value = ts_ns, value

    def close(self) -> None:
        if self._ts is not None and self._value is not None:
            self._hand_on(self._ts, self.end_ns, self._value)
        self._ts = None

    def _hand_on(self, start: int, next_ns: int, value: float) -> None:
        until = min(next_ns, start + self.cap_ns, self.end_ns)
        if self.stops:
            index = bisect_left(self.stops, start)
            if index < len(self.stops) and self.stops[index] < until:
                until = self.stops[index]
        if until > start:
            self.sink(start, until, value)


@dataclass
class OnTime:
    """Sink of a power series over a window: time on, and time the state was known."""

    window: Interval
    on_ns: int = 0
    known_ns: int = 0

    def __call__(self, start: int, end: int, value: float) -> None:
        length = overlap(start, end, self.window)
        self.known_ns += length
        if value:
            self.on_ns += length


@dataclass
class LessonStats:
    """Sink of a numeric series over the lesson intervals: time covered, time under `limit`,
    the time-weighted sum (for the mean), min and max of the values held during lessons."""

    lessons: Sequence[Interval]
    limit: float | None = None
    covered_ns: int = 0
    under_ns: int = 0
    weighted: float = 0.0
    low: float | None = None
    high: float | None = None
    _next: int = 0

    def __call__(self, start: int, end: int, value: float) -> None:
        lessons = self.lessons
        count = len(lessons)
        index = self._next
        while index < count and lessons[index][1] <= start:
            index += 1
        self._next = index  # segments come in time order: earlier lessons are done with
        while index < count:
            lesson_start, lesson_end = lessons[index]
            if lesson_start >= end:
                break
            length = min(end, lesson_end) - max(start, lesson_start)
            if length > 0:
                self.covered_ns += length
                self.weighted += value * length
                if self.limit is not None and value < self.limit:
                    self.under_ns += length
                if self.low is None or value < self.low:
                    self.low = value
                if self.high is None or value > self.high:
                    self.high = value
            if lesson_end >= end:
                break
            index += 1

    @property
    def mean(self) -> float | None:
        return self.weighted / self.covered_ns if self.covered_ns else None

    def merge(self, other: LessonStats) -> None:
        """Adds another series' figures (several sensors of one room)."""
        self.covered_ns += other.covered_ns
        self.under_ns += other.under_ns
        self.weighted += other.weighted
        for value in (other.low, other.high):
            if value is not None:
                self.low = value if self.low is None else min(self.low, value)
                self.high = value if self.high is None else max(self.high, value)


@dataclass(frozen=True)
class Health:
    """Up, reported-down and unknown time of a device over its window."""

    window: Interval
    up_ns: int
    down_ns: int

    @property
    def window_ns(self) -> int:
        return self.window[1] - self.window[0]

    @property
    def unknown_ns(self) -> int:
        return self.window_ns - self.up_ns - self.down_ns


def health(seen: Iterable[int], downs: Sequence[int], cap_ns: int, window: Interval) -> Health:
    """`seen`: sorted times the device answered (readings, device_up events), which may start
    before the window (the last one before it carries in); `downs`: sorted device_down times."""
    up = down = 0
    low, high = window
    last_seen: int | None = None
    down_since: int | None = None
    # At equal times a reading sorts before a device_down event: the event ends it at once.
    for ts, is_down in heapq.merge(((t, False) for t in seen), ((t, True) for t in downs)):
        if last_seen is not None:
            # inline overlap(): this loop runs once per reading time of the month
            until = min(ts, last_seen + cap_ns, high)
            since = max(last_seen, low)
            if until > since:
                up += until - since
            last_seen = None
        if is_down:
            if down_since is None:
                down_since = ts
            continue
        if down_since is not None:
            down += overlap(down_since, ts, window)
            down_since = None
        last_seen = ts
    if last_seen is not None:
        up += overlap(last_seen, last_seen + cap_ns, window)
    if down_since is not None:
        down += overlap(down_since, high, window)
    return Health(window, up, down)
