"""Profile points ⇄ registers: pure functions, no I/O.

`decode_point` turns the registers (or bits) a point occupies into its value in engineering
units; `encode_point` does the reverse for writes and for the simulator. Byte order swaps the two
bytes of every register before the word order is applied.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Sequence

from drivers.base import Value
from drivers.modbus.codec import DataType, WordOrder, encode_value, register_count, struct_code
from drivers.modbus.profile import ByteOrder, ModbusPoint, PointType

_INT_LIMITS = {
    DataType.INT16: (-(2**15), 2**15 - 1),
    DataType.UINT16: (0, 2**16 - 1),
    DataType.INT32: (-(2**31), 2**31 - 1),
    DataType.UINT32: (0, 2**32 - 1),
    DataType.INT64: (-(2**63), 2**63 - 1),
    DataType.UINT64: (0, 2**64 - 1),
}


def _swap(registers: list[int]) -> list[int]:
    return [((r & 0xFF) << 8) | (r >> 8) for r in registers]


Raw = Sequence[int] | Sequence[bool]
Decoder = Callable[[Raw], Value]


def point_decoder(point: ModbusPoint) -> Decoder:
    """A function from the point's registers (or bit) to its value, with every decision about
    type, orders and scaling taken once, here, instead of on every poll."""
    if point.table.is_bits:
        return lambda raw: bool(raw[0])
    kind = point.kind
    swap = point.byte_order is ByteOrder.LITTLE

    def words(raw: Raw) -> list[int]:
        registers = [int(r) for r in raw]
        return _swap(registers) if swap else registers

    if kind is PointType.BOOL:
        bit = point.bit
        assert bit is not None
        return lambda raw: bool(words(raw)[0] >> bit & 1)
    if kind is PointType.BITFIELD:
        return lambda raw: words(raw)[0]
    if kind is PointType.STRING:

        def text(raw: Raw) -> str:
            data = b"".join(r.to_bytes(2, "big") for r in words(raw))
            return data.split(b"\0", 1)[0].decode("latin-1").strip()

        return text
    scale, offset = point.scale, point.offset
    scaled = scale != 1.0 or offset != 0.0
    if not swap and not scaled and kind is PointType.UINT16:  # the common case, made cheap
        return lambda raw: int(raw[0])
    if not swap and not scaled and kind is PointType.INT16:
        return lambda raw: int(raw[0]) - 65536 if raw[0] >= 32768 else int(raw[0])
    dtype = DataType(kind.value)
    unpack = struct.Struct(">" + struct_code(dtype)).unpack
    pack = struct.Struct(f">{register_count(dtype)}H").pack
    reverse = point.word_order is WordOrder.LITTLE

    def number(raw: Raw) -> Value:
        registers = words(raw)
        if reverse:
            registers.reverse()
        value: int | float = unpack(pack(*registers))[0]
        return round(value * scale + offset, 6) if scaled else value

    return number


def decode_point(point: ModbusPoint, raw: Raw) -> Value:
    return point_decoder(point)(raw)


def encode_point(point: ModbusPoint, value: Value) -> list[int] | bool:
    """Registers (or the bit) that hold `value`; numbers are scaled, rounded and clipped to the
    type's range only by `clip_to_type` — here, out-of-range raises ValueError."""
    if point.table.is_bits:
        return bool(value)
    kind = point.kind
    if kind is PointType.BOOL:
        raise ValueError(f"{point.name} is one bit of a register: write it with read-modify-write")
    if kind is PointType.STRING:
        assert point.length is not None
        data = str(value).encode("latin-1")[: point.length * 2].ljust(point.length * 2, b"\0")
        registers = [int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2)]
    elif kind is PointType.BITFIELD:
        registers = [int(value) & 0xFFFF]
    else:
        if isinstance(value, str):
            raise ValueError(f"{point.name} takes a number, not {value!r}")
        registers = encode_value(point.to_raw(float(value)), DataType(kind.value), point.word_order)
    if point.byte_order is ByteOrder.LITTLE:
        registers = _swap(registers)
    return registers


def clip_to_type(point: ModbusPoint, value: float) -> float:
    """`value` moved inside what the point's integer type can hold (for simulated values)."""
    limits = _INT_LIMITS.get(DataType(point.kind.value)) if point.kind.numeric else None
    if limits is None:
        return value
    low, high = (point.to_engineering(limit) for limit in limits)
    low, high = min(low, high), max(low, high)
    return min(max(value, low), high)


def check_range(point: ModbusPoint, value: Value) -> str | None:
    """Why a decoded value cannot be true, or None when it is plausible."""
    if isinstance(value, bool | str) or not point.kind.numeric:
        return None
    if isinstance(value, int) and not -(2**63) <= value < 2**63:
        return f"{value} does not fit a signed 64-bit integer (scale it, or set max)"
    if isinstance(value, float) and not math.isfinite(value):
        return f"{value} is not a finite number"
    if point.min is not None and value < point.min:
        return f"{value} {point.unit}".rstrip() + f" is below the profile's minimum {point.min}"
    if point.max is not None and value > point.max:
        return f"{value} {point.unit}".rstrip() + f" is above the profile's maximum {point.max}"
    return None
