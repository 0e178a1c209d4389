"""Every shipped profile, served by the simulator over Modbus TCP and over RTU (a socat pty pair,
all devices on one bus), read by our driver: values match what the simulator serves, scaled and
typed as the profile says; every command runs and reads back."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from drivers.base import Value
from drivers.modbus.driver import (
    ModbusDriver,
    ModbusPool,
    ModbusRtuConnection,
    ModbusTcpConnection,
)
from drivers.modbus.points import clip_to_type
from drivers.modbus.profile import Command, ModbusPoint, ModbusProfile
from drivers.profiles import ProfileLibrary
from simulator.broker import free_port
from simulator.modbus_server import SimulatedModbusDevice, serve_rtu, serve_tcp
from simulator.runner import pty_pair
from simulator.scenario import RtuBus
from simulator.values import DeviceValues

LIBRARY = ProfileLibrary.load()
PROFILES = sorted(p.id for p in LIBRARY.profiles.values() if p.protocol == "modbus")
FIXED_TIME = 86_400 * 30 + 9 * 3600.0  # a Tuesday lesson: every value away from zero


def simulated(profile: ModbusProfile, unit: int) -> SimulatedModbusDevice:
    return SimulatedModbusDevice(
        profile, DeviceValues(profile, seed=unit), unit=unit, clock=lambda: FIXED_TIME
    )


def expected_value(point: ModbusPoint, served: Value) -> Value:
    if point.kind.numeric:
        return clip_to_type(point, float(served))
    return served


def assert_matches(point: ModbusPoint, got: Value, served: Value) -> None:
    want = expected_value(point, served)
    kind = point.kind.value
    if kind == "bool":
        assert got is bool(want), point.name
    elif kind == "string":
        assert isinstance(got, str) and got == str(want).strip(), point.name
    elif kind == "bitfield":
        assert isinstance(got, int) and got == want, point.name
    elif kind.startswith(("int", "uint")):
        assert isinstance(got, int if point.scale == 1 and point.offset == 0 else float | int)
        assert got == pytest.approx(want, abs=abs(point.scale) / 2 + 1e-9), point.name
    else:
        assert isinstance(got, float), point.name
        rel = 1e-6 if kind == "float32" else 1e-12
        assert math.isclose(got, float(want), rel_tol=rel, abs_tol=1e-3 * abs(point.scale)), (
            point.name,
            got,
            want,
        )


def in_range(point: ModbusPoint, served: Value) -> bool:
    if not point.kind.numeric:
        return True
    value = expected_value(point, served)
    assert isinstance(value, float)
    return (point.min is None or value >= point.min) and (point.max is None or value <= point.max)


async def check_device(driver: ModbusDriver, device: SimulatedModbusDevice) -> None:
    result = await driver.read()
    served = device.current_values()
    got = dict(result.values)
    rejected = dict(result.rejected)
    for point in driver.profile.points:
        if in_range(point, served[point.name]):
            assert point.name in got, f"{point.name}: {rejected.get(point.name)}"
            assert_matches(point, got[point.name], served[point.name])
        else:
            assert "profile's m" in rejected[point.name]


def argument_for(command: Command) -> Any:
    argument = command.argument
    if argument is None:
        return None
    if argument.type == "bool":
        return True
    if argument.type == "choice":
        assert argument.choices
        return next(iter(argument.choices))
    if argument.min is not None:
        return int(argument.min) if argument.type == "int" else argument.min
    return 1


@pytest.fixture
async def tcp_devices() -> AsyncIterator[dict[str, tuple[ModbusDriver, SimulatedModbusDevice]]]:
    pool = ModbusPool()
    servers, devices = [], {}
    for profile_id in PROFILES:
        profile = LIBRARY.get(profile_id)
        device = simulated(profile, unit=1)
        port = free_port()
        servers.append(asyncio.create_task(serve_tcp([device], "::1", port)))
        connection = ModbusTcpConnection(
            type="modbus-tcp", host="::1", port=port, unit=1, timeout_s=2
        )
        devices[profile_id] = (ModbusDriver(profile, connection, pool), device)
    await asyncio.sleep(0.3)
    yield devices
    await pool.close()
    for server in servers:
        server.cancel()
    await asyncio.gather(*servers, return_exceptions=True)


@pytest.fixture
async def rtu_bus(
    tmp_path: Path,
) -> AsyncIterator[dict[str, tuple[ModbusDriver, SimulatedModbusDevice]]]:
    bus = RtuBus(name="bus-1", link=tmp_path / "ttyCAMPUS0", baudrate=19200)
    with pty_pair(bus) as simulator_end:
        sims = [simulated(LIBRARY.get(pid), unit=i) for i, pid in enumerate(PROFILES, start=1)]
        server = asyncio.create_task(serve_rtu(sims, str(simulator_end), bus.baudrate))
        await asyncio.sleep(0.3)
        pool = ModbusPool()
        devices = {
            sim.profile.id: (
                ModbusDriver(
                    sim.profile,
                    ModbusRtuConnection(
                        type="modbus-rtu",
                        port=str(bus.link),
                        baudrate=19200,
                        unit=sim.unit,
                        timeout_s=1.0,
                    ),
                    pool,
                ),
                sim,
            )
            for sim in sims
        }
        yield devices
        await pool.close()
        server.cancel()
        await asyncio.gather(server, return_exceptions=True)


@pytest.mark.parametrize("profile_id", PROFILES)
async def test_every_profile_over_tcp(
    tcp_devices: dict[str, tuple[ModbusDriver, SimulatedModbusDevice]], profile_id: str
) -> None:
    driver, device = tcp_devices[profile_id]
    await check_device(driver, device)
    for command in driver.profile.commands:
        result = await driver.command(command.name, argument_for(command))
        assert result["command"] == command.name


async def test_every_profile_on_one_rtu_bus(
    rtu_bus: dict[str, tuple[ModbusDriver, SimulatedModbusDevice]],
) -> None:
    assert len(rtu_bus) >= 9, "nine device models share the bus, each with its own unit id"
    for driver, device in rtu_bus.values():
        await check_device(driver, device)
        for command in driver.profile.commands:
            result = await driver.command(command.name, argument_for(command))
            assert result["command"] == command.name
    assert sum(device.reads for _, device in rtu_bus.values()) >= len(rtu_bus)
