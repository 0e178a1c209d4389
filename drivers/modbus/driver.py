"""Modbus driver (TCP and RTU): polls a profile's due points with the fewest requests, decodes
them, and writes points and commands with read-back.

Rules: one client per TCP peer or serial port, shared by every device (unit id) behind it, so
requests on one bus never overlap. A device that times out is tried again once within the same
poll only if it was answering until then: a dead device holds its bus for one timeout per poll,
no longer. An exception response for one block marks that block's points rejected; the other
blocks are still read.
"""

from __future__ import annotations

import math
import struct
import time
from typing import Annotated, Any, Literal, Protocol

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from drivers.base import Driver, PollResult, Value
from drivers.errors import DeviceTimeout, DriverError
from drivers.modbus.codec import (
    ModbusCrcError,
    ModbusExceptionResponse,
    ModbusFrameError,
    Table,
)
from drivers.modbus.plan import PointRef, ReadBlock, plan_reads
from drivers.modbus.points import (
    Decoder,
    check_range,
    encode_point,
    point_decoder,
)
from drivers.modbus.profile import ModbusPoint, ModbusProfile, PointType
from drivers.modbus.transport import ModbusTcpClient
from drivers.profile_base import to_bool
from wire.net import bare_host


class ModbusTcpConnection(BaseModel):
    """`connection:` of a Modbus TCP device in the agent config."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    type: Literal["modbus-tcp"]
    host: Annotated[str, AfterValidator(bare_host)]
    port: Annotated[int, Field(ge=1, le=65535)] = 502
    unit: Annotated[int, Field(ge=0, le=255)] = 1
    timeout_s: Annotated[float, Field(gt=0, le=60)] = 2.0
    retries: Annotated[int, Field(ge=0, le=5)] = 1
    max_gap: Annotated[int, Field(ge=0, le=124)] = 8


class ModbusRtuConnection(BaseModel):
    """`connection:` of a Modbus RTU device on a serial port (RS-485)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    type: Literal["modbus-rtu"]
    port: str = Field(description="serial device, e.g. /dev/ttyUSB0")
    baudrate: Literal[1200, 2400, 4800, 9600, 19200, 38400, 57600, 115200] = 9600
    parity: Literal["N", "E", "O"] = "N"
    stopbits: Literal[1, 2] = 1
    unit: Annotated[int, Field(ge=1, le=247)] = 1
    timeout_s: Annotated[float, Field(gt=0, le=60)] = 1.0
    retries: Annotated[int, Field(ge=0, le=5)] = 1
    max_gap: Annotated[int, Field(ge=0, le=124)] = 8

    def line(self) -> tuple[int, str, int]:
        return (self.baudrate, self.parity, self.stopbits)


class ModbusClient(Protocol):
    address: str
    timeout: float

    async def connect(self) -> None: ...

    async def close(self) -> None: ...

    async def read(
        self, unit: int, table: Table, address: int, count: int
    ) -> tuple[int, ...] | tuple[bool, ...]: ...

    async def write_registers(self, unit: int, address: int, values: list[int]) -> None: ...

    async def write_register(self, unit: int, address: int, value: int) -> None: ...

    async def write_coil(self, unit: int, address: int, value: bool) -> None: ...


class ModbusPool:
    """One client per TCP peer or serial port, shared by the devices behind it."""

    def __init__(self) -> None:
        self._clients: dict[str, ModbusClient] = {}
        self._lines: dict[str, tuple[int, str, int]] = {}

    def client(self, connection: ModbusTcpConnection | ModbusRtuConnection) -> ModbusClient:
        """The shared client; devices behind one client wait as long as the slowest of them
        (the longest `timeout_s`), so that none is cut short by a bus mate's setting."""
        client = self._client(connection)
        client.timeout = max(client.timeout, connection.timeout_s)
        return client

    def _client(self, connection: ModbusTcpConnection | ModbusRtuConnection) -> ModbusClient:
        if isinstance(connection, ModbusTcpConnection):
            key = f"tcp://{connection.host}:{connection.port}"
            if key not in self._clients:
                self._clients[key] = ModbusTcpClient(
                    connection.host, connection.port, timeout=connection.timeout_s
                )
            return self._clients[key]
        key = f"rtu://{connection.port}"
        if key in self._lines and self._lines[key] != connection.line():
            raise DriverError(
                f"{connection.port}: devices on one serial line need the same baud rate, "
                f"parity and stop bits ({self._lines[key]} vs {connection.line()})"
            )
        if key not in self._clients:
            from drivers.modbus.rtu import ModbusRtuClient

            self._clients[key] = ModbusRtuClient(
                connection.port,
                baudrate=connection.baudrate,
                parity=connection.parity,
                stopbits=connection.stopbits,
                timeout=connection.timeout_s,
            )
            self._lines[key] = connection.line()
        return self._clients[key]

    async def close(self) -> None:
        for client in self._clients.values():
            await client.close()
        self._clients.clear()


_Member = tuple[str, int, int, Decoder, ModbusPoint | None, float | None]


class ModbusDriver(Driver):
    def __init__(
        self,
        profile: ModbusProfile,
        connection: ModbusTcpConnection | ModbusRtuConnection,
        pool: ModbusPool,
        *,
        coalesce: bool = True,
    ) -> None:
        self.profile = profile
        self.connection = connection
        self.unit = connection.unit
        self._client = pool.client(connection)
        self.bus = self._client.address
        self._points = {point.name: point for point in profile.points}
        self._decoders = {point.name: point_decoder(point) for point in profile.points}
        self._checked = {
            point.name: point
            for point in profile.points
            if point.min is not None or point.max is not None or point.kind.value.startswith("f")
        }
        self._max_gap = connection.max_gap if coalesce else 0
        self._max_registers = profile.max_read_registers if coalesce else 1
        self._plans: dict[frozenset[str], list[ReadBlock]] = {}
        self._all_points = frozenset(self._points)
        self._scheduled = any(p.poll_interval_s is not None for p in profile.points)
        self._layouts: dict[ReadBlock, list[_Member]] = {}
        self._next_due: dict[str, float] = {}
        self._answering = True
        self.requests = 0

    def _plan(self, names: frozenset[str]) -> list[ReadBlock]:
        if names not in self._plans:
            refs = [
                PointRef(p.name, p.table, p.address, p.count)
                for p in self.profile.points
                if p.name in names
            ]
            self._plans[names] = plan_reads(
                refs,
                max_registers=max(self._max_registers, max(r.count for r in refs)),
                max_gap=self._max_gap,
            )
        return self._plans[names]

    def due_points(self, now: float) -> frozenset[str]:
        if not self._scheduled:
            return self._all_points
        return frozenset(
            p.name
            for p in self.profile.points
            if p.poll_interval_s is None or now >= self._next_due.get(p.name, 0.0)
        )

    def _layout(self, block: ReadBlock) -> list[_Member]:
        """Where each member sits in the block's answer, with its decoder: worked out once."""
        layout = self._layouts.get(block)
        if layout is None:
            layout = self._layouts[block] = [
                (
                    member.key,
                    member.address - block.address,
                    member.address - block.address + member.count,
                    self._decoders[member.key],
                    self._checked.get(member.key),
                    self._points[member.key].poll_interval_s,
                )
                for member in block.members
            ]
        return layout

    async def open(self) -> None:
        await self._client.connect()

    async def _request(self, block: ReadBlock) -> tuple[int, ...] | tuple[bool, ...]:
        attempts = 1 + (self.connection.retries if self._answering else 0)
        for attempt in range(attempts):
            try:
                self.requests += 1
                raw = await self._client.read(self.unit, block.table, block.address, block.count)
            except (DeviceTimeout, ModbusCrcError):  # no answer, or one garbled by line noise
                if attempt + 1 == attempts:
                    self._answering = False
                    raise
                continue
            self._answering = True
            return raw
        raise AssertionError("unreachable")

    async def read(self) -> PollResult:
        now = time.monotonic()
        due = self.due_points(now)
        result = PollResult()
        if not due:
            return result
        plan = self._plan(due)
        refused: list[ModbusExceptionResponse] = []
        scheduled: list[tuple[str, float]] = []  # applied only if the whole poll succeeds
        for block in plan:
            try:
                raw = await self._request(block)
            except ModbusExceptionResponse as exc:
                refused.append(exc)
                result.rejected.extend((member.key, str(exc)) for member in block.members)
                continue
            if len(raw) != block.count:
                raise ModbusFrameError(f"asked for {block.count} items, got {len(raw)}")
            for name, start, end, decode, checked, interval in self._layout(block):
                try:
                    value = decode(raw[start:end])
                except (ValueError, UnicodeDecodeError, struct.error) as exc:
                    result.rejected.append((name, str(exc)))
                    continue
                problem = None if checked is None else check_range(checked, value)
                if problem is None:
                    result.values.append((name, value))
                else:
                    result.rejected.append((name, problem))
                if interval is not None:
                    scheduled.append((name, now + interval))
        if len(refused) == len(plan):
            raise refused[0]  # refusing everything is a device fault, not a few bad points
        self._next_due.update(scheduled)
        return result

    async def read_point(self, point: ModbusPoint) -> Value:
        raw = await self._client.read(self.unit, point.table, point.address, point.count)
        return self._decoders[point.name](raw)

    async def write(self, name: str, value: Value, *, readback: bool = True) -> Value:
        """Writes a read-write point (engineering units), reads it back, and returns what the
        device now holds. ValueError: the request is wrong (nothing written); DriverError: the
        device failed or kept another value."""
        point = self._points.get(name)
        if point is None:
            raise ValueError(f"{self.profile.id} has no point {name!r}")
        if not point.writable:
            raise ValueError(f"{self.profile.id} point {name!r} is read-only")
        if point.kind is PointType.BOOL:
            value = to_bool(value)
        problem = check_range(point, value)
        if problem is not None:
            raise ValueError(f"{name}: {problem}")
        await self._write_raw(point, value)
        if not readback:
            return value
        written = await self.read_point(point)
        if not self._holds(point, written, value):
            raise DriverError(f"{name}: wrote {value!r}, the device reads back {written!r}")
        return written

    def _holds(self, point: ModbusPoint, read: Value, wanted: Value) -> bool:
        """Whether the device holds `wanted` as well as its registers can: the comparison is
        with `wanted` put through the same encoding (rounding to the register's step)."""
        if point.kind.numeric and not point.table.is_bits:
            registers = encode_point(point, wanted)
            assert isinstance(registers, list)
            stored = self._decoders[point.name](registers)
            return math.isclose(float(read), float(stored), rel_tol=1e-9, abs_tol=1e-9)
        return read == wanted

    async def _write_raw(self, point: ModbusPoint, value: Value) -> None:
        if point.table is Table.COIL:
            await self._client.write_coil(self.unit, point.address, bool(value))
            return
        if point.kind is PointType.BOOL:  # one bit of a register: read, modify, write
            assert point.bit is not None
            (current,) = await self._client.read(self.unit, point.table, point.address, 1)
            mask = 1 << point.bit
            new = (int(current) | mask) if value else (int(current) & ~mask)
            await self._write_registers(point.address, [new])
            return
        registers = encode_point(point, value)
        assert isinstance(registers, list)
        await self._write_registers(point.address, registers)

    async def _write_registers(self, address: int, registers: list[int]) -> None:
        if len(registers) == 1 and not self.profile.write_multiple_only:
            await self._client.write_register(self.unit, address, registers[0])
        else:
            await self._client.write_registers(self.unit, address, registers)

    async def command(
        self, name: str, argument: Any = None, options: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """Runs a profile command; ValueError for a bad argument (nothing written)."""
        command = self.profile.command(name)
        command.check_options(options)
        value: Value
        if command.argument is not None:
            value = command.check_argument(argument)
        else:
            command.check_argument(argument)
            assert command.value is not None
            value = command.value
        if command.point is not None:
            written = await self.write(command.point, value, readback=command.readback)
            return {"command": name, "point": command.point, "value": written}
        assert command.table is not None and command.address is not None
        if command.table is Table.COIL:
            await self._client.write_coil(self.unit, command.address, bool(value))
        else:
            await self._write_registers(command.address, [int(value)])
        result: dict[str, Any] = {"command": name, "address": command.address, "value": value}
        if command.readback:
            (back,) = await self._client.read(self.unit, command.table, command.address, 1)
            result["readback"] = back if isinstance(back, bool) else int(back)
        return result

    async def close(self) -> None:
        await self._client.close()


Pool = ModbusPool


def build(
    profile: ModbusProfile, connection: ModbusTcpConnection | ModbusRtuConnection, pool: ModbusPool
) -> ModbusDriver:
    return ModbusDriver(profile, connection, pool)
