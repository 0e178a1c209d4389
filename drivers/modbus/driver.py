"""Modbus TCP driver: polls a profile's points with the fewest requests and decodes them.

Connections to one host:port are shared by every device (unit id) behind it, and the transport
serialises requests on them.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from drivers.base import Driver, PollResult
from drivers.modbus.codec import Table, decode_value
from drivers.modbus.plan import PointRef, ReadBlock, plan_reads, slice_block
from drivers.modbus.transport import ModbusTcpClient
from drivers.profiles import ModbusPoint, Profile


class ModbusTcpConnection(BaseModel):
    """`connection:` of a Modbus TCP device in the agent config."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    type: Literal["modbus-tcp"]
    host: str
    port: Annotated[int, Field(ge=1, le=65535)] = 502
    unit: Annotated[int, Field(ge=0, le=255)] = 1
    timeout_s: Annotated[float, Field(gt=0, le=60)] = 2.0


class ModbusTcpPool:
    """One client per host:port, shared by the devices behind it."""

    def __init__(self) -> None:
        self._clients: dict[tuple[str, int], ModbusTcpClient] = {}

    def client(self, connection: ModbusTcpConnection) -> ModbusTcpClient:
        key = (connection.host, connection.port)
        if key not in self._clients:
            self._clients[key] = ModbusTcpClient(
                connection.host, connection.port, timeout=connection.timeout_s
            )
        return self._clients[key]

    async def close(self) -> None:
        for client in self._clients.values():
            await client.close()
        self._clients.clear()


def decode_point(point: ModbusPoint, raw: tuple[int, ...] | tuple[bool, ...]) -> int | float | bool:
    if point.table in (Table.COIL, Table.DISCRETE):
        return bool(raw[0])
    return point.to_engineering(decode_value([int(r) for r in raw], point.type, point.word_order))


def check_range(point: ModbusPoint, value: int | float | bool) -> str | None:
    """Why a decoded value cannot be true, or None when it is plausible."""
    if isinstance(value, bool):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return f"{value} is not a finite number"
    shown = f"{value} {point.unit}".rstrip()
    if point.min is not None and value < point.min:
        return f"{shown} is below the profile's minimum {point.min}"
    if point.max is not None and value > point.max:
        return f"{shown} is above the profile's maximum {point.max}"
    return None


class ModbusTcpDriver(Driver):
    def __init__(self, profile: Profile, connection: ModbusTcpConnection, pool: ModbusTcpPool):
        self.profile = profile
        self.connection = connection
        self.bus = f"modbus-tcp://{connection.host}:{connection.port}"
        self._client = pool.client(connection)
        self._points = {point.name: point for point in profile.points}
        self._blocks: list[ReadBlock] = plan_reads(
            PointRef(p.name, p.table, p.address, p.count) for p in profile.points
        )

    async def open(self) -> None:
        await self._client.connect()

    async def read(self) -> PollResult:
        result = PollResult()
        for block in self._blocks:
            raw = await self._client.read(
                self.connection.unit, block.table, block.address, block.count
            )
            for name, words in slice_block(block, raw).items():
                point = self._points[name]
                try:
                    value = decode_point(point, words)
                except ValueError as exc:
                    result.rejected.append((name, str(exc)))
                    continue
                problem = check_range(point, value)
                if problem is None:
                    result.values.append((name, value))
                else:
                    result.rejected.append((name, problem))
        return result

    async def close(self) -> None:
        await self._client.close()
