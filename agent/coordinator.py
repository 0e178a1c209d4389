"""Owns every poll schedule: one loop per device, serialised per bus, with availability tracking.

Rules: a poll never overlaps the previous one of the same device; devices on one bus take turns
(one request at a time on an RS-485 line or a Modbus TCP gateway; commands share the same lock); a
failing device is polled with capped exponential back-off and reported once when it goes down and
once when it comes back, never on every failed poll. The set of devices changes at run time in a
`Transition`: new and changed devices start polling before the loops they replace stop, and a
transition that is rolled back leaves the previous loops untouched.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from typing import Any

from agent.buffer import Buffer, Priority, Stamp
from agent.clock import Clock
from agent.config import DeviceConfig
from agent.events import EventQueue
from drivers.base import Driver
from drivers.errors import DriverError
from drivers.profile_base import Alarm, ProfileBase
from wire.models import EventKind, Quality

log = logging.getLogger(__name__)

MAX_BACKOFF_FACTOR = 8
#: How long a retiring loop may finish the poll it is in before it is cancelled, past its timeout.
STOP_MARGIN_S = 1.0

#: Builds a device's driver and returns it with the profile; may raise: the caller rolls back.
DriverBuilder = Callable[[DeviceConfig], tuple[Driver, ProfileBase]]


@dataclass(slots=True)
class DeviceHealth:
    up: bool | None = None
    polls: int = 0
    failures: int = 0
    consecutive_failures: int = 0
    rejected: int = 0
    last_error: str | None = None
    last_success_ns: int | None = None


class AlarmWatch:
    """Raises once when a threshold is crossed, clears once the value is back past it by the
    hysteresis: no event storm from a value hovering at the threshold."""

    def __init__(self, point: str, unit: str, alarm: Alarm) -> None:
        self.point = point
        self.unit = unit
        self.alarm = alarm
        self.active: str | None = None  # "high" or "low"
        self.seen = False  # a value was checked since the agent started

    def update(self, value: float) -> tuple[str, dict[str, Any]] | None:
        self.seen = True
        alarm, shown = self.alarm, f"{value:g} {self.unit}".rstrip()
        if self.active is None:
            if alarm.high is not None and value > alarm.high:
                self.active = "high"
                return self._event(f"{self.point} {shown} above {alarm.high:g}", value, "raised")
            if alarm.low is not None and value < alarm.low:
                self.active = "low"
                return self._event(f"{self.point} {shown} below {alarm.low:g}", value, "raised")
            return None
        back = (
            value <= alarm.high - alarm.hysteresis
            if self.active == "high" and alarm.high is not None
            else alarm.low is not None and value >= alarm.low + alarm.hysteresis
        )
        if not back:
            return None
        level, self.active = self.active, None
        return self._event(f"{self.point} back to {shown}", value, "cleared", level)

    def _event(
        self, message: str, value: float, state: str, level: str | None = None
    ) -> tuple[str, dict[str, Any]]:
        return message, {
            "point": self.point,
            "value": value,
            "state": state,
            "level": level or self.active,
            "high": self.alarm.high,
            "low": self.alarm.low,
        }


@dataclass(eq=False)
class DeviceLoop:
    """One device's poll loop and what it needs: driver, profile, bus lock, health, alarms."""

    device: DeviceConfig
    driver: Driver
    profile: ProfileBase
    lock: asyncio.Lock
    jitter_s: float = 0.0
    health: DeviceHealth = field(default_factory=DeviceHealth)
    priorities: dict[str, int] = field(default_factory=dict)
    alarms: dict[str, AlarmWatch] = field(default_factory=dict)
    rejected_points: dict[str, str] = field(default_factory=dict)
    task: asyncio.Task[None] | None = None
    polling: bool = False
    stopping: bool = False

    def __post_init__(self) -> None:
        self.jitter_s = min(self.jitter_s, self.device.interval_s)
        self.priorities = {
            point.name: Priority[point.priority.upper()] for point in self.profile.points
        }
        for point in self.profile.points:  # the device's thresholds replace the profile's
            alarm = self.device.alarms.get(point.name, point.alarm)
            if alarm is not None:
                self.alarms[point.name] = AlarmWatch(point.name, point.unit, alarm)

    @property
    def timeout_s(self) -> float:
        """How long one poll may take: the device's `timeout_s`, or longer when the driver's
        own bounded retries need it (a BLE connection tried twice)."""
        return max(self.device.timeout_s, self.driver.poll_timeout_s)

    async def stop(self) -> None:
        """Lets a poll in progress finish (up to its timeout), then ends the loop."""
        task = self.task
        if task is None or task.done():
            return
        self.stopping = True
        if not self.polling:
            task.cancel()
        await asyncio.wait({task}, timeout=self.timeout_s + STOP_MARGIN_S)
        if not task.done():
            task.cancel()
            await asyncio.wait({task})


class Coordinator:
    def __init__(self, buffer: Buffer, events: EventQueue, clock: Clock) -> None:
        self.buffer = buffer
        self.events = events
        self.clock = clock
        #: The devices being polled now, by id (a retiring loop is no longer here).
        self.loops: dict[str, DeviceLoop] = {}
        self._bus_locks: dict[str, asyncio.Lock] = {}
        self._group: asyncio.TaskGroup | None = None
        #: Polls in progress, and an event set whenever none is: the end of a poll round.
        self.polling = 0
        self.quiet = asyncio.Event()

    def bind(self, group: asyncio.TaskGroup | None) -> None:
        """Poll loops run in `group` (a crash in one ends the agent); None: plain tasks."""
        self._group = group

    @property
    def health(self) -> dict[str, DeviceHealth]:
        return {device_id: loop.health for device_id, loop in self.loops.items()}

    @property
    def devices(self) -> list[DeviceConfig]:
        return [loop.device for loop in self.loops.values()]

    def bus_lock(self, bus: str) -> asyncio.Lock:
        """The lock every request on `bus` holds: polls and commands alike."""
        return self._bus_locks.setdefault(bus, asyncio.Lock())

    def _spawn(self, coroutine: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        if self._group is not None:
            return self._group.create_task(coroutine, name=name)
        return asyncio.get_running_loop().create_task(coroutine, name=name)

    async def begin(
        self, devices: Iterable[DeviceConfig], build: DriverBuilder, jitter_s: float = 0.0
    ) -> Transition:
        """Starts the loops of new and changed devices; the loops they replace keep running
        until `commit()`. If a driver cannot be built, the loops started so far are stopped,
        nothing else changed, and the error is raised."""
        wanted = {device.id: device for device in devices}
        previous = dict(self.loops)
        started: list[DeviceLoop] = []
        try:
            for device in wanted.values():
                old = previous.get(device.id)
                if old is not None and old.device == device:
                    continue
                driver, profile = build(device)
                loop = DeviceLoop(device, driver, profile, self.bus_lock(driver.bus), jitter_s)
                started.append(loop)
                loop.task = self._spawn(self._run(loop), f"poll:{device.id}")
        except Exception:
            await _stop_loops(started, list(previous.values()))
            raise
        retired = [
            loop
            for device_id, loop in previous.items()
            if device_id not in wanted or loop.device != wanted[device_id]
        ]
        replacing = {loop.device.id: loop for loop in started}
        self.loops = {
            device_id: replacing.get(device_id) or previous[device_id] for device_id in wanted
        }
        return Transition(self, previous, started, retired)

    async def stop_all(self) -> None:
        loops, self.loops = list(self.loops.values()), {}
        await asyncio.gather(*(loop.stop() for loop in loops))

    async def poll_once(self, loop: DeviceLoop) -> bool:
        self.polling += 1
        self.quiet.clear()
        loop.polling = True
        try:
            return await self._poll(loop)
        finally:
            loop.polling = False
            self.polling -= 1
            if self.polling == 0:
                self.quiet.set()

    async def _poll(self, loop: DeviceLoop) -> bool:
        device, health = loop.device, loop.health
        health.polls += 1
        try:
            async with loop.lock:
                async with asyncio.timeout(loop.timeout_s):
                    result = await loop.driver.read()
        except (DriverError, TimeoutError, OSError) as exc:
            reason = str(exc) or type(exc).__name__
            self._failed(device.id, health, reason)
            return False
        stamp = self.stamp()
        self.buffer.add_many(stamp, device.id, result.values, loop.priorities)
        for point, watch in loop.alarms.items():
            value = next((v for p, v in result.values if p == point), None)
            if isinstance(value, int | float) and not isinstance(value, bool):
                change = watch.update(float(value))
                if change is not None:
                    log.warning("device %s: %s", device.id, change[0])
                    self.events.raise_event(EventKind.ALARM, change[0], device.id, **change[1])
        self._report_rejected(loop, result.rejected)
        health.consecutive_failures = 0
        health.last_success_ns = stamp.ts_ns
        if health.up is not True:
            if health.up is False:
                log.info("device %s is back (%s)", device.id, loop.driver.bus)
                self.events.raise_event(EventKind.DEVICE_UP, "device answers again", device.id)
            health.up = True
            health.last_error = None
        return True

    def stamp(self) -> Stamp:
        quality = Quality.GOOD if self.clock.synced() else Quality.CLOCK_UNSYNCED
        return Stamp(self.clock.wall_ns(), self.clock.mono_ns(), int(quality))

    def _failed(self, device_id: str, health: DeviceHealth, reason: str) -> None:
        health.failures += 1
        health.consecutive_failures += 1
        health.last_error = reason
        if health.up is not False:
            log.warning("device %s is down: %s", device_id, reason)
            self.events.raise_event(EventKind.DEVICE_DOWN, reason, device_id)
            health.up = False

    def _report_rejected(self, loop: DeviceLoop, rejected: list[tuple[str, str]]) -> None:
        device_id, health = loop.device.id, loop.health
        health.rejected += len(rejected)
        now_bad = dict(rejected)
        for point, why in now_bad.items():
            if point not in loop.rejected_points:
                log.warning("device %s point %s rejected: %s", device_id, point, why)
                self.events.raise_event(
                    EventKind.REJECTED_INPUT, why, device_id, point=point, count=health.rejected
                )
        loop.rejected_points = now_bad

    async def _run(self, loop: DeviceLoop) -> None:
        """Polls on the interval's boundaries (as Telegraf's round_interval does), so devices
        with the same interval are read together and their readings share one commit and one
        batch; `poll_jitter_s` spreads them when a shared network or bus needs it."""
        interval = loop.device.interval_s
        clock = asyncio.get_running_loop()
        now = clock.time()
        next_at = math.ceil(now / interval) * interval + random.uniform(0, loop.jitter_s)
        await asyncio.sleep(next_at - now)
        while not loop.stopping:
            ok = await self.poll_once(loop)
            if loop.stopping:
                return
            factor = (
                1 if ok else min(2 ** (loop.health.consecutive_failures - 1), MAX_BACKOFF_FACTOR)
            )
            next_at += interval * factor
            now = clock.time()
            if next_at < now:  # overran: skip the missed slots, stay on the grid
                next_at += math.ceil((now - next_at) / interval) * interval
            await asyncio.sleep(next_at - now)


class Transition:
    """A change of the device set in progress: `commit()` or `rollback()`, once."""

    def __init__(
        self,
        coordinator: Coordinator,
        previous: dict[str, DeviceLoop],
        started: list[DeviceLoop],
        retired: list[DeviceLoop],
    ) -> None:
        self.coordinator = coordinator
        self.previous = previous
        self.started = started
        self.retired = retired

    @property
    def added(self) -> list[str]:
        return [loop.device.id for loop in self.started if loop.device.id not in self.previous]

    @property
    def changed(self) -> list[str]:
        return [loop.device.id for loop in self.started if loop.device.id in self.previous]

    @property
    def removed(self) -> list[str]:
        ids = {loop.device.id for loop in self.started}
        return [loop.device.id for loop in self.retired if loop.device.id not in ids]

    async def commit(self) -> None:
        """Stops the replaced and removed devices' loops; closes their drivers unless a
        device still polled shares the bus."""
        await _stop_loops(self.retired, list(self.coordinator.loops.values()))

    async def rollback(self) -> None:
        """Back to the previous devices: the new loops stop, the old ones never did."""
        self.coordinator.loops = dict(self.previous)
        await _stop_loops(self.started, list(self.previous.values()))


async def _stop_loops(stopping: list[DeviceLoop], staying: list[DeviceLoop]) -> None:
    await asyncio.gather(*(loop.stop() for loop in stopping))
    in_use = {loop.driver.bus for loop in staying}
    for loop in stopping:
        if loop.driver.bus in in_use:
            continue
        in_use.add(loop.driver.bus)  # one close per bus: its drivers share the connection
        try:
            await loop.driver.close()
        except (DriverError, OSError) as exc:
            log.warning("device %s: closing its driver failed: %s", loop.device.id, exc)
