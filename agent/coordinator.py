"""Owns every poll schedule: one loop per device, serialised per bus, with availability tracking.

Rules: a poll never overlaps the previous one of the same device; devices on one bus take turns
(one request at a time on an RS-485 line or a Modbus TCP gateway); a failing device is polled with
capped exponential back-off and reported once when it goes down and once when it comes back, never
on every failed poll.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
from dataclasses import dataclass
from typing import Any

from agent.buffer import Buffer, Priority, Stamp
from agent.clock import Clock
from agent.config import DeviceConfig
from agent.events import EventQueue
from drivers.base import Driver
from drivers.errors import DriverError
from drivers.profiles import Alarm, Profile
from wire.models import EventKind, Quality

log = logging.getLogger(__name__)

MAX_BACKOFF_FACTOR = 8


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

    def update(self, value: float) -> tuple[str, dict[str, Any]] | None:
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


class Coordinator:
    def __init__(self, buffer: Buffer, events: EventQueue, clock: Clock) -> None:
        self.buffer = buffer
        self.events = events
        self.clock = clock
        self._priorities: dict[str, dict[str, int]] = {}
        self._alarms: dict[str, dict[str, AlarmWatch]] = {}
        self.health: dict[str, DeviceHealth] = {}
        self._bus_locks: dict[str, asyncio.Lock] = {}
        self._rejected_points: dict[tuple[str, str], str] = {}
        #: Polls in progress, and an event set whenever none is: the end of a poll round.
        self.polling = 0
        self.quiet = asyncio.Event()

    def add(
        self, device: DeviceConfig, driver: Driver, profile: Profile, jitter_s: float = 0.0
    ) -> _DeviceLoop:
        self.health[device.id] = DeviceHealth()
        self._priorities[device.id] = {
            point.name: Priority[point.priority.upper()] for point in profile.points
        }
        self._alarms[device.id] = {
            point.name: AlarmWatch(point.name, point.unit, point.alarm)
            for point in profile.points
            if point.alarm is not None
        }
        lock = self._bus_locks.setdefault(driver.bus, asyncio.Lock())
        return _DeviceLoop(self, device, driver, lock, jitter_s)

    async def poll_once(self, device: DeviceConfig, driver: Driver, lock: asyncio.Lock) -> bool:
        self.polling += 1
        self.quiet.clear()
        try:
            return await self._poll(device, driver, lock)
        finally:
            self.polling -= 1
            if self.polling == 0:
                self.quiet.set()

    async def _poll(self, device: DeviceConfig, driver: Driver, lock: asyncio.Lock) -> bool:
        health = self.health[device.id]
        health.polls += 1
        try:
            async with lock:
                async with asyncio.timeout(device.timeout_s):
                    result = await driver.read()
        except (DriverError, TimeoutError, OSError) as exc:
            reason = str(exc) or type(exc).__name__
            self._failed(device.id, health, reason)
            return False
        stamp = self.stamp()
        priorities = self._priorities[device.id]
        alarms = self._alarms[device.id]
        self.buffer.add_many(stamp, device.id, result.values, priorities)
        for point, watch in alarms.items():
            value = next((v for p, v in result.values if p == point), None)
            if isinstance(value, int | float) and not isinstance(value, bool):
                change = watch.update(float(value))
                if change is not None:
                    log.warning("device %s: %s", device.id, change[0])
                    self.events.raise_event(EventKind.ALARM, change[0], device.id, **change[1])
        self._report_rejected(device.id, health, result.rejected)
        health.consecutive_failures = 0
        health.last_success_ns = stamp.ts_ns
        if health.up is not True:
            if health.up is False:
                log.info("device %s is back (%s)", device.id, driver.bus)
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

    def _report_rejected(
        self, device_id: str, health: DeviceHealth, rejected: list[tuple[str, str]]
    ) -> None:
        health.rejected += len(rejected)
        now_bad = {(device_id, point): why for point, why in rejected}
        for key, why in now_bad.items():
            if key not in self._rejected_points:
                log.warning("device %s point %s rejected: %s", device_id, key[1], why)
                self.events.raise_event(
                    EventKind.REJECTED_INPUT, why, device_id, point=key[1], count=health.rejected
                )
        for key in [k for k in self._rejected_points if k[0] == device_id and k not in now_bad]:
            del self._rejected_points[key]
        self._rejected_points.update(now_bad)


class _DeviceLoop:
    def __init__(
        self,
        coordinator: Coordinator,
        device: DeviceConfig,
        driver: Driver,
        lock: asyncio.Lock,
        jitter_s: float = 0.0,
    ) -> None:
        self.jitter_s = min(jitter_s, device.interval_s)
        self.coordinator = coordinator
        self.device = device
        self.driver = driver
        self.lock = lock

    async def run(self) -> None:
        """Polls on the interval's boundaries (as Telegraf's round_interval does), so devices
        with the same interval are read together and their readings share one commit and one
        batch; `poll_jitter_s` spreads them when a shared network or bus needs it."""
        interval = self.device.interval_s
        loop = asyncio.get_running_loop()
        now = loop.time()
        next_at = math.ceil(now / interval) * interval + random.uniform(0, self.jitter_s)
        await asyncio.sleep(next_at - now)
        while True:
            ok = await self.coordinator.poll_once(self.device, self.driver, self.lock)
            health = self.coordinator.health[self.device.id]
            factor = 1 if ok else min(2 ** (health.consecutive_failures - 1), MAX_BACKOFF_FACTOR)
            next_at += interval * factor
            now = loop.time()
            if next_at < now:  # overran: skip the missed slots, stay on the grid
                next_at += math.ceil((now - next_at) / interval) * interval
            await asyncio.sleep(next_at - now)
