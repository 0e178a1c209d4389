"""Fault modes of simulated devices, seen through our driver and the agent's coordinator: each
becomes a device error or a rejected value, never a crash, and a dead device delays its bus mates
by at most its timeout."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from drivers.errors import DeviceTimeout
from drivers.modbus.codec import (
    ModbusCrcError,
    ModbusExceptionResponse,
    ModbusFrameError,
    ModbusWrongUnit,
)
from drivers.modbus.driver import (
    ModbusDriver,
    ModbusPool,
    ModbusRtuConnection,
    ModbusTcpConnection,
)
from drivers.profiles import ProfileLibrary
from simulator.broker import free_port
from simulator.modbus_server import Fault, SimulatedModbusDevice, serve_rtu, serve_tcp
from simulator.runner import pty_pair
from simulator.scenario import RtuBus
from simulator.values import DeviceValues

PROFILE = ProfileLibrary.load().get("campussim-thc100")
TIMEOUT = 0.3


def device(unit: int, fault: Fault | None = None) -> SimulatedModbusDevice:
    now = [86_400 * 3 + 9 * 3600.0]

    def clock() -> float:
        now[0] += 60  # each read is a minute later: values move unless stuck
        return now[0]

    return SimulatedModbusDevice(
        PROFILE, DeviceValues(PROFILE, seed=unit), unit=unit, clock=clock, fault=fault
    )


@pytest.fixture
async def tcp() -> AsyncIterator[tuple[SimulatedModbusDevice, ModbusDriver]]:
    sim = device(1)
    port = free_port()
    server = asyncio.create_task(serve_tcp([sim], "127.0.0.1", port))
    await asyncio.sleep(0.2)
    pool = ModbusPool()
    connection = ModbusTcpConnection(
        type="modbus-tcp", host="127.0.0.1", port=port, timeout_s=TIMEOUT, retries=0
    )
    yield sim, ModbusDriver(PROFILE, connection, pool)
    await pool.close()
    server.cancel()
    await asyncio.gather(server, return_exceptions=True)


async def test_healthy_then_each_fault_over_tcp(
    tcp: tuple[SimulatedModbusDevice, ModbusDriver],
) -> None:
    sim, driver = tcp
    assert len((await driver.read()).values) == 5

    sim.fault = Fault("offline")
    with pytest.raises(DeviceTimeout):
        await driver.read()

    sim.fault = Fault("slow", delay_s=TIMEOUT * 2)
    with pytest.raises(DeviceTimeout):
        await driver.read()
    await asyncio.sleep(TIMEOUT * 2)  # let the late answer go by
    sim.fault = Fault("slow", delay_s=TIMEOUT / 3)
    assert len((await driver.read()).values) == 5, "slow but within the timeout is fine"

    sim.fault = Fault("exception", code=6)
    with pytest.raises(ModbusExceptionResponse, match="exception 6"):
        await driver.read()

    sim.fault = Fault("stuck")
    first = dict((await driver.read()).values)
    second = dict((await driver.read()).values)
    assert first == second, "a stuck sensor repeats itself"
    sim.fault = Fault()
    assert dict((await driver.read()).values)["uptime"] != second["uptime"]

    sim.fault = Fault("noisy", spread=0.5)
    rejected = []
    for _ in range(10):
        rejected += (await driver.read()).rejected
    assert any("above the profile's maximum" in why for _, why in rejected)

    sim.fault = Fault("wrong_unit")
    with pytest.raises(ModbusWrongUnit):
        await driver.read()

    sim.fault = Fault("garbled")
    with pytest.raises(ModbusFrameError):
        await driver.read()

    sim.fault = Fault()
    assert len((await driver.read()).values) == 5, "the driver recovers from every fault"


@pytest.fixture
async def rtu(tmp_path: Path) -> AsyncIterator[tuple[list[SimulatedModbusDevice], ModbusPool, str]]:
    bus = RtuBus(name="bus", link=tmp_path / "ttyRS485")
    with pty_pair(bus) as simulator_end:
        sims = [device(unit) for unit in (1, 2, 3, 4)]
        server = asyncio.create_task(serve_rtu(sims, str(simulator_end), 9600))
        await asyncio.sleep(0.2)
        pool = ModbusPool()
        yield sims, pool, str(bus.link)
        await pool.close()
        server.cancel()
        await asyncio.gather(server, return_exceptions=True)


def rtu_driver(pool: ModbusPool, port: str, unit: int, retries: int = 0) -> ModbusDriver:
    connection = ModbusRtuConnection(
        type="modbus-rtu", port=port, unit=unit, timeout_s=TIMEOUT, retries=retries
    )
    return ModbusDriver(PROFILE, connection, pool)


async def test_faults_on_a_shared_rtu_bus(
    rtu: tuple[list[SimulatedModbusDevice], ModbusPool, str],
) -> None:
    sims, pool, port = rtu
    healthy, dead, garbled, impostor = (rtu_driver(pool, port, unit) for unit in (1, 2, 3, 4))
    sims[1].fault = Fault("offline")
    sims[2].fault = Fault("garbled")
    sims[3].fault = Fault("wrong_unit")
    assert len((await healthy.read()).values) == 5
    with pytest.raises(DeviceTimeout):
        await dead.read()
    with pytest.raises(ModbusCrcError):
        await garbled.read()
    with pytest.raises(ModbusWrongUnit):
        await impostor.read()
    assert len((await healthy.read()).values) == 5, "the bus works after every fault"


async def test_a_dead_device_delays_its_bus_mate_by_at_most_its_timeout(
    rtu: tuple[list[SimulatedModbusDevice], ModbusPool, str],
) -> None:
    sims, pool, port = rtu
    sims[1].fault = Fault("offline")
    healthy = rtu_driver(pool, port, 1)
    dead = rtu_driver(pool, port, 2, retries=3)  # retries only while the device was answering
    latencies: list[float] = []

    async def poll_healthy() -> None:
        for _ in range(8):
            started = time.monotonic()
            assert len((await healthy.read()).values) == 5
            latencies.append(time.monotonic() - started)
            await asyncio.sleep(0.05)

    async def poll_dead() -> None:
        for _ in range(6):
            with pytest.raises(DeviceTimeout):
                await dead.read()

    await asyncio.gather(poll_healthy(), poll_dead())
    # The first dead poll may retry (the device was believed alive): 4 timeouts at most, once.
    steady = sorted(latencies)[:-1]
    assert max(steady) < TIMEOUT + 0.25, latencies


def test_devices_sharing_a_client_wait_as_long_as_the_slowest() -> None:
    pool = ModbusPool()
    quick = ModbusTcpConnection(type="modbus-tcp", host="::1", port=1502, unit=1, timeout_s=0.5)
    slow = ModbusTcpConnection(type="modbus-tcp", host="::1", port=1502, unit=2, timeout_s=3.0)
    first = ModbusDriver(PROFILE, quick, pool)
    second = ModbusDriver(PROFILE, slow, pool)
    assert first._client is second._client
    assert first._client.timeout == 3.0
