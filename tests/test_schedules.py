"""Schedules: the next-fire computation on fixed zones and dates (weekends, holidays, DST days), the
firing rules against a hand-moved clock (once per date, clock sync, grace, jumps), and one real
firing in a running agent that switches a simulated relay."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from agent.buffer import Buffer
from agent.commands import CommandExecutor
from agent.config import DeviceConfig
from agent.coordinator import Coordinator
from agent.events import EventQueue
from agent.runtime import Agent
from agent.schedules import GRACE, Scheduler, fire_time, next_fire, runs_on, targets
from tests.test_agent_commands import coil
from tests.test_agent_control import (
    PROFILES,
    RELAY,
    THC,
    Fleet,
    Gateway,
    Sims,
    device,
    eventually,
    running,
)
from wire.gateway_config import Schedule
from wire.models import EventKind

pytest_plugins = ["tests.test_agent_control"]

PARIS = ZoneInfo("Europe/Paris")
SHANGHAI = ZoneInfo("Asia/Shanghai")
SCHOOL_DAYS: Any = ["mon", "tue", "wed", "thu", "fri"]


def schedule(at: str = "22:00", **fields: Any) -> Schedule:
    return Schedule.model_validate(
        {"id": "displays-off", "at": at, "kinds": ["display"], "action": "power_off", **fields}
    )


def local(
    zone: ZoneInfo, year: int, month: int, day: int, hour: int, minute: int, second: int = 0
) -> datetime:
    return datetime(year, month, day, hour, minute, second, tzinfo=zone)


# -- next fire: pure ------------------------------------------------------------------------------


def test_school_days_skip_the_weekend() -> None:
    evening = schedule(days=SCHOOL_DAYS)
    friday = local(PARIS, 2024, 3, 8, 21, 59)
    assert next_fire(evening, friday, PARIS) == local(PARIS, 2024, 3, 8, 22, 0)
    at_the_time = local(PARIS, 2024, 3, 8, 22, 0)
    assert next_fire(evening, at_the_time, PARIS) == local(PARIS, 2024, 3, 11, 22, 0)
    assert next_fire(evening, at_the_time, PARIS).tzinfo is UTC
    saturday = local(PARIS, 2024, 3, 9, 9, 0)
    assert next_fire(evening, saturday, PARIS) == local(PARIS, 2024, 3, 11, 22, 0)
    assert [runs_on(evening, date(2024, 3, d)) for d in range(8, 12)] == [
        True,
        False,
        False,
        True,
    ]


def test_holidays_are_skipped() -> None:
    evening = schedule(days=SCHOOL_DAYS, except_dates=["2024-03-11", "2024-03-12"])
    friday_night = local(PARIS, 2024, 3, 8, 23, 0)
    assert next_fire(evening, friday_night, PARIS) == local(PARIS, 2024, 3, 13, 22, 0)
    assert not runs_on(evening, date(2024, 3, 11))
    winter_break = schedule(days=["mon"], except_dates=[f"2024-02-{d:02}" for d in (5, 12, 19)])
    assert next_fire(winter_break, local(PARIS, 2024, 2, 1, 0, 0), PARIS) == local(
        PARIS, 2024, 2, 26, 22, 0
    )


def test_local_time_is_kept_across_the_dst_change() -> None:
    morning = schedule("08:00")
    # Europe/Paris moved from +01:00 to +02:00 on Sunday 31 March 2024 at 02:00.
    saturday = next_fire(morning, local(PARIS, 2024, 3, 30, 7, 0), PARIS)
    sunday = next_fire(morning, saturday, PARIS)
    assert saturday == datetime(2024, 3, 30, 7, 0, tzinfo=UTC)
    assert sunday == datetime(2024, 3, 31, 6, 0, tzinfo=UTC)
    assert sunday - saturday == timedelta(hours=23)
    # Back to +01:00 on Sunday 27 October 2024 at 03:00: that day lasts 25 hours.
    saturday = next_fire(morning, datetime(2024, 10, 25, 12, 0, tzinfo=UTC), PARIS)
    sunday = next_fire(morning, saturday, PARIS)
    assert (saturday, sunday) == (
        datetime(2024, 10, 26, 6, 0, tzinfo=UTC),
        datetime(2024, 10, 27, 7, 0, tzinfo=UTC),
    )
    assert sunday - saturday == timedelta(hours=25)
    # No DST in Shanghai: 08:00 is always 00:00 UTC.
    assert next_fire(morning, datetime(2024, 3, 30, 12, 0, tzinfo=UTC), SHANGHAI) == datetime(
        2024, 3, 31, 0, 0, tzinfo=UTC
    )


def test_times_missing_or_doubled_by_dst_fire_once() -> None:
    night = schedule("02:30")
    # 02:30 does not exist on 31 March 2024 in Paris: it fires right after the gap (03:30 CEST).
    spring = next_fire(night, local(PARIS, 2024, 3, 30, 12, 0), PARIS)
    assert spring == datetime(2024, 3, 31, 1, 30, tzinfo=UTC)
    assert spring.astimezone(PARIS).strftime("%H:%M %Z") == "03:30 CEST"
    # 02:30 happens twice on 27 October 2024: it fires at the first one only.
    autumn = next_fire(night, local(PARIS, 2024, 10, 26, 12, 0), PARIS)
    assert autumn == datetime(2024, 10, 27, 0, 30, tzinfo=UTC)
    after = next_fire(night, autumn, PARIS)
    assert after == datetime(2024, 10, 28, 1, 30, tzinfo=UTC), "not again at the second 02:30"
    assert fire_time(night, date(2024, 10, 27), PARIS) == autumn


def test_targets_are_named_devices_and_devices_of_the_kinds() -> None:
    connection = {"type": "modbus-tcp", "host": "192.0.2.1"}
    devices = [
        DeviceConfig.model_validate({"id": i, "profile": p, "connection": connection, **extra})
        for i, p, extra in [
            ("room-1-env", THC, {}),
            ("relays-1", RELAY, {}),
            ("relays-2", RELAY, {"kind": "display"}),  # its own kind, not the profile's
        ]
    ]
    boards = schedule(kinds=["board"], devices=["room-1-env"])
    assert targets(boards, devices, PROFILES) == ["room-1-env", "relays-1"]
    assert targets(schedule(kinds=["display"]), devices, PROFILES) == ["relays-2"]
    both = schedule(kinds=["display", "board"], devices=["relays-2"])
    assert targets(both, devices, PROFILES) == ["relays-2", "relays-1"]


# -- the firing rules: a clock moved by hand -------------------------------------------------------


class HandClock:
    def __init__(self, at: datetime, synced: bool = True) -> None:
        self.at = at
        self.is_synced = synced

    def wall_ns(self) -> int:
        return int(self.at.timestamp() * 1e9)

    def mono_ns(self) -> int:
        return time.monotonic_ns()

    def synced(self) -> bool:
        return self.is_synced


@pytest.fixture
def buffer(tmp_path: Path) -> Iterator[Buffer]:
    opened = Buffer(tmp_path / "buffer.db")
    opened.open()
    yield opened
    opened.close()


def scheduler(
    buffer: Buffer, clock: HandClock, *schedules: Schedule, memory: Path | None = None
) -> Scheduler:
    events = EventQueue(buffer, clock.wall_ns)
    coordinator = Coordinator(buffer, events, clock)
    executor = CommandExecutor(coordinator, clock, events, timeout_s=5)
    made = Scheduler(
        executor, lambda: coordinator.devices, PROFILES, clock, events, memory_path=memory
    )
    made.replace(list(schedules), "Europe/Paris")
    return made


def fired(made: Scheduler, at: datetime, synced: bool = True) -> list[date]:
    return [due.day for due in made.due(at.astimezone(UTC), synced)]


def skip_events(buffer: Buffer) -> list[dict[str, Any]]:
    buffer.commit()
    found = []
    while (event := buffer.take_event()) is not None:
        event_id, payload = event
        buffer.delete_event(event_id)
        data = json.loads(payload)
        if data["kind"] == EventKind.SCHEDULE.value:
            found.append(data)
    return found


def test_a_schedule_fires_once_per_date(buffer: Buffer) -> None:
    clock = HandClock(local(PARIS, 2024, 3, 5, 21, 55))
    made = scheduler(buffer, clock, schedule())
    assert fired(made, local(PARIS, 2024, 3, 5, 21, 59, 59)) == []
    assert fired(made, local(PARIS, 2024, 3, 5, 22, 0, 0)) == [date(2024, 3, 5)]
    assert fired(made, local(PARIS, 2024, 3, 5, 22, 0, 1)) == []
    assert fired(made, local(PARIS, 2024, 3, 5, 22, 5)) == []
    # An NTP step back over the time: not a second time that date.
    assert fired(made, local(PARIS, 2024, 3, 5, 21, 58)) == []
    assert fired(made, local(PARIS, 2024, 3, 5, 22, 0, 30)) == []
    assert made.last_fired("displays-off") == date(2024, 3, 5)
    assert fired(made, local(PARIS, 2024, 3, 6, 22, 0, 2)) == [date(2024, 3, 6)]
    assert skip_events(buffer) == []


def test_a_late_clock_sync_fires_within_the_grace_only(buffer: Buffer) -> None:
    clock = HandClock(local(PARIS, 2024, 3, 5, 21, 0), synced=False)
    made = scheduler(buffer, clock, schedule())
    assert fired(made, local(PARIS, 2024, 3, 5, 22, 0), synced=False) == []
    assert fired(made, local(PARIS, 2024, 3, 5, 22, 9), synced=False) == []
    assert fired(made, local(PARIS, 2024, 3, 5, 22, 9, 30)) == [date(2024, 3, 5)]

    assert fired(made, local(PARIS, 2024, 3, 6, 22, 0), synced=False) == []
    assert fired(made, local(PARIS, 2024, 3, 6, 22, 10, 1), synced=False) == []
    assert fired(made, local(PARIS, 2024, 3, 6, 22, 11)) == [], "too late once synced"
    (skipped,) = skip_events(buffer)
    assert skipped["data"]["skipped"] is True
    assert skipped["data"]["date"] == "2024-03-06"
    assert "the clock was not synced in time" in skipped["message"]


def test_a_clock_jump_over_the_time_skips_it(buffer: Buffer) -> None:
    clock = HandClock(local(PARIS, 2024, 3, 5, 21, 0))
    made = scheduler(buffer, clock, schedule())
    assert fired(made, local(PARIS, 2024, 3, 5, 21, 59)) == []
    assert fired(made, local(PARIS, 2024, 3, 5, 22, 30)) == []
    (skipped,) = skip_events(buffer)
    assert "30 min late, the clock jumped forward" in skipped["message"]
    # A jump shorter than the grace period only makes it late.
    assert fired(made, local(PARIS, 2024, 3, 6, 21, 59)) == []
    assert fired(made, local(PARIS, 2024, 3, 6, 22, 4)) == [date(2024, 3, 6)]
    assert timedelta(minutes=10) == GRACE


def test_starting_after_the_time(buffer: Buffer) -> None:
    late = scheduler(buffer, HandClock(local(PARIS, 2024, 3, 5, 23, 0)), schedule())
    assert fired(late, local(PARIS, 2024, 3, 5, 23, 0, 1)) == [], "an hour ago: over"
    assert skip_events(buffer) == [], "nothing was missed while the agent ran"
    soon = scheduler(buffer, HandClock(local(PARIS, 2024, 3, 5, 22, 5)), schedule())
    assert fired(soon, local(PARIS, 2024, 3, 5, 22, 5, 1)) == [date(2024, 3, 5)]


def test_a_new_config_keeps_what_already_fired(buffer: Buffer) -> None:
    clock = HandClock(local(PARIS, 2024, 3, 5, 21, 0))
    made = scheduler(buffer, clock, schedule())
    assert fired(made, local(PARIS, 2024, 3, 5, 22, 0)) == [date(2024, 3, 5)]
    clock.at = local(PARIS, 2024, 3, 5, 22, 1)
    made.replace([schedule()], "Europe/Paris")
    assert fired(made, local(PARIS, 2024, 3, 5, 22, 2)) == [], "unchanged: not again"
    made.replace([schedule("22:05")], "Europe/Paris")
    assert fired(made, local(PARIS, 2024, 3, 5, 22, 5)) == [date(2024, 3, 5)], "a new time"


def test_a_restarted_agent_does_not_fire_again(buffer: Buffer, tmp_path: Path) -> None:
    memory = tmp_path / "config.applied.json.schedules"
    first = scheduler(buffer, HandClock(local(PARIS, 2024, 3, 5, 21, 0)), schedule(), memory=memory)
    assert fired(first, local(PARIS, 2024, 3, 5, 22, 0)) == [date(2024, 3, 5)]
    # Restarted at 22:03, within the grace period: the memory says it already ran today.
    again = scheduler(buffer, HandClock(local(PARIS, 2024, 3, 5, 22, 3)), schedule(), memory=memory)
    assert fired(again, local(PARIS, 2024, 3, 5, 22, 3, 1)) == []
    assert fired(again, local(PARIS, 2024, 3, 6, 22, 0)) == [date(2024, 3, 6)]
    # A changed schedule is a new one: its memory does not apply.
    changed = scheduler(
        buffer, HandClock(local(PARIS, 2024, 3, 6, 22, 3)), schedule("22:02"), memory=memory
    )
    assert fired(changed, local(PARIS, 2024, 3, 6, 22, 3, 1)) == [date(2024, 3, 6)]
    # A damaged memory file is ignored, not fatal.
    memory.write_text("{not json")
    damaged = scheduler(
        buffer, HandClock(local(PARIS, 2024, 3, 7, 21, 0)), schedule(), memory=memory
    )
    assert fired(damaged, local(PARIS, 2024, 3, 7, 22, 0)) == [date(2024, 3, 7)]


# -- one real firing -------------------------------------------------------------------------------


async def test_a_schedule_switches_a_relay_once_the_clock_is_synced(
    gateway: Gateway, fleet: Fleet, sims: Sims, tmp_path: Path
) -> None:
    sim = await sims.start(RELAY)
    # The agent's clock: 09:59:57 in Paris today, not synced yet.
    today = datetime.now(PARIS).date()
    start = datetime(today.year, today.month, today.day, 9, 59, 57, tzinfo=PARIS)
    clock_file = tmp_path / "clock.json"
    offset_s = start.timestamp() - time.time()

    def set_clock(synced: bool) -> None:
        clock_file.write_text(json.dumps({"offset_s": offset_s, "synced": synced}))

    set_clock(False)
    lights_on = {
        "id": "lights-on",
        "at": "10:00",
        "kinds": ["board"],
        "action": "set_relay_2",
        "argument": True,
    }
    config = gateway.config(
        [device("relays", RELAY, sim, interval_s=0.5)],
        clock={"sync_check": "file", "file": str(clock_file)},
        schedules=[lights_on],
        timezone="Europe/Paris",
    )
    agent = Agent(config, PROFILES)
    async with running(agent):
        await eventually(
            lambda: agent.clock.wall_ns() / 1e9 > start.timestamp() + 5, 10, "10:00:02 passed"
        )
        assert not agent.scheduler.history
        assert await coil(sim, 1) is False, "not while the clock is not synced"
        assert fleet.events(EventKind.SCHEDULE) == []

        set_clock(True)
        (event,) = await eventually(
            lambda: fleet.events(EventKind.SCHEDULE), 10, "the schedule's event"
        )
        assert event.data["schedule"] == "lights-on"
        assert event.data["outcomes"] == {"relays": "ok"}
        assert event.data["date"] == today.isoformat()
        assert await coil(sim, 1) is True
        assert agent.scheduler.last_fired("lights-on") == today
        (run,) = agent.scheduler.history
        assert [(o.device, o.outcome.value) for o in run.outcomes] == [("relays", "ok")]
