"""Serves a simulated device's profile over Modbus TCP with pymodbus (an independent stack).

Registers are laid out exactly as the profile says; each read refreshes them from the classroom
model first, so every answer carries current values encoded with the profile's types and scaling.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType as SimType
from pymodbus.simulator import SimData, SimDevice

from drivers.modbus.codec import DataType, Table, encode_value
from drivers.profiles import ModbusPoint, Profile
from simulator.model import ClassroomAir

log = logging.getLogger(__name__)

_INT_LIMITS = {
    DataType.INT16: (-(2**15), 2**15 - 1),
    DataType.UINT16: (0, 2**16 - 1),
    DataType.INT32: (-(2**31), 2**31 - 1),
    DataType.UINT32: (0, 2**32 - 1),
    DataType.INT64: (-(2**63), 2**63 - 1),
    DataType.UINT64: (0, 2**64 - 1),
}
_READ_TABLE = {3: Table.HOLDING, 4: Table.INPUT}


def point_registers(point: ModbusPoint, value: float) -> list[int]:
    """A value in engineering units → the registers the device would hold (clipped to its type)."""
    raw = point.to_raw(value)
    if point.type in _INT_LIMITS:
        low, high = _INT_LIMITS[point.type]
        raw = min(max(round(raw), low), high)
    return encode_value(raw, point.type, point.word_order)


class SimulatedModbusDevice:
    def __init__(
        self,
        profile: Profile,
        air: ClassroomAir,
        *,
        unit: int = 1,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.profile = profile
        self.air = air
        self.unit = unit
        self.clock = clock
        self.reads = 0
        self.overrides: dict[str, float] = {}

    def register_image(self, table: Table) -> dict[int, int]:
        """address → register for every point of `table`, from the model's current values."""
        values = self.air.values()
        image: dict[int, int] = {}
        for point in self.profile.points:
            if point.table != table:
                continue
            value = self.overrides.get(point.name, values.get(point.name, 0.0))
            for offset, register in enumerate(point_registers(point, value)):
                image[point.address + offset] = register
        return image

    def sim_device(self) -> SimDevice:
        def block(table: Table, datatype: SimType) -> list[SimData]:
            points = [p for p in self.profile.points if p.table == table]
            if not points:
                return [SimData(0, count=1, datatype=datatype, values=0)]
            end = max(p.address + p.count for p in points)
            return [SimData(0, count=end, datatype=datatype, values=0)]

        return SimDevice(
            id=self.unit,
            simdata=(
                block(Table.COIL, SimType.BITS),
                block(Table.DISCRETE, SimType.BITS),
                block(Table.HOLDING, SimType.REGISTERS),
                block(Table.INPUT, SimType.REGISTERS),
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
    ) -> None:
        table = _READ_TABLE.get(function_code)
        if set_values is not None or table is None:
            return
        self.reads += 1
        self.air.advance(self.clock())
        for register_address, register in self.register_image(table).items():
            index = register_address - start_address
            if 0 <= index < len(registers):
                registers[index] = register


class ListenError(OSError):
    """The simulator could not listen where the scenario says (port taken, address missing)."""


async def serve_modbus_tcp(device: SimulatedModbusDevice, host: str, port: int) -> None:
    """Listens, logs one 'listening' line, then serves until cancelled."""
    server = ModbusTcpServer(device.sim_device(), address=(host, port))
    try:
        await server.serve_forever(background=True)
    except RuntimeError as exc:
        raise ListenError(f"cannot listen on {host} port {port}: {exc}") from None
    log.info(
        "%s (%s) listening on %s port %d, unit %d",
        device.profile.model,
        device.profile.id,
        host,
        port,
        device.unit,
    )
    try:
        await asyncio.Event().wait()
    finally:
        await asyncio.shield(server.shutdown())  # type: ignore[no-untyped-call]
