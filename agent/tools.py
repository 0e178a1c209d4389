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
from drivers.base import Driver, Value
from drivers.errors import DriverError
from drivers.modbus.driver import ModbusDriver
from drivers.profiles import ProfileLibrary
from drivers.registry import DriverFactory


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


def _driver(device: DeviceConfig, library: ProfileLibrary, factory: DriverFactory) -> Driver:
    return factory.build(library.get(device.profile), device.connection)


async def probe(
    config: AgentConfig, library: ProfileLibrary, devices: list[DeviceConfig]
) -> list[Probe]:
    factory = DriverFactory()
    results = []
    try:
        # built first: a BLE sensor takes the adverts its adapter hears from the first BLE
        # device's open() on, so each open() need not wait for one more advert
        drivers = [_driver(device, library, factory) for device in devices]
        for device, driver in zip(devices, drivers, strict=True):
            profile = library.get(device.profile)
            started = time.monotonic()
            try:
                await driver.open()
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
        await factory.close()
    return results


async def write(library: ProfileLibrary, device: DeviceConfig, point: str, value: Value) -> Value:
    factory = DriverFactory()
    try:
        driver = _driver(device, library, factory)
        if not isinstance(driver, ModbusDriver):
            raise ValueError(f"{device.id}: only Modbus points are written directly; use a command")
        return await driver.write(point, value)
    finally:
        await factory.close()


async def command(
    library: ProfileLibrary,
    device: DeviceConfig,
    name: str,
    argument: Any,
    options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    factory = DriverFactory()
    try:
        driver = _driver(device, library, factory)
        await driver.open()
        return await driver.command(name, argument, options)
    finally:
        await factory.close()
