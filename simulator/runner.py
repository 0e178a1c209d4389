"""Runs a scenario: one Modbus TCP server per simulated device, until cancelled."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import datetime

from drivers.profiles import ProfileLibrary
from simulator.modbus_server import SimulatedModbusDevice, serve_modbus_tcp
from simulator.model import ClassroomAir
from simulator.scenario import Scenario


def scenario_clock(scenario: Scenario) -> Callable[[], float]:
    """Simulated seconds: real time sped up by `time_scale`, optionally starting at a time of
    day (so a demo can begin at 08:00 when the first lesson starts)."""
    real_start = time.time()
    sim_start = real_start
    if scenario.start_time_of_day is not None:
        hours, minutes = (int(part) for part in scenario.start_time_of_day.split(":"))
        midnight = datetime.now().replace(hour=0, minute=0, second=0, microsecond=0)
        sim_start = midnight.timestamp() + hours * 3600 + minutes * 60
    scale = scenario.time_scale
    return lambda: sim_start + (time.time() - real_start) * scale


def build_devices(scenario: Scenario, library: ProfileLibrary) -> list[SimulatedModbusDevice]:
    clock = scenario_clock(scenario)
    return [
        SimulatedModbusDevice(
            library.get(device.profile),
            ClassroomAir(
                seed=device.seed,
                base_temperature=device.base_temperature,
                base_humidity=device.base_humidity,
            ),
            unit=device.unit,
            clock=clock,
        )
        for device in scenario.devices
    ]


async def run_scenario(scenario: Scenario, library: ProfileLibrary) -> None:
    devices = build_devices(scenario, library)
    async with asyncio.TaskGroup() as group:
        for spec, device in zip(scenario.devices, devices, strict=True):
            group.create_task(serve_modbus_tcp(device, spec.host, spec.port), name=spec.id)
