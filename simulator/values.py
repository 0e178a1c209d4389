"""Plausible values for any profile's points, chosen by point name.

Air (temperature, humidity, CO2, dew point) comes from the classroom model; dust, noise and light
follow the timetable; meters see a load that rises in lessons, on each phase (`_l1`, `_l2`, `_l3`)
and in total, and their energy counters integrate it. `wall_clock_ms` is the real time of the
read (for latency measurements). A point with another name holds the middle of its valid range,
or 0.
"""

from __future__ import annotations

import math
import random
import re
import time
from dataclasses import dataclass, field

from drivers.base import Value
from drivers.modbus.profile import ModbusPoint, ModbusProfile, PointType
from simulator.model import ClassroomAir, Walk, occupied

PHASE = re.compile(r"^(?P<base>.+?)_l(?P<phase>[123])$")
NOMINAL_V = 230.0


@dataclass
class Electrical:
    rng: random.Random
    phases: int
    voltage: list[Walk] = field(init=False)
    load: list[Walk] = field(init=False)
    frequency: Walk = field(init=False)
    energy_kwh: float = 0.0

    def __post_init__(self) -> None:
        self.energy_kwh = self.rng.uniform(1_000, 20_000)  # a meter that has been in service
        self.voltage = [Walk(NOMINAL_V + self.rng.uniform(-2, 2), 60, 0.05) for _ in range(3)]
        self.load = [Walk(0.4, 120, 0.02) for _ in range(3)]
        self.frequency = Walk(50.0, 30, 0.002)

    def advance(self, t_s: float, dt: float) -> None:
        lesson = occupied(t_s)
        for phase in range(3):
            self.voltage[phase].step(NOMINAL_V, dt, self.rng)
            self.load[phase].step((4.0 + phase) if lesson else 0.4, dt, self.rng)
        self.frequency.step(50.0, dt, self.rng)
        self.energy_kwh += self.total_power() * dt / 3_600_000

    def phase_values(self, phase: int) -> dict[str, float]:
        volts = self.voltage[phase].value
        amps = max(0.0, self.load[phase].value)
        pf = 0.93
        apparent = volts * amps
        return {
            "voltage": volts,
            "current": amps,
            "power_factor": pf,
            "active_power": apparent * pf,
            "apparent_power": apparent,
            "reactive_power": apparent * math.sqrt(1 - pf * pf),
        }

    def total_power(self) -> float:
        return sum(self.phase_values(p)["active_power"] for p in range(self.phases))


class DeviceValues:
    def __init__(
        self,
        profile: ModbusProfile,
        seed: int = 0,
        base_temperature: float = 21.0,
        base_humidity: float = 45.0,
    ) -> None:
        self.profile = profile
        self.rng = random.Random(seed)
        self.air = ClassroomAir(seed, base_temperature, base_humidity)
        phases = 3 if any(PHASE.match(p.name) for p in profile.points) else 1
        self.electrical = Electrical(random.Random(seed + 1), phases)
        self.dust = Walk(8.0, 600, 0.05)
        self.noise = Walk(38.0, 20, 0.5)
        self.started_s: float | None = None
        self.last_s: float | None = None

    def advance(self, t_s: float) -> None:
        if self.last_s is None:
            self.started_s = self.last_s = t_s
        dt = max(0.0, t_s - self.last_s)
        self.last_s = t_s
        lesson = occupied(t_s)
        self.air.advance(t_s)
        self.electrical.advance(t_s, dt)
        self.dust.step(14.0 if lesson else 8.0, dt, self.rng)
        self.noise.step(62.0 if lesson else 38.0, dt, self.rng)

    def illuminance(self) -> float:
        t_s = self.last_s or 0.0
        daylight = max(0.0, math.sin(math.pi * ((t_s % 86_400) / 3600 - 6) / 13))
        return 120 * daylight + (380.0 if occupied(t_s) else 0.0)

    def by_name(self) -> dict[str, float]:
        values = dict(self.air.values())
        dust = max(0.0, self.dust.value)
        values.update(
            pm1_0=dust * 0.6,
            pm2_5=dust,
            pm10=dust * 1.6,
            noise=self.noise.value,
            illuminance=self.illuminance(),
            frequency=self.electrical.frequency.value,
            import_energy=self.electrical.energy_kwh,
            total_energy=self.electrical.energy_kwh,
            export_energy=0.0,
            uptime=(self.last_s or 0.0) - (self.started_s or 0.0),
            # Real (not simulated) time of the read, for measuring how old a value is on arrival.
            wall_clock_ms=time.time() * 1000,
        )
        phases = [self.electrical.phase_values(p) for p in range(self.electrical.phases)]
        for name in phases[0]:
            for index, phase in enumerate(phases, start=1):
                values[f"{name}_l{index}"] = phase[name]
            if name in ("voltage", "power_factor"):
                values[name] = sum(phase[name] for phase in phases) / len(phases)
            else:
                values[name] = sum(phase[name] for phase in phases)
        return values

    def value(self, point: ModbusPoint, named: dict[str, float]) -> Value:
        kind = point.kind
        if kind is PointType.BOOL:
            return False
        if kind is PointType.BITFIELD:
            return 0
        if kind is PointType.STRING:
            return self.profile.model[: 2 * (point.length or 1)]
        if point.name in named:
            return named[point.name]
        if point.min is not None and point.max is not None:
            return (point.min + point.max) / 2
        return point.min if point.min is not None and point.min > 0 else 0.0

    def values(self) -> dict[str, Value]:
        named = self.by_name()
        return {point.name: self.value(point, named) for point in self.profile.points}
