"""Modbus TCP client for asyncio: a thin transport over the sans-IO codec, one request in flight.

Answers with another transaction id are discarded; a timeout (DeviceTimeout), lost connection
(DeviceUnreachable) or malformed frame drops the connection, and the next call reconnects.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Self

from drivers.errors import DeviceTimeout, DeviceUnreachable
from drivers.modbus import codec
from drivers.modbus.codec import Function, Response, Table, TcpResponseDecoder

_log = logging.getLogger(__name__)

_Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]


# Unit ids that a Modbus TCP device may answer for whatever it calls itself.
ANY_UNIT = (0, 255)


class ModbusTcpClient:
    def __init__(self, host: str, port: int, *, timeout: float = 2.0) -> None:
        self.host = host
        self.port = port
        self.timeout = timeout
        self.address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self._lock = asyncio.Lock()
        self._streams: _Streams | None = None
        self._decoder = TcpResponseDecoder()
        self._transaction_id = 0

    @property
    def connected(self) -> bool:
        return self._streams is not None

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def connect(self) -> None:
        async with self._lock:
            await self._connect()

    async def close(self) -> None:
        """Close the connection once the request in flight, if any, is over."""
        async with self._lock:
            if self._streams is None:
                return
            _, writer = self._streams
            self._streams = None
            writer.close()
            try:
                await writer.wait_closed()
            except OSError:
                _log.debug("%s: error while closing", self.address, exc_info=True)

    async def read(
        self, unit: int, table: Table, address: int, count: int
    ) -> tuple[int, ...] | tuple[bool, ...]:
        """`count` registers, or bits for coils and discrete inputs, from `address`."""
        response = await self._exchange(
            lambda tid: codec.encode_read_request(tid, unit, table, address, count)
        )
        return codec.read_values(response, table, count)

    async def write_registers(self, unit: int, address: int, values: Sequence[int]) -> None:
        response = await self._exchange(
            lambda tid: codec.encode_write_registers(tid, unit, address, values)
        )
        codec.check_write(response, Function.WRITE_MULTIPLE_REGISTERS)

    async def write_register(self, unit: int, address: int, value: int) -> None:
        response = await self._exchange(
            lambda tid: codec.encode_write_register(tid, unit, address, value)
        )
        codec.check_write(response, Function.WRITE_SINGLE_REGISTER)

    async def write_coil(self, unit: int, address: int, value: bool) -> None:
        response = await self._exchange(
            lambda tid: codec.encode_write_coil(tid, unit, address, value)
        )
        codec.check_write(response, Function.WRITE_SINGLE_COIL)

    async def _connect(self) -> _Streams:
        if self._streams is not None:
            return self._streams
        try:
            async with asyncio.timeout(self.timeout):
                self._streams = await asyncio.open_connection(self.host, self.port)
        except TimeoutError:
            raise DeviceTimeout(self.address, f"no connection within {self.timeout} s") from None
        except OSError as error:
            raise DeviceUnreachable(self.address, f"cannot connect: {error}") from error
        self._decoder = TcpResponseDecoder()
        return self._streams

    def _drop(self) -> None:
        if self._streams is not None:
            self._streams[1].transport.abort()
            self._streams = None

    async def _exchange(self, encode: Callable[[int], bytes]) -> Response:
        async with self._lock:
            transaction_id = (self._transaction_id + 1) % 0x10000
            request = encode(transaction_id)
            self._transaction_id = transaction_id
            reader, writer = await self._connect()
            try:
                async with asyncio.timeout(self.timeout):
                    writer.write(request)
                    await writer.drain()
                    response = await self._receive(reader, transaction_id)
            except TimeoutError:
                self._drop()
                raise DeviceTimeout(self.address, f"no answer within {self.timeout} s") from None
            except OSError as error:
                self._drop()
                raise DeviceUnreachable(self.address, f"connection lost: {error}") from error
            except BaseException:
                self._drop()
                raise
            unit = request[6]
            if response.unit != unit and unit not in ANY_UNIT:
                raise codec.ModbusWrongUnit(unit, response.unit)
            return response

    async def _receive(self, reader: asyncio.StreamReader, transaction_id: int) -> Response:
        while True:
            response = self._decoder.next_response()
            if response is None:
                data = await reader.read(4096)
                if not data:
                    raise DeviceUnreachable(self.address, "connection closed by the device")
                self._decoder.feed(data)
            elif response.transaction_id == transaction_id:
                return response
            else:
                _log.debug("%s: discarding stale %s", self.address, response)
