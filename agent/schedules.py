"""Schedules: a command at a local time of day, run by the gateway whether or not the fleet is
reachable.

Rules: a schedule fires at most once per local date (its config's time zone, or the system's;
zoneinfo makes it DST-correct: a time that does not exist on a spring-forward day fires right after
the gap, an ambiguous one on its first occurrence). Never while the wall clock is not synced: held
back, it fires once the clock is synced if that is within `GRACE` after its time. An occurrence more
than `GRACE` in the past that never fired (the clock jumped forward over it, or stayed unsynced) is
skipped with a log line and an event. Runs go through the command executor, so the per-bus locks
and command time limits apply.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta, tzinfo
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from agent.clock import Clock
from agent.commands import CommandExecutor, Outcome
from agent.config import DeviceConfig
from agent.events import EventQueue
from drivers.profiles import ProfileLibrary
from wire.gateway_config import WEEKDAYS, Schedule, device_kind
from wire.models import EventKind

log = logging.getLogger(__name__)

GRACE = timedelta(minutes=10)
TICK_S = 1.0
HISTORY = 100


# -- pure time computations ---------------------------------------------------------------------


def runs_on(schedule: Schedule, day: date) -> bool:
    return WEEKDAYS[day.weekday()] in schedule.days and day not in schedule.except_dates


def fire_time(schedule: Schedule, day: date, zone: tzinfo) -> datetime:
    """The instant (UTC) of `schedule` on local date `day`, whether or not it runs that day."""
    hour, minute = schedule.hour_minute
    return datetime.combine(day, time(hour, minute), tzinfo=zone).astimezone(UTC)


def next_fire(schedule: Schedule, after: datetime, zone: tzinfo) -> datetime:
    """The first instant (UTC) strictly after `after` (aware) at which `schedule` fires."""
    first = after.astimezone(zone).date() - timedelta(days=1)
    # Every week holds each weekday once, and each holiday can cost at most one week.
    for offset in range(7 * (len(schedule.except_dates) + 1) + 2):
        day = first + timedelta(days=offset)
        if runs_on(schedule, day) and (at := fire_time(schedule, day, zone)) > after:
            return at
    raise AssertionError("unreachable: a schedule runs on at least one weekday")


def zone_named(name: str | None) -> tzinfo:
    """The IANA zone `name`, or the system's when None."""
    return ZoneInfo(name) if name is not None else system_zone()


def system_zone() -> tzinfo:
    """The gateway's zone: $TZ, else /etc/localtime (by its link name, so DST rules come along),
    else UTC."""
    name = os.environ.get("TZ", "").lstrip(":")
    if name:
        try:
            return ZoneInfo(name)
        except (ZoneInfoNotFoundError, ValueError):
            log.warning("TZ=%r is not an IANA zone name: using /etc/localtime", name)
    localtime = Path("/etc/localtime")
    parts = localtime.resolve().parts
    if "zoneinfo" in parts:
        key = "/".join(parts[parts.index("zoneinfo") + 1 :])
        try:
            return ZoneInfo(key)
        except (ZoneInfoNotFoundError, ValueError):
            pass
    try:
        with localtime.open("rb") as data:
            return ZoneInfo.from_file(data, key="localtime")
    except (OSError, ValueError):
        return UTC


def targets(schedule: Schedule, devices: list[DeviceConfig], library: ProfileLibrary) -> list[str]:
    """Device ids a schedule acts on: those it names, then those of its kinds, once each."""
    chosen = list(dict.fromkeys(schedule.devices))
    for device in devices:
        if device.id not in chosen and device_kind(device, library) in schedule.kinds:
            chosen.append(device.id)
    return chosen


# -- the scheduler --------------------------------------------------------------------------------


class ScheduleMemory:
    """A small JSON file: per schedule id, the schedule's identity (its fields and zone) and
    the last local date it fired or was skipped. Written (atomically) only when it changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._saved: dict[str, dict[str, str]] | None = None

    @staticmethod
    def _identity(schedule: Schedule, timezone: str | None) -> str:
        return json.dumps([schedule.model_dump(mode="json"), timezone], sort_keys=True)

    def _load(self) -> dict[str, dict[str, str]]:
        if self._saved is None:
            try:
                data = json.loads(self.path.read_text())
                self._saved = data if isinstance(data, dict) else {}
            except (OSError, ValueError):
                self._saved = {}
        return self._saved

    def get(self, schedule: Schedule, timezone: str | None) -> date | None:
        entry = self._load().get(schedule.id)
        if not isinstance(entry, dict) or entry.get("identity") != self._identity(
            schedule, timezone
        ):
            return None  # a changed schedule starts afresh
        try:
            return date.fromisoformat(entry["last_handled"])
        except (KeyError, TypeError, ValueError):
            return None

    def save(self, states: dict[str, tuple[Schedule, date | None]], timezone: str | None) -> None:
        data = {
            schedule_id: {
                "identity": self._identity(schedule, timezone),
                "last_handled": handled.isoformat(),
            }
            for schedule_id, (schedule, handled) in states.items()
            if handled is not None
        }
        if data == self._load():
            return
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            tmp.write_text(json.dumps(data, sort_keys=True))
            tmp.replace(self.path)
        except OSError as exc:
            log.warning("schedule memory %s not saved: %s", self.path, exc)
            return
        self._saved = data


@dataclass
class _State:
    schedule: Schedule
    last_fired: date | None = None
    #: The latest local date whose occurrence was fired or skipped: nothing up to it fires.
    last_handled: date | None = None
    waiting_for_sync: date | None = None


@dataclass(frozen=True)
class Due:
    schedule: Schedule
    day: date
    at: datetime


@dataclass
class Run:
    schedule: str
    day: date
    at: datetime
    outcomes: list[Outcome] = field(default_factory=list)


class Scheduler:
    def __init__(
        self,
        executor: CommandExecutor,
        devices: Callable[[], list[DeviceConfig]],
        library: ProfileLibrary,
        clock: Clock,
        events: EventQueue,
        *,
        grace: timedelta = GRACE,
        tick_s: float = TICK_S,
        memory_path: Path | None = None,
    ) -> None:
        self.executor = executor
        #: Which local date each schedule last fired or skipped, kept across restarts so that
        #: an agent restarted at 22:03 does not run the 22:00 schedule again.
        self.memory = ScheduleMemory(memory_path) if memory_path is not None else None
        self.devices = devices
        self.library = library
        self.clock = clock
        self.events = events
        self.grace = grace
        self.tick_s = tick_s
        self.zone: tzinfo = UTC
        self._zone_name: str | None = None
        self._states: dict[str, _State] = {}
        self.history: deque[Run] = deque(maxlen=HISTORY)
        self._wake = asyncio.Event()

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.clock.wall_ns() / 1e9, UTC)

    def replace(self, schedules: list[Schedule], timezone: str | None) -> None:
        """Takes a new set of schedules. An unchanged schedule keeps its memory (it does not
        fire again today); a new or changed one fires from now on, including an occurrence less
        than the grace period ago."""
        zone = zone_named(timezone)
        same_zone = timezone == self._zone_name
        now = self.now()
        states: dict[str, _State] = {}
        for schedule in schedules:
            old = self._states.get(schedule.id)
            if same_zone and old is not None and old.schedule == schedule:
                states[schedule.id] = old
                continue
            state = _State(schedule)
            for day in _recent_days(now, zone):  # already over before we knew the schedule
                if fire_time(schedule, day, zone) + self.grace < now:
                    state.last_handled = day
            remembered = self.memory.get(schedule, timezone) if self.memory else None
            if remembered is not None and (
                state.last_handled is None or remembered > state.last_handled
            ):
                state.last_handled = remembered
            states[schedule.id] = state
        self.zone, self._zone_name, self._states = zone, timezone, states
        for schedule in schedules:
            log.info(
                "schedule %s: %s on %s next at %s",
                schedule.id,
                schedule.action,
                ",".join(schedule.days),
                next_fire(schedule, now, zone).astimezone(zone).isoformat(timespec="minutes"),
            )
        self._wake.set()

    @property
    def schedules(self) -> list[Schedule]:
        return [state.schedule for state in self._states.values()]

    def last_fired(self, schedule_id: str) -> date | None:
        state = self._states.get(schedule_id)
        return state.last_fired if state is not None else None

    def due(self, now: datetime, synced: bool) -> list[Due]:
        """Occurrences to fire at `now`, each marked as fired; skips and waits are logged."""
        fire: list[Due] = []
        for state in self._states.values():
            schedule = state.schedule
            for day in _recent_days(now, self.zone):
                if state.last_handled is not None and day <= state.last_handled:
                    continue
                if not runs_on(schedule, day):
                    continue
                at = fire_time(schedule, day, self.zone)
                if at > now:
                    continue
                late = now - at
                if late > self.grace:
                    state.last_handled = day
                    self._skipped(schedule, day, late, synced)
                    continue
                if not synced:
                    if state.waiting_for_sync != day:
                        state.waiting_for_sync = day
                        log.warning(
                            "schedule %s (%s %s): clock not synced, waiting up to %d min for it",
                            schedule.id,
                            day,
                            schedule.at,
                            self.grace.total_seconds() // 60,
                        )
                    continue
                state.last_handled = state.last_fired = day
                fire.append(Due(schedule, day, at))
        self._remember()
        return fire

    def _remember(self) -> None:
        if self.memory is not None:
            self.memory.save(
                {s.schedule.id: (s.schedule, s.last_handled) for s in self._states.values()},
                self._zone_name,
            )

    def _skipped(self, schedule: Schedule, day: date, late: timedelta, synced: bool) -> None:
        why = (
            "the clock was not synced in time"
            if not synced
            else "the clock jumped forward over it (or the agent was not running)"
        )
        message = (
            f"schedule {schedule.id} of {day} at {schedule.at} skipped: "
            f"{late.total_seconds() / 60:.0f} min late, {why}"
        )
        log.warning("%s", message)
        self.events.raise_event(
            EventKind.SCHEDULE,
            message,
            schedule=schedule.id,
            date=day.isoformat(),
            at=schedule.at,
            action=schedule.action,
            skipped=True,
        )

    async def run(self) -> None:
        async with asyncio.TaskGroup() as group:
            while True:
                for occurrence in self.due(self.now(), self.clock.synced()):
                    group.create_task(
                        self.fire(occurrence), name=f"schedule:{occurrence.schedule.id}"
                    )
                self._wake.clear()
                try:
                    async with asyncio.timeout(self.tick_s):
                        await self._wake.wait()
                except TimeoutError:
                    pass

    async def fire(self, occurrence: Due) -> Run:
        schedule = occurrence.schedule
        devices = targets(schedule, self.devices(), self.library)
        deadline_ns = self.clock.wall_ns() + int(self.grace.total_seconds() * 1e9)
        outcomes = await asyncio.gather(
            *(
                self.executor.run(
                    device, schedule.action, schedule.argument, deadline_ns, schedule.options
                )
                for device in devices
            )
        )
        run = Run(schedule.id, occurrence.day, occurrence.at, list(outcomes))
        self.history.append(run)
        failed = [o for o in outcomes if not o.ok]
        message = (
            f"schedule {schedule.id}: {schedule.action} on {len(devices)} devices, "
            f"{len(devices) - len(failed)} ok"
        )
        if failed:
            message += ", failed: " + ", ".join(f"{o.device} ({o.outcome.value})" for o in failed)
            log.warning("%s", message)
        else:
            log.info("%s", message)
        self.events.raise_event(
            EventKind.SCHEDULE,
            message[:2000],
            schedule=schedule.id,
            date=occurrence.day.isoformat(),
            at=schedule.at,
            action=schedule.action,
            outcomes={o.device: o.outcome.value for o in outcomes},
            errors={o.device: o.error for o in outcomes if o.error},
        )
        return run


def _recent_days(now: datetime, zone: tzinfo) -> tuple[date, date]:
    today = now.astimezone(zone).date()
    return today - timedelta(days=1), today
