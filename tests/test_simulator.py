"""The simulator speaks real Modbus: checked with mbpoll (an independent C master) and our
driver."""

from __future__ import annotations

import asyncio
import re
import subprocess
from pathlib import Path

import pytest

from drivers.modbus.driver import ModbusDriver, ModbusPool, ModbusTcpConnection
from drivers.profiles import ProfileLibrary
from simulator.broker import free_port
from simulator.modbus_server import SimulatedModbusDevice, serve_tcp
from simulator.model import ClassroomAir, dew_point, occupied
from simulator.values import DeviceValues
from tests.conftest import Processes, wait_for, write_yaml


def mbpoll(port: int, *args: str) -> list[str]:
    result = subprocess.run(
        ["mbpoll", "-m", "tcp", "-a", "1", "-1", "-p", str(port), *args, "127.0.0.1"],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return re.findall(r"^\[(\d+)\]:\s+(\S+)", result.stdout, re.MULTILINE)  # type: ignore[return-value]


def test_campus_sim_answers_mbpoll(processes: Processes, tmp_path: Path) -> None:
    port = free_port()
    scenario = write_yaml(
        tmp_path / "s.yaml",
        {"devices": [{"id": "r1", "profile": "campussim-thc100", "port": port, "seed": 3}]},
    )
    processes.start("sim", "campus-sim", "run", str(scenario))
    wait_for(lambda: "listening" in processes.log("sim"), 10, what="simulator listening")
    # input registers 0..2 (mbpoll -r is 1-based): temperature x10, humidity x10, CO2 ppm
    values = dict(mbpoll(port, "-t", "3", "-r", "1", "-c", "3"))
    temperature, humidity, co2 = (int(values[k]) / s for k, s in (("1", 10), ("2", 10), ("3", 1)))
    assert 15 < temperature < 30
    assert 20 < humidity < 80
    assert 350 < co2 < 2000
    # float32 dew point at input register 4, big-endian words
    dew = float(dict(mbpoll(port, "-t", "3:float", "-B", "-r", "5", "-c", "1"))["5"])
    assert dew == pytest.approx(dew_point(temperature, humidity), abs=0.5)


def test_campus_sim_refuses_a_taken_port(processes: Processes, tmp_path: Path) -> None:
    port = free_port()
    scenario = write_yaml(
        tmp_path / "s.yaml",
        {"devices": [{"id": "r1", "profile": "campussim-thc100", "port": port}]},
    )
    processes.start("first", "campus-sim", "run", str(scenario))
    wait_for(lambda: "listening" in processes.log("first"), 10, what="first simulator")
    second = processes.start("second", "campus-sim", "run", str(scenario))
    assert second.wait(10) == 1
    assert f"cannot listen on 127.0.0.1 port {port}" in processes.log("second")


def test_timetable_and_drift() -> None:
    assert occupied(8 * 3600 + 60) and not occupied(8 * 3600 + 46 * 60)
    assert not occupied(20 * 3600)
    air = ClassroomAir(seed=1)
    day = 86_400 * 10
    air.advance(day + 7 * 3600)
    start = air.values()
    air.advance(day + 8 * 3600 + 40 * 60)  # 40 minutes into the first lesson
    lesson = air.values()
    air.advance(day + 8 * 3600 + 54 * 60)  # end of the break
    assert lesson["co2"] > start["co2"] + 300, "CO2 must rise with pupils in the room"
    assert air.values()["co2"] < lesson["co2"], "CO2 must fall in the break"
    assert 15 < lesson["temperature"] < 30


async def test_our_driver_reads_the_simulator_and_values_move() -> None:
    library = ProfileLibrary.load()
    profile = library.get("campussim-thc100")
    now = [86_400 * 3 + 8 * 3600.0]
    device = SimulatedModbusDevice(
        profile, DeviceValues(profile, seed=5), unit=1, clock=lambda: now[0]
    )
    port = free_port()
    server = asyncio.create_task(serve_tcp([device], "::1", port))
    await asyncio.sleep(0.2)
    pool = ModbusPool()
    driver = ModbusDriver(
        profile, ModbusTcpConnection(type="modbus-tcp", host="::1", port=port, unit=1), pool
    )
    try:
        first = dict((await driver.read()).values)
        now[0] += 1800
        later = dict((await driver.read()).values)
    finally:
        await pool.close()
        server.cancel()
        await asyncio.gather(server, return_exceptions=True)
    assert set(first) == {"temperature", "humidity", "co2", "dew_point", "uptime"}
    assert later["uptime"] == first["uptime"] + 1800
    assert later["co2"] > first["co2"]
    assert device.reads == 2  # one request per poll: the planner merges registers 0..9
