"""The usage and health report of one site over one month, computed from the fleet's own store.

Rules: rooms come from the registry; a device without a room counts in its gateway's room, else
in the `unassigned` group; devices gateways report that the registry lacks count too, by the kind
they report. A device is in service from the earliest of its registration, its first reading and
its first event; before that the month is not held against it. Readings are streamed from range
queries over the index (device, ts_ns): one per device for its presence, then a display's power
over its window, or a sensor's CO2, temperature and humidity around each lesson only. Nothing is
loaded whole.
"""

from __future__ import annotations

import heapq
import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from drivers.profiles import AnyProfile, DeviceKind
from fleet.registry import Registry, RegistryError, Target
from fleet.reports.period import NS, Interval, Period
from fleet.reports.timeline import (
    GAP_FACTOR,
    Health,
    LessonStats,
    OnTime,
    Series,
    health,
    number,
    overlap,
    power_on,
)
from wire.gateway_config import DeviceConfig

UNASSIGNED = "unassigned"
CO2_LIMIT_PPM = 1000.0
COMFORT_POINTS = ("co2", "temperature", "humidity")
POWER_POINTS = ("power", "power_state")  # the first one a display's profile declares
DEFAULT_INTERVAL_S: float = DeviceConfig.model_fields["interval_s"].default
SENSOR_KINDS = frozenset({DeviceKind.SENSOR.value, DeviceKind.METER.value})


@dataclass
class DeviceFigures:
    """One device over its window (None: not in service during the period)."""

    device: str
    gateway: str
    kind: str
    profile: str | None
    registered: bool
    interval_s: float
    window: Interval | None
    health: Health | None = None
    power_point: str | None = None
    on: OnTime | None = None
    comfort: dict[str, LessonStats] = field(default_factory=dict)
    co2_sensor: bool = False
    lesson_ns: int = 0  # lesson time while in service (sensors)


@dataclass
class Availability:
    """Up, down and known-down time summed over devices of one kind, and over their windows."""

    devices: int = 0
    window_ns: int = 0
    up_ns: int = 0
    down_ns: int = 0

    def add(self, figures: Health) -> None:
        self.devices += 1
        self.window_ns += figures.window_ns
        self.up_ns += figures.up_ns
        self.down_ns += figures.down_ns

    def merge(self, other: Availability) -> None:
        self.devices += other.devices
        self.window_ns += other.window_ns
        self.up_ns += other.up_ns
        self.down_ns += other.down_ns

    @property
    def up_share(self) -> float | None:
        return self.up_ns / self.window_ns if self.window_ns else None

    @property
    def down_share(self) -> float | None:
        return self.down_ns / self.window_ns if self.window_ns else None

    @property
    def unknown_share(self) -> float | None:
        unknown = self.window_ns - self.up_ns - self.down_ns
        return unknown / self.window_ns if self.window_ns else None


@dataclass
class Displays:
    devices: int = 0
    window_ns: int = 0
    on_ns: int = 0
    known_ns: int = 0

    def add(self, window_ns: int, on: OnTime) -> None:
        self.devices += 1
        self.window_ns += window_ns
        self.on_ns += on.on_ns
        self.known_ns += on.known_ns

    def merge(self, other: Displays) -> None:
        self.devices += other.devices
        self.window_ns += other.window_ns
        self.on_ns += other.on_ns
        self.known_ns += other.known_ns

    @property
    def on_hours(self) -> float | None:
        """Summed over the displays; None when none of them reported its power state."""
        return self.on_ns / (3600 * NS) if self.known_ns else None

    @property
    def known_share(self) -> float | None:
        return self.known_ns / self.window_ns if self.window_ns else None


@dataclass
class Comfort:
    """Lesson-time statistics of a room's sensors (kind sensor), summed over sensors."""

    lesson_ns: int
    limit: float
    co2_sensors: int = 0
    expected_ns: int = 0  # lesson time while in service, summed over the CO2 sensors
    points: dict[str, LessonStats] = field(default_factory=dict)

    def stats(self, point: str) -> LessonStats:
        if point not in self.points:
            self.points[point] = LessonStats((), limit=self.limit if point == "co2" else None)
        return self.points[point]

    def add(self, figures: DeviceFigures) -> None:
        if figures.co2_sensor:
            self.co2_sensors += 1
            self.expected_ns += figures.lesson_ns
        for point, stats in figures.comfort.items():
            self.stats(point).merge(stats)

    def merge(self, other: Comfort) -> None:
        self.co2_sensors += other.co2_sensors
        self.expected_ns += other.expected_ns
        for point, stats in other.points.items():
            self.stats(point).merge(stats)

    @property
    def co2_coverage(self) -> float | None:
        """Share of the CO2 sensors' lesson time in service with a CO2 value held."""
        if not self.expected_ns:
            return None
        return self.stats("co2").covered_ns / self.expected_ns

    @property
    def co2_under_share(self) -> float | None:
        """Share of the covered lesson time with CO2 under the limit (None: no CO2 data)."""
        co2 = self.stats("co2")
        return co2.under_ns / co2.covered_ns if co2.covered_ns else None


@dataclass
class RoomFigures:
    room: str  # a room id, UNASSIGNED, or the site id for the totals
    name: str | None
    building: str | None
    comfort: Comfort
    devices: list[DeviceFigures] = field(default_factory=list)
    displays: Displays = field(default_factory=Displays)
    boards: Availability = field(default_factory=Availability)
    sensors: Availability = field(default_factory=Availability)
    cameras: Availability = field(default_factory=Availability)

    def add(self, figures: DeviceFigures) -> None:
        self.devices.append(figures)
        if figures.health is None:  # not in service during the period
            return
        kind = figures.kind
        if kind == DeviceKind.DISPLAY and figures.on is not None:
            self.displays.add(figures.health.window_ns, figures.on)
        elif kind == DeviceKind.BOARD:
            self.boards.add(figures.health)
        elif kind == DeviceKind.CAMERA:
            self.cameras.add(figures.health)
        elif kind in SENSOR_KINDS:
            self.sensors.add(figures.health)
        if kind == DeviceKind.SENSOR:
            self.comfort.add(figures)

    def merge(self, other: RoomFigures) -> None:
        """Adds another room's sums (for the site's totals)."""
        self.displays.merge(other.displays)
        self.boards.merge(other.boards)
        self.sensors.merge(other.sensors)
        self.cameras.merge(other.cameras)
        self.comfort.merge(other.comfort)


@dataclass
class UsageReport:
    site: str
    site_name: str | None
    period: Period
    zone_source: str  # "option", "site settings" or "fleet host"
    co2_limit: float
    rooms: list[RoomFigures]
    totals: RoomFigures
    generated_ns: int


@dataclass(frozen=True)
class _Device:
    device: str
    gateway: str
    room: str
    kind: str
    profile: str | None
    registered: bool
    created_ns: int | None
    interval_s: float


def usage_report(
    registry: Registry,
    site: str,
    period: Period,
    *,
    zone_source: str,
    co2_limit: float = CO2_LIMIT_PPM,
    now_ns: int,
) -> UsageReport:
    """Raises `NotFound` for an unknown site."""
    entry = registry.site(site)
    conn = registry.store.conn
    rooms: dict[str, RoomFigures] = {}
    for row in registry.rooms(site):
        rooms[row["room"]] = RoomFigures(
            row["room"], row["name"], row["building"], Comfort(period.lesson_ns, co2_limit)
        )
    profiles = _profiles(registry)
    events = _device_events(conn, site, period.end_ns)
    first_event = dict(
        conn.execute(
            "SELECT device, min(ts_ns) FROM events WHERE site = ? AND device IS NOT NULL "
            "GROUP BY device",
            (site,),
        ).fetchall()
    )
    for device in _devices(registry, site):
        room = rooms.get(device.room)
        if room is None:
            building = (
                None if device.room == UNASSIGNED else registry.building_of_room(site, device.room)
            )
            room = rooms[device.room] = RoomFigures(
                device.room, None, building, Comfort(period.lesson_ns, co2_limit)
            )
        profile = profiles.get(device.profile) if device.profile else None
        room.add(
            _device_figures(
                conn,
                site,
                device,
                profile,
                period,
                events.get(device.device, []),
                first_event.get(device.device),
                co2_limit,
            )
        )
    ordered = sorted(
        (r for r in rooms.values() if r.room != UNASSIGNED),
        key=lambda r: (r.building or "", r.room),
    )
    if UNASSIGNED in rooms:
        ordered.append(rooms[UNASSIGNED])
    totals = RoomFigures(site, entry.get("name"), None, Comfort(period.lesson_ns, co2_limit))
    for room in ordered:
        totals.merge(room)
    return UsageReport(
        site=site,
        site_name=entry.get("name"),
        period=period,
        zone_source=zone_source,
        co2_limit=co2_limit,
        rooms=ordered,
        totals=totals,
        generated_ns=now_ns,
    )


def _profiles(registry: Registry) -> dict[str, AnyProfile]:
    """The firmware profiles, for per-point poll intervals and power point names (without them
    the device's interval and the default point names apply)."""
    try:
        return dict(registry.library.profiles)
    except RegistryError:
        return {}


def _devices(registry: Registry, site: str) -> list[_Device]:
    """Registered devices, then the ones gateways report that the registry lacks."""
    conn = registry.store.conn
    gateway_rooms = dict(
        conn.execute(
            "SELECT gateway, room FROM registry_gateways WHERE site = ?", (site,)
        ).fetchall()
    )
    found: list[_Device] = []
    for device, gateway, room, kind, profile, created_ns in conn.execute(
        "SELECT device, gateway, room, kind, profile, created_ns FROM registry_devices "
        "WHERE site = ? ORDER BY device",
        (site,),
    ).fetchall():
        interval = registry.effective(Target("device", site, device)).interval_s
        found.append(
            _Device(
                device,
                gateway,
                room or gateway_rooms.get(gateway) or UNASSIGNED,
                kind,
                profile,
                True,
                created_ns,
                interval or DEFAULT_INTERVAL_S,
            )
        )
    # A device reported by two gateways (moved) counts once, at the gateway that saw it last
    # (SQLite takes the bare columns from the row where max() is found).
    for device, gateway, kind, profile, _seen in conn.execute(
        "SELECT o.device, o.gateway, o.kind, o.profile, max(coalesce(o.last_seen_ns, 0)) "
        "FROM devices o WHERE o.site = ? AND o.kind IS NOT NULL AND NOT EXISTS (SELECT 1 "
        "FROM registry_devices d WHERE d.site = o.site AND d.device = o.device) "
        "GROUP BY o.device ORDER BY o.device",
        (site,),
    ).fetchall():
        interval = None
        if gateway in gateway_rooms:
            interval = registry.effective(Target("gateway", site, gateway)).interval_s
        found.append(
            _Device(
                device,
                gateway,
                gateway_rooms.get(gateway) or UNASSIGNED,
                kind,
                profile,
                False,
                None,
                interval or DEFAULT_INTERVAL_S,
            )
        )
    return found


def _device_events(
    conn: sqlite3.Connection, site: str, end_ns: int
) -> dict[str, list[tuple[int, bool]]]:
    """device_up / device_down events before `end_ns`, per device, in time order:
    (ts_ns, is_down). They are transitions, so they are few."""
    events: dict[str, list[tuple[int, bool]]] = {}
    for device, ts_ns, kind in conn.execute(
        "SELECT device, ts_ns, kind FROM events WHERE site = ? AND device IS NOT NULL "
        "AND kind IN ('device_up', 'device_down') AND ts_ns < ? ORDER BY ts_ns, id",
        (site, end_ns),
    ):
        events.setdefault(device, []).append((ts_ns, kind == "device_down"))
    return events


def _device_figures(
    conn: sqlite3.Connection,
    site: str,
    device: _Device,
    profile: AnyProfile | None,
    period: Period,
    events: Sequence[tuple[int, bool]],
    first_event_ns: int | None,
    co2_limit: float,
) -> DeviceFigures:
    figures = DeviceFigures(
        device.device,
        device.gateway,
        device.kind,
        device.profile,
        device.registered,
        device.interval_s,
        None,
    )
    reads = _Readings(conn, site, device.device)
    starts = [t for t in (device.created_ns, reads.first_ns(), first_event_ns) if t is not None]
    if not starts:
        return figures
    window = (max(period.start_ns, min(starts)), period.end_ns)
    if window[0] >= window[1]:
        return figures
    figures.window = window
    cap_ns = int(GAP_FACTOR * device.interval_s * NS)
    downs = [ts for ts, is_down in events if is_down]
    ups = [ts for ts, is_down in events if not is_down]
    figures.health = health(heapq.merge(reads.times(window), ups), downs, cap_ns, window)

    if device.kind == DeviceKind.DISPLAY:
        _power(figures, reads, profile, window, downs)
    elif device.kind == DeviceKind.SENSOR:
        _comfort(figures, reads, profile, period, window, downs, co2_limit)
    return figures


def _cap_ns(device: DeviceFigures, profile: AnyProfile | None, point: str) -> int:
    """How long a reading of the point holds: GAP_FACTOR × its poll interval (the device's, or
    the point's own when its profile polls it less often)."""
    interval = max(device.interval_s, _point_interval(profile, point) or 0.0)
    return int(GAP_FACTOR * interval * NS)


def _power(
    figures: DeviceFigures,
    reads: _Readings,
    profile: AnyProfile | None,
    window: Interval,
    downs: Sequence[int],
) -> None:
    """On-time of a display over its whole window."""
    point = figures.power_point = _power_point(profile)
    on = figures.on = OnTime(window)
    cap = _cap_ns(figures, profile, point)
    series = Series(cap, downs, window[1], on)
    for ts_ns, _point, value in reads.values((point,), [(window[0] - cap, window[1])]):
        state = power_on(value)
        series.add(ts_ns, None if state is None else float(state))
    series.close()


def _comfort(
    figures: DeviceFigures,
    reads: _Readings,
    profile: AnyProfile | None,
    period: Period,
    window: Interval,
    downs: Sequence[int],
    co2_limit: float,
) -> None:
    """Lesson-time statistics of a sensor. Only readings that can hold into a lesson are read:
    those from `cap` before each lesson to its end (about a quarter of a month of readings)."""
    caps = {point: _cap_ns(figures, profile, point) for point in COMFORT_POINTS}
    series: dict[str, Series] = {}
    for point in COMFORT_POINTS:
        stats = figures.comfort[point] = LessonStats(
            period.lessons, limit=co2_limit if point == "co2" else None
        )
        series[point] = Series(caps[point], downs, window[1], stats)
    reported = False
    spans = _spans(period.lessons, max(caps.values()), window)
    for ts_ns, point, value in reads.values(COMFORT_POINTS, spans):
        series[point].add(ts_ns, number(value))
        reported = reported or point == "co2"
    for each in series.values():
        each.close()
    figures.co2_sensor = (
        reported or _declares(profile, "co2") or (profile is None and reads.has("co2", window))
    )
    figures.lesson_ns = sum(overlap(start, end, window) for start, end in period.lessons)


def _spans(lessons: Sequence[Interval], cap_ns: int, window: Interval) -> list[Interval]:
    """The lessons widened by `cap` before them, merged and kept to the window (and the `cap`
    before it, whose readings carry in)."""
    spans: list[Interval] = []
    for start, end in lessons:
        span = (max(start - cap_ns, window[0] - cap_ns), min(end, window[1]))
        if span[0] >= span[1]:
            continue
        if spans and span[0] <= spans[-1][1]:
            spans[-1] = (spans[-1][0], max(spans[-1][1], span[1]))
        else:
            spans.append(span)
    return spans


def _declares(profile: AnyProfile | None, point: str) -> bool:
    return profile is not None and any(declared.name == point for declared in profile.points)


def _point_interval(profile: AnyProfile | None, point: str) -> float | None:
    """The point's own poll interval, when its profile sets one."""
    if profile is None:
        return None
    return next((p.poll_interval_s for p in profile.points if p.name == point), None)


def _power_point(profile: AnyProfile | None) -> str:
    return next((name for name in POWER_POINTS if _declares(profile, name)), POWER_POINTS[0])


class _Readings:
    """Streamed reads of one device's readings over the (device, ts_ns) index. The site is
    checked only when the device id is also reported in another site: otherwise the index alone
    answers the presence query."""

    def __init__(self, conn: sqlite3.Connection, site: str, device: str) -> None:
        self.conn = conn
        self.site = site
        self.device = device
        sites = conn.execute(
            "SELECT count(DISTINCT site) FROM devices WHERE device = ?", (device,)
        ).fetchone()[0]
        self.shared = sites > 1
        self._where = "device = ?" + (" AND site = ?" if self.shared else "")
        self._key: tuple[str, ...] = (device, site) if self.shared else (device,)

    def first_ns(self) -> int | None:
        row = self.conn.execute(
            f"SELECT ts_ns FROM readings WHERE {self._where} ORDER BY ts_ns LIMIT 1", self._key
        ).fetchone()
        return None if row is None else int(row[0])

    def times(self, window: Interval) -> Iterator[int]:
        """The last reading time before the window (it may carry in), then every distinct
        reading time inside it, in order."""
        before = self.conn.execute(
            f"SELECT ts_ns FROM readings WHERE {self._where} AND ts_ns < ? "
            "ORDER BY ts_ns DESC LIMIT 1",
            (*self._key, window[0]),
        ).fetchone()
        if before is not None:
            yield int(before[0])
        for (ts_ns,) in self.conn.execute(
            f"SELECT DISTINCT ts_ns FROM readings WHERE {self._where} AND ts_ns >= ? "
            "AND ts_ns < ? ORDER BY ts_ns",
            (*self._key, *window),
        ):
            yield int(ts_ns)

    def values(
        self, points: Sequence[str], spans: Sequence[Interval]
    ) -> Iterator[tuple[int, str, Any]]:
        """Readings of these points in the spans (sorted, disjoint), in time order."""
        marks = ", ".join("?" for _ in points)
        sql = (
            f"SELECT ts_ns, point, value FROM readings WHERE {self._where} AND ts_ns >= ? "
            f"AND ts_ns < ? AND point IN ({marks}) ORDER BY ts_ns"
        )
        for span in spans:
            yield from self.conn.execute(sql, (*self._key, *span, *points))

    def has(self, point: str, window: Interval) -> bool:
        """Whether the point has any reading in the window."""
        row = self.conn.execute(
            f"SELECT 1 FROM readings WHERE {self._where} AND ts_ns >= ? AND ts_ns < ? "
            "AND point = ? LIMIT 1",
            (*self._key, *window, point),
        ).fetchone()
        return row is not None
