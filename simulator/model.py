"""How simulated classroom values move: mean-reverting random walks driven by a class timetable.

Pure and deterministic for a given seed and clock, so tests can step it. Temperature follows the
day and the number of pupils, CO2 rises during lessons and decays in breaks, humidity wanders, the
dew point follows from temperature and humidity (Magnus formula).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

LESSON_S = 45 * 60
BREAK_S = 10 * 60


def occupied(t_s: float) -> bool:
    """Lessons of 45 minutes followed by 10-minute breaks, from 08:00 to 16:00 (local sim time)."""
    day_s = t_s % 86_400
    if not 8 * 3600 <= day_s < 16 * 3600:
        return False
    return (day_s - 8 * 3600) % (LESSON_S + BREAK_S) < LESSON_S


def dew_point(temperature: float, humidity: float) -> float:
    a, b = 17.62, 243.12
    gamma = math.log(max(humidity, 0.1) / 100.0) + a * temperature / (b + temperature)
    return b * gamma / (a - gamma)


@dataclass
class Walk:
    """Ornstein–Uhlenbeck process: pulled towards `target` with time constant `tau_s`."""

    value: float
    tau_s: float
    sigma: float  # noise per square-root second

    def step(self, target: float, dt: float, rng: random.Random) -> float:
        if dt <= 0:
            return self.value
        pull = 1.0 - math.exp(-dt / self.tau_s)
        self.value += (target - self.value) * pull + rng.gauss(0.0, self.sigma * math.sqrt(dt))
        return self.value


@dataclass
class ClassroomAir:
    """Temperature (degC), relative humidity (%RH) and CO2 (ppm) of one classroom."""

    seed: int = 0
    base_temperature: float = 21.0
    base_humidity: float = 45.0
    outdoor_co2: float = 420.0
    occupied_co2: float = 1250.0
    rng: random.Random = field(init=False)
    temperature: Walk = field(init=False)
    humidity: Walk = field(init=False)
    co2: Walk = field(init=False)
    started_s: float | None = field(default=None, init=False)
    last_s: float | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self.temperature = Walk(self.base_temperature + self.rng.uniform(-0.5, 0.5), 1800, 0.01)
        self.humidity = Walk(self.base_humidity + self.rng.uniform(-3, 3), 3600, 0.05)
        self.co2 = Walk(self.outdoor_co2 + self.rng.uniform(0, 80), 900, 1.5)

    def advance(self, t_s: float) -> None:
        if self.last_s is None:
            self.started_s = self.last_s = t_s
        dt = max(0.0, t_s - self.last_s)
        self.last_s = t_s
        in_class = occupied(t_s)
        day_phase = 2 * math.pi * ((t_s % 86_400) - 15 * 3600) / 86_400
        self.temperature.step(
            self.base_temperature + 1.5 * math.cos(day_phase) + (1.2 if in_class else 0.0),
            dt,
            self.rng,
        )
        self.humidity.step(self.base_humidity + (4.0 if in_class else 0.0), dt, self.rng)
        self.co2.step(self.occupied_co2 if in_class else self.outdoor_co2, dt, self.rng)

    def values(self) -> dict[str, float]:
        temperature = self.temperature.value
        humidity = min(100.0, max(0.0, self.humidity.value))
        uptime = (self.last_s or 0.0) - (self.started_s or 0.0)
        return {
            "temperature": temperature,
            "humidity": humidity,
            "co2": max(0.0, self.co2.value),
            "dew_point": dew_point(temperature, humidity),
            "uptime": uptime,
        }
