"""Installer tools: poll devices once, write a point, run a command — without the daemon.

They open the device's bus themselves: stop the agent first when it shares a serial line, or
two masters will talk over each other on the RS-485 pair.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from agent.config import AgentConfig, DeviceConfig
from drivers.base import Value
from drivers.errors import DriverError
from drivers.modbus.driver import ModbusDriver, ModbusPool
from drivers.profiles import ProfileLibrary


@dataclass
class Probe:
    device: str
    profile: str
    ok: bool
    seconds: float
    values: list[dict[str, Any]] = field(default_factory=list)
    rejected: list[dict[str, str]] = field(default_factory=list)
    error: str | None = None


def select(config: AgentConfig, names: Iterable[str]) -> list[DeviceConfig]:
    wanted = list(names)
    known = {device.id: device for device in config.devices}
    unknown = [name for name in wanted if name not in known]
    if unknown:
        raise KeyError(
            f"no device {', '.join(map(repr, unknown))} in the config "
            f"(devices: {', '.join(known) or 'none'})"
        )
    return [known[name] for name in wanted] if wanted else list(known.values())


def _driver(device: DeviceConfig, library: ProfileLibrary, pool: ModbusPool) -> ModbusDriver:
    return ModbusDriver(library.get(device.profile), device.connection, pool)


async def probe(
    config: AgentConfig, library: ProfileLibrary, devices: list[DeviceConfig]
) -> list[Probe]:
    pool = ModbusPool()
    results = []
    try:
        for device in devices:
            driver = _driver(device, library, pool)
            profile = driver.profile
            started = time.monotonic()
            try:
                polled = await asyncio.wait_for(driver.read(), device.timeout_s * 4)
            except (DriverError, TimeoutError, OSError) as exc:
                results.append(
                    Probe(
                        device.id,
                        profile.id,
                        False,
                        time.monotonic() - started,
                        error=str(exc) or type(exc).__name__,
                    )
                )
                continue
            results.append(
                Probe(
                    device.id,
                    profile.id,
                    not polled.rejected,
                    time.monotonic() - started,
                    values=[
                        {"point": name, "value": value, "unit": profile.point(name).unit}
                        for name, value in polled.values
                    ],
                    rejected=[{"point": name, "why": why} for name, why in polled.rejected],
                )
            )
    finally:
        await pool.close()
    return results


async def write(library: ProfileLibrary, device: DeviceConfig, point: str, value: Value) -> Value:
    pool = ModbusPool()
    try:
        return await _driver(device, library, pool).write(point, value)
    finally:
        await pool.close()


async def command(
    library: ProfileLibrary, device: DeviceConfig, name: str, argument: Any
) -> dict[str, Any]:
    pool = ModbusPool()
    try:
        return await _driver(device, library, pool).command(name, argument)
    finally:
        await pool.close()
