"""The Modbus part of a firmware profile: where each point lives in the register map and how
registers become its value (type, word and byte order, scaling), and commands that write points
or fixed values. The shape follows EdgeX device profiles."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from drivers.modbus.codec import DataType, Table, WordOrder, register_count
from drivers.profile_base import CommandBase, PointBase, PointName, ProfileBase

NUMERIC = {t.value for t in DataType}


class PointType(StrEnum):
    INT16 = "int16"
    UINT16 = "uint16"
    INT32 = "int32"
    UINT32 = "uint32"
    INT64 = "int64"
    UINT64 = "uint64"
    FLOAT32 = "float32"
    FLOAT64 = "float64"
    BOOL = "bool"  # a coil, a discrete input, or one `bit` of a register
    BITFIELD = "bitfield"  # a 16-bit register of flags, named in `bits`
    STRING = "string"  # `length` registers of text, two characters each

    @property
    def numeric(self) -> bool:
        return self.value in NUMERIC


class ByteOrder(StrEnum):
    """Order of the two bytes inside each register ('little' = swapped, as some meters do)."""

    BIG = "big"
    LITTLE = "little"


class ModbusPoint(PointBase):
    """One value a device exposes: where it lives and how registers become that value."""

    table: Table
    address: Annotated[int, Field(ge=0, le=65535)]
    type: PointType | None = Field(
        None, description="default: uint16 in register tables, bool in bit tables"
    )
    word_order: WordOrder = WordOrder.BIG
    byte_order: ByteOrder = ByteOrder.BIG
    bit: Annotated[int, Field(ge=0, le=15)] | None = Field(
        None, description="for a bool kept in one bit of a register"
    )
    bits: dict[Annotated[int, Field(ge=0, le=15)], PointName] | None = Field(
        None, description="for a bitfield: bit number -> flag name"
    )
    length: Annotated[int, Field(ge=1, le=125)] | None = Field(
        None, description="for a string: registers it spans"
    )
    scale: float = 1.0
    offset: float = 0.0
    access: Literal["read", "read-write"] = "read"

    @property
    def kind(self) -> PointType:
        if self.type is not None:
            return self.type
        return PointType.BOOL if self.table.is_bits else PointType.UINT16

    @property
    def count(self) -> int:
        """Registers (or bits) this point occupies."""
        kind = self.kind
        if self.table.is_bits or kind in (PointType.BOOL, PointType.BITFIELD):
            return 1
        if kind is PointType.STRING:
            return self.length or 0
        return register_count(DataType(kind.value))

    @property
    def writable(self) -> bool:
        return self.access == "read-write"

    @model_validator(mode="after")
    def _consistent(self) -> ModbusPoint:
        kind = self.kind
        if self.table.is_bits and kind is not PointType.BOOL:
            raise ValueError(f"a point in the {self.table} table is a bool, not {kind}")
        if (self.bit is not None) != (kind is PointType.BOOL and not self.table.is_bits):
            raise ValueError("'bit' is needed by, and only by, a bool kept in a register")
        if self.bit is not None and self.byte_order is ByteOrder.LITTLE:
            raise ValueError("give 'bit' as numbered after the byte swap: use byte_order big")
        if (self.bits is not None) != (kind is PointType.BITFIELD):
            raise ValueError("'bits' is needed by, and only by, a bitfield")
        if (self.length is not None) != (kind is PointType.STRING):
            raise ValueError("'length' is needed by, and only by, a string")
        numeric = kind.numeric
        if not numeric and (self.scale != 1.0 or self.offset != 0.0):
            raise ValueError(f"scale and offset apply to numbers, not to a {kind}")
        if not numeric and (self.min is not None or self.max is not None or self.alarm):
            raise ValueError(f"min, max and alarm apply to numbers, not to a {kind}")
        if self.scale == 0:
            raise ValueError("scale must not be 0")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min {self.min} is above max {self.max}")
        if self.address + self.count - 1 > 65535:
            raise ValueError(f"{kind} at {self.address} runs past register 65535")
        if self.writable and self.table in (Table.INPUT, Table.DISCRETE):
            raise ValueError(f"a point in the {self.table} table cannot be read-write")
        return self

    def to_engineering(self, raw: float | int) -> float | int:
        """Raw register value → value in `unit` (`raw * scale + offset`)."""
        if self.scale == 1.0 and self.offset == 0.0:
            return raw
        return round(raw * self.scale + self.offset, 6)

    def to_raw(self, value: float) -> float:
        return (value - self.offset) / self.scale


class Command(CommandBase):
    """A named write: to a read-write point (the argument is in its unit), or a fixed raw value
    to a register or coil (e.g. 'reset energy counter' = write 0x0003 to holding 0xF010)."""

    point: PointName | None = None
    table: Literal[Table.HOLDING, Table.COIL] | None = None
    address: Annotated[int, Field(ge=0, le=65535)] | None = None
    value: int | None = Field(
        None,
        description="what a fixed command writes: raw for a table + address, in the point's "
        "unit for a point",
    )
    readback: bool = Field(True, description="read the target again and compare")

    @model_validator(mode="after")
    def _one_target(self) -> Command:
        raw = self.table is not None or self.address is not None
        if (self.point is None) == (not raw):
            raise ValueError("a command writes either to a 'point' or to a 'table' + 'address'")
        if raw and (self.table is None or self.address is None):
            raise ValueError("a raw command needs both 'table' and 'address'")
        if raw and (self.value is None) == (self.argument is None):
            raise ValueError("a raw command needs either a fixed 'value' or an 'argument'")
        if self.point is not None and (self.value is None) == (self.argument is None):
            raise ValueError("a point command needs either a fixed 'value' or an 'argument'")
        return self


class ModbusProfile(ProfileBase):
    protocol: Literal["modbus"]
    max_read_registers: Annotated[int, Field(ge=1, le=125)] = Field(
        125, description="the most registers the device answers in one read request"
    )
    write_multiple_only: bool = Field(
        False, description="the device refuses FC06: write every register with FC16"
    )
    points: Annotated[list[ModbusPoint], Field(min_length=1)]
    commands: list[Command] = Field(default_factory=list)

    @model_validator(mode="after")
    def _points_fit_one_read(self) -> ModbusProfile:
        for point in self.points:
            if not point.table.is_bits and point.count > self.max_read_registers:
                raise ValueError(
                    f"point {point.name!r} spans {point.count} registers, more than "
                    f"max_read_registers {self.max_read_registers}"
                )
        return self

    @field_validator("points")
    @classmethod
    def _points_do_not_clash(cls, points: list[ModbusPoint]) -> list[ModbusPoint]:
        names: set[str] = set()
        # (table, address) -> [(bit mask, point)]: flags may share a register, bit by bit
        taken: dict[tuple[Table, int], list[tuple[int, str]]] = {}
        for point in points:
            if point.name in names:
                raise ValueError(f"point name {point.name!r} is used twice")
            names.add(point.name)
            mask = 0xFFFF if point.bit is None else 1 << point.bit
            for address in range(point.address, point.address + point.count):
                owners = taken.setdefault((point.table, address), [])
                for other_mask, other in owners:
                    if other_mask & mask:
                        raise ValueError(
                            f"points {other!r} and {point.name!r} overlap at "
                            f"{point.table} {address}"
                        )
                owners.append((mask, point.name))
        return points

    @model_validator(mode="after")
    def _commands_fit_points(self) -> ModbusProfile:
        for command in self.commands:
            if command.point is None:
                continue
            point = next((p for p in self.points if p.name == command.point), None)
            if point is None:
                raise ValueError(f"command {command.name!r}: no point {command.point!r}")
            if not point.writable:
                raise ValueError(
                    f"command {command.name!r}: point {point.name!r} is not read-write"
                )
        return self

    def point(self, name: str) -> ModbusPoint:
        for point in self.points:
            if point.name == name:
                return point
        raise KeyError(name)

    def command(self, name: str) -> Command:
        found = super().command(name)  # KeyError naming the known commands
        assert isinstance(found, Command)
        return found
