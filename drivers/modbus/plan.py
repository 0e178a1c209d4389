"""Read planning, pure: cover a device's points with the fewest Modbus reads.

Points of one table share a read when at most `max_gap` unread items lie between them and the read
stays within `max_registers` (`max_bits` for coils and discrete inputs); a point is never split.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from drivers.modbus.codec import MAX_READ_BITS, MAX_READ_REGISTERS, ModbusRequestError, Table

_V = TypeVar("_V", bound=int)


@dataclass(frozen=True, slots=True)
class PointRef:
    key: str
    table: Table
    address: int
    count: int = 1


@dataclass(frozen=True, slots=True)
class ReadBlock:
    table: Table
    address: int
    count: int
    members: tuple[PointRef, ...]


def plan_reads(
    points: Iterable[PointRef],
    max_registers: int = MAX_READ_REGISTERS,
    max_gap: int = 8,
    *,
    max_bits: int = MAX_READ_BITS,
) -> list[ReadBlock]:
    """Reads covering every point, ordered by table then address; members sorted by address."""
    _check_limit("max_registers", max_registers, MAX_READ_REGISTERS)
    _check_limit("max_bits", max_bits, MAX_READ_BITS)
    if max_gap < 0:
        raise ModbusRequestError(f"max_gap {max_gap} is negative")
    points = list(points)
    _check_points(points, max_registers, max_bits)
    blocks: list[ReadBlock] = []
    for table in Table:
        limit = max_bits if table.is_bits else max_registers
        members: list[PointRef] = []
        start = end = 0
        for point in sorted((p for p in points if p.table == table), key=lambda p: p.address):
            point_end = point.address + point.count
            if members and point.address - end <= max_gap and max(end, point_end) - start <= limit:
                members.append(point)
                end = max(end, point_end)
                continue
            if members:
                blocks.append(ReadBlock(table, start, end - start, tuple(members)))
            members, start, end = [point], point.address, point_end
        if members:
            blocks.append(ReadBlock(table, start, end - start, tuple(members)))
    return blocks


def slice_block(block: ReadBlock, values: Sequence[_V]) -> dict[str, tuple[_V, ...]]:
    """Each member's registers (or bits) out of the values read for `block`."""
    if len(values) != block.count:
        raise ModbusRequestError(f"block of {block.count} items got {len(values)} values")
    offsets = ((m.key, m.address - block.address, m.count) for m in block.members)
    return {key: tuple(values[offset : offset + count]) for key, offset, count in offsets}


def _check_limit(name: str, value: int, maximum: int) -> None:
    if not 1 <= value <= maximum:
        raise ModbusRequestError(f"{name} {value} is outside 1..{maximum}")


def _check_points(points: Sequence[PointRef], max_registers: int, max_bits: int) -> None:
    seen: set[str] = set()
    for point in points:
        if point.key in seen:
            raise ModbusRequestError(f"point key {point.key!r} appears twice")
        seen.add(point.key)
        limit = max_bits if point.table.is_bits else max_registers
        if not 1 <= point.count <= limit:
            raise ModbusRequestError(
                f"point {point.key!r} count {point.count} is outside 1..{limit}"
            )
        if not 0 <= point.address <= 0x10000 - point.count:
            raise ModbusRequestError(
                f"point {point.key!r} at {point.address} with count {point.count} "
                "is outside addresses 0..65535"
            )
