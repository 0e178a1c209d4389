"""Byte-for-byte tests of the sans-IO Modbus codec."""

from __future__ import annotations

import math
import pickle

import pytest

from drivers.errors import DriverError
from drivers.modbus.codec import (
    DataType,
    Function,
    ModbusExceptionResponse,
    ModbusFrameError,
    ModbusRequestError,
    Response,
    Table,
    TcpResponseDecoder,
    WordOrder,
    check_write,
    crc16,
    decode_value,
    encode_read_request,
    encode_rtu_read_request,
    encode_value,
    encode_write_coil,
    encode_write_register,
    encode_write_registers,
    exception_name,
    read_values,
    register_count,
)


def decode_one(hex_frame: str) -> Response:
    decoder = TcpResponseDecoder()
    decoder.feed(bytes.fromhex(hex_frame))
    response = decoder.next_response()
    assert response is not None
    return response


def bits(pattern: str) -> tuple[bool, ...]:
    return tuple(char == "1" for char in pattern if char != " ")


# --- values -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dtype", "count"),
    [
        ("int16", 1),
        ("uint16", 1),
        ("int32", 2),
        ("uint32", 2),
        ("int64", 4),
        ("uint64", 4),
        ("float32", 2),
        ("float64", 4),
    ],
)
def test_register_count(dtype: str, count: int) -> None:
    assert register_count(DataType(dtype)) == count


@pytest.mark.parametrize(
    ("value", "dtype", "registers"),
    [
        (21.5, DataType.FLOAT32, [0x41AC, 0x0000]),
        (-1.0, DataType.FLOAT32, [0xBF80, 0x0000]),
        (1.0, DataType.FLOAT64, [0x3FF0, 0, 0, 0]),
        (-2, DataType.INT32, [0xFFFF, 0xFFFE]),
        (-100_000, DataType.INT32, [0xFFFE, 0x7960]),
        (0x12345678, DataType.UINT32, [0x1234, 0x5678]),
        (-1, DataType.INT16, [0xFFFF]),
        (65535, DataType.UINT16, [0xFFFF]),
        (-2, DataType.INT64, [0xFFFF, 0xFFFF, 0xFFFF, 0xFFFE]),
        (2**64 - 1, DataType.UINT64, [0xFFFF] * 4),
    ],
)
def test_known_bit_patterns(value: float, dtype: DataType, registers: list[int]) -> None:
    assert encode_value(value, dtype) == registers
    assert decode_value(registers, dtype) == value


def test_little_word_order_swaps_words_not_bytes() -> None:
    assert encode_value(21.5, DataType.FLOAT32, WordOrder.LITTLE) == [0x0000, 0x41AC]
    assert encode_value(0x12345678, DataType.UINT32, WordOrder.LITTLE) == [0x5678, 0x1234]
    assert decode_value([0x5678, 0x1234], DataType.UINT32, WordOrder.LITTLE) == 0x12345678
    assert decode_value([0xFFFE, 0xFFFF], DataType.INT32, WordOrder.LITTLE) == -2


@pytest.mark.parametrize("dtype", list(DataType))
@pytest.mark.parametrize("word_order", list(WordOrder))
def test_round_trip(dtype: DataType, word_order: WordOrder) -> None:
    samples: list[float] = [0, 1, 100, 32767]
    if dtype.startswith("int"):
        samples += [-32768, -1]
    if dtype.startswith("float"):
        samples += [-1.5, 21.5, 2.0**100, math.inf, -math.inf]
    for value in samples:
        registers = encode_value(value, dtype, word_order)
        assert len(registers) == register_count(dtype)
        assert decode_value(registers, dtype, word_order) == value


def test_float64_keeps_precision_and_nan() -> None:
    assert decode_value(encode_value(0.1, DataType.FLOAT64), DataType.FLOAT64) == 0.1
    assert math.isnan(decode_value(encode_value(math.nan, DataType.FLOAT32), DataType.FLOAT32))


def test_integer_types_round() -> None:
    assert encode_value(21.6, DataType.INT16) == [22]
    assert encode_value(-0.4, DataType.UINT16) == [0]
    assert encode_value(True, DataType.UINT16) == [1]


@pytest.mark.parametrize(
    ("value", "dtype", "message"),
    [
        (65536, DataType.UINT16, r"65536 is out of range for uint16 \(0\.\.65535\)"),
        (-1, DataType.UINT32, r"-1 is out of range for uint32"),
        (32768, DataType.INT16, r"out of range for int16 \(-32768\.\.32767\)"),
        (2**63, DataType.INT64, "out of range for int64"),
        (math.nan, DataType.INT32, "nan cannot be stored as int32"),
        (math.inf, DataType.UINT64, "inf cannot be stored as uint64"),
        (1e39, DataType.FLOAT32, "1e[+]39 is out of range for float32"),
        pytest.param(10**400, DataType.FLOAT64, "out of range for float64", id="huge-int"),
    ],
)
def test_encode_out_of_range(value: float, dtype: DataType, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        encode_value(value, dtype)


@pytest.mark.parametrize(
    ("registers", "dtype", "message"),
    [
        ([1], DataType.FLOAT32, "float32 needs 2 registers, got 1"),
        ([1, 2, 3], DataType.UINT16, "uint16 needs 1 registers, got 3"),
        ([65536], DataType.UINT16, "register 0 is 65536, not a 16-bit unsigned integer"),
        ([0, -1], DataType.INT32, "register 1 is -1"),
    ],
)
def test_decode_rejects_bad_registers(registers: list[int], dtype: DataType, message: str) -> None:
    with pytest.raises(ModbusRequestError, match=message):
        decode_value(registers, dtype)


# --- requests -----------------------------------------------------------------------------------


def test_read_request_bytes() -> None:
    expected = bytes.fromhex("0001 0000 0006 01 03 0000 000a")
    assert encode_read_request(1, 1, Table.HOLDING, 0, 10) == expected
    assert encode_read_request(1, 1, 3, 0, 10) == expected
    assert encode_read_request(0xABCD, 17, Table.INPUT, 0x1234, 2) == bytes.fromhex(
        "abcd 0000 0006 11 04 1234 0002"
    )
    assert encode_read_request(2, 1, Table.COIL, 19, 37) == bytes.fromhex(
        "0002 0000 0006 01 01 0013 0025"
    )
    assert encode_read_request(3, 1, Table.DISCRETE, 0, 2000) == bytes.fromhex(
        "0003 0000 0006 01 02 0000 07d0"
    )


def test_write_request_bytes() -> None:
    assert encode_write_registers(7, 1, 1, [0x000A, 0x0102]) == bytes.fromhex(
        "0007 0000 000b 01 10 0001 0002 04 000a 0102"
    )
    assert encode_write_register(8, 1, 1, 3) == bytes.fromhex("0008 0000 0006 01 06 0001 0003")
    assert encode_write_coil(9, 1, 172, True) == bytes.fromhex("0009 0000 0006 01 05 00ac ff00")
    assert encode_write_coil(9, 1, 172, False) == bytes.fromhex("0009 0000 0006 01 05 00ac 0000")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((1, 1, Table.HOLDING, 0, 0), r"holding count 0 is outside 1\.\.125"),
        ((1, 1, Table.HOLDING, 0, 126), r"holding count 126 is outside 1\.\.125"),
        ((1, 1, Table.COIL, 0, 2001), r"coil count 2001 is outside 1\.\.2000"),
        ((1, 1, Table.HOLDING, 65536, 1), r"address 65536 is outside 0\.\.65535"),
        ((1, 1, Table.HOLDING, -1, 1), "address -1"),
        ((1, 1, Table.INPUT, 65530, 10), "10 items from address 65530 run past 65535"),
        ((1, 256, Table.HOLDING, 0, 1), r"unit 256 is outside 0\.\.255"),
        ((65536, 1, Table.HOLDING, 0, 1), "transaction id 65536"),
        ((1, 1, 5, 0, 1), "5 is not a read function code"),
        ((1, 1, 99, 0, 1), "99 is not a read function code"),
    ],
)
def test_read_request_validation(args: tuple[int, int, int, int, int], message: str) -> None:
    with pytest.raises(ModbusRequestError, match=message):
        encode_read_request(*args)


def test_write_request_validation() -> None:
    with pytest.raises(ModbusRequestError, match=r"register count 0 is outside 1\.\.123"):
        encode_write_registers(1, 1, 0, [])
    with pytest.raises(ModbusRequestError, match="register count 124"):
        encode_write_registers(1, 1, 0, [0] * 124)
    with pytest.raises(ModbusRequestError, match="register 1 is 70000"):
        encode_write_registers(1, 1, 0, [1, 70000])
    with pytest.raises(ModbusRequestError, match="register value -1"):
        encode_write_register(1, 1, 0, -1)
    with pytest.raises(ModbusRequestError, match="address 65536"):
        encode_write_coil(1, 1, 65536, True)


def test_request_errors_are_value_errors_and_driver_errors() -> None:
    with pytest.raises(ValueError):
        encode_read_request(1, 1, Table.HOLDING, 0, 0)
    with pytest.raises(DriverError):
        encode_read_request(1, 1, Table.HOLDING, 0, 0)


# --- responses ----------------------------------------------------------------------------------


def test_holding_registers_response() -> None:
    response = decode_one("0001 0000 0007 01 03 04 41ac 0000")
    assert response == Response(1, 1, 3, registers=(0x41AC, 0))
    assert read_values(response, Table.HOLDING, 2) == (0x41AC, 0)


def test_coil_response_keeps_padding_for_the_caller_to_trim() -> None:
    response = decode_one("0002 0000 0005 01 01 02 cd 01")
    assert response.bits == bits("1011 0011 1000 0000")
    assert read_values(response, Table.COIL, 10) == bits("1011 0011 10")


def test_write_responses_echo_address_and_value() -> None:
    assert decode_one("0007 0000 0006 01 10 0001 0002") == Response(7, 1, 16, registers=(1, 2))
    assert decode_one("0009 0000 0006 01 05 00ac ff00") == Response(
        9, 1, 5, registers=(172, 0xFF00)
    )
    check_write(Response(8, 1, 6, registers=(1, 3)), Function.WRITE_SINGLE_REGISTER)


def test_exception_response() -> None:
    response = decode_one("0004 0000 0003 01 83 02")
    assert response == Response(4, 1, 3, exception_code=2)
    with pytest.raises(ModbusExceptionResponse) as caught:
        read_values(response, Table.HOLDING, 2)
    assert (caught.value.function, caught.value.code) == (3, 2)
    assert str(caught.value) == "function 3 refused with exception 2 (illegal data address)"
    with pytest.raises(ModbusExceptionResponse, match=r"exception 6 \(server device busy\)"):
        check_write(Response(1, 1, 16, exception_code=6), Function.WRITE_MULTIPLE_REGISTERS)


def test_exception_names() -> None:
    assert [exception_name(code) for code in (1, 4, 5, 10, 11, 99)] == [
        "illegal function",
        "server device failure",
        "acknowledge",
        "gateway path unavailable",
        "gateway target device failed to respond",
        "unknown exception",
    ]


def test_exception_response_pickles() -> None:
    error = pickle.loads(pickle.dumps(ModbusExceptionResponse(3, 2)))
    assert (error.function, error.code) == (3, 2)


def test_answers_that_do_not_fit_the_request() -> None:
    with pytest.raises(ModbusFrameError, match="function 4 answers a function 3 request"):
        read_values(Response(1, 1, 4, registers=(1,)), Table.HOLDING, 1)
    with pytest.raises(ModbusFrameError, match="1 registers answer a read of 2"):
        read_values(Response(1, 1, 3, registers=(1,)), Table.HOLDING, 2)
    with pytest.raises(ModbusFrameError, match="2 data bytes answer a read of 3 bits"):
        read_values(Response(1, 1, 1, bits=(False,) * 16), Table.COIL, 3)


def test_decoder_waits_for_whole_frames_and_splits_several() -> None:
    decoder = TcpResponseDecoder()
    stream = bytes.fromhex("0001 0000 0005 01 04 02 0102" + "0002 0000 0003 01 84 02")
    for byte in stream[:10]:
        decoder.feed(bytes([byte]))
        assert decoder.next_response() is None
    decoder.feed(stream[10:])
    assert decoder.next_response() == Response(1, 1, 4, registers=(0x0102,))
    assert decoder.next_response() == Response(2, 1, 4, exception_code=2)
    assert decoder.next_response() is None


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        ("0001 0001 0007 01 03 04 0000 0000", "protocol id is 1, not 0"),
        ("0001 0000 0001 01", r"length field 1 is outside 2\.\.254"),
        ("0001 0000 00ff 01", r"length field 255 is outside 2\.\.254"),
        ("0001 0000 0007 01 03 06 0000 0000", r"byte count 6 disagrees .*4 data bytes"),
        ("0001 0000 0006 01 03 03 0000 00", "odd register byte count 3"),
        ("0001 0000 0003 01 03 00", "has byte count 0"),
        ("0001 0000 0002 01 03", "response to function 3 has no byte count"),
        ("0001 0000 0004 01 83 02 00", "exception response to function 3 has 2 bytes"),
        ("0001 0000 0005 01 06 0001 00", "response to function 6 has 3 bytes"),
        ("0001 0000 0003 01 2b 00", "unsupported function code 43"),
    ],
)
def test_malformed_frames(frame: str, message: str) -> None:
    with pytest.raises(ModbusFrameError, match=message):
        decode_one(frame)


def test_decoder_stays_broken_after_a_frame_error() -> None:
    decoder = TcpResponseDecoder()
    decoder.feed(bytes.fromhex("0001 0001 0003 01 83 02"))
    with pytest.raises(ModbusFrameError):
        decoder.next_response()
    with pytest.raises(ModbusFrameError, match="unusable after an earlier error: protocol id"):
        decoder.next_response()
    with pytest.raises(ModbusFrameError, match="unusable"):
        decoder.feed(bytes.fromhex("0002 0000 0003 01 83 02"))


# --- RTU ----------------------------------------------------------------------------------------


def test_crc16_standard_example() -> None:
    assert crc16(bytes.fromhex("01 03 00 00 00 0a")) == 0xCDC5
    assert crc16(b"") == 0xFFFF


def test_rtu_read_request() -> None:
    assert encode_rtu_read_request(1, Table.HOLDING, 0, 10) == bytes.fromhex("01 03 0000 000a c5cd")
    frame = encode_rtu_read_request(17, Table.INPUT, 8, 1)
    assert crc16(frame) == 0, "a frame with its CRC appended checks to zero"


def test_rtu_refuses_broadcast_and_reserved_units() -> None:
    for unit in (0, 248):
        with pytest.raises(ModbusRequestError, match=r"RTU unit .* is outside 1\.\.247"):
            encode_rtu_read_request(unit, Table.HOLDING, 0, 1)
