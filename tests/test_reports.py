"""Usage and health reports (`campus-fleet report usage`) on a real SQLite fleet database.

One school is built through the Store and Registry APIs for October 2026 in Europe/Paris (745 h:
the month ends DST; 22 school days, 198 h of lessons 08:00-17:00): a CO2 sensor whose values
cross 1000 ppm at known times, two displays with power on/off readings, a board with down/up
events and an outage, a camera that goes down for good, a meter, a device no registry knows,
a room without sensors and an empty room. Every expected figure is worked out by hand in the
comments, in minutes. Poll interval 600 s everywhere (a reading holds 30 min at most), 300 s for
the displays (15 min).
"""

from __future__ import annotations

import csv
import io
import json
import struct
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from click.testing import CliRunner, Result

from fleet.cli import main
from fleet.registry import NotFound, Registry, Target
from fleet.reports.period import (
    NS,
    ReportError,
    month_period,
    parse_days,
    parse_lessons,
    parse_month,
    parse_zone,
)
from fleet.reports.render import CSV_COLUMNS, to_csv
from fleet.reports.timeline import LessonStats, OnTime, Series, health, number, power_on
from fleet.reports.usage import RoomFigures, UsageReport, usage_report
from fleet.settings import NodeSettings
from fleet.store import Store
from wire.models import DeviceState, Event, EventKind, GatewayState, Reading, Status

SITE = "lycee-test"
OTHER_SITE = "college-b"
PARIS = ZoneInfo("Europe/Paris")
MIN = 60 * NS
LESSONS = parse_lessons("08:00-17:00")
SCHOOL_DAYS = parse_days("mon-fri")
NOW = int(datetime(2026, 11, 26, 12, tzinfo=PARIS).timestamp()) * NS

MONTH_MIN = 745 * 60  # October 2026 in Paris: 31 days and the hour DST gives back
LESSON_MIN = 22 * 9 * 60


def local(day: int, hour: int = 0, minute: int = 0, month: int = 10) -> int:
    return int(datetime(2026, month, day, hour, minute, tzinfo=PARIS).timestamp()) * NS


M0, M1 = local(1), local(1, month=11)


# -- the school -----------------------------------------------------------------------------------


class Feed:
    """Readings into the store, each gateway with its own sequence."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.seq: dict[tuple[str, str], int] = {}

    def readings(
        self, gateway: str, device: str, rows: list[tuple[int, str, Any]], site: str = SITE
    ) -> None:
        batch: list[Reading] = []
        for ts_ns, point, value in rows:
            seq = self.seq[(site, gateway)] = self.seq.get((site, gateway), 0) + 1
            batch.append((seq, ts_ns, device, point, value, 0))
        with self.store.transaction():
            self.store.ingest_batch(site, gateway, batch)

    def event(self, gateway: str, device: str, kind: EventKind, ts_ns: int) -> None:
        self.store.record_event(
            SITE, gateway, Event(ts_ns=ts_ns, kind=kind, device=device, message=kind.value)
        )


def every(start: int, stop: int, step_min: int) -> list[int]:
    return list(range(start, stop, step_min * MIN))


def tcp(host: str) -> dict[str, Any]:
    return {"type": "modbus-tcp", "host": host}


def build_school(path: Path) -> None:
    store = Store(path)
    registry = Registry(store)
    registry.add_site(SITE, "Lycée Test")
    registry.set_settings(
        Target("site", SITE, SITE), NodeSettings(timezone="Europe/Paris", interval_s=600)
    )
    registry.add_building(SITE, "a", "Bâtiment A")
    registry.add_room(SITE, "a101", "a", "Salle 101")
    registry.add_room(SITE, "a102", "a", "Salle 102")
    registry.add_room(SITE, "a103", "a", "Labo")
    registry.add_gateway(SITE, "gw-1", room="a101")
    registry.add_gateway(SITE, "gw-2", building="a")
    fast = NodeSettings(interval_s=300)
    # No room of their own: in gw-1's room, a101.
    registry.add_device(SITE, "a101-env", "gw-1", "campussim-thc100", tcp("10.0.0.1"))
    registry.add_device(
        SITE, "a101-proj", "gw-1", "wirenboard-wb-mr6xv", tcp("10.0.0.2"), "display", None, fast
    )
    registry.add_device(SITE, "a101-board", "gw-1", "wirenboard-wb-mr6xv", tcp("10.0.0.3"))
    # In a102 by their own room, whatever their gateway's (gw-1 in a101, gw-2 in none).
    registry.add_device(SITE, "a102-meter", "gw-1", "eastron-sdm120", tcp("10.0.0.4"), None, "a102")
    registry.add_device(
        SITE, "a102-screen", "gw-2", "wirenboard-wb-mr6xv", tcp("10.0.0.5"), "display", "a102", fast
    )
    registry.add_device(
        SITE, "a102-cam", "gw-2", "wirenboard-wb-mr6xv", tcp("10.0.0.6"), "camera", "a102"
    )
    # gw-2 has no room: unassigned.
    registry.add_device(SITE, "spare-env", "gw-2", "campussim-thc100", tcp("10.0.0.7"))
    feed = Feed(store)

    # a101-env, Monday 5 October: every 10 min 08:00-12:50 and 14:00-16:50.
    # CO2 600 until 09:50, 1200 10:00-11:40, exactly 1000 at 11:50, 800 from 12:00.
    # Temperature 20 before 12:00, 23 after; humidity 40 before 12:00, 50 after, and a text
    # value at 10:00 (not a number: its 10 min count nowhere).
    env: list[tuple[int, str, Any]] = []
    for ts in every(local(5, 8), local(5, 13), 10) + every(local(5, 14), local(5, 17), 10):
        co2 = 600 if ts < local(5, 10) else 1200 if ts < local(5, 11, 50) else 800
        co2 = 1000 if ts == local(5, 11, 50) else co2
        morning = ts < local(5, 12)
        humidity: Any = "err" if ts == local(5, 10) else 40.0 if morning else 50.0
        env += [
            (ts, "co2", co2),
            (ts, "temperature", 20.0 if morning else 23.0),
            (ts, "humidity", humidity),
        ]
    feed.readings("gw-1", "a101-env", env)

    # a101-proj, Monday 5 October, PJLink states every 5 min 07:00-17:55 but none 15:00-15:25.
    proj: list[tuple[int, str, Any]] = []
    for ts in every(local(5, 7), local(5, 18), 5):
        if local(5, 15) <= ts < local(5, 15, 30):
            continue
        state = "standby"
        if ts == local(5, 8):
            state = "warming"
        elif local(5, 8) < ts < local(5, 12) or local(5, 14) <= ts < local(5, 16):
            state = "on"
        elif ts == local(5, 12):
            state = "cooling"
        proj.append((ts, "power", state))
    feed.readings("gw-1", "a101-proj", proj)

    # a101-board: a down/up pair in September, a reading at 23:55 the night before the month,
    # then every 10 min from 00:10; down 12 Oct 10:00-16:00 (events), silent 20 Oct (gw offline).
    feed.event("gw-1", "a101-board", EventKind.DEVICE_DOWN, local(20, 9, month=9))
    feed.event("gw-1", "a101-board", EventKind.DEVICE_UP, local(21, 9, month=9))
    board = [(local(30, 23, 55, month=9), "uptime", 1)]
    for ts in every(M0 + 10 * MIN, M1, 10):
        if local(12, 10) <= ts < local(12, 16) or local(20) <= ts < local(21):
            continue
        board.append((ts, "uptime", 2))
    feed.readings("gw-1", "a101-board", board)
    feed.event("gw-1", "a101-board", EventKind.DEVICE_DOWN, local(12, 10))
    feed.event("gw-1", "a101-board", EventKind.DEVICE_UP, local(12, 16))

    # A camera no registry knows, reported by gw-1 (so in a101), every 10 min on 1 October.
    feed.readings("gw-1", "ghost-cam", [(ts, "rtsp_ms", 40) for ts in every(M0, local(2), 10)])
    store.record_state(
        SITE,
        "gw-1",
        GatewayState(
            status=Status.ONLINE,
            devices=[DeviceState(id="ghost-cam", profile="onvif-camera", kind="camera", up=True)],
        ),
    )

    # a102-meter: every 10 min all month but none on 10 October.
    meter = [(ts, "voltage", 230.0) for ts in every(M0, M1, 10) if not local(10) <= ts < local(11)]
    feed.readings("gw-1", "a102-meter", meter)

    # a102-screen, Tuesday 6 October: a boolean power point every 5 min, true 08:00-11:55,
    # false 12:00-12:25, then silence.
    screen = [(ts, "power", ts < local(6, 12)) for ts in every(local(6, 8), local(6, 12, 30), 5)]
    feed.readings("gw-2", "a102-screen", screen)

    # a102-cam: every 10 min from the first minute of the month, down for good on 28 October
    # 08:00 (CET by then).
    feed.readings("gw-2", "a102-cam", [(ts, "rtsp_ms", 35) for ts in every(M0, local(28, 8), 10)])
    feed.event("gw-2", "a102-cam", EventKind.DEVICE_DOWN, local(28, 8))

    # spare-env, Thursday 15 October, at night only (00:00-01:50): no lesson time covered.
    spare: list[tuple[int, str, Any]] = []
    for ts in every(local(15), local(15, 2), 10):
        spare += [(ts, "co2", 500), (ts, "temperature", 19.0), (ts, "humidity", 50.0)]
    feed.readings("gw-2", "spare-env", spare)

    # Another site's device with the same id, in lessons of 2 October: must not leak into a101.
    feed.readings(
        "gw-x",
        "a101-env",
        [(ts, "co2", 2000) for ts in every(local(2, 10), local(2, 11), 10)],
        site=OTHER_SITE,
    )
    store.close()


@pytest.fixture(scope="module")
def school(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("reports") / "fleet.db"
    build_school(path)
    return path


def compute(path: Path, month: str = "2026-10", now_ns: int = NOW) -> UsageReport:
    store = Store(path, read_only=True)
    try:
        period = month_period(month, PARIS, LESSONS, SCHOOL_DAYS, now_ns)
        return usage_report(Registry(store), SITE, period, zone_source="option", now_ns=now_ns)
    finally:
        store.close()


@pytest.fixture(scope="module")
def report(school: Path) -> UsageReport:
    return compute(school)


def room(report: UsageReport, name: str) -> RoomFigures:
    return next(r for r in report.rooms if r.room == name)


# -- the period ------------------------------------------------------------------------------------


def test_october_in_paris_is_745_hours_with_198_hours_of_lessons() -> None:
    period = month_period("2026-10", PARIS, LESSONS, SCHOOL_DAYS, NOW)
    assert (period.start_ns, period.end_ns, period.complete) == (M0, M1, True)
    assert period.length_ns == MONTH_MIN * MIN
    assert (period.school_days, period.lesson_ns) == (22, LESSON_MIN * MIN)
    # lessons are local wall time on both sides of the DST change (UTC+2, then UTC+1)
    assert local(23, 8) in {start for start, _ in period.lessons}
    assert local(26, 8) in {start for start, _ in period.lessons}
    assert local(26, 8) - local(23, 8) == (3 * 24 + 1) * 60 * MIN
    march = month_period("2026-03", PARIS, LESSONS, SCHOOL_DAYS, NOW)
    assert march.length_ns == (31 * 24 - 1) * 60 * MIN


def test_a_month_not_over_ends_now_and_so_do_its_lessons() -> None:
    period = month_period("2026-10", PARIS, LESSONS, SCHOOL_DAYS, local(15, 12))
    assert (period.end_ns, period.complete) == (local(15, 12), False)
    # 1-2, 5-9, 12-14 October: 10 full days, and 08:00-12:00 on the 15th
    assert period.lesson_ns == (10 * 9 + 4) * 60 * MIN
    with pytest.raises(ReportError, match="has not begun"):
        month_period("2026-11", PARIS, LESSONS, SCHOOL_DAYS, local(31, 23))


def test_lesson_ranges_days_and_zones_parse_or_say_what_is_wrong() -> None:
    assert parse_lessons("08:00-12:00, 13:30-24:00") == ((480, 720), (810, 1440))
    assert parse_days("mon-wed,fri") == {0, 1, 2, 4}
    assert parse_days("sun-thu") == {6, 0, 1, 2, 3}
    assert parse_month("2026-02") == (2026, 2)
    assert parse_zone("Asia/Shanghai").key == "Asia/Shanghai"
    for bad, message in (
        (lambda: parse_month("2026-13"), "YYYY-MM"),
        (lambda: parse_month("11/2026"), "YYYY-MM"),
        (lambda: parse_lessons("8h-17h"), "HH:MM-HH:MM"),
        (lambda: parse_lessons("17:00-08:00"), "ends before it starts"),
        (lambda: parse_lessons("08:00-12:00,11:00-13:00"), "overlaps"),
        (lambda: parse_lessons("08:00-25:00"), "not a time of day"),
        (lambda: parse_days("monday-friday"), "not a day"),
        (lambda: parse_zone("Europe/Atlantis"), "unknown time zone"),
    ):
        with pytest.raises(ReportError, match=message):
            bad()


# -- the integration rules -----------------------------------------------------------------------


def test_power_states_on_off_and_unknown() -> None:
    assert [power_on(v) for v in ("on", "Warming", "standby", "cooling", " OFF ")] == [
        True,
        True,
        False,
        False,
        False,
    ]
    # numbers are PJLink's POWR codes, which include a boolean's 0 and 1
    assert [power_on(v) for v in (True, False, 1, 0, 3, 2, 1.0)] == [
        True,
        False,
        True,
        False,
        True,
        False,
        True,
    ]
    assert [power_on(v) for v in ("lamp fault", 7, 0.5, None)] == [None, None, None, None]
    assert [number(v) for v in (12, 1.5, True, "12", float("nan"))] == [12.0, 1.5, None, None, None]


def test_a_reading_holds_until_the_next_the_cap_or_a_down_event() -> None:
    segments: list[tuple[int, int, float]] = []
    series = Series(30, stops=[250], end_ns=300, sink=lambda a, b, v: segments.append((a, b, v)))
    for ts, value in ((0, 1.0), (10, 2.0), (100, None), (110, 3.0), (240, 4.0), (260, 5.0)):
        series.add(ts, value)
    series.close()
    # 10 → 40 (cap, not 100); None ends nothing it holds; 240 stops at the down event (250);
    # 260 is after the stop and holds to the end of the window (290 by its cap)
    assert segments == [
        (0, 10, 1.0),
        (10, 40, 2.0),
        (110, 140, 3.0),
        (240, 250, 4.0),
        (260, 290, 5.0),
    ]
    on = OnTime((5, 1000))
    on(0, 10, 1.0)
    on(20, 30, 0.0)
    assert (on.on_ns, on.known_ns) == (5, 15)


def test_health_up_down_and_unknown() -> None:
    window = (100, 1000)
    # seen before the window (carries in 100-130), silent 130-300 (unknown), seen 300-400,
    # down at 400 until seen again at 700, up to 760 (cap), unknown after
    figures = health([70, 300, 330, 360, 700], [400], cap_ns=60, window=window)
    assert (figures.up_ns, figures.down_ns, figures.unknown_ns) == (30 + 100 + 60, 300, 410)
    # a down event before the window, never seen again: down all the way
    assert health([], [50], cap_ns=60, window=window).down_ns == 900
    # no evidence at all: everything unknown
    assert health([], [], cap_ns=60, window=window).unknown_ns == 900


def test_lesson_stats_over_several_lessons() -> None:
    stats = LessonStats([(0, 10), (20, 30)], limit=1000.0)
    stats(5, 25, 900.0)  # 5 in the first lesson, 5 in the second
    stats(25, 40, 1100.0)  # 5 in the second
    assert (stats.covered_ns, stats.under_ns, stats.mean) == (15, 10, (900 * 10 + 1100 * 5) / 15)
    assert (stats.low, stats.high) == (900.0, 1100.0)


# -- the figures of the school ------------------------------------------------------------------


def test_rooms_from_the_registry_then_unassigned(report: UsageReport) -> None:
    assert [r.room for r in report.rooms] == ["a101", "a102", "a103", "unassigned"]
    assert room(report, "a101").name == "Salle 101"
    devices = {r.room: sorted(d.device for d in r.devices) for r in report.rooms}
    assert devices == {
        "a101": ["a101-board", "a101-env", "a101-proj", "ghost-cam"],
        "a102": ["a102-cam", "a102-meter", "a102-screen"],
        "a103": [],
        "unassigned": ["spare-env"],
    }


def test_comfort_of_the_co2_sensor(report: UsageReport) -> None:
    comfort = room(report, "a101").comfort
    # Lesson 08:00-17:00 on 5 Oct: 600 for 120 min, 1200 for 110, 1000 for 10 (not under),
    # 800 from 12:00 to 13:20 (the 12:50 reading's 30 min) = 80, gap to 14:00, 800 for 180.
    assert comfort.co2_sensors == 1
    co2 = comfort.stats("co2")
    assert (co2.covered_ns, co2.under_ns) == (500 * MIN, 380 * MIN)
    assert comfort.co2_under_share == pytest.approx(380 / 500)
    # of the lessons since it came into service: 5-30 October, 20 days
    assert comfort.co2_coverage == pytest.approx(500 / (20 * 9 * 60))
    assert co2.mean == pytest.approx((120 * 600 + 110 * 1200 + 10 * 1000 + 260 * 800) / 500)
    assert (co2.low, co2.high) == (600.0, 1200.0)
    temperature = comfort.stats("temperature")
    assert temperature.mean == pytest.approx((240 * 20 + 260 * 23) / 500)
    humidity = comfort.stats("humidity")  # the text value's 10 min count nowhere
    assert humidity.covered_ns == 490 * MIN
    assert humidity.mean == pytest.approx((230 * 40 + 260 * 50) / 490)


def test_rooms_without_co2_data_say_so(report: UsageReport) -> None:
    a102, a103, spare = room(report, "a102"), room(report, "a103"), room(report, "unassigned")
    for empty in (a102.comfort, a103.comfort):  # no sensor at all (a meter is not one)
        assert (empty.co2_sensors, empty.co2_coverage, empty.co2_under_share) == (0, None, None)
        assert empty.stats("co2").mean is None
    # a sensor that reported only at night: it exists, covers 0 % of lessons, no share
    assert (spare.comfort.co2_sensors, spare.comfort.co2_coverage) == (1, 0.0)
    assert spare.comfort.co2_under_share is None
    assert a103.displays.on_hours is None and a103.boards.up_share is None
    assert a103.sensors.up_share is None and a103.cameras.up_share is None


def test_display_on_hours(report: UsageReport) -> None:
    a101, a102 = room(report, "a101").displays, room(report, "a102").displays
    # warming 08:00 to cooling 12:00 = 240 min; on 14:00-14:55 holds to 15:10 (15 min cap) = 70;
    # on 15:30-15:55 to 16:00 = 30
    assert a101.on_ns == 340 * MIN
    assert a101.on_hours == pytest.approx(340 / 60)
    # known 07:00-15:10 and 15:30-18:10 over its service from 07:00 on 5 Oct (642 h)
    assert a101.known_share == pytest.approx(650 / (642 * 60))
    # boolean true 08:00-12:00, then false
    assert a102.on_hours == pytest.approx(4.0)
    assert a102.known_share == pytest.approx(280 / (617 * 60))


def test_board_uptime_from_events_and_readings(report: UsageReport) -> None:
    boards = room(report, "a101").boards
    # whole month in service (known since September); the 23:55 reading carries in to 00:10;
    # down 6 h on the 12th (events); 20 Oct silent from 00:20 (last reading's cap) to 24:00
    assert boards.devices == 1
    assert (boards.down_ns, boards.window_ns) == (360 * MIN, MONTH_MIN * MIN)
    assert boards.up_ns == (MONTH_MIN - 360 - 1420) * MIN
    assert boards.unknown_share == pytest.approx(1420 / MONTH_MIN)


def test_sensor_availability_counts_from_first_sight(report: UsageReport) -> None:
    # a101-env in service from 5 Oct 08:00 (641 h); readings hold 08:00-13:20 and 14:00-17:20
    assert room(report, "a101").sensors.up_share == pytest.approx(520 / (641 * 60))
    # the meter: all month but 10 Oct from 00:20
    assert room(report, "a102").sensors.up_share == pytest.approx((MONTH_MIN - 1420) / MONTH_MIN)
    # spare-env from 15 Oct 00:00 (409 h), 00:00-02:20
    assert room(report, "unassigned").sensors.up_share == pytest.approx(140 / (409 * 60))


def test_cameras_healthy_and_an_unregistered_device(report: UsageReport) -> None:
    a102 = room(report, "a102").cameras
    # up to the down event on 28 Oct 08:00 CET, down the last 88 h
    assert (a102.up_ns, a102.down_ns) == ((MONTH_MIN - 88 * 60) * MIN, 88 * 60 * MIN)
    ghost = next(d for d in room(report, "a101").devices if d.device == "ghost-cam")
    assert (ghost.registered, ghost.kind, ghost.interval_s) == (False, "camera", 600)
    assert room(report, "a101").cameras.up_share == pytest.approx(1460 / MONTH_MIN)


def test_totals_add_every_room(report: UsageReport) -> None:
    totals = report.totals
    assert totals.displays.on_hours == pytest.approx((340 + 240) / 60)
    assert totals.sensors.up_share == pytest.approx(
        (520 + MONTH_MIN - 1420 + 140) / (641 * 60 + MONTH_MIN + 409 * 60)
    )
    assert totals.cameras.up_share == pytest.approx((MONTH_MIN - 88 * 60 + 1460) / (2 * MONTH_MIN))
    assert totals.comfort.co2_sensors == 2
    assert totals.comfort.co2_under_share == pytest.approx(0.76)
    # spare-env's lessons from 15 October: 12 days
    assert totals.comfort.co2_coverage == pytest.approx(500 / ((20 + 12) * 9 * 60))


def test_a_month_without_data_is_no_data_not_zero(school: Path) -> None:
    september = compute(school, "2026-09")
    a101 = room(september, "a101")
    assert a101.comfort.co2_under_share is None
    assert a101.displays.on_hours is None
    # the board was already known (September events and a reading), so it has a window
    assert a101.boards.devices == 1
    assert room(september, "a102").sensors.devices == 0


# -- the command and its formats ---------------------------------------------------------------


def run(school: Path, *args: str) -> Result:
    runner = CliRunner(env={"CAMPUS_FLEET_SITE": None, "TZ": "UTC"})
    return runner.invoke(
        main,
        ["--db", str(school), "report", "usage", "--site", SITE, "--month", "2026-10", *args],
        catch_exceptions=False,
    )


def ok(school: Path, *args: str) -> str:
    result = run(school, *args)
    assert result.exit_code == 0, result.output
    return result.stdout


def test_json_for_scripts(school: Path) -> None:
    data = json.loads(ok(school, "--format", "json"))
    assert (data["site"], data["month"], data["timezone"]) == (SITE, "2026-10", "Europe/Paris")
    assert data["timezone_source"] == "site settings"
    assert data["period"] == {
        "start": "2026-09-30T22:00:00.000Z",
        "end": "2026-10-31T23:00:00.000Z",
        "start_local": "2026-10-01 00:00 CEST",
        "end_local": "2026-11-01 00:00 CET",
        "complete": True,
        "hours": 745.0,
    }
    assert data["rules"]["lesson_hours"] == 198.0
    rooms = {r["room"]: r for r in data["rooms"]}
    a101 = rooms["a101"]
    assert a101["comfort"]["co2_under_limit_share"] == 0.76
    assert a101["comfort"]["co2_ppm"] == {"mean": 844.0, "min": 600.0, "max": 1200.0}
    assert a101["displays"] == {
        "count": 1,
        "on_hours": round(340 / 60, 4),
        "power_known_share": round(650 / (642 * 60), 6),
    }
    assert a101["boards"]["down_share"] == round(360 / MONTH_MIN, 6)
    assert rooms["a102"]["comfort"]["co2_under_limit_share"] is None
    proj = next(d for d in a101["devices"] if d["device"] == "a101-proj")
    assert (proj["power_point"], proj["in_service_from"]) == ("power", "2026-10-05T05:00:00.000Z")
    assert data["totals"]["displays"]["on_hours"] == round(580 / 60, 4)
    assert json.loads(ok(school, "--json"))["rooms"] == data["rooms"]


def test_csv_one_row_per_room(school: Path, report: UsageReport) -> None:
    rows = list(csv.DictReader(io.StringIO(ok(school, "--format", "csv"))))
    assert [r["room"] for r in rows] == ["a101", "a102", "a103", "unassigned"]
    assert tuple(rows[0]) == CSV_COLUMNS
    a101, a102, a103 = rows[0], rows[1], rows[2]
    assert float(a101["co2_under_limit_share"]) == 0.76
    assert float(a101["co2_mean_ppm"]) == 844.0
    assert float(a101["display_on_hours"]) == pytest.approx(340 / 60, abs=1e-6)
    assert float(a102["camera_healthy_share"]) == pytest.approx(1 - 88 * 60 / MONTH_MIN, abs=1e-6)
    assert (a102["co2_under_limit_share"], a102["co2_sensors"]) == ("", "0")
    counts = {"displays", "boards", "sensors", "cameras", "co2_sensors", "lesson_hours"}
    figures = CSV_COLUMNS[CSV_COLUMNS.index("lesson_hours") :]
    assert [a103[c] for c in figures if c not in counts] == [""] * (len(figures) - len(counts))
    assert [a103[c] for c in sorted(counts - {"lesson_hours"})] == ["0"] * 5
    assert to_csv(report) == ok(school, "--format", "csv")


def test_table_for_people(school: Path) -> None:
    text = ok(school)
    for expected in ("Salle 101", "Labo", "unassigned", "76.0 %", "no data", "all rooms"):
        assert expected in text
    assert "198 h" in text and "Europe/Paris" in text


def test_png_charts(school: Path, tmp_path: Path) -> None:
    out = tmp_path / "october.png"
    assert ok(school, "--format", "png", "--out", str(out)).strip() == str(out)
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])  # IHDR
    assert width == 1400 and 500 < height < 1500
    assert 30_000 < len(data) < 2_000_000


def test_html_is_one_self_contained_page(school: Path, tmp_path: Path) -> None:
    out = tmp_path / "october.html"
    ok(school, "--format", "html", "--out", str(out))
    page = out.read_text()
    for name in ("Salle 101", "Salle 102", "Labo", "unassigned", "no data", "Lycée Test"):
        assert name in page
    assert page.count('src="data:image/png;base64,iVBORw0KGgo') == 4
    assert "ghost-cam (not registered)" in page  # the devices table
    assert "http://" not in page and "https://" not in page
    assert 'src="' not in page.replace('src="data:', "")


def test_out_writes_text_formats_too(school: Path, tmp_path: Path) -> None:
    out = tmp_path / "october.json"
    ok(school, "--format", "json", "--out", str(out))
    assert json.loads(out.read_text())["month"] == "2026-10"
    table = tmp_path / "october.txt"
    ok(school, "--out", str(table))
    assert "Salle 101" in table.read_text()


def test_timezone_option_moves_lessons(school: Path) -> None:
    # in UTC the lessons are 10:00-19:00 Paris time in October: other CO2 values, other share
    data = json.loads(ok(school, "--format", "json", "--timezone", "UTC"))
    assert (data["timezone"], data["timezone_source"]) == ("UTC", "option")
    assert data["period"]["hours"] == 744.0
    # 5 Oct 08:00-17:00 UTC = 10:00-19:00 Paris: 1200 for 110, 1000 for 10, 800 for 80 + 200
    share = data["rooms"][0]["comfort"]["co2_under_limit_share"]
    assert share == round(280 / 400, 6)


@pytest.mark.parametrize(
    ("lessons", "covered_min", "under_min"),
    [
        # lunch break: 08:00-12:00 covered 240 (120 under); 13:30-14:00 is a gap; 14:00-17:00
        ("08:00-12:00,13:30-17:00", 240 + 180, 120 + 180),
        # the 12:50 reading, read before the lesson, holds into it until 13:20
        ("13:00-17:00", 20 + 180, 20 + 180),
    ],
)
def test_lesson_ranges_choose_the_time_that_counts(
    school: Path, lessons: str, covered_min: int, under_min: int
) -> None:
    data = json.loads(ok(school, "--format", "json", "--lessons", lessons))
    comfort = data["rooms"][0]["comfort"]
    assert comfort["co2_under_limit_share"] == round(under_min / covered_min, 6)
    assert data["rules"]["lessons"] == lessons


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (("--month", "2026-13"), 2, "YYYY-MM"),
        (("--lessons", "17:00-08:00"), 2, "ends before it starts"),
        (("--days", "weekdays"), 2, "not a day"),
        (("--timezone", "Mars/Olympus"), 2, "unknown time zone"),
        (("--month", "2099-01"), 2, "has not begun"),
        (("--format", "png"), 2, "--out"),
        (("--format", "pdf"), 2, "pdf"),
        (("--json", "--format", "csv"), 2, "contradict"),
        (("--site", "nowhere"), 3, "no site 'nowhere'"),
    ],
)
def test_bad_arguments(school: Path, args: tuple[str, ...], code: int, message: str) -> None:
    result = run(school, *args)
    assert result.exit_code == code, result.output
    assert message in result.stderr


def test_the_only_site_is_the_default(school: Path) -> None:
    result = CliRunner(env={"CAMPUS_FLEET_SITE": None}).invoke(
        main, ["--db", str(school), "report", "usage", "--month", "2026-10", "--json"]
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["site"] == SITE


def test_without_a_site_zone_the_fleet_hosts_zone_is_used(tmp_path: Path) -> None:
    store = Store(tmp_path / "fleet.db")
    Registry(store).add_site("ecole")
    store.close()
    result = CliRunner(env={"TZ": "Asia/Shanghai", "CAMPUS_FLEET_SITE": None}).invoke(
        main,
        ["--db", str(tmp_path / "fleet.db"), "report", "usage", "--month", "2026-10", "--json"],
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert (data["timezone"], data["timezone_source"]) == ("Asia/Shanghai", "fleet host")
    assert (data["rooms"], data["totals"]["comfort"]["co2_under_limit_share"]) == ([], None)


def test_no_database_is_a_runtime_failure(tmp_path: Path) -> None:
    result = run(tmp_path / "missing.db")
    assert result.exit_code == 1
    assert "no fleet database" in result.stderr


def test_unknown_site_from_the_api(school: Path) -> None:
    store = Store(school, read_only=True)
    period = month_period("2026-10", PARIS, LESSONS, SCHOOL_DAYS, NOW)
    with pytest.raises(NotFound):
        usage_report(Registry(store), "nowhere", period, zone_source="option", now_ns=NOW)
    store.close()
