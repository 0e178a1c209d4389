"""Runs a scenario: one pymodbus server per TCP endpoint and per RTU bus, until cancelled.

An RTU bus is a pty pair made with socat: the simulator serves on `<link>.sim`, the agent opens
`<link>`. A pty ignores baud rate and parity, so it proves framing and logic, not timing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import subprocess
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path

from drivers.modbus.profile import ModbusProfile
from drivers.profiles import ProfileLibrary
from simulator.board import run_board
from simulator.camera_server import serve_camera
from simulator.modbus_server import (
    Fault,
    ListenError,
    SimulatedModbusDevice,
    serve_rtu,
    serve_tcp,
)
from simulator.pjlink_server import scaled_clock, serve_projector
from simulator.processes import stop_group
from simulator.scenario import RtuBus, Scenario, SimulatedDevice
from simulator.values import DeviceValues
from wire.net import host_port

log = logging.getLogger(__name__)


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
    # The model's day runs on its clock modulo 86,400 s: shift it so that its hours are local.
    local = datetime.now().astimezone().utcoffset()
    shift = local.total_seconds() if local is not None else 0.0
    return lambda: sim_start + shift + (time.time() - real_start) * scale


def build_device(
    spec: SimulatedDevice, library: ProfileLibrary, clock: Callable[[], float]
) -> SimulatedModbusDevice:
    profile = library.get(spec.profile)
    assert isinstance(profile, ModbusProfile)  # checked when the scenario was loaded
    values = DeviceValues(profile, spec.seed, spec.base_temperature, spec.base_humidity)
    fault = Fault(spec.fault.kind, spec.fault.delay_s, spec.fault.code, spec.fault.spread)
    device = SimulatedModbusDevice(profile, values, unit=spec.unit, clock=clock, fault=fault)
    device.overrides.update(spec.values)
    return device


def sim_side(bus: RtuBus) -> Path:
    return bus.link.with_name(bus.link.name + ".sim")


@contextlib.contextmanager
def pty_pair(bus: RtuBus, timeout: float = 5.0) -> Iterator[Path]:
    """A socat pty pair: yields the simulator's end; the agent opens `bus.link`."""
    socat = shutil.which("socat")
    if socat is None:
        raise ListenError("socat is not installed: run 'make install'")
    bus.link.parent.mkdir(parents=True, exist_ok=True)
    ours = sim_side(bus)
    process = subprocess.Popen(
        [socat, f"pty,raw,echo=0,link={bus.link}", f"pty,raw,echo=0,link={ours}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + timeout
        while not (bus.link.exists() and ours.exists()):
            if process.poll() is not None or time.monotonic() > deadline:
                raise ListenError(f"socat could not make the pty pair {bus.link}")
            time.sleep(0.01)
        yield ours
    finally:
        stop_group(process)


async def run_scenario(scenario: Scenario, library: ProfileLibrary) -> None:
    clock = scenario_clock(scenario)
    endpoints: dict[str, list[SimulatedModbusDevice]] = defaultdict(list)
    for spec in scenario.devices:
        endpoints[spec.endpoint].append(build_device(spec, library, clock))
    buses = {bus.name: bus for bus in scenario.rtu_buses}
    with contextlib.ExitStack() as stack:
        async with contextlib.AsyncExitStack() as servers:
            await _serve_others(scenario, servers)
            await _serve_modbus(endpoints, buses, stack)


async def _serve_others(scenario: Scenario, servers: contextlib.AsyncExitStack) -> None:
    """Starts the projectors, cameras, boards and BLE sensors; they run until `servers`
    closes."""
    lamp_clock = scaled_clock(scenario.time_scale)
    for projector in scenario.projectors:
        server = await servers.enter_async_context(serve_projector(projector, lamp_clock))
        log.info("projector %s: PJLink on %s", projector.id, server.address)
    for camera in scenario.cameras:
        running = await servers.enter_async_context(serve_camera(camera))
        log.info("camera %s: ONVIF %s, RTSP %s", camera.id, running.onvif_url, running.rtsp_url)
    for board in scenario.boards:
        await servers.enter_async_context(run_board(board))
        log.info(
            "board %s: MQTT %s on %s",
            board.id,
            board.base_topic,
            host_port(board.broker_host, board.broker_port),
        )
    if scenario.ble_sensors:
        await _serve_ble(scenario, servers)


async def _serve_ble(scenario: Scenario, servers: contextlib.AsyncExitStack) -> None:
    """A private D-Bus system bus with a mock BlueZ, the sensors advertising on it; the line
    to give the agent (DBUS_SYSTEM_BUS_ADDRESS=…) goes to the log and to stdout."""
    from simulator.ble import serve

    workdir = scenario.ble_workdir
    if workdir is None:
        workdir = Path(servers.enter_context(tempfile.TemporaryDirectory(prefix="campus-ble-")))
    workdir.mkdir(parents=True, exist_ok=True)

    ready = asyncio.Event()

    def announce(line: str) -> None:
        log.info("BLE sensors on a mock BlueZ: give the agent %s", line)
        print(line, flush=True)
        ready.set()

    task = asyncio.create_task(serve(workdir, scenario.ble_sensors, announce), name="ble")
    servers.push_async_callback(_cancel, task)
    waiting = asyncio.create_task(ready.wait())
    await asyncio.wait({task, waiting}, return_when=asyncio.FIRST_COMPLETED)
    waiting.cancel()
    if task.done():  # ended before its bus was up: say why
        error = task.exception()
        raise ListenError(f"the mock BlueZ for the BLE sensors did not start: {error}")


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _serve_modbus(
    endpoints: dict[str, list[SimulatedModbusDevice]],
    buses: dict[str, RtuBus],
    stack: contextlib.ExitStack,
) -> None:
    """Serves the Modbus endpoints until cancelled (and waits the same way when there is none)."""
    if not endpoints:
        await asyncio.Event().wait()
        return
    async with asyncio.TaskGroup() as group:
        for endpoint, devices in endpoints.items():
            kind, _, where = endpoint.partition(":")
            if kind == "tcp":
                host, _, port = where.rpartition(":")
                group.create_task(serve_tcp(devices, host, int(port)), name=endpoint)
            else:
                bus = buses[where]
                port_path = stack.enter_context(pty_pair(bus))
                group.create_task(serve_rtu(devices, str(port_path), bus.baudrate), name=endpoint)
