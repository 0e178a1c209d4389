"""Modbus RTU: the codec byte for byte, and the client over a socat pty pair against real peers.

A pty ignores baud rate and parity, so the peer tests prove framing and logic, not line timing.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import re
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pymodbus import FramerType
from pymodbus.framer import FramerRTU
from pymodbus.pdu import DecodePDU
from pymodbus.pdu.bit_message import (
    ReadCoilsRequest,
    ReadDiscreteInputsRequest,
    WriteSingleCoilRequest,
)
from pymodbus.pdu.register_message import (
    ReadHoldingRegistersRequest,
    ReadHoldingRegistersResponse,
    ReadInputRegistersRequest,
    WriteMultipleRegistersRequest,
    WriteSingleRegisterRequest,
)
from pymodbus.server import ModbusSerialServer
from pymodbus.simulator import DataType as SimType
from pymodbus.simulator import SimData, SimDevice

from drivers.errors import DeviceTimeout, DeviceUnreachable
from drivers.modbus.codec import (
    Function,
    ModbusCrcError,
    ModbusExceptionResponse,
    ModbusFrameError,
    ModbusRequestError,
    ModbusWrongUnit,
    Response,
    RtuResponseDecoder,
    Table,
    check_write,
    crc16,
    encode_rtu_read_request,
    encode_rtu_write_coil,
    encode_rtu_write_register,
    encode_rtu_write_registers,
    read_values,
    rtu_frame_gap_s,
)
from drivers.modbus.rtu import ModbusRtuClient
from drivers.modbus.transport import ModbusTcpClient

TIMEOUT = 0.3


def table_crc16(data: bytes) -> int:
    """A second, table-driven Modbus CRC, to cross-check the codec's bitwise one."""
    table = []
    for index in range(256):
        value = index
        for _ in range(8):
            value = (value >> 1) ^ 0xA001 if value & 1 else value >> 1
        table.append(value)
    crc = 0xFFFF
    for byte in data:
        crc = (crc >> 8) ^ table[(crc ^ byte) & 0xFF]
    return crc


def with_crc(hex_body: str) -> bytes:
    body = bytes.fromhex(hex_body)
    return body + crc16(body).to_bytes(2, "little")


PYMODBUS_RTU = FramerRTU(DecodePDU(False))


# --- codec: requests ----------------------------------------------------------------------------

# Frames published by the Modbus organisation's spec examples and simplymodbus.ca, CRC included.
KNOWN_REQUESTS = [
    (encode_rtu_read_request(1, Table.HOLDING, 0, 10), "01 03 0000 000A C5CD"),
    (encode_rtu_read_request(0x11, Table.HOLDING, 0x6B, 3), "11 03 006B 0003 7687"),
    (encode_rtu_read_request(0x11, Table.COIL, 0x13, 0x25), "11 01 0013 0025 0E84"),
    (encode_rtu_read_request(0x11, Table.DISCRETE, 0xC4, 0x16), "11 02 00C4 0016 BAA9"),
    (encode_rtu_read_request(0x11, Table.INPUT, 8, 1), "11 04 0008 0001 B298"),
    (encode_rtu_write_coil(0x11, 0xAC, True), "11 05 00AC FF00 4E8B"),
    (encode_rtu_write_register(0x11, 1, 3), "11 06 0001 0003 9A9B"),
    (encode_rtu_write_registers(0x11, 1, [0x000A, 0x0102]), "11 10 0001 0002 04 000A 0102 C6F0"),
]


@pytest.mark.parametrize(("frame", "expected"), KNOWN_REQUESTS)
def test_rtu_requests_match_published_frames(frame: bytes, expected: str) -> None:
    assert frame == bytes.fromhex(expected)
    assert crc16(frame[:-2]) == table_crc16(frame[:-2]) == int.from_bytes(frame[-2:], "little")


def test_rtu_requests_match_pymodbus() -> None:
    pymodbus_frames = [
        ReadHoldingRegistersRequest(dev_id=1, address=0, count=10),
        ReadHoldingRegistersRequest(dev_id=0x11, address=0x6B, count=3),
        ReadCoilsRequest(dev_id=0x11, address=0x13, count=0x25),
        ReadDiscreteInputsRequest(dev_id=0x11, address=0xC4, count=0x16),
        ReadInputRegistersRequest(dev_id=0x11, address=8, count=1),
        WriteSingleCoilRequest(dev_id=0x11, address=0xAC, bits=[True]),
        WriteSingleRegisterRequest(dev_id=0x11, address=1, registers=[3]),
        WriteMultipleRegistersRequest(dev_id=0x11, address=1, registers=[0x000A, 0x0102]),
    ]
    assert [frame for frame, _ in KNOWN_REQUESTS] == [
        PYMODBUS_RTU.buildFrame(pdu) for pdu in pymodbus_frames
    ]


def test_rtu_write_coil_off_and_bounds() -> None:
    assert encode_rtu_write_coil(1, 0, False) == with_crc("01 05 0000 0000")
    encoders: list[Callable[[], bytes]] = [
        lambda: encode_rtu_write_coil(0, 1, True),
        lambda: encode_rtu_write_register(248, 1, 1),
        lambda: encode_rtu_write_registers(0, 1, [1]),
    ]
    for encode in encoders:
        with pytest.raises(ModbusRequestError, match=r"RTU unit .* is outside 1\.\.247"):
            encode()
    with pytest.raises(ModbusRequestError, match="register count 124"):
        encode_rtu_write_registers(1, 0, [0] * 124)
    with pytest.raises(ModbusRequestError, match="register value 65536"):
        encode_rtu_write_register(1, 0, 0x10000)


# --- codec: responses ---------------------------------------------------------------------------

RESPONSE_220_450 = bytes.fromhex("01 03 04 00DC 01C2 BBC8")


def test_known_response_crc_by_three_methods() -> None:
    body = RESPONSE_220_450[:-2]
    assert crc16(body) == table_crc16(body) == 0xC8BB
    built = PYMODBUS_RTU.buildFrame(ReadHoldingRegistersResponse(dev_id=1, registers=[220, 450]))
    assert built == RESPONSE_220_450
    assert crc16(RESPONSE_220_450) == 0, "a frame with its CRC appended checks to zero"


def feed_bytewise(decoder: RtuResponseDecoder, frame: bytes) -> Response:
    for byte in frame[:-1]:
        assert decoder.feed(bytes([byte])) is None
    response = decoder.feed(frame[-1:])
    assert response is not None
    return response


def test_read_response_needs_every_byte() -> None:
    decoder = RtuResponseDecoder(1, Function.READ_HOLDING_REGISTERS, 2)
    response = feed_bytewise(decoder, RESPONSE_220_450)
    assert response == Response(0, 1, 3, registers=(220, 450))
    assert read_values(response, Table.HOLDING, 2) == (220, 450)
    assert decoder.received == 9


def test_coil_response_is_trimmed_by_read_values() -> None:
    frame = bytes.fromhex("11 01 05 CD6BB20E1B 45E6")
    decoder = RtuResponseDecoder.for_request(encode_rtu_read_request(0x11, Table.COIL, 0x13, 37))
    response = decoder.feed(frame)
    assert response is not None
    values = read_values(response, Table.COIL, 37)
    assert len(values) == 37
    assert values[:8] == (True, False, True, True, False, False, True, True)  # 0xCD, LSB first


def test_input_and_discrete_responses() -> None:
    decoder = RtuResponseDecoder.for_request(bytes.fromhex("11 04 0008 0001 B298"))
    assert decoder.feed(bytes.fromhex("11 04 02 000A F8F4")) == Response(0, 17, 4, registers=(10,))
    decoder = RtuResponseDecoder(0x11, Function.READ_DISCRETE_INPUTS, 22)
    response = decoder.feed(bytes.fromhex("11 02 03 ACDB35 2018"))
    assert response is not None
    assert read_values(response, Table.DISCRETE, 22)[:4] == (False, False, True, True)


def test_exception_response_is_five_bytes() -> None:
    decoder = RtuResponseDecoder(1, Function.READ_HOLDING_REGISTERS, 2)
    response = feed_bytewise(decoder, bytes.fromhex("01 83 02 C0F1"))
    assert response == Response(0, 1, 3, exception_code=2)
    with pytest.raises(ModbusExceptionResponse, match="illegal data address"):
        read_values(response, Table.HOLDING, 2)


@pytest.mark.parametrize(
    "request_frame",
    [KNOWN_REQUESTS[5][0], KNOWN_REQUESTS[6][0], KNOWN_REQUESTS[7][0]],
    ids=["coil", "register", "registers"],
)
def test_write_echo_is_eight_bytes(request_frame: bytes) -> None:
    decoder = RtuResponseDecoder.for_request(request_frame)
    echo = request_frame[:6] + crc16(request_frame[:6]).to_bytes(2, "little")
    response = feed_bytewise(decoder, echo)
    assert response.function == request_frame[1]
    assert response.registers == (
        int.from_bytes(request_frame[2:4], "big"),
        int.from_bytes(request_frame[4:6], "big"),
    )
    check_write(response, request_frame[1], response.registers)


def test_write_echo_must_repeat_the_request() -> None:
    response = Response(0, 1, 6, registers=(1, 4))
    check_write(response, Function.WRITE_SINGLE_REGISTER)
    with pytest.raises(ModbusFrameError, match="acknowledged with 0001 0004, not 0001 0003"):
        check_write(response, Function.WRITE_SINGLE_REGISTER, (1, 3))


def test_crc_mismatch() -> None:
    decoder = RtuResponseDecoder(1, Function.READ_HOLDING_REGISTERS, 2)
    with pytest.raises(ModbusCrcError, match="CRC C9BB does not match C8BB") as caught:
        decoder.feed(RESPONSE_220_450[:-1] + b"\xc9")
    assert isinstance(caught.value, ModbusFrameError)
    with pytest.raises(ModbusFrameError, match="unusable after an earlier error"):
        decoder.feed(b"\x00")


def test_wrong_unit_is_checked_after_the_crc() -> None:
    answer = with_crc("02 03 04 00DC 01C2")
    with pytest.raises(ModbusWrongUnit, match="unit 2 answered a request to unit 1") as caught:
        RtuResponseDecoder(1, Function.READ_HOLDING_REGISTERS, 2).feed(answer)
    assert (caught.value.expected, caught.value.received) == (1, 2)
    assert isinstance(caught.value, ModbusFrameError)
    garbled = answer[:-1] + bytes([answer[-1] ^ 1])
    with pytest.raises(ModbusCrcError):
        RtuResponseDecoder(1, Function.READ_HOLDING_REGISTERS, 2).feed(garbled)


def test_wrong_function_fails_at_once() -> None:
    decoder = RtuResponseDecoder(1, Function.READ_HOLDING_REGISTERS, 2)
    with pytest.raises(ModbusFrameError, match="function 4 answers a function 3 request") as caught:
        decoder.feed(b"\x01\x04")
    assert type(caught.value) is ModbusFrameError
    decoder = RtuResponseDecoder(1, Function.WRITE_SINGLE_REGISTER)
    with pytest.raises(ModbusFrameError, match="exception response to function 3 answers a fun"):
        decoder.feed(b"\x01\x83")


def test_byte_count_must_fit_the_request() -> None:
    decoder = RtuResponseDecoder(1, Function.READ_HOLDING_REGISTERS, 2)
    with pytest.raises(ModbusFrameError, match="byte count 6 answers a read of 2, which needs 4"):
        decoder.feed(bytes.fromhex("01 03 06"))
    decoder = RtuResponseDecoder(1, Function.READ_COILS, 9)
    assert decoder.feed(bytes.fromhex("01 01 02")) is None


def test_without_count_the_byte_count_decides() -> None:
    decoder = RtuResponseDecoder(0x11, Function.READ_HOLDING_REGISTERS)
    response = decoder.feed(bytes.fromhex("11 03 06 AE41 5652 4340 49AD"))
    assert response is not None
    assert response.registers == (0xAE41, 0x5652, 0x4340)
    with pytest.raises(ModbusFrameError, match="odd register byte count 1"):
        RtuResponseDecoder(1, Function.READ_HOLDING_REGISTERS).feed(with_crc("01 03 01 07"))


def test_bytes_after_the_frame_are_surplus_and_the_decoder_is_single_use() -> None:
    decoder = RtuResponseDecoder(1, Function.READ_HOLDING_REGISTERS, 2)
    assert decoder.feed(RESPONSE_220_450 + b"\x00\x01") is not None
    assert decoder.surplus == b"\x00\x01"
    with pytest.raises(ModbusRequestError, match="one per request"):
        decoder.feed(b"\x00")


def test_decoder_refuses_impossible_requests() -> None:
    with pytest.raises(ModbusRequestError, match="RTU unit 0"):
        RtuResponseDecoder(0, Function.READ_COILS, 1)
    with pytest.raises(ModbusRequestError, match="not a supported function"):
        RtuResponseDecoder(1, 7)
    with pytest.raises(ModbusRequestError, match="no read count"):
        RtuResponseDecoder(1, Function.WRITE_SINGLE_COIL, 1)
    with pytest.raises(ModbusRequestError, match="holding count 126"):
        RtuResponseDecoder(1, Function.READ_HOLDING_REGISTERS, 126)
    with pytest.raises(ModbusRequestError, match="not an RTU request frame"):
        RtuResponseDecoder.for_request(bytes.fromhex("01 03 0000 000A C5CE"))


def test_frame_gap() -> None:
    assert rtu_frame_gap_s(9600) == pytest.approx(3.5 * 11 / 9600)  # 4.01 ms
    assert rtu_frame_gap_s(9600, 10) == pytest.approx(3.5 * 10 / 9600)
    assert rtu_frame_gap_s(19200) == pytest.approx(3.5 * 11 / 19200)  # 2.005 ms
    assert rtu_frame_gap_s(19201) == rtu_frame_gap_s(115200) == 1.75e-3
    with pytest.raises(ModbusRequestError, match="baudrate 0"):
        rtu_frame_gap_s(0)
    with pytest.raises(ModbusRequestError, match="bits per character"):
        rtu_frame_gap_s(9600, 0)


# --- client: local checks -----------------------------------------------------------------------


def test_same_surface_as_the_tcp_client() -> None:
    for name in ("read", "write_registers", "write_register", "write_coil", "connect", "close"):
        assert inspect.signature(getattr(ModbusRtuClient, name)) == inspect.signature(
            getattr(ModbusTcpClient, name)
        ), name
    assert isinstance(ModbusRtuClient.connected, property)
    client = ModbusRtuClient("/dev/ttyUSB0", baudrate=19200, parity="E")
    assert client.address == "/dev/ttyUSB0"
    assert not client.connected
    assert client.frame_gap_s == pytest.approx(3.5 * 11 / 19200)


def test_settings_are_checked() -> None:
    with pytest.raises(ModbusRequestError, match="parity 'X'"):
        ModbusRtuClient("/dev/null", parity="X")
    with pytest.raises(ModbusRequestError, match="stop bits 3"):
        ModbusRtuClient("/dev/null", stopbits=3)
    with pytest.raises(ModbusRequestError, match="baudrate 0"):
        ModbusRtuClient("/dev/null", baudrate=0)
    with pytest.raises(ModbusRequestError, match="timeout 0"):
        ModbusRtuClient("/dev/null", timeout=0)


async def test_missing_port_is_unreachable(tmp_path: Path) -> None:
    path = str(tmp_path / "ttyUSB9")
    client = ModbusRtuClient(path, timeout=TIMEOUT)
    with pytest.raises(DeviceUnreachable, match="cannot open") as caught:
        await client.connect()
    assert caught.value.address == path
    with pytest.raises(DeviceUnreachable, match=re.escape(f"{path}: cannot open")):
        await client.read(1, Table.HOLDING, 0, 1)
    assert not client.connected
    await client.close()
    with pytest.raises(ValueError, match="holding count 126"):
        await client.read(1, Table.HOLDING, 0, 126)


# --- a socat pty pair ---------------------------------------------------------------------------


@dataclass
class PtyPair:
    a: str
    b: str
    socat: subprocess.Popen[bytes]


@pytest.fixture
def pty_pair(tmp_path: Path) -> Iterator[PtyPair]:
    socat = shutil.which("socat")
    if socat is None:
        pytest.skip("socat is not installed")
    a, b = tmp_path / "A", tmp_path / "B"
    with (tmp_path / "socat.log").open("wb") as log:
        process = subprocess.Popen(
            [socat, "-d", "-d", f"pty,raw,echo=0,link={a}", f"pty,raw,echo=0,link={b}"],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
        )
    try:
        for _ in range(500):
            if a.exists() and b.exists():
                break
            if process.poll() is not None:
                pytest.fail(f"socat exited: {(tmp_path / 'socat.log').read_text()}")
            time.sleep(0.01)
        else:
            pytest.fail("socat did not create its ptys within 5 s")
        yield PtyPair(str(a), str(b), process)
    finally:
        process.kill()
        process.wait()


# --- against pymodbus ---------------------------------------------------------------------------


def sim_device(unit: int) -> SimDevice:
    offset = 1000 * (unit - 1)
    return SimDevice(
        unit,
        simdata=(
            [SimData(0, values=[True, False, unit == 2, True], datatype=SimType.BITS)],
            [SimData(0, values=[False, True], datatype=SimType.BITS)],
            [SimData(0, values=[220 + offset, 450 + offset, 3, 4, 5], datatype=SimType.REGISTERS)],
            [SimData(10, values=[7 + offset, 8 + offset], datatype=SimType.REGISTERS)],
        ),
    )


@pytest.fixture
async def rtu_server(pty_pair: PtyPair) -> AsyncIterator[str]:
    """A pymodbus RTU server with units 1 and 2 on B; yields A, where the master goes."""
    server = ModbusSerialServer(
        [sim_device(1), sim_device(2)], framer=FramerType.RTU, port=pty_pair.b, baudrate=9600
    )
    await server.serve_forever(background=True)
    try:
        yield pty_pair.a
    finally:
        await server.shutdown()  # type: ignore[no-untyped-call]


async def test_reads_two_units_on_one_bus(rtu_server: str) -> None:
    async with ModbusRtuClient(rtu_server, timeout=TIMEOUT) as client:
        assert client.connected
        assert await client.read(1, Table.HOLDING, 0, 2) == (220, 450)
        assert await client.read(2, Table.HOLDING, 0, 2) == (1220, 1450)
        assert await client.read(1, Table.INPUT, 10, 2) == (7, 8)
        assert await client.read(2, Table.INPUT, 11, 1) == (1008,)
        assert await client.read(1, Table.COIL, 0, 4) == (True, False, False, True)
        assert await client.read(2, Table.COIL, 0, 4) == (True, False, True, True)
        assert await client.read(2, Table.DISCRETE, 0, 2) == (False, True)
    assert not client.connected


async def test_writes_and_reads_back(rtu_server: str) -> None:
    async with ModbusRtuClient(rtu_server, timeout=TIMEOUT) as client:
        await client.write_registers(1, 2, [100, 200])
        await client.write_register(1, 4, 300)
        await client.write_register(2, 0, 0xFFFF)
        assert await client.read(1, Table.HOLDING, 0, 5) == (220, 450, 100, 200, 300)
        assert await client.read(2, Table.HOLDING, 0, 2) == (0xFFFF, 1450)
        await client.write_coil(1, 1, True)
        await client.write_coil(1, 0, False)
        assert await client.read(1, Table.COIL, 0, 3) == (False, True, False)


async def test_unmapped_address_is_an_exception_response(rtu_server: str) -> None:
    async with ModbusRtuClient(rtu_server, timeout=TIMEOUT) as client:
        with pytest.raises(ModbusExceptionResponse) as caught:
            await client.read(1, Table.HOLDING, 100, 2)
        assert (caught.value.function, caught.value.code) == (3, 2)
        assert await client.read(1, Table.INPUT, 10, 1) == (7,)


async def test_concurrent_tasks_share_the_bus(rtu_server: str) -> None:
    async with ModbusRtuClient(rtu_server, timeout=TIMEOUT) as client:

        async def poll(unit: int) -> list[tuple[int, ...] | tuple[bool, ...]]:
            return [await client.read(unit, Table.HOLDING, address, 1) for address in range(5)]

        one, two = await asyncio.gather(poll(1), poll(2))
        assert one == [(220,), (450,), (3,), (4,), (5,)]
        assert two == [(1220,), (1450,), (3,), (4,), (5,)]


async def test_mbpoll_reads_the_pymodbus_server(rtu_server: str) -> None:
    """An independent C master (libmodbus) against the same setup: proves pymodbus + socat."""
    mbpoll = shutil.which("mbpoll")
    if mbpoll is None:
        pytest.skip("mbpoll is not installed")
    args = ["-m", "rtu", "-b", "9600", "-P", "none", "-a", "1", "-t", "4", "-r", "1", "-c", "2"]
    process = await asyncio.create_subprocess_exec(
        mbpoll, *args, "-1", rtu_server, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    output, _ = await asyncio.wait_for(process.communicate(), 5)
    text = output.decode()
    assert process.returncode == 0, text
    assert re.findall(r"^\[(\d+)\]:\s+(\d+)\s*$", text, re.MULTILINE) == [
        ("1", "220"),
        ("2", "450"),
    ]


# --- against a scripted fake device -------------------------------------------------------------

Chunks = list[tuple[float, bytes]]  # (delay in s, bytes), sent in order
Script = Callable[[bytes], Chunks]


class FakeRtuDevice:
    """Reads request frames on its end of the pty; answers the n-th with script[n](request).

    Records when each request arrived and flags one that arrived while an answer was pending.
    """

    def __init__(self, path: str, script: list[Script]) -> None:
        self.loop = asyncio.get_running_loop()
        self.fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        self.script = script
        self.buffer = bytearray()
        self.requests: list[bytes] = []
        self.arrived: list[float] = []
        self.answered: list[float] = []
        self.pending = 0
        self.overlapping = 0
        self.scheduled: list[asyncio.TimerHandle] = []
        self.loop.add_reader(self.fd, self._readable)

    def close(self) -> None:
        for handle in self.scheduled:
            handle.cancel()
        self.loop.remove_reader(self.fd)
        os.close(self.fd)

    def send(self, data: bytes) -> None:
        self.answered.append(self.loop.time())
        os.write(self.fd, data)

    def _readable(self) -> None:
        try:
            data = os.read(self.fd, 512)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.loop.remove_reader(self.fd)
            return
        self.buffer += data
        while len(self.buffer) >= 8:
            size = 9 + self.buffer[6] if self.buffer[1] == 16 else 8
            if len(self.buffer) < size:
                return
            request = bytes(self.buffer[:size])
            del self.buffer[:size]
            self._answer(request)

    def _answer(self, request: bytes) -> None:
        self.arrived.append(self.loop.time())
        self.overlapping += self.pending > 0
        self.requests.append(request)
        if crc16(request) != 0:  # garbled: the tests compare self.requests with what they sent
            return
        chunks = self.script[len(self.requests) - 1](request)
        delay = 0.0
        for index, (pause, data) in enumerate(chunks):
            delay += pause
            last = index == len(chunks) - 1
            self.pending += last
            self.scheduled.append(self.loop.call_later(delay, self._send_chunk, data, last))

    def _send_chunk(self, data: bytes, last: bool) -> None:
        self.send(data)
        self.pending -= last


@pytest.fixture
async def fake_bus(pty_pair: PtyPair) -> AsyncIterator[Callable[[list[Script]], FakeRtuDevice]]:
    devices: list[FakeRtuDevice] = []

    def start(script: list[Script]) -> FakeRtuDevice:
        devices.append(FakeRtuDevice(pty_pair.b, script))
        return devices[-1]

    yield start
    for device in devices:
        device.close()


def holding_answer(unit: int, *values: int) -> bytes:
    body = bytes([unit, 3, 2 * len(values)]) + b"".join(v.to_bytes(2, "big") for v in values)
    return body + crc16(body).to_bytes(2, "little")


def answer(*values: int, unit: int = 1, delay: float = 0.0) -> Script:
    return lambda request: [(delay, holding_answer(unit, *values))]


def silent(request: bytes) -> Chunks:
    return []


def bad_crc_then_noise(request: bytes) -> Chunks:
    frame = holding_answer(1, 42)
    return [(0.0, frame[:-1] + bytes([frame[-1] ^ 0xFF])), (0.01, b"\x00\xff\x00")]


def truncated(request: bytes) -> Chunks:
    return [(0.0, holding_answer(1, 42)[:5])]


async def test_faults_of_a_device(
    pty_pair: PtyPair, fake_bus: Callable[..., FakeRtuDevice]
) -> None:
    device = fake_bus(
        [silent, bad_crc_then_noise, answer(42, unit=9), truncated, answer(42), answer(43)]
    )
    loop = asyncio.get_running_loop()
    async with ModbusRtuClient(pty_pair.a, timeout=TIMEOUT) as client:
        started = loop.time()
        with pytest.raises(DeviceTimeout, match=r"A: no answer within 0\.3 s") as timed_out:
            await client.read(1, Table.HOLDING, 0, 1)
        assert 0.29 < loop.time() - started < 0.6
        assert timed_out.value.address == pty_pair.a

        started = loop.time()
        with pytest.raises(ModbusCrcError):
            await client.read(1, Table.HOLDING, 0, 1)
        assert loop.time() - started >= 0.03, "the noise 10 ms later was drained until silent"

        with pytest.raises(ModbusWrongUnit, match="unit 9 answered a request to unit 1"):
            await client.read(1, Table.HOLDING, 0, 1)

        with pytest.raises(DeviceTimeout, match=r"an incomplete answer \(5 bytes\) within 0\.3"):
            await client.read(1, Table.HOLDING, 0, 1)

        assert client.connected
        assert await client.read(1, Table.HOLDING, 0, 1) == (42,)
        assert await client.read(1, Table.HOLDING, 0, 1) == (43,)
    assert device.requests == [encode_rtu_read_request(1, Table.HOLDING, 0, 1)] * 6


async def test_late_answers_and_noise_are_discarded(
    pty_pair: PtyPair, fake_bus: Callable[..., FakeRtuDevice]
) -> None:
    device = fake_bus([answer(7, delay=TIMEOUT + 0.05), answer(42), answer(43)])
    async with ModbusRtuClient(pty_pair.a, timeout=TIMEOUT) as client:
        with pytest.raises(DeviceTimeout):
            await client.read(1, Table.HOLDING, 0, 1)
        await asyncio.sleep(0.1)  # the late answer arrives while no request waits
        assert len(device.answered) == 1
        assert await client.read(1, Table.HOLDING, 0, 1) == (42,)
        device.send(holding_answer(1, 9) + b"\xff\x00noise")
        await asyncio.sleep(0.02)
        assert await client.read(1, Table.HOLDING, 0, 1) == (43,)


async def test_requests_never_overlap_and_keep_the_frame_gap(
    pty_pair: PtyPair, fake_bus: Callable[..., FakeRtuDevice]
) -> None:
    def echo_address(request: bytes) -> Chunks:
        address = int.from_bytes(request[2:4], "big")
        return [(0.01, holding_answer(request[0], address * 10 + request[0]))]

    device = fake_bus([echo_address] * 12)
    # at 115200 baud, sending a request and the gap after it take < 3 ms: far less than the 10 ms
    # the device takes to answer, so only the lock keeps the second task from sending meanwhile
    async with ModbusRtuClient(pty_pair.a, baudrate=115200, timeout=TIMEOUT) as client:

        async def poll(unit: int) -> list[tuple[int, ...] | tuple[bool, ...]]:
            return [await client.read(unit, Table.HOLDING, address, 1) for address in range(6)]

        one, two = await asyncio.gather(poll(1), poll(2))
    assert one == [(address * 10 + 1,) for address in range(6)]
    assert two == [(address * 10 + 2,) for address in range(6)]
    assert len(device.requests) == 12
    assert device.overlapping == 0
    units = [request[0] for request in device.requests]
    assert units.count(1) == units.count(2) == 6 and units != sorted(units), "tasks interleave"
    gaps = [
        arrived - answered
        for arrived, answered in zip(device.arrived[1:], device.answered[:-1], strict=True)
    ]
    assert min(gaps) >= client.frame_gap_s


async def test_port_vanishing_is_unreachable(
    pty_pair: PtyPair, fake_bus: Callable[..., FakeRtuDevice]
) -> None:
    fake_bus([answer(5), silent])
    client = ModbusRtuClient(pty_pair.a, timeout=1.0)
    assert await client.read(1, Table.HOLDING, 0, 1) == (5,)
    loop = asyncio.get_running_loop()
    loop.call_later(0.05, pty_pair.socat.kill)
    started = loop.time()
    with pytest.raises(DeviceUnreachable, match="port lost: hung up"):
        await client.read(1, Table.HOLDING, 0, 1)
    assert loop.time() - started < 0.5, "noticed at once, not at the timeout"
    assert not client.connected
    pty_pair.socat.wait()
    await asyncio.to_thread(Path(pty_pair.a).unlink)
    with pytest.raises(DeviceUnreachable, match="cannot open"):
        await client.read(1, Table.HOLDING, 0, 1)


async def test_a_port_has_one_master(rtu_server: str) -> None:
    async with ModbusRtuClient(rtu_server, timeout=TIMEOUT):
        with pytest.raises(DeviceUnreachable, match="exclusively lock"):
            await ModbusRtuClient(rtu_server).connect()


async def test_a_line_never_silent_is_a_timeout(
    pty_pair: PtyPair, fake_bus: Callable[..., FakeRtuDevice]
) -> None:
    device = fake_bus([answer(1)])
    loop = asyncio.get_running_loop()
    # at 1200 baud the gap is 29 ms (8N1): a byte every 2 ms never leaves the line silent that long
    noise = [loop.call_later(index * 0.002, device.send, b"\x00") for index in range(100)]
    try:
        async with ModbusRtuClient(pty_pair.a, baudrate=1200, timeout=0.1) as client:
            with pytest.raises(DeviceTimeout, match=r"never silent for 29\.17 ms within 0\.1 s"):
                await client.read(1, Table.HOLDING, 0, 1)
    finally:
        for handle in noise:
            handle.cancel()
    assert device.requests == []
