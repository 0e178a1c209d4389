"""A simulated PJLink display (projector or flat panel), class 1 or 2, over real TCP.

Power is a state machine on a simulated clock: standby → warming → on → cooling → standby, the
transitions taking `warm_up_s` / `cool_down_s` simulated seconds; set commands while warming or
cooling, and input or mute while in standby, answer ERR3, as real projectors do. Lamp and filter
hours grow while the lamp is lit. One controller connection at a time: another one waits half a
second for it to end, then is closed. Faults: `offline` (nothing listens: connections are
refused), `silent` (accepts, never speaks), `garbage` (junk instead of the greeting), `garbled`
(junk instead of answers), `truncated` (an answer without its CR, then the connection closes),
`overlong` (answers longer than PJLink allows); `refuse` forces ERRn answers for chosen commands.

    async with serve_projector(SimulatedProjector(id="a101-proj"), clock) as server:
        server.port  # the port chosen when the spec's port is 0
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from drivers.pjlink import codec
from drivers.pjlink.codec import (
    MUTE_SETTINGS,
    LineSplitter,
    Mute,
    PjlinkFrameError,
    Power,
    Request,
)
from wire.net import host_port

log = logging.getLogger(__name__)

Clock = Callable[[], float]
ProjectorFault = Literal["none", "offline", "silent", "garbage", "garbled", "truncated", "overlong"]

#: Commands the simulator answers, and the class that introduced them.
CLASS1_COMMANDS = frozenset(
    {"POWR", "INPT", "AVMT", "ERST", "LAMP", "INST", "NAME", "INF1", "INF2", "INFO", "CLSS"}
)
CLASS2_COMMANDS = frozenset({"SNUM", "SVER", "FILT", "RLMP", "RFIL", "INNM"})
BUSY_GRACE_S = 0.5
GARBAGE = b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03 not PJLink \xff\xfe\r"


class SimulatedProjector(BaseModel):
    """What a simulated display is; `port: 0` picks a free port (read it from the server)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 0
    password: Annotated[str, Field(min_length=1, max_length=32)] | None = None
    pjlink_class: Literal[1, 2] = 1
    name: Annotated[str, Field(max_length=64)] = "Projector"
    manufacturer: Annotated[str, Field(max_length=32)] = "CampusSim"
    product: Annotated[str, Field(max_length=32)] = "PJ-100"
    other_info: Annotated[str, Field(max_length=32)] = "simulated"
    serial: Annotated[str, Field(max_length=32)] = "SIM0001"
    software_version: Annotated[str, Field(max_length=32)] = "1.0.0"
    inputs: Annotated[list[str], Field(min_length=1)] = ["11", "31", "32"]
    input: str = "31"
    power: Literal["standby", "on"] = "standby"
    warm_up_s: Annotated[float, Field(ge=0, le=3600)] = 30.0
    cool_down_s: Annotated[float, Field(ge=0, le=3600)] = 60.0
    lamps: Annotated[int, Field(ge=0, le=8, description="0: a flat panel, no LAMP")] = 1
    lamp_hours: Annotated[float, Field(ge=0, le=99_999)] = 1000.0
    filter_hours: Annotated[float, Field(ge=0, le=99_999)] | None = Field(
        500.0, description="None: no filter (FILT answers ERR1)"
    )
    errors: Annotated[str, Field(pattern=r"^[012]{6}$")] = Field(
        "000000", description="ERST: fan, lamp, temperature, cover, filter, other"
    )
    fault: ProjectorFault = "none"
    refuse: dict[str, Literal[1, 2, 3, 4]] = Field(
        default_factory=dict, description="commands answered ERRn, e.g. {LAMP: 4}"
    )
    idle_timeout_s: Annotated[float, Field(gt=0, le=3600)] = 30.0

    @field_validator("inputs")
    @classmethod
    def _codes(cls, inputs: list[str]) -> list[str]:
        for code in inputs:
            if not codec.valid_input(code):
                raise ValueError(f"{code!r} is not a PJLink input code")
        return inputs


class ProjectorState:
    """The display's state on the simulated clock, and its answer to each request (pure)."""

    def __init__(self, spec: SimulatedProjector, now: float) -> None:
        self.spec = spec
        self.power = Power.ON if spec.power == "on" else Power.STANDBY
        self.input = spec.input if spec.input in spec.inputs else spec.inputs[0]
        self.mute = Mute(False, False)
        self.lamp_hours = spec.lamp_hours
        self.filter_hours = spec.filter_hours
        self.errors = spec.errors
        self.refuse: dict[str, int] = dict(spec.refuse)
        self._last = now
        self._until = now  # end of warming or cooling

    def advance(self, now: float) -> None:
        while self.power in (Power.WARMING, Power.COOLING) and self._until <= now:
            self._run_lamp(self._until)
            self.power = Power.ON if self.power is Power.WARMING else Power.STANDBY
        self._run_lamp(now)

    def _run_lamp(self, until: float) -> None:
        elapsed = max(0.0, until - self._last)
        self._last = max(self._last, until)
        if self.power.lit:
            self.lamp_hours = min(self.lamp_hours + elapsed / 3600, codec.MAX_HOURS)
            if self.filter_hours is not None:
                self.filter_hours = min(self.filter_hours + elapsed / 3600, codec.MAX_HOURS)

    def _switch(self, on: bool, now: float) -> str:
        if self.power in (Power.WARMING, Power.COOLING):
            return "ERR3"
        if on and self.power is Power.STANDBY:
            self.power, self._until = Power.WARMING, now + self.spec.warm_up_s
        elif not on and self.power is Power.ON:
            self.power, self._until = Power.COOLING, now + self.spec.cool_down_s
            self.mute = Mute(False, False)
        self.advance(now)  # no warm-up at all: on at once
        return "OK"

    def answer(self, request: Request, now: float) -> str:
        """The body of the answer to `request` (a value, OK or ERRn)."""
        self.advance(now)
        command = request.command
        if command in CLASS2_COMMANDS:
            if self.spec.pjlink_class < 2 or request.pclass < 2:
                return "ERR1"
        elif command not in CLASS1_COMMANDS or request.pclass > self.spec.pjlink_class:
            return "ERR1"
        if command in self.refuse:
            return f"ERR{self.refuse[command]}"
        if command == "POWR":
            if request.is_query:
                return self.power.code
            if request.parameter not in ("0", "1"):
                return "ERR2"
            return self._switch(request.parameter == "1", now)
        if command in ("INPT", "AVMT"):
            return self._picture(request)
        return self._info(request)

    def _picture(self, request: Request) -> str:
        """INPT and AVMT: only while on."""
        if self.power is not Power.ON:
            return "ERR3"
        if request.command == "INPT":
            if request.is_query:
                return self.input
            if not codec.valid_input(request.parameter, request.pclass):
                return "ERR2"
            if request.parameter not in self.spec.inputs:
                return "ERR2"
            self.input = request.parameter
            return "OK"
        if request.is_query:
            return self.mute.code
        if request.parameter not in MUTE_SETTINGS:
            return "ERR2"
        video, audio = MUTE_SETTINGS[request.parameter]
        self.mute = Mute(
            self.mute.video if video is None else video,
            self.mute.audio if audio is None else audio,
        )
        return "OK"

    def _info(self, request: Request) -> str:
        if not request.is_query:
            return "ERR2"
        spec = self.spec
        match request.command:
            case "ERST":
                return self.errors
            case "LAMP":
                if spec.lamps == 0:
                    return "ERR1"
                lit = "1" if self.power.lit else "0"
                return " ".join(f"{int(self.lamp_hours)} {lit}" for _ in range(spec.lamps))
            case "FILT":
                return "ERR1" if self.filter_hours is None else str(int(self.filter_hours))
            case "INST":
                return " ".join(spec.inputs)
            case "CLSS":
                return str(spec.pjlink_class)
            case "INNM":
                return f"Input {self.input}"
        texts = {
            "NAME": spec.name,
            "INF1": spec.manufacturer,
            "INF2": spec.product,
            "INFO": spec.other_info,
            "SNUM": spec.serial,
            "SVER": spec.software_version,
            "RLMP": "LMP-100" if spec.lamps else "",
            "RFIL": "FLT-100" if spec.filter_hours is not None else "",
        }
        return texts[request.command]


class ProjectorServer:
    """Serves one simulated display; `fault` and `state` may be changed while it runs."""

    def __init__(self, spec: SimulatedProjector, clock: Clock = time.monotonic) -> None:
        self.spec = spec
        self.clock = clock
        self.state = ProjectorState(spec, clock())
        self.fault: ProjectorFault = spec.fault
        self.host = spec.host
        self.port = spec.port
        self.connections = 0
        self.requests = 0
        self.auth_failures = 0
        self._server: asyncio.Server | None = None
        self._one_at_a_time = asyncio.Lock()
        self.turned_away = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def address(self) -> str:
        return host_port(self.host, self.port)

    async def start(self) -> None:
        """Listens (unless the fault is `offline`: then the port is only chosen)."""
        if self.port == 0:
            self.port = await _pick_port(self.host)
        if self.fault != "offline":
            await self._listen()
        log.info("simulated display %s on %s", self.spec.id, self.address)

    async def _listen(self) -> None:
        if self._server is None:
            self._server = await asyncio.start_server(
                self._serve, self.host, self.port, reuse_address=True
            )

    async def set_offline(self, offline: bool) -> None:
        """Offline: stops listening (connections are refused) and drops open ones."""
        if offline:
            self.fault = "offline"
            await self._unlisten()
        else:
            self.fault = "none" if self.fault == "offline" else self.fault
            await self._listen()

    async def _unlisten(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
            for writer in list(self._writers):
                writer.transport.abort()  # the session's read ends; cancelling would be logged
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await server.wait_closed()

    async def stop(self) -> None:
        await self._unlisten()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        self.connections += 1
        try:
            try:  # one controller at a time; a closing one gets a moment to finish
                async with asyncio.timeout(BUSY_GRACE_S):
                    await self._one_at_a_time.acquire()
            except TimeoutError:
                self.turned_away += 1
                return
            try:
                await self._session(reader, writer)
            finally:
                self._one_at_a_time.release()
        except (OSError, asyncio.IncompleteReadError, TimeoutError):
            pass
        finally:
            self._tasks.discard(task)
            self._writers.discard(writer)
            writer.transport.abort()

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.fault == "silent":
            await reader.read()  # until the controller gives up
            return
        if self.fault == "garbage":
            writer.write(GARBAGE)
            await writer.drain()
            await reader.read()
            return
        random = secrets.token_hex(4) if self.spec.password else None
        writer.write(codec.encode_greeting(random))
        await writer.drain()
        splitter = LineSplitter(codec.MAX_REQUEST_LINE)
        first = True
        while True:
            async with asyncio.timeout(self.spec.idle_timeout_s):
                data = await reader.read(1024)
            if not data:
                return
            try:
                lines = splitter.feed(data)
            except PjlinkFrameError:
                return
            for line in lines:
                if not line:
                    continue
                if first and random is not None and not self._authenticated(line, random):
                    self.auth_failures += 1
                    writer.write(codec.AUTH_ERROR)
                    await writer.drain()
                    return
                first = False
                if not await self._reply(line, writer):
                    return

    def _authenticated(self, line: bytes, random: str) -> bool:
        assert self.spec.password is not None
        expected = codec.auth_digest(random, self.spec.password).encode("ascii")
        return line[: codec.DIGEST_LENGTH] == expected

    async def _reply(self, line: bytes, writer: asyncio.StreamWriter) -> bool:
        """Answers one request line; False when the connection is to end."""
        try:
            request = codec.parse_request(line)
        except PjlinkFrameError:
            log.debug("%s: ignoring %r", self.spec.id, line)
            return True
        self.requests += 1
        body = self.state.answer(request, self.clock())
        answer = codec.encode_response(request.pclass, request.command, body)
        if self.fault == "garbled":
            answer = b"%" + bytes(reversed(answer[1:-1])) + b"\x07\r"
        elif self.fault == "overlong":
            answer = answer[:-1] + b" " + b"X" * 200 + b"\r"
        elif self.fault == "truncated":
            writer.write(answer[: max(3, len(answer) // 2)])
            await writer.drain()
            return False
        writer.write(answer)
        await writer.drain()
        return True


async def _pick_port(host: str) -> int:
    server = await asyncio.start_server(lambda r, w: None, host, 0)
    port = int(server.sockets[0].getsockname()[1])
    server.close()
    await server.wait_closed()
    return port


def scaled_clock(time_scale: float = 1.0, start: float = 0.0) -> Clock:
    """Simulated seconds: `start` plus real seconds since now, times `time_scale`."""
    origin = time.monotonic()
    return lambda: start + (time.monotonic() - origin) * time_scale


@contextlib.asynccontextmanager
async def serve_projector(
    spec: SimulatedProjector, clock: Clock = time.monotonic
) -> AsyncIterator[ProjectorServer]:
    server = ProjectorServer(spec, clock)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()
