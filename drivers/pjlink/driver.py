"""PJLink driver (projectors and flat panels, class 1 and 2): polls a profile's points and runs
its commands over one short TCP connection each time.

Rules: a display takes one controller connection at a time and drops idle ones, so every poll
and every command connects, authenticates, sends its requests one after the other and closes;
nothing stays open between them, which leaves the display free for a room's control panel.
The display's class (CLSS ?) is asked once, and again after the link failed. An ERRn answer
rejects the points of that query only; the poll fails when every query is refused. ERR3 to a
query the display only answers when on (input, mute) while it is not on is no fault: those points
are left out. Class 2 points on a display that answers class 1 are rejected once, then not asked.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

from drivers.base import Driver, PollResult, Value
from drivers.errors import DeviceLinkError, DeviceTimeout, DeviceUnreachable, DriverError
from drivers.pjlink import codec
from drivers.pjlink.codec import (
    QUERIES,
    Context,
    LineSplitter,
    PjlinkAuthError,
    PjlinkError,
    PjlinkFrameError,
    PjlinkRefused,
    Power,
    Response,
)
from drivers.pjlink.connection import PjlinkConnection
from drivers.pjlink.profile import PjlinkCommand, PjlinkPoint, PjlinkProfile
from wire.net import host_port

_log = logging.getLogger(__name__)

BUSY = "display busy (warming up or cooling down), try again"
_GREETING = "the PJLink greeting"
_ONE_AT_A_TIME = (
    " (a display takes one PJLink connection at a time: is another controller connected?)"
)
_REFUSAL_HINTS = {
    "ERR1": "the display does not know this command",
    "ERR2": "the display does not accept this parameter",
    "ERR3": BUSY,
    "ERR4": "the display reports a failure: check it (lamp, fan, temperature, cover)",
}


class PjlinkSession:
    """One TCP connection to a display: greeting, authentication on the first request, then one
    request at a time. Every wait is bounded by `timeout`."""

    def __init__(self, host: str, port: int, password: str | None, timeout: float) -> None:
        self.host = host
        self.port = port
        self.password = password
        self.timeout = timeout
        self.address = host_port(host, port)
        self.requests = 0
        self._streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self._splitter = LineSplitter()
        self._lines: deque[bytes] = deque()
        self._digest: str | None = None

    async def open(self) -> None:
        try:
            async with asyncio.timeout(self.timeout):
                self._streams = await asyncio.open_connection(self.host, self.port)
        except TimeoutError:
            raise DeviceTimeout(self.address, f"no connection within {self.timeout} s") from None
        except OSError as error:
            raise DeviceUnreachable(self.address, f"cannot connect: {error}") from error
        try:
            greeting = codec.parse_greeting(await self._line(_GREETING))
        except PjlinkError as error:
            raise error.at(self.address) from None
        if greeting.random is not None:
            if not self.password:
                raise PjlinkAuthError(
                    "the display asks for a PJLink password and none is configured "
                    "(connection: password)"
                ).at(self.address)
            self._digest = codec.auth_digest(greeting.random, self.password)

    async def request(
        self, command: str, parameter: str = codec.QUERY, pclass: int = 1
    ) -> Response:
        """The display's answer; PjlinkRefused for ERR1..ERR4, with the address."""
        if self._streams is None:
            raise DeviceUnreachable(self.address, "not connected")
        line = codec.encode_request(command, parameter, pclass, self._digest)
        self._digest = None  # only the first request of a connection carries it
        self.requests += 1
        writer = self._streams[1]
        try:
            writer.write(line)
            await writer.drain()
        except OSError as error:
            raise DeviceUnreachable(self.address, f"connection lost: {error}") from error
        answer = await self._line(f"the answer to {command}")
        try:
            return codec.parse_response(answer, command, pclass)
        except PjlinkError as error:
            raise error.at(self.address) from None

    async def _line(self, what: str) -> bytes:
        assert self._streams is not None
        reader = self._streams[0]
        while not self._lines:
            try:
                async with asyncio.timeout(self.timeout):
                    data = await reader.read(1024)
            except TimeoutError:
                raise DeviceTimeout(
                    self.address, f"{what} did not come within {self.timeout} s"
                ) from None
            except OSError as error:
                raise DeviceUnreachable(self.address, f"connection lost: {error}") from error
            if not data:
                pending = self._splitter.pending
                cut = f" after {codec.excerpt(pending)} (a line without its CR)" if pending else ""
                hint = _ONE_AT_A_TIME if what == _GREETING else ""
                raise DeviceUnreachable(
                    self.address, f"connection closed by the display before {what}{cut}{hint}"
                )
            try:
                self._lines.extend(self._splitter.feed(data))
            except PjlinkFrameError as error:
                raise error.at(self.address) from None
        return self._lines.popleft()

    def abort(self) -> None:
        if self._streams is not None:
            self._streams[1].transport.abort()
            self._streams = None

    async def close(self) -> None:
        if self._streams is None:
            return
        writer = self._streams[1]
        self._streams = None
        writer.close()
        try:
            async with asyncio.timeout(self.timeout):
                await writer.wait_closed()
        except (OSError, TimeoutError):
            writer.transport.abort()


class PjlinkPool:
    """Nothing is shared between displays; the pool serialises the drivers of one display
    (two entries naming the same host and port) and ends connections still open at shutdown."""

    def __init__(self) -> None:
        self._locks: dict[str, asyncio.Lock] = {}
        self._open: set[PjlinkSession] = set()

    def lock(self, address: str) -> asyncio.Lock:
        return self._locks.setdefault(address, asyncio.Lock())

    @contextlib.asynccontextmanager
    async def session(self, connection: PjlinkConnection) -> AsyncIterator[PjlinkSession]:
        session = PjlinkSession(
            connection.host, connection.port, connection.password, connection.timeout_s
        )
        async with self.lock(session.address):
            self._open.add(session)
            try:
                await session.open()
                yield session
            except BaseException:
                session.abort()
                raise
            finally:
                self._open.discard(session)
                await session.close()

    async def close(self) -> None:
        for session in list(self._open):
            session.abort()
        self._open.clear()


class PjlinkDriver(Driver):
    def __init__(
        self, profile: PjlinkProfile, connection: PjlinkConnection, pool: PjlinkPool
    ) -> None:
        self.profile = profile
        self.connection = connection
        self.pool = pool
        self.address = host_port(connection.host, connection.port)
        self.bus = f"pjlink://{self.address}"
        self._input_names = profile.input_names()
        self._device_class: int | None = None
        self._unsupported: set[str] = set()  # class 2 points of a class 1 display
        self._next_due: dict[str, float] = {}
        self._scheduled = any(p.poll_interval_s is not None for p in profile.points)
        self.connects = 0
        self.requests = 0
        self.refusals = 0  # ERRn answers
        self.bad_answers = 0  # answers that are not PJLink, or values that do not parse

    @contextlib.asynccontextmanager
    async def _session(self) -> AsyncIterator[PjlinkSession]:
        self.connects += 1
        session: PjlinkSession | None = None
        try:
            async with self.pool.session(self.connection) as session:
                yield session
        except DeviceLinkError:
            self._device_class = None  # it may be another display when it comes back
            raise
        except PjlinkFrameError:
            self.bad_answers += 1
            self._device_class = None
            raise
        finally:
            if session is not None:
                self.requests += session.requests

    async def open(self) -> None:
        """Checks that the display answers (greeting and password); nothing stays open."""
        async with self._session() as session:
            await self._class_of(session)

    async def close(self) -> None:
        """Nothing to close: each poll and command closes its own connection."""

    async def _class_of(self, session: PjlinkSession) -> int:
        """The display's PJLink class: asked when the profile is class 2, else 1."""
        if self.profile.pjlink_class == 1:
            return 1
        if self._device_class is None:
            try:
                response = await session.request("CLSS")
                self._device_class = codec.parse_class(response.body)
            except PjlinkRefused:
                self._device_class = 1
            except PjlinkFrameError as error:
                raise error.at(self.address) from None
            if self._device_class < 2:
                self._mark_unsupported()
        return self._device_class

    def _mark_unsupported(self) -> None:
        names = [p.name for p in self.profile.points if p.pclass > 1]
        if names:
            _log.warning(
                "%s: the display answers PJLink class 1; class 2 points not read: %s",
                self.address,
                ", ".join(names),
            )

    def _pclass(self, command: str, device_class: int) -> int:
        if command in codec.CLASS2_ONLY:
            return 2
        return 2 if command in codec.CLASS2_WHERE_AVAILABLE and device_class >= 2 else 1

    def _due(self, now: float) -> list[PjlinkPoint]:
        return [
            p
            for p in self.profile.points
            if p.name not in self._unsupported
            and (p.poll_interval_s is None or now >= self._next_due.get(p.name, 0.0))
        ]

    async def read(self) -> PollResult:
        now = time.monotonic()
        points = self._due(now)
        result = PollResult()
        if not points:
            return result
        answers: dict[str, str | PjlinkRefused] = {}
        async with self._session() as session:
            known = self._device_class is not None
            device_class = await self._class_of(session)
            if self.profile.pjlink_class > 1 and not known:
                answers["CLSS"] = str(device_class)  # just asked: not again in this poll
            if device_class < 2:
                points = self._drop_class2(points, result)
            commands = [
                c
                for c in dict.fromkeys(QUERIES[p.query].command for p in points)
                if c not in answers
            ]
            if any(QUERIES[p.query].standby for p in points) and "POWR" not in commands:
                commands.insert(0, "POWR")  # to tell "in standby" from "refused"
            elif "POWR" in commands:
                commands.insert(0, commands.pop(commands.index("POWR")))
            for command in commands:
                try:
                    answers[command] = (
                        await session.request(command, pclass=self._pclass(command, device_class))
                    ).body
                except PjlinkRefused as refusal:
                    self.refusals += 1
                    answers[command] = refusal
        self._decode(points, answers, device_class, result)
        refused = [a for a in answers.values() if isinstance(a, PjlinkRefused)]
        if answers and len(refused) == len(answers) and result.rejected:
            raise refused[0]  # refusing everything is a display fault, not a few bad points
        if self._scheduled:
            for point in points:
                if point.poll_interval_s is not None:
                    self._next_due[point.name] = now + point.poll_interval_s
        return result

    def _drop_class2(self, points: list[PjlinkPoint], result: PollResult) -> list[PjlinkPoint]:
        kept = []
        for point in points:
            if point.pclass > 1:
                self._unsupported.add(point.name)
                result.rejected.append(
                    (
                        point.name,
                        f"{point.query} needs PJLink class 2; the display answers class 1 "
                        "(CLSS ?): not read again",
                    )
                )
            else:
                kept.append(point)
        return kept

    def _decode(
        self,
        points: list[PjlinkPoint],
        answers: dict[str, str | PjlinkRefused],
        device_class: int,
        result: PollResult,
    ) -> None:
        context = Context(device_class, self._input_names)
        power: Power | None = None
        powr = answers.get("POWR")
        if isinstance(powr, str):
            with contextlib.suppress(PjlinkFrameError):
                power = codec.parse_power(powr)
        for point in points:
            query = QUERIES[point.query]
            answer = answers[query.command]
            if isinstance(answer, PjlinkRefused):
                if answer.busy and query.standby and power not in (None, Power.ON):
                    continue  # no input or mute while in standby: nothing to report
                result.rejected.append((point.name, str(answer)))
                continue
            try:
                raw: Value = query.extract(answer, context)
            except PjlinkFrameError as error:
                self.bad_answers += 1
                result.rejected.append((point.name, str(error.at(self.address))))
                continue
            result.add(point, raw)

    async def command(
        self, name: str, argument: Any = None, options: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """Sends the command's request, reads the state back and returns it; ValueError for a
        bad request (nothing sent), DriverError when the display refuses or fails."""
        try:
            command = self.profile.command(name)
        except KeyError as error:
            raise ValueError(error.args[0]) from None
        command.check_options(options)
        parameter = self._parameter(command, argument)
        async with self._session() as session:
            device_class = await self._class_of(session)
            pclass = self._pclass(command.set, device_class)
            sent = f"{command.set} {parameter}"
            try:
                codec.check_ok(await session.request(command.set, parameter, pclass))
            except PjlinkRefused as refused:
                self.refusals += 1
                raise DriverError(await self._refusal(session, sent, refused)) from None
            except PjlinkFrameError as error:
                raise error.at(self.address) from None
            result: dict[str, Any] = {"command": name, "sent": sent}
            try:
                result.update(await self._read_back(session, command.set, pclass, device_class))
            except PjlinkRefused as refused:
                self.refusals += 1
                result["readback_error"] = str(refused)
            return result

    def _parameter(self, command: PjlinkCommand, argument: Any) -> str:
        if command.argument is None:
            command.check_argument(argument)  # ValueError if one is given
            assert command.value is not None
            return (
                self.profile.input_parameter(command.value)
                if command.set == "INPT"
                else command.value
            )
        value = command.check_argument(argument)
        if command.set == "POWR":
            return "1" if value else "0"
        if command.set == "AVMT":
            if isinstance(value, bool):
                return "31" if value else "30"
            return str(value)
        return self.profile.input_parameter(str(value))

    async def _refusal(self, session: PjlinkSession, sent: str, refused: PjlinkRefused) -> str:
        """A message for IT staff: what was refused, why, and the power state when it helps."""
        detail = f"{self.address}: {sent} refused with {refused.code} ({refused.meaning})"
        if not refused.busy:
            return f"{_REFUSAL_HINTS.get(refused.code, 'refused')}: {detail}"
        power: Power | None = None
        with contextlib.suppress(PjlinkError):
            power = codec.parse_power((await session.request("POWR")).body)
        if power is Power.STANDBY and not sent.startswith("POWR"):
            return f"display is in standby: power it on first ({detail})"
        state = f"; the display is {power.value}" if power is not None else ""
        return f"{BUSY}: {detail}{state}"

    async def _read_back(
        self, session: PjlinkSession, command: str, pclass: int, device_class: int
    ) -> dict[str, Any]:
        body = (await session.request(command, pclass=pclass)).body
        try:
            if command == "POWR":
                return {"power": codec.parse_power(body).value}
            if command == "AVMT":
                mute = codec.parse_mute(body)
                return {"video_mute": mute.video, "audio_mute": mute.audio}
            code = codec.parse_input(body, device_class)
        except PjlinkFrameError as error:
            self.bad_answers += 1
            raise error.at(self.address) from None
        return {"input": code, "input_name": self._input_names.get(code) or codec.input_name(code)}


Pool = PjlinkPool


def build(profile: PjlinkProfile, connection: PjlinkConnection, pool: PjlinkPool) -> PjlinkDriver:
    return PjlinkDriver(profile, connection, pool)
