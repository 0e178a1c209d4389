"""Serves simulated devices over Modbus TCP or RTU with pymodbus (an independent stack).

Registers are laid out exactly as each device's profile says. Every read refreshes the read-only
points from the device's value model first; read-write points keep what was last written. Faults
are applied where a real device shows them: `slow`, `exception`, `stuck` and `noisy` on the
request, `offline` (silence), `wrong_unit` and `garbled` on the bytes that leave the server.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from pymodbus import FramerType
from pymodbus.constants import ExcCodes
from pymodbus.server import ModbusSerialServer, ModbusTcpServer
from pymodbus.simulator import DataType as SimType
from pymodbus.simulator import SimData, SimDevice

from drivers.base import Value
from drivers.modbus.codec import Table, crc16
from drivers.modbus.points import clip_to_type, encode_point
from drivers.modbus.profile import ModbusProfile, PointType
from simulator.values import DeviceValues

log = logging.getLogger(__name__)

FaultKind = Literal[
    "none", "offline", "slow", "exception", "stuck", "noisy", "wrong_unit", "garbled"
]
GAP_FILLED = 16
_READ_TABLE = {1: Table.COIL, 2: Table.DISCRETE, 3: Table.HOLDING, 4: Table.INPUT}


@dataclass
class Fault:
    kind: FaultKind = "none"
    delay_s: float = 0.5  # slow
    code: int = int(ExcCodes.DEVICE_FAILURE)  # exception
    spread: float = 0.3  # noisy: relative noise; one read in five is far out of range


class SimulatedModbusDevice:
    def __init__(
        self,
        profile: ModbusProfile,
        values: DeviceValues,
        *,
        unit: int = 1,
        clock: Callable[[], float] = time.time,
        fault: Fault | None = None,
    ) -> None:
        self.profile = profile
        self.model = values
        self.unit = unit
        self.clock = clock
        self.fault = fault or Fault()
        self.reads = 0
        self.writes = 0
        self.overrides: dict[str, Value] = {}
        self._stuck: dict[str, Value] | None = None
        self._rng = random.Random(unit)

    def current_values(self) -> dict[str, Value]:
        if self.fault.kind == "stuck":
            if self._stuck is None:
                self._stuck = self.model.values()
            return {**self._stuck, **self.overrides}
        self._stuck = None
        self.model.advance(self.clock())
        values = {**self.model.values(), **self.overrides}
        if self.fault.kind == "noisy":
            for name, value in values.items():
                if isinstance(value, float):
                    spike = 100.0 if self._rng.random() < 0.2 else 1.0
                    values[name] = value * (1 + self._rng.gauss(0, self.fault.spread)) * spike
        return values

    def register_image(self, table: Table, *, writable: bool = False) -> dict[int, int]:
        """address → register for the points of `table` (read-only ones, or all)."""
        values = self.current_values()
        image: dict[int, int] = {}
        for point in self.profile.points:
            if point.table != table or point.table.is_bits or (point.writable and not writable):
                continue
            if point.kind is PointType.BOOL:  # flags share registers: OR them in
                if values.get(point.name):
                    assert point.bit is not None
                    image[point.address] = image.get(point.address, 0) | 1 << point.bit
                continue
            value = values.get(point.name, 0.0)
            if point.kind.numeric:
                value = clip_to_type(point, float(value))
            registers = encode_point(point, value)
            assert isinstance(registers, list)
            for offset, register in enumerate(registers):
                image[point.address + offset] = register
        return image

    def sim_device(self) -> SimDevice:
        def block(table: Table) -> list[SimData]:
            spans = sorted(
                [(p.address, p.count) for p in self.profile.points if p.table == table]
                + [  # registers that only commands write to exist on the device too
                    (c.address, 1)
                    for c in self.profile.commands
                    if c.table == table and c.address is not None
                ]
            )
            datatype = SimType.BITS if table.is_bits else SimType.REGISTERS
            if not spans:
                return [SimData(0, count=1, datatype=datatype, values=0)]
            if table.is_bits:
                end = max(address + count for address, count in spans)
                return [SimData(0, count=end, datatype=datatype, values=False)]
            # Runs of registers; gaps up to GAP_FILLED read as 0 (so coalesced reads work),
            # wider gaps are unmapped and answer 'illegal data address', as on real devices.
            image = self.register_image(table, writable=True)
            runs: list[list[int]] = []
            for address, count in spans:
                if runs and address - runs[-1][1] <= GAP_FILLED:
                    runs[-1][1] = max(runs[-1][1], address + count)
                else:
                    runs.append([address, address + count])
            return [
                SimData(
                    start,
                    datatype=datatype,
                    values=[image.get(address, 0) for address in range(start, end)],
                )
                for start, end in runs
            ]

        return SimDevice(
            id=self.unit,
            simdata=(
                block(Table.COIL),
                block(Table.DISCRETE),
                block(Table.HOLDING),
                block(Table.INPUT),
            ),
            action=self._on_access,
        )

    async def _on_access(
        self,
        function_code: int,
        start_address: int,
        address: int,
        count: int,
        registers: list[int],
        set_values: list[int] | list[bool] | None,
    ) -> ExcCodes | None:
        kind = self.fault.kind
        if kind == "slow":
            await asyncio.sleep(self.fault.delay_s)
        if kind == "exception":
            return ExcCodes(self.fault.code)
        if set_values is not None:
            self.writes += 1
            return None
        table = _READ_TABLE.get(function_code)
        if table is None or table.is_bits:
            return None
        self.reads += 1
        for register_address, register in self.register_image(table).items():
            index = register_address - start_address
            if 0 <= index < len(registers):
                registers[index] = register
        return None


class PacketFaults:
    """Applies byte-level faults to responses leaving a server, by unit id (pymodbus's
    trace_packet hook): silence for `offline`, another unit id for `wrong_unit`, a flipped
    byte for `garbled`."""

    def __init__(self, devices: list[SimulatedModbusDevice], rtu: bool) -> None:
        self.devices = {device.unit: device for device in devices}
        self.rtu = rtu

    def __call__(self, sending: bool, packet: bytes) -> bytes:
        if not sending or not packet:
            return packet
        unit_at = 0 if self.rtu else 6
        if len(packet) <= unit_at:
            return packet
        device = self.devices.get(packet[unit_at]) or self.devices.get(0)
        kind = device.fault.kind if device is not None else "none"
        if kind == "offline":
            return b""
        if kind == "wrong_unit":
            frame = bytearray(packet)
            frame[unit_at] = (frame[unit_at] % 247) + 1
            return self._with_crc(frame)
        if kind == "garbled":  # RTU: a data byte (the CRC catches it); TCP: the protocol id
            frame = bytearray(packet)
            frame[-3 if self.rtu else 2] ^= 0x5A
            return bytes(frame)
        return packet

    def _with_crc(self, frame: bytearray) -> bytes:
        if not self.rtu:
            return bytes(frame)
        body = bytes(frame[:-2])
        return body + crc16(body).to_bytes(2, "little")


class ListenError(OSError):
    """The simulator could not listen where the scenario says (port taken, address missing)."""


async def serve_tcp(devices: list[SimulatedModbusDevice], host: str, port: int) -> None:
    """Serves the devices (one per unit id) on one TCP port until cancelled."""
    server = ModbusTcpServer(
        [d.sim_device() for d in devices],
        address=(host, port),
        trace_packet=PacketFaults(devices, rtu=False),
    )
    where = f"listening on {host} port {port}"
    await _serve(server, devices, where, f"cannot listen on {host} port {port}")


async def serve_rtu(devices: list[SimulatedModbusDevice], port: str, baudrate: int) -> None:
    """Serves the devices (one per unit id) on one serial line until cancelled."""
    server = ModbusSerialServer(
        [d.sim_device() for d in devices],
        framer=FramerType.RTU,
        port=port,
        baudrate=baudrate,
        trace_packet=PacketFaults(devices, rtu=True),
    )
    await _serve(server, devices, f"on serial line {port}", f"cannot open serial line {port}")


async def _serve(
    server: ModbusTcpServer | ModbusSerialServer,
    devices: list[SimulatedModbusDevice],
    where: str,
    failure: str,
) -> None:
    try:
        await server.serve_forever(background=True)
    except RuntimeError as exc:
        raise ListenError(f"{failure}: {exc}") from None
    for device in devices:
        log.info("%s (%s) %s, unit %d", device.profile.model, device.profile.id, where, device.unit)
    await _serve_until_cancelled(server)


async def _serve_until_cancelled(server: ModbusTcpServer | ModbusSerialServer) -> None:
    try:
        await asyncio.Event().wait()
    finally:
        await asyncio.shield(server.shutdown())  # type: ignore[no-untyped-call]
