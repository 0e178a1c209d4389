"""Tests of the asyncio Modbus TCP client against a real pymodbus server and scripted devices."""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from typing import cast

import pytest
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType as SimType
from pymodbus.simulator import SimData, SimDevice

from drivers.errors import DeviceTimeout, DeviceUnreachable
from drivers.modbus.codec import (
    DataType,
    ModbusExceptionResponse,
    ModbusFrameError,
    Table,
    decode_value,
)
from drivers.modbus.transport import ModbusTcpClient

UNIT = 1
COILS = [True, False, True, True, False, False, False, False, True]


def has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


def simulated_device() -> SimDevice:
    return SimDevice(
        UNIT,
        simdata=(
            [SimData(0, values=COILS, datatype=SimType.BITS)],
            [SimData(0, values=[False, True], datatype=SimType.BITS)],
            [SimData(0, values=[0x41AC, 0, 3, 4, 5, 6, 7, 8], datatype=SimType.REGISTERS)],
            [SimData(10, values=[7, 8], datatype=SimType.REGISTERS)],
        ),
    )


@pytest.fixture(params=["127.0.0.1", "::1"])
async def modbus_server(request: pytest.FixtureRequest) -> AsyncIterator[tuple[str, int]]:
    host: str = request.param
    if host == "::1" and not has_ipv6_loopback():
        pytest.skip("no IPv6 loopback on this machine")
    server = ModbusTcpServer(simulated_device(), address=(host, 0))
    await server.serve_forever(background=True)
    listener = cast(asyncio.Server, server.transport)
    try:
        yield host, listener.sockets[0].getsockname()[1]
    finally:
        await server.shutdown()  # type: ignore[no-untyped-call]


async def test_reads_every_table(modbus_server: tuple[str, int]) -> None:
    async with ModbusTcpClient(*modbus_server) as client:
        registers = await client.read(UNIT, Table.HOLDING, 0, 2)
        assert decode_value(registers, DataType.FLOAT32) == 21.5
        assert await client.read(UNIT, Table.INPUT, 10, 2) == (7, 8)
        assert await client.read(UNIT, Table.COIL, 0, 9) == tuple(COILS)
        assert await client.read(UNIT, Table.DISCRETE, 0, 2) == (False, True)


async def test_writes(modbus_server: tuple[str, int]) -> None:
    async with ModbusTcpClient(*modbus_server) as client:
        await client.write_registers(UNIT, 2, [100, 200])
        await client.write_register(UNIT, 4, 300)
        assert await client.read(UNIT, Table.HOLDING, 2, 3) == (100, 200, 300)
        await client.write_coil(UNIT, 1, True)
        await client.write_coil(UNIT, 0, False)
        assert await client.read(UNIT, Table.COIL, 0, 3) == (False, True, True)


async def test_exception_response_keeps_the_connection(modbus_server: tuple[str, int]) -> None:
    async with ModbusTcpClient(*modbus_server) as client:
        with pytest.raises(ModbusExceptionResponse) as caught:
            await client.read(UNIT, Table.HOLDING, 100, 2)
        assert (caught.value.function, caught.value.code) == (3, 2)
        assert "illegal data address" in str(caught.value)
        assert client.connected
        assert await client.read(UNIT, Table.INPUT, 11, 1) == (8,)


async def test_concurrent_requests_are_serialised(modbus_server: tuple[str, int]) -> None:
    async with ModbusTcpClient(*modbus_server) as client:
        reads = [client.read(UNIT, Table.HOLDING, address, 1) for address in range(2, 8)] * 3
        assert await asyncio.gather(*reads) == [(value,) for value in range(3, 9)] * 3


async def test_transaction_ids_wrap(modbus_server: tuple[str, int]) -> None:
    async with ModbusTcpClient(*modbus_server) as client:
        client._transaction_id = 0xFFFE
        for _ in range(3):
            assert await client.read(UNIT, Table.INPUT, 10, 1) == (7,)
        assert client._transaction_id == 1


async def test_reconnects_after_close(modbus_server: tuple[str, int]) -> None:
    client = ModbusTcpClient(*modbus_server)
    await client.connect()
    await client.close()
    assert not client.connected
    assert await client.read(UNIT, Table.INPUT, 10, 1) == (7,)
    await client.close()


def test_address_brackets_ipv6_literals() -> None:
    assert ModbusTcpClient("::1", 502).address == "[::1]:502"
    assert ModbusTcpClient("plc.school.example", 1502).address == "plc.school.example:1502"


# --- scripted fake devices ----------------------------------------------------------------------

Reply = Callable[[bytes], bytes | None]


class FakeDevice:
    """Answers each request with reply(request): b"" stays silent, None hangs up."""

    def __init__(self, reply: Reply) -> None:
        self.reply = reply
        self.connections = 0
        self.writers: list[asyncio.StreamWriter] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        with suppress(ConnectionError):
            while request := await reader.read(260):
                answer = self.reply(request)
                if answer is None:
                    break
                writer.write(answer)
        writer.close()


@asynccontextmanager
async def fake_device(reply: Reply) -> AsyncIterator[tuple[FakeDevice, int]]:
    device = FakeDevice(reply)
    server = await asyncio.start_server(device.handle, "127.0.0.1", 0)
    async with server:
        yield device, server.sockets[0].getsockname()[1]
        for writer in device.writers:
            writer.close()


def frame(transaction_id: int, pdu: str, protocol: int = 0) -> bytes:
    body = bytes([UNIT]) + bytes.fromhex(pdu)
    return struct.pack(">HHH", transaction_id % 0x10000, protocol, len(body)) + body


def tid(request: bytes) -> int:
    return int.from_bytes(request[:2], "big")


async def test_timeout_drops_the_connection_and_next_call_reconnects() -> None:
    async with fake_device(lambda request: b"") as (device, port):
        client = ModbusTcpClient("127.0.0.1", port, timeout=0.2)
        started = time.monotonic()
        with pytest.raises(DeviceTimeout, match=rf"127\.0\.0\.1:{port}: no answer within 0\.2 s"):
            await client.read(UNIT, Table.HOLDING, 0, 1)
        assert 0.15 < time.monotonic() - started < 1.0
        assert not client.connected
        with pytest.raises(DeviceTimeout) as caught:
            await client.read(UNIT, Table.HOLDING, 0, 1)
        assert caught.value.address == f"127.0.0.1:{port}"
        assert device.connections == 2


async def test_stale_responses_are_discarded() -> None:
    def stale_then_fresh(request: bytes) -> bytes:
        return frame(tid(request) - 1, "03 02 0007") + frame(tid(request), "03 02 002a")

    async with (
        fake_device(stale_then_fresh) as (_, port),
        ModbusTcpClient("127.0.0.1", port, timeout=0.5) as client,
    ):
        assert await client.read(UNIT, Table.HOLDING, 0, 1) == (42,)
        assert await client.read(UNIT, Table.HOLDING, 0, 1) == (42,)


async def test_malformed_frame_drops_the_connection() -> None:
    async with fake_device(lambda request: frame(tid(request), "03 02 002a", protocol=1)) as (
        device,
        port,
    ):
        client = ModbusTcpClient("127.0.0.1", port, timeout=0.5)
        for _ in range(2):
            with pytest.raises(ModbusFrameError, match="protocol id is 1"):
                await client.read(UNIT, Table.HOLDING, 0, 1)
            assert not client.connected
        assert device.connections == 2


async def test_device_hanging_up_is_unreachable() -> None:
    async with fake_device(lambda request: None) as (_, port):
        client = ModbusTcpClient("127.0.0.1", port, timeout=0.5)
        with pytest.raises(DeviceUnreachable, match="connection closed by the device"):
            await client.read(UNIT, Table.HOLDING, 0, 1)
        assert not client.connected


async def test_closed_port_is_unreachable() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    client = ModbusTcpClient("127.0.0.1", port, timeout=0.5)
    with pytest.raises(DeviceUnreachable, match=rf"127\.0\.0\.1:{port}: cannot connect") as caught:
        await client.read(UNIT, Table.HOLDING, 0, 1)
    assert caught.value.address == f"127.0.0.1:{port}"
    with pytest.raises(DeviceUnreachable):
        await client.connect()


async def test_invalid_request_neither_connects_nor_consumes_an_id() -> None:
    client = ModbusTcpClient("127.0.0.1", 9, timeout=0.5)
    with pytest.raises(ValueError, match="holding count 126"):
        await client.read(UNIT, Table.HOLDING, 0, 126)
    assert client._transaction_id == 0
    assert not client.connected
