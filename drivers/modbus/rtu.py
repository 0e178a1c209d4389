"""Modbus RTU client for asyncio: the sans-IO codec on a serial port's fd watched by the loop.

One request at a time on the bus, each after the inter-frame gap of silence; input while no request
waits is discarded, a garbled answer is drained until the line is silent, a lost port is reopened.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
from collections.abc import Sequence
from contextlib import suppress
from typing import Final, Protocol, Self

import serial  # type: ignore[import-untyped, unused-ignore]

from drivers.errors import DeviceTimeout, DeviceUnreachable
from drivers.modbus import codec
from drivers.modbus.codec import (
    Function,
    ModbusFrameError,
    ModbusRequestError,
    Response,
    RtuResponseDecoder,
    Table,
)

_log = logging.getLogger(__name__)

# "Silent" after garbage means no byte for this long at least: USB adapters deliver bytes in
# bursts up to 16 ms apart (the FTDI latency timer), far longer than 3.5 characters.
MIN_DRAIN_SILENCE_S: Final = 0.02
_STALE_KEPT: Final = 256  # stale bytes kept for the debug log; older ones are only counted
_READ_SIZE: Final = 4096


class _SerialPort(Protocol):
    def fileno(self) -> int: ...
    def reset_output_buffer(self) -> None: ...
    def close(self) -> None: ...


class ModbusRtuClient:
    """Master of one RTU bus; every device on it is a unit id, 1 to 247."""

    def __init__(
        self,
        port: str,
        *,
        baudrate: int = 9600,
        bytesize: int = 8,
        parity: str = "N",
        stopbits: float = 1,
        timeout: float = 1.0,
    ) -> None:
        if bytesize not in (5, 6, 7, 8):
            raise ModbusRequestError(f"byte size {bytesize!r} is not 5, 6, 7 or 8")
        if parity not in ("N", "E", "O", "M", "S"):
            raise ModbusRequestError(f"parity {parity!r} is not one of N, E, O, M, S")
        if stopbits not in (1, 1.5, 2):
            raise ModbusRequestError(f"stop bits {stopbits!r} is not 1, 1.5 or 2")
        if not (isinstance(timeout, int | float) and 0 < timeout < math.inf):
            raise ModbusRequestError(f"timeout {timeout!r} is not a positive number of seconds")
        bits_per_char = 1 + bytesize + (parity != "N") + stopbits
        self.frame_gap_s = codec.rtu_frame_gap_s(baudrate, bits_per_char)
        self.char_time_s = bits_per_char / baudrate
        self.port = port
        self.address = port
        self.baudrate = baudrate
        self.bytesize = bytesize
        self.parity = parity
        self.stopbits = stopbits
        self.timeout = timeout
        self._lock = asyncio.Lock()
        self._serial: _SerialPort | None = None
        self._fd = -1
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._listening = False
        self._rx = bytearray()
        self._stale = 0
        self._last_rx = -math.inf
        self._tx_end = -math.inf
        self._lost_reason = ""

    @property
    def connected(self) -> bool:
        return self._serial is not None

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def connect(self) -> None:
        async with self._lock:
            self._open()

    async def close(self) -> None:
        """Close the port once the request in flight, if any, is over."""
        async with self._lock:
            self._shut()

    async def read(
        self, unit: int, table: Table, address: int, count: int
    ) -> tuple[int, ...] | tuple[bool, ...]:
        """`count` registers, or bits for coils and discrete inputs, from `address`."""
        request = codec.encode_rtu_read_request(unit, table, address, count)
        return codec.read_values(await self._exchange(request), table, count)

    async def write_registers(self, unit: int, address: int, values: Sequence[int]) -> None:
        request = codec.encode_rtu_write_registers(unit, address, values)
        response = await self._exchange(request)
        codec.check_write(response, Function.WRITE_MULTIPLE_REGISTERS, (address, len(values)))

    async def write_register(self, unit: int, address: int, value: int) -> None:
        response = await self._exchange(codec.encode_rtu_write_register(unit, address, value))
        codec.check_write(response, Function.WRITE_SINGLE_REGISTER, (address, value))

    async def write_coil(self, unit: int, address: int, value: bool) -> None:
        response = await self._exchange(codec.encode_rtu_write_coil(unit, address, value))
        codec.check_write(response, Function.WRITE_SINGLE_COIL, (address, 0xFF00 if value else 0))

    # --- port ---------------------------------------------------------------------------------

    def _open(self) -> None:
        if self._serial is not None:
            return
        loop = asyncio.get_running_loop()
        try:
            port: _SerialPort = serial.Serial(
                self.port,
                baudrate=self.baudrate,
                bytesize=self.bytesize,
                parity=self.parity,
                stopbits=self.stopbits,
                timeout=0,
                write_timeout=0,
                exclusive=True,
            )
        except OSError as error:  # serial.SerialException is an OSError
            raise DeviceUnreachable(self.address, f"cannot open: {error}") from error
        self._serial, self._fd, self._loop = port, port.fileno(), loop
        self._rx.clear()
        self._stale = 0
        self._last_rx = loop.time()  # the line's state before the port opened is unknown
        self._tx_end = -math.inf
        loop.add_reader(self._fd, self._on_readable)

    def _shut(self) -> None:
        port, loop = self._serial, self._loop
        if port is None or loop is None:
            return
        self._serial = None
        loop.remove_reader(self._fd)
        loop.remove_writer(self._fd)
        try:
            port.close()
        except OSError:
            _log.debug("%s: error while closing", self.address, exc_info=True)
        self._fd = -1
        self._wake()

    def _lose(self, reason: str) -> None:
        _log.warning("%s: %s", self.address, reason)
        self._lost_reason = reason
        self._shut()

    def _on_readable(self) -> None:
        try:
            data = os.read(self._fd, _READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as error:
            self._lose(f"port lost: {error.strerror or error}")
            return
        if not data:  # readable yet empty: the tty hung up (unplugged, or the pty's master closed)
            self._lose("port lost: hung up")
            return
        assert self._loop is not None
        self._last_rx = self._loop.time()
        self._rx += data
        if self._listening:
            self._wake()
        else:
            self._stale += len(data)
            del self._rx[:-_STALE_KEPT]

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def _wait(self, for_writing: bool = False) -> None:
        """Until something was read (or the fd is writable); DeviceUnreachable if the port went."""
        if self._serial is None or self._loop is None:
            raise DeviceUnreachable(self.address, self._lost_reason or "port closed")
        self._waiter = self._loop.create_future()
        if for_writing:
            self._loop.add_writer(self._fd, self._wake)
        try:
            await self._waiter
        finally:
            self._waiter = None
            if for_writing and self._serial is not None:
                self._loop.remove_writer(self._fd)
        if self._serial is None:
            raise DeviceUnreachable(self.address, self._lost_reason or "port closed")

    # --- exchange -----------------------------------------------------------------------------

    async def _exchange(self, request: bytes) -> Response:
        decoder = RtuResponseDecoder.for_request(request)
        async with self._lock:
            self._open()
            try:
                return await self._transact(request, decoder)
            finally:
                self._listening = False
                self._rx.clear()

    async def _transact(self, request: bytes, decoder: RtuResponseDecoder) -> Response:
        try:
            async with asyncio.timeout(self.timeout):
                await self._until_silent(self.frame_gap_s)
        except TimeoutError:
            raise DeviceTimeout(
                self.address,
                f"line never silent for {self.frame_gap_s * 1000:.2f} ms within {self.timeout} s",
            ) from None
        self._discard_stale()
        assert self._loop is not None
        deadline = self._loop.time() + len(request) * self.char_time_s + self.timeout
        sent = False
        try:
            async with asyncio.timeout_at(deadline):
                self._listening = True
                await self._send(request)
                sent = True
                return await self._receive(decoder)
        except TimeoutError:
            if not sent and self._serial is not None:
                with suppress(OSError):
                    self._serial.reset_output_buffer()
            got = (
                f"an incomplete answer ({decoder.received} bytes)"
                if decoder.received
                else "no answer"
            )
            raise DeviceTimeout(self.address, f"{got} within {self.timeout} s") from None
        except ModbusFrameError:
            self._listening = False
            with suppress(TimeoutError):
                async with asyncio.timeout(self.timeout):
                    await self._until_silent(max(self.frame_gap_s, MIN_DRAIN_SILENCE_S))
            self._discard_stale()
            raise
        except OSError as error:
            self._lose(f"port lost: {error.strerror or error}")
            raise DeviceUnreachable(self.address, self._lost_reason) from error

    async def _until_silent(self, silence: float) -> None:
        """Until nothing was sent or received for `silence` seconds."""
        assert self._loop is not None
        while (remaining := max(self._last_rx, self._tx_end) + silence - self._loop.time()) > 0:
            await asyncio.sleep(remaining)

    def _discard_stale(self) -> None:
        if self._stale:
            _log.debug(
                "%s: discarding %d stale bytes, ending in %s",
                self.address,
                self._stale,
                self._rx.hex(" "),
            )
        self._rx.clear()
        self._stale = 0

    async def _send(self, frame: bytes) -> None:
        assert self._loop is not None
        start = max(self._loop.time(), self._tx_end)
        unsent = memoryview(frame)
        while unsent:
            if self._serial is None:
                raise DeviceUnreachable(self.address, self._lost_reason or "port closed")
            with suppress(BlockingIOError, InterruptedError):
                unsent = unsent[os.write(self._fd, unsent) :]
            if unsent:
                await self._wait(for_writing=True)
        # os.write only queued the bytes: estimate when the UART sends the last one
        self._tx_end = max(start + len(frame) * self.char_time_s, self._loop.time())

    async def _receive(self, decoder: RtuResponseDecoder) -> Response:
        while True:
            if self._rx:
                data = bytes(self._rx)
                self._rx.clear()
                response = decoder.feed(data)
                if response is not None:
                    if decoder.surplus:
                        _log.debug(
                            "%s: discarding %s after the answer",
                            self.address,
                            decoder.surplus.hex(" "),
                        )
                    return response
            await self._wait()
