"""Modbus codec, sans-IO in the style of h11: bytes in, values out, and back, for TCP and RTU.

Everything here is pure: no asyncio, no sockets, no clock. Local misuse raises ModbusRequestError
(a ValueError); bytes from the device that break the protocol raise ModbusFrameError.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum, StrEnum
from typing import Final

from drivers.errors import DriverError

MAX_READ_REGISTERS: Final = 125
MAX_READ_BITS: Final = 2000
MAX_WRITE_REGISTERS: Final = 123

EXCEPTION_NAMES: Final[Mapping[int, str]] = {
    1: "illegal function",
    2: "illegal data address",
    3: "illegal data value",
    4: "server device failure",
    5: "acknowledge",
    6: "server device busy",
    10: "gateway path unavailable",
    11: "gateway target device failed to respond",
}


class ModbusError(DriverError):
    """Root of the Modbus driver's errors."""


class ModbusRequestError(ModbusError, ValueError):
    """The caller asked for something Modbus cannot express (local misuse)."""


class ModbusFrameError(ModbusError):
    """The device sent bytes that break the protocol (remote misbehaviour)."""


class ModbusCrcError(ModbusFrameError):
    """An RTU frame whose CRC does not match its bytes: line noise, a collision, wrong settings."""


class ModbusWrongUnit(ModbusFrameError):
    """A well-formed RTU answer from another unit id than the one asked: a misconfigured device."""

    def __init__(self, expected: int, received: int) -> None:
        super().__init__(expected, received)
        self.expected = expected
        self.received = received

    def __str__(self) -> str:
        return f"unit {self.received} answered a request to unit {self.expected}"


class ModbusExceptionResponse(ModbusError):
    """The device understood the request and refused it with an exception code."""

    def __init__(self, function: int, code: int) -> None:
        super().__init__(function, code)
        self.function = function
        self.code = code

    @property
    def name(self) -> str:
        return exception_name(self.code)

    def __str__(self) -> str:
        return f"function {self.function} refused with exception {self.code} ({self.name})"


def exception_name(code: int) -> str:
    return EXCEPTION_NAMES.get(code, "unknown exception")


class Function(IntEnum):
    READ_COILS = 1
    READ_DISCRETE_INPUTS = 2
    READ_HOLDING_REGISTERS = 3
    READ_INPUT_REGISTERS = 4
    WRITE_SINGLE_COIL = 5
    WRITE_SINGLE_REGISTER = 6
    WRITE_MULTIPLE_REGISTERS = 16


class Table(StrEnum):
    HOLDING = "holding"
    INPUT = "input"
    COIL = "coil"
    DISCRETE = "discrete"

    @property
    def read_function(self) -> Function:
        return _READ_FUNCTIONS[self]

    @property
    def is_bits(self) -> bool:
        return self in (Table.COIL, Table.DISCRETE)

    @property
    def max_read(self) -> int:
        return MAX_READ_BITS if self.is_bits else MAX_READ_REGISTERS


_READ_FUNCTIONS: Final = {
    Table.COIL: Function.READ_COILS,
    Table.DISCRETE: Function.READ_DISCRETE_INPUTS,
    Table.HOLDING: Function.READ_HOLDING_REGISTERS,
    Table.INPUT: Function.READ_INPUT_REGISTERS,
}
_TABLES_BY_FUNCTION: Final[Mapping[int, Table]] = {
    function: table for table, function in _READ_FUNCTIONS.items()
}


class DataType(StrEnum):
    INT16 = "int16"
    UINT16 = "uint16"
    INT32 = "int32"
    UINT32 = "uint32"
    INT64 = "int64"
    UINT64 = "uint64"
    FLOAT32 = "float32"
    FLOAT64 = "float64"


class WordOrder(StrEnum):
    """Order of the words of a multi-register value; a word's bytes are always big-endian."""

    BIG = "big"
    LITTLE = "little"


_STRUCT_FORMATS: Final = {
    DataType.INT16: "h",
    DataType.UINT16: "H",
    DataType.INT32: "i",
    DataType.UINT32: "I",
    DataType.INT64: "q",
    DataType.UINT64: "Q",
    DataType.FLOAT32: "f",
    DataType.FLOAT64: "d",
}


def struct_code(dtype: DataType) -> str:
    """The `struct` format character of a data type (big-endian words are packed with '>')."""
    return _STRUCT_FORMATS[dtype]


def register_count(dtype: DataType) -> int:
    return struct.calcsize(_STRUCT_FORMATS[dtype]) // 2


def decode_value(
    registers: Sequence[int], dtype: DataType, word_order: WordOrder = WordOrder.BIG
) -> int | float:
    expected = register_count(dtype)
    if len(registers) != expected:
        raise ModbusRequestError(f"{dtype} needs {expected} registers, got {len(registers)}")
    words = _checked_registers(registers)
    if word_order == WordOrder.LITTLE:
        words.reverse()
    value: int | float
    (value,) = struct.unpack(">" + _STRUCT_FORMATS[dtype], _pack_words(words))
    return value


def encode_value(
    value: float | int, dtype: DataType, word_order: WordOrder = WordOrder.BIG
) -> list[int]:
    """Registers holding `value`; integer types round it to the nearest integer first."""
    fmt = _STRUCT_FORMATS[dtype]
    if fmt in "fd":
        try:
            packed = struct.pack(">" + fmt, float(value))
        except OverflowError:
            raise ModbusRequestError(f"{value!r} is out of range for {dtype}") from None
    else:
        packed = struct.pack(">" + fmt, _rounded_in_range(value, dtype))
    words = list(struct.unpack(f">{len(packed) // 2}H", packed))
    if word_order == WordOrder.LITTLE:
        words.reverse()
    return words


def _rounded_in_range(value: float | int, dtype: DataType) -> int:
    if isinstance(value, float) and not math.isfinite(value):
        raise ModbusRequestError(f"{value!r} cannot be stored as {dtype}")
    bits = register_count(dtype) * 16
    low, high = (
        (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if dtype.startswith("int") else (0, 2**bits - 1)
    )
    rounded = round(value)
    if not low <= rounded <= high:
        raise ModbusRequestError(f"{value!r} is out of range for {dtype} ({low}..{high})")
    return rounded


def _checked_registers(registers: Sequence[int]) -> list[int]:
    for index, register in enumerate(registers):
        if not isinstance(register, int) or not 0 <= register <= 0xFFFF:
            raise ModbusRequestError(
                f"register {index} is {register!r}, not a 16-bit unsigned integer"
            )
    return list(registers)


def _pack_words(words: Sequence[int]) -> bytes:
    return struct.pack(f">{len(words)}H", *words)


def _check_range(name: str, value: int, low: int, high: int) -> None:
    if not isinstance(value, int) or not low <= value <= high:
        raise ModbusRequestError(f"{name} {value!r} is outside {low}..{high}")


def _check_span(address: int, count: int) -> None:
    _check_range("address", address, 0, 0xFFFF)
    if address + count > 0x10000:
        raise ModbusRequestError(f"{count} items from address {address} run past 65535")


def _read_table(table_or_function: Table | int) -> Table:
    if isinstance(table_or_function, Table):
        return table_or_function
    try:
        return _TABLES_BY_FUNCTION[Function(table_or_function)]
    except (ValueError, KeyError):
        raise ModbusRequestError(f"{table_or_function!r} is not a read function code") from None


def _read_pdu(table_or_function: Table | int, address: int, count: int) -> bytes:
    table = _read_table(table_or_function)
    _check_range(f"{table} count", count, 1, table.max_read)
    _check_span(address, count)
    return struct.pack(">BHH", table.read_function, address, count)


_MBAP: Final = struct.Struct(">HHHB")


def _tcp_frame(transaction_id: int, unit: int, pdu: bytes) -> bytes:
    _check_range("transaction id", transaction_id, 0, 0xFFFF)
    _check_range("unit", unit, 0, 0xFF)
    return _MBAP.pack(transaction_id, 0, len(pdu) + 1, unit) + pdu


def encode_read_request(
    transaction_id: int, unit: int, table_or_function: Table | int, address: int, count: int
) -> bytes:
    """Modbus TCP read (function 1, 2, 3 or 4) of `count` registers or bits from `address`."""
    return _tcp_frame(transaction_id, unit, _read_pdu(table_or_function, address, count))


def encode_write_registers(
    transaction_id: int, unit: int, address: int, registers: Sequence[int]
) -> bytes:
    """Modbus TCP function 16, write multiple registers."""
    return _tcp_frame(transaction_id, unit, _write_registers_pdu(address, registers))


def encode_write_register(transaction_id: int, unit: int, address: int, value: int) -> bytes:
    """Modbus TCP function 6, write single register."""
    return _tcp_frame(transaction_id, unit, _write_register_pdu(address, value))


def encode_write_coil(transaction_id: int, unit: int, address: int, value: bool) -> bytes:
    """Modbus TCP function 5, write single coil."""
    return _tcp_frame(transaction_id, unit, _write_coil_pdu(address, value))


def _write_registers_pdu(address: int, registers: Sequence[int]) -> bytes:
    count = len(registers)
    _check_range("register count", count, 1, MAX_WRITE_REGISTERS)
    _check_span(address, count)
    words = _checked_registers(registers)
    header = struct.pack(">BHHB", Function.WRITE_MULTIPLE_REGISTERS, address, count, 2 * count)
    return header + _pack_words(words)


def _write_register_pdu(address: int, value: int) -> bytes:
    _check_span(address, 1)
    _check_range("register value", value, 0, 0xFFFF)
    return struct.pack(">BHH", Function.WRITE_SINGLE_REGISTER, address, value)


def _write_coil_pdu(address: int, value: bool) -> bytes:
    _check_span(address, 1)
    return struct.pack(">BHH", Function.WRITE_SINGLE_COIL, address, 0xFF00 if value else 0)


def _crc_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_CRC_TABLE: Final = _crc_table()


def crc16(data: bytes) -> int:
    """Modbus CRC-16 (reflected 0xA001, start 0xFFFF), by table; it goes on the wire low byte
    first."""
    crc = 0xFFFF
    for byte in data:
        crc = (crc >> 8) ^ _CRC_TABLE[(crc ^ byte) & 0xFF]
    return crc


def _rtu_frame(unit: int, pdu: bytes) -> bytes:
    """Unit, PDU, CRC; unit 0 (broadcast) is refused since a broadcast gets no answer."""
    _check_range("RTU unit", unit, 1, 247)
    frame = bytes([unit]) + pdu
    return frame + crc16(frame).to_bytes(2, "little")


def encode_rtu_read_request(
    unit: int, table_or_function: Table | int, address: int, count: int
) -> bytes:
    """Modbus RTU read; unit 0 (broadcast) is refused since a broadcast gets no answer.

    The other RTU encoders refuse it too: each request is sent to get an answer.
    """
    return _rtu_frame(unit, _read_pdu(table_or_function, address, count))


def encode_rtu_write_registers(unit: int, address: int, registers: Sequence[int]) -> bytes:
    """Modbus RTU function 16, write multiple registers."""
    return _rtu_frame(unit, _write_registers_pdu(address, registers))


def encode_rtu_write_register(unit: int, address: int, value: int) -> bytes:
    """Modbus RTU function 6, write single register."""
    return _rtu_frame(unit, _write_register_pdu(address, value))


def encode_rtu_write_coil(unit: int, address: int, value: bool) -> bytes:
    """Modbus RTU function 5, write single coil."""
    return _rtu_frame(unit, _write_coil_pdu(address, value))


RTU_FIXED_GAP_ABOVE_BAUDRATE: Final = 19200
RTU_FIXED_FRAME_GAP_S: Final = 0.00175


def rtu_frame_gap_s(baudrate: int, bits_per_char: float = 11) -> float:
    """The silent interval that delimits RTU frames, in seconds.

    3.5 character times, a character being `bits_per_char` bits on the line (11 for the spec's
    8E1/8N2, 10 for the common 8N1); above 19200 baud the spec fixes it at 1.75 ms instead.
    """
    _check_range("baudrate", baudrate, 1, 100_000_000)
    if not (isinstance(bits_per_char, int | float) and 0 < bits_per_char < 100):
        raise ModbusRequestError(f"bits per character {bits_per_char!r} is outside 0..100")
    if baudrate > RTU_FIXED_GAP_ABOVE_BAUDRATE:
        return RTU_FIXED_FRAME_GAP_S
    return 3.5 * bits_per_char / baudrate


@dataclass(frozen=True, slots=True)
class Response:
    """One Modbus response; RTU has no transaction id and leaves it 0.

    `function` is the request's function code, its 0x80 exception flag cleared. Reads 3 and 4 fill
    `registers`. Reads 1 and 2 fill `bits` with every bit of the data bytes, padding included: the
    frame does not carry the requested count, so the caller trims (read_values does). Writes 5, 6
    and 16 fill `registers` with the two echoed words (address, then value or quantity). Exception
    responses fill only `exception_code`.
    """

    transaction_id: int
    unit: int
    function: int
    registers: tuple[int, ...] | None = None
    bits: tuple[bool, ...] | None = None
    exception_code: int | None = None


class TcpResponseDecoder:
    """Splits a Modbus TCP byte stream into Responses.

    feed() bytes as they arrive, then call next_response() until it returns None (more data
    needed). MBAP has no frame marker to resynchronise on, so after a ModbusFrameError every call
    raises again: drop the connection and use a fresh decoder on the next one.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._error: ModbusFrameError | None = None

    def feed(self, data: bytes) -> None:
        self._raise_if_broken()
        self._buffer += data

    def next_response(self) -> Response | None:
        self._raise_if_broken()
        if len(self._buffer) < _MBAP.size:
            return None
        transaction_id, protocol, length, unit = _MBAP.unpack_from(self._buffer)
        try:
            if protocol != 0:
                raise ModbusFrameError(f"protocol id is {protocol}, not 0")
            if not 2 <= length <= 254:
                raise ModbusFrameError(f"length field {length} is outside 2..254")
            end = _MBAP.size - 1 + length
            if len(self._buffer) < end:
                return None
            pdu = bytes(self._buffer[_MBAP.size : end])
            del self._buffer[:end]
            return _decode_pdu(transaction_id, unit, pdu)
        except ModbusFrameError as error:
            self._error = error
            raise

    def _raise_if_broken(self) -> None:
        if self._error is not None:
            raise ModbusFrameError(f"decoder unusable after an earlier error: {self._error}")


_RTU_WRITE_FUNCTIONS: Final = frozenset(
    {Function.WRITE_SINGLE_COIL, Function.WRITE_SINGLE_REGISTER, Function.WRITE_MULTIPLE_REGISTERS}
)


class RtuResponseDecoder:
    """The answer to one Modbus RTU request, from bytes fed as they arrive; single use.

    RTU frames carry no length, so the request sets the frame's end: an exception response has
    5 bytes, a write echo 8, a read answer 5 plus its byte count, which must match `count` when
    given. feed() returns the Response once the frame is complete and None until then; bytes after
    the frame stay in `surplus`. The CRC is checked before the unit id, so ModbusWrongUnit means
    a well-formed frame from another device. After a ModbusFrameError every feed() raises again.
    """

    def __init__(self, unit: int, function: Function | int, count: int | None = None) -> None:
        _check_range("RTU unit", unit, 1, 247)
        if function not in _TABLES_BY_FUNCTION and function not in _RTU_WRITE_FUNCTIONS:
            raise ModbusRequestError(f"{function!r} is not a supported function code")
        self.unit = unit
        self.function = Function(function)
        self.count = count
        self._byte_count: int | None = None
        table = _TABLES_BY_FUNCTION.get(function)
        if count is not None:
            if table is None:
                raise ModbusRequestError(f"function {function} is a write: it has no read count")
            _check_range(f"{table} count", count, 1, table.max_read)
            self._byte_count = (count + 7) // 8 if table.is_bits else 2 * count
        self._buffer = bytearray()
        self._size: int | None = None
        self._response: Response | None = None
        self._error: ModbusFrameError | None = None

    @classmethod
    def for_request(cls, request: bytes) -> RtuResponseDecoder:
        """A decoder for the answer to `request`, an RTU request frame as encoded here."""
        if len(request) < 8 or crc16(request) != 0:
            raise ModbusRequestError(f"{request.hex(' ')} is not an RTU request frame")
        unit, function = request[0], request[1]
        count = int.from_bytes(request[4:6], "big") if function in _TABLES_BY_FUNCTION else None
        return cls(unit, function, count)

    @property
    def received(self) -> int:
        """How many bytes were fed so far."""
        return len(self._buffer)

    @property
    def surplus(self) -> bytes:
        """Bytes fed after the complete frame."""
        return bytes(self._buffer[self._size :]) if self._size is not None else b""

    def feed(self, data: bytes) -> Response | None:
        if self._error is not None:
            raise ModbusFrameError(f"decoder unusable after an earlier error: {self._error}")
        if self._response is not None:
            raise ModbusRequestError("this decoder already returned its response: one per request")
        self._buffer += data
        try:
            self._response = self._parse()
        except ModbusFrameError as error:
            self._error = error
            raise
        return self._response

    def _parse(self) -> Response | None:
        buffer = self._buffer
        if len(buffer) < 2:
            return None
        function = buffer[1]
        if function == self.function | 0x80:
            size = 5
        elif function != self.function:
            what = (
                f"exception response to function {function & 0x7F}"
                if function & 0x80
                else f"function {function}"
            )
            raise ModbusFrameError(f"{what} answers a function {self.function} request")
        elif function in _RTU_WRITE_FUNCTIONS:
            size = 8
        elif len(buffer) < 3:
            return None
        elif self._byte_count is not None and buffer[2] != self._byte_count:
            raise ModbusFrameError(
                f"byte count {buffer[2]} answers a read of {self.count}, "
                f"which needs {self._byte_count}"
            )
        else:
            size = 5 + buffer[2]
        if len(buffer) < size:
            return None
        frame = bytes(buffer[:size])
        if crc16(frame) != 0:
            received = int.from_bytes(frame[-2:], "little")
            raise ModbusCrcError(
                f"CRC {received:04X} does not match {crc16(frame[:-2]):04X} in {frame.hex(' ')}"
            )
        if frame[0] != self.unit:
            raise ModbusWrongUnit(self.unit, frame[0])
        self._size = size
        return _decode_pdu(0, frame[0], frame[1:-2])


def _decode_pdu(transaction_id: int, unit: int, pdu: bytes) -> Response:
    function, body = pdu[0], pdu[1:]
    if function & 0x80:
        _check_body_size(body, 1, f"exception response to function {function & 0x7F}")
        return Response(transaction_id, unit, function & 0x7F, exception_code=body[0])
    table = _TABLES_BY_FUNCTION.get(function)
    if table is not None:
        data = _read_data(table, body)
        if table.is_bits:
            bits = tuple(bool(byte >> bit & 1) for byte in data for bit in range(8))
            return Response(transaction_id, unit, function, bits=bits)
        registers = struct.unpack(f">{len(data) // 2}H", data)
        return Response(transaction_id, unit, function, registers=registers)
    if function in (
        Function.WRITE_SINGLE_COIL,
        Function.WRITE_SINGLE_REGISTER,
        Function.WRITE_MULTIPLE_REGISTERS,
    ):
        _check_body_size(body, 4, f"response to function {function}")
        return Response(transaction_id, unit, function, registers=struct.unpack(">HH", body))
    raise ModbusFrameError(f"unsupported function code {function}")


def _check_body_size(body: bytes, expected: int, what: str) -> None:
    if len(body) != expected:
        raise ModbusFrameError(
            f"{what} has {len(body)} bytes after the function code, not {expected}"
        )


def _read_data(table: Table, body: bytes) -> bytes:
    if not body:
        raise ModbusFrameError(f"response to function {table.read_function} has no byte count")
    byte_count, data = body[0], body[1:]
    if byte_count != len(data):
        raise ModbusFrameError(
            f"byte count {byte_count} disagrees with the length field ({len(data)} data bytes)"
        )
    if byte_count == 0:
        raise ModbusFrameError(f"response to function {table.read_function} has byte count 0")
    if not table.is_bits and byte_count % 2:
        raise ModbusFrameError(f"odd register byte count {byte_count}")
    return data


def read_values(response: Response, table: Table, count: int) -> tuple[int, ...] | tuple[bool, ...]:
    """The values a response gives for a read of `count` items of `table`, bits trimmed to count.

    Raises ModbusExceptionResponse for a refusal, ModbusFrameError for an answer that does not fit.
    """
    _check_answer(response, table.read_function)
    if table.is_bits:
        bits = response.bits or ()
        if len(bits) != (count + 7) // 8 * 8:
            raise ModbusFrameError(f"{len(bits) // 8} data bytes answer a read of {count} bits")
        return bits[:count]
    registers = response.registers or ()
    if len(registers) != count:
        raise ModbusFrameError(f"{len(registers)} registers answer a read of {count}")
    return registers


def check_write(response: Response, function: int, echo: tuple[int, int] | None = None) -> None:
    """Raise unless the response acknowledges a write of `function`.

    `echo`, when given, is what the acknowledgement must repeat: the address, then the value
    written (function 6), 0xFF00 or 0 (function 5), or the register count (function 16).
    """
    _check_answer(response, function)
    if echo is not None and response.registers != echo:
        shown = " ".join(f"{word:04X}" for word in response.registers or ())
        raise ModbusFrameError(
            f"function {function} acknowledged with {shown}, not {echo[0]:04X} {echo[1]:04X}"
        )


def _check_answer(response: Response, function: int) -> None:
    if response.function != function:
        raise ModbusFrameError(
            f"function {response.function} answers a function {function} request"
        )
    if response.exception_code is not None:
        raise ModbusExceptionResponse(response.function, response.exception_code)
