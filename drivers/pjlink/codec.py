"""PJLink codec (JBMIA PJLink Class 1 v1.04, Class 2 v2.00), sans-IO: lines in, values out, and
back, for the controller and for a simulated display.

Everything here is pure: no asyncio, no sockets, no clock. Local misuse raises
PjlinkRequestError (a ValueError); bytes from the device that break the protocol raise
PjlinkFrameError; an `ERRn` answer raises PjlinkRefused; a refused password raises PjlinkAuthError.

Wire format: every line ends with CR (0x0D). The display greets with `PJLINK 0` (no password) or
`PJLINK 1 <random>`; a request is `%<class><CMD4> <param>`, its answer `%<class><CMD4>=<body>`,
a line at most 136 bytes with its CR. With a password, the first request of a connection is
prefixed by md5_hex(random + password).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import IntEnum, StrEnum
from typing import Final, Literal, Self

from drivers.base import Value
from drivers.errors import DriverError

DEFAULT_PORT: Final = 4352
CR: Final = b"\r"
#: The longest line either side sends, its CR included (header 2 + command 4 + separator 1 +
#: parameter 128 + CR 1): the specification's limit.
MAX_LINE: Final = 136
MAX_PARAMETER: Final = 128
#: A request line may carry the 32-character digest on top of MAX_LINE.
MAX_REQUEST_LINE: Final = MAX_LINE + 32
DIGEST_LENGTH: Final = 32
RANDOM_LENGTH: Final = 8

ERROR_CODES: Final[Mapping[str, str]] = {
    "ERR1": "undefined command",
    "ERR2": "out of parameter",
    "ERR3": "unavailable time",
    "ERR4": "projector/display failure",
}

_COMMAND = re.compile(r"[A-Z0-9]{4}")
_RANDOM = re.compile(r"[\x21-\x7e]{8}")
_DIGEST = re.compile(r"[0-9a-f]{32}")


class PjlinkError(DriverError):
    """Root of the PJLink driver's errors; `at(address)` names the display in the message."""

    address: str = ""

    def at(self, address: str) -> Self:
        self.address = address
        return self

    def __str__(self) -> str:
        detail = super().__str__()
        return f"{self.address}: {detail}" if self.address else detail


class PjlinkRequestError(PjlinkError, ValueError):
    """The caller asked for something PJLink cannot express (local misuse)."""


class PjlinkFrameError(PjlinkError):
    """The device sent bytes that are not PJLink (remote misbehaviour)."""


class PjlinkAuthError(PjlinkError):
    """The display refused the password (`PJLINK ERRA`), or wants one that is not configured."""


class PjlinkRefused(PjlinkError):
    """The display understood the request and answered ERR1..ERR4."""

    def __init__(self, command: str, code: str, pclass: int = 1) -> None:
        super().__init__(command, code, pclass)
        self.command = command
        self.code = code
        self.pclass = pclass

    @property
    def meaning(self) -> str:
        return ERROR_CODES.get(self.code, "unknown error")

    @property
    def busy(self) -> bool:
        """ERR3: not now (warming up, cooling down, in standby), try again later."""
        return self.code == "ERR3"

    def __str__(self) -> str:
        text = f"{self.command} refused with {self.code} ({self.meaning})"
        return f"{self.address}: {text}" if self.address else text


# --- greeting and authentication -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Greeting:
    """`PJLINK 0` (no password) or `PJLINK 1 <random>` (password: digest the random)."""

    random: str | None

    @property
    def auth(self) -> bool:
        return self.random is not None


def parse_greeting(line: bytes) -> Greeting:
    text = line.decode("ascii", errors="replace")
    if text == "PJLINK 0":
        return Greeting(None)
    if text == "PJLINK ERRA":
        raise PjlinkAuthError("wrong PJLink password (the display answered PJLINK ERRA)")
    if text.startswith("PJLINK 1 ") and _RANDOM.fullmatch(text[9:]):
        return Greeting(text[9:])
    raise PjlinkFrameError(f"not a PJLink greeting: {excerpt(line)}")


def encode_greeting(random: str | None) -> bytes:
    """What a display sends on connect (the simulator's side)."""
    if random is None:
        return b"PJLINK 0\r"
    if not _RANDOM.fullmatch(random):
        raise PjlinkRequestError(f"the random must be {RANDOM_LENGTH} printable characters")
    return f"PJLINK 1 {random}\r".encode("ascii")


AUTH_ERROR: Final = b"PJLINK ERRA\r"


def auth_digest(random: str, password: str) -> str:
    """md5_hex(random + password), lower case, as the first request of a connection carries it.

    PJLink passwords are ASCII (at most 32 characters); the random comes from the greeting.
    """
    try:
        data = (random + password).encode("ascii")
    except UnicodeEncodeError:
        raise PjlinkRequestError("a PJLink password is ASCII text") from None
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


# --- requests ------------------------------------------------------------------------------------


QUERY: Final = "?"


def encode_request(
    command: str, parameter: str = QUERY, pclass: int = 1, digest: str | None = None
) -> bytes:
    """`[digest]%<class><command> <parameter>\\r`, e.g. `%1POWR ?\\r` or `%1POWR 1\\r`."""
    _check_command(command)
    if pclass not in (1, 2):
        raise PjlinkRequestError(f"PJLink class {pclass!r} is not 1 or 2")
    if not parameter or len(parameter) > MAX_PARAMETER:
        raise PjlinkRequestError(f"a parameter has 1..{MAX_PARAMETER} characters")
    if any(not 0x20 <= ord(c) <= 0x7E for c in parameter):
        raise PjlinkRequestError(f"parameter {parameter!r} is not printable ASCII")
    if digest is not None and not _DIGEST.fullmatch(digest):
        raise PjlinkRequestError("a digest is 32 lower-case hexadecimal characters")
    return f"{digest or ''}%{pclass}{command} {parameter}\r".encode("ascii")


@dataclass(frozen=True, slots=True)
class Request:
    """A request as a display reads it (the simulator's side)."""

    pclass: int
    command: str
    parameter: str
    digest: str | None = None

    @property
    def is_query(self) -> bool:
        return self.parameter == QUERY


def parse_request(line: bytes) -> Request:
    """A request line without its CR; PjlinkFrameError for anything else."""
    if len(line) + 1 > MAX_REQUEST_LINE:
        raise PjlinkFrameError(f"request of {len(line)} bytes is too long")
    text = _ascii(line, "request")
    digest = None
    if len(text) > DIGEST_LENGTH and text[DIGEST_LENGTH] == "%":
        digest, text = text[:DIGEST_LENGTH], text[DIGEST_LENGTH:]
    if len(text) < 8 or text[0] != "%" or text[1] not in "12" or text[6] != " ":
        raise PjlinkFrameError(f"not a PJLink request: {excerpt(line)}")
    command = text[2:6]
    if not _COMMAND.fullmatch(command):
        raise PjlinkFrameError(f"not a PJLink command: {command!r}")
    return Request(int(text[1]), command, text[7:], digest)


# --- responses -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Response:
    """An answer `%<class><command>=<body>`, not an error (those raise PjlinkRefused)."""

    pclass: int
    command: str
    body: str

    @property
    def ok(self) -> bool:
        return self.body == "OK"


def encode_response(pclass: int, command: str, body: str) -> bytes:
    """`%<class><command>=<body>\\r` (the simulator's side); body is `OK`, `ERRn` or a value."""
    _check_command(command)
    line = f"%{pclass}{command}={body}\r".encode()
    if len(line) > MAX_LINE:
        raise PjlinkRequestError(f"answer of {len(line)} bytes is longer than {MAX_LINE}")
    return line


def parse_response(line: bytes, command: str, pclass: int = 1) -> Response:
    """The answer to `%<pclass><command> …`, checked to echo that class and command.

    ERR1..ERR4 raise PjlinkRefused; `PJLINK ERRA` (a refused digest) raises PjlinkAuthError;
    anything else that is not such an answer raises PjlinkFrameError.
    """
    if len(line) + 1 > MAX_LINE:
        raise PjlinkFrameError(
            f"answer to {command} has {len(line) + 1} bytes, more than PJLink's {MAX_LINE}"
        )
    if line == AUTH_ERROR[:-1]:
        raise PjlinkAuthError("wrong PJLink password (the display answered PJLINK ERRA)")
    head = _ascii(line[:7], f"answer to {command}")
    if len(head) < 7 or head[0] != "%" or head[1] not in "12" or head[6] != "=":
        raise PjlinkFrameError(f"answer to {command} is not PJLink: {excerpt(line)}")
    echoed = f"%{head[1]}{head[2:6]}"
    if echoed != f"%{pclass}{command}":
        raise PjlinkFrameError(f"asked %{pclass}{command}, the answer is for {echoed}")
    try:
        body = line[7:].decode("utf-8")  # NAME may be UTF-8 (class 2); the rest is ASCII
    except UnicodeDecodeError:
        raise PjlinkFrameError(f"answer to {command} is not text: {excerpt(line)}") from None
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in body):
        raise PjlinkFrameError(f"answer to {command} has control characters: {excerpt(line)}")
    if body in ERROR_CODES:
        raise PjlinkRefused(command, body, pclass)
    return Response(pclass, command, body)


def check_ok(response: Response) -> None:
    """A set command's answer must be `OK`."""
    if not response.ok:
        raise PjlinkFrameError(f"{response.command} answered {response.body!r:.40}, not OK")


class LineSplitter:
    """Splits a PJLink byte stream into lines (without their CR); a LF after a CR, which some
    displays add, is dropped. feed() returns the complete lines; more than `limit` bytes without
    a CR raise PjlinkFrameError, and the splitter is unusable after that."""

    def __init__(self, limit: int = MAX_LINE) -> None:
        self.limit = limit
        self._buffer = bytearray()
        self._broken = False

    def feed(self, data: bytes) -> list[bytes]:
        if self._broken:
            raise PjlinkFrameError("line splitter unusable after an over-long line")
        self._buffer += data
        lines: list[bytes] = []
        while (end := self._buffer.find(CR)) >= 0:
            line = bytes(self._buffer[:end]).removeprefix(b"\n")
            del self._buffer[: end + 1]
            if len(line) + 1 > self.limit:
                self._broken = True
                raise PjlinkFrameError(f"line of {len(line) + 1} bytes, longer than {self.limit}")
            lines.append(line)
        if len(self._buffer.removeprefix(b"\n")) >= self.limit:
            self._broken = True
            raise PjlinkFrameError(f"no CR within {self.limit} bytes: {excerpt(self._buffer)}")
        return lines

    @property
    def pending(self) -> bytes:
        """Bytes of an incomplete line (what was left when the peer closed)."""
        return bytes(self._buffer.removeprefix(b"\n"))


# --- typed values --------------------------------------------------------------------------------


class Power(StrEnum):
    """POWR ? → 0 standby, 1 on, 2 cooling, 3 warming."""

    STANDBY = "standby"
    ON = "on"
    COOLING = "cooling"
    WARMING = "warming"

    @property
    def code(self) -> str:
        return str(list(Power).index(self))

    @property
    def lit(self) -> bool:
        """On or warming up: switched on (fleet/reports/timeline.py counts it as on)."""
        return self in (Power.ON, Power.WARMING)


def parse_power(body: str) -> Power:
    if len(body) == 1 and body in "0123":
        return list(Power)[int(body)]
    raise PjlinkFrameError(f"POWR answered {body!r:.40}, not 0..3")


_INPUT_TYPES: Final = ("rgb", "video", "digital", "storage", "network", "internal")
_INPUT_CLASS1 = re.compile(r"[1-5][1-9]")
_INPUT_CLASS2 = re.compile(r"[1-6][1-9A-Z]")


def valid_input(code: str, pclass: int = 2) -> bool:
    """Whether `code` is an INPT parameter: `<type 1-5><1-9>` (class 1), `<1-6><1-9 A-Z>` (2)."""
    return bool((_INPUT_CLASS2 if pclass >= 2 else _INPUT_CLASS1).fullmatch(code))


def parse_input(body: str, pclass: int = 1) -> str:
    """INPT ? → the input code, e.g. "31" (digital 1)."""
    if valid_input(body, pclass):
        return body
    raise PjlinkFrameError(f"INPT answered {body!r:.40}, not an input code")


def input_name(code: str) -> str:
    """The specification's name of an input code: "31" → "digital1", "6A" → "internal-a"."""
    kind = _INPUT_TYPES[int(code[0]) - 1]
    return f"{kind}{code[1]}" if code[1].isdigit() else f"{kind}-{code[1].lower()}"


def input_code(name: str) -> str | None:
    """The code of a specification name ("digital1" → "31", "HDMI" → None), or of a raw code."""
    word = name.strip().lower()
    if valid_input(word.upper()):
        return word.upper()
    for index, kind in enumerate(_INPUT_TYPES, start=1):
        rest = word.removeprefix(kind)
        if rest != word:
            if len(rest) == 1 and rest in "123456789":
                return f"{index}{rest}"
            if len(rest) == 2 and rest[0] == "-" and rest[1].isalpha() and rest[1].isascii():
                return f"{index}{rest[1].upper()}"
    return None


def parse_input_list(body: str, pclass: int = 1) -> tuple[str, ...]:
    """INST ? → the inputs the display has."""
    codes = tuple(body.split())
    for code in codes:
        if not valid_input(code, pclass):
            raise PjlinkFrameError(f"INST answered {body!r:.60}: {code!r} is not an input code")
    return codes


@dataclass(frozen=True, slots=True)
class Mute:
    video: bool
    audio: bool

    @property
    def code(self) -> str:
        """The AVMT query's answer for this state (the specification answers 11, 21, 31, 30)."""
        if self.video and self.audio:
            return "31"
        if self.video:
            return "11"
        return "21" if self.audio else "30"


MUTE_SETTINGS: Final[Mapping[str, tuple[bool | None, bool | None]]] = {
    # parameter: (video, audio) after it; None leaves that one as it is
    "10": (False, None),
    "11": (True, None),
    "20": (None, False),
    "21": (None, True),
    "30": (False, False),
    "31": (True, True),
}


def parse_mute(body: str) -> Mute:
    """AVMT ? → 11 video muted, 21 audio muted, 31 both, 30 (or 10, 20) neither."""
    answers = {
        "11": Mute(True, False),
        "21": Mute(False, True),
        "31": Mute(True, True),
        "30": Mute(False, False),
        "10": Mute(False, False),
        "20": Mute(False, False),
    }
    try:
        return answers[body]
    except KeyError:
        raise PjlinkFrameError(f"AVMT answered {body!r:.40}, not 11, 21, 31 or 30") from None


class Severity(IntEnum):
    """A digit of ERST: 0 ok, 1 warning, 2 error (reported as the number, for alarms)."""

    OK = 0
    WARNING = 1
    ERROR = 2


ERROR_PARTS: Final = ("fan", "lamp", "temperature", "cover", "filter", "other")


@dataclass(frozen=True, slots=True)
class ErrorStatus:
    fan: Severity
    lamp: Severity
    temperature: Severity
    cover: Severity
    filter: Severity
    other: Severity

    def as_dict(self) -> dict[str, Severity]:
        return {part: getattr(self, part) for part in ERROR_PARTS}

    def summary(self) -> str:
        """ "ok", or the parts that are not, e.g. "lamp warning, filter error"."""
        bad = [f"{part} {sev.name.lower()}" for part, sev in self.as_dict().items() if sev]
        return ", ".join(bad) or "ok"

    @property
    def code(self) -> str:
        return "".join(str(int(sev)) for sev in self.as_dict().values())


def parse_errors(body: str) -> ErrorStatus:
    """ERST ? → six digits: fan, lamp, temperature, cover open, filter, other."""
    if len(body) != 6 or any(c not in "012" for c in body):
        raise PjlinkFrameError(f"ERST answered {body!r:.40}, not six digits 0..2")
    return ErrorStatus(*(Severity(int(c)) for c in body))


@dataclass(frozen=True, slots=True)
class Lamp:
    hours: int
    on: bool


MAX_HOURS: Final = 99_999
MAX_LAMPS: Final = 8


def parse_lamps(body: str) -> tuple[Lamp, ...]:
    """LAMP ? → `hours on/off` per lamp (1..8 lamps, hours 0..99999)."""
    words = body.split(" ")
    if not body or len(words) % 2 or len(words) > 2 * MAX_LAMPS:
        raise PjlinkFrameError(f"LAMP answered {body!r:.60}, not 1..8 pairs of hours and 0/1")
    lamps = []
    for hours, on in zip(words[::2], words[1::2], strict=True):
        if not (hours.isdigit() and hours.isascii() and len(hours) <= 5 and on in ("0", "1")):
            raise PjlinkFrameError(f"LAMP answered {body!r:.60}, not pairs of hours and 0/1")
        lamps.append(Lamp(int(hours), on == "1"))
    return tuple(lamps)


def parse_hours(body: str, command: str = "FILT") -> int:
    """FILT ? → hours of use, 0..99999."""
    if body.isdigit() and body.isascii() and len(body) <= 5:
        return int(body)
    raise PjlinkFrameError(f"{command} answered {body!r:.40}, not hours 0..99999")


def parse_class(body: str) -> int:
    """CLSS ? → "1" or "2" (a later class is a digit too)."""
    if len(body) == 1 and body in "123456789":
        return int(body)
    raise PjlinkFrameError(f"CLSS answered {body!r:.40}, not a class number")


# --- helpers -------------------------------------------------------------------------------------


def _check_command(command: str) -> None:
    if not isinstance(command, str) or not _COMMAND.fullmatch(command):
        raise PjlinkRequestError(f"{command!r} is not a PJLink command (4 letters or digits)")


def _ascii(line: bytes | bytearray, what: str) -> str:
    try:
        return bytes(line).decode("ascii")
    except UnicodeDecodeError:
        raise PjlinkFrameError(f"{what} is not ASCII: {excerpt(line)}") from None


def excerpt(data: bytes | bytearray, limit: int = 40) -> str:
    """Bytes as a short printable excerpt for an error message."""
    text = repr(bytes(data[:limit]))
    return text + ("…" if len(data) > limit else "")


# --- queries: the values a profile's points name -------------------------------------------------


@dataclass(frozen=True, slots=True)
class Context:
    """What a value needs besides the answer: the display's class, the profile's input names."""

    pclass: int = 1
    input_names: Mapping[str, str] = field(default_factory=dict)  # code -> name


Extract = Callable[[str, Context], Value]


@dataclass(frozen=True, slots=True)
class Query:
    """A value read from the answer to `%<pclass><command> ?`.

    `type` is the value's own type (a point may declare `float` for an `int` query). `standby`:
    the display may answer ERR3 while it is not on (INPT, AVMT), which is not a fault.
    """

    name: str
    command: str
    pclass: int
    type: Literal["int", "bool", "string"]
    extract: Extract
    description: str
    standby: bool = False


def _first_lamp(body: str) -> Lamp:
    return parse_lamps(body)[0]


def _input_label(body: str, ctx: Context) -> str:
    code = parse_input(body, ctx.pclass)
    return ctx.input_names.get(code) or input_name(code)


def _text(body: str, _: Context) -> str:
    return body


def _error_part(part: str) -> Extract:
    return lambda body, _: int(getattr(parse_errors(body), part))


_QUERY_LIST: Final = (
    Query(
        "power",
        "POWR",
        1,
        "string",
        lambda b, _: parse_power(b).value,
        "standby, on, cooling or warming",
    ),
    Query(
        "power_on", "POWR", 1, "bool", lambda b, _: parse_power(b).lit, "true when on or warming up"
    ),
    Query(
        "input",
        "INPT",
        1,
        "string",
        lambda b, c: parse_input(b, c.pclass),
        "input code, e.g. 31 (digital 1)",
        standby=True,
    ),
    Query(
        "input_name",
        "INPT",
        1,
        "string",
        _input_label,
        "the profile's name of the input, else the specification's (digital1)",
        standby=True,
    ),
    Query(
        "inputs",
        "INST",
        1,
        "string",
        lambda b, c: " ".join(parse_input_list(b, c.pclass)),
        "the input codes the display has, space-separated",
    ),
    Query(
        "video_mute",
        "AVMT",
        1,
        "bool",
        lambda b, _: parse_mute(b).video,
        "picture muted (shutter closed)",
        standby=True,
    ),
    Query(
        "audio_mute",
        "AVMT",
        1,
        "bool",
        lambda b, _: parse_mute(b).audio,
        "sound muted",
        standby=True,
    ),
    *(
        Query(
            f"error.{part}",
            "ERST",
            1,
            "int",
            _error_part(part),
            f"{part} status: 0 ok, 1 warning, 2 error",
        )
        for part in ERROR_PARTS
    ),
    Query(
        "errors",
        "ERST",
        1,
        "string",
        lambda b, _: parse_errors(b).summary(),
        "ok, or the parts in warning or error, e.g. 'lamp warning'",
    ),
    Query(
        "lamp_hours",
        "LAMP",
        1,
        "int",
        lambda b, _: _first_lamp(b).hours,
        "hours of use of the first lamp",
    ),
    Query("lamp_on", "LAMP", 1, "bool", lambda b, _: _first_lamp(b).on, "the first lamp is lit"),
    Query("name", "NAME", 1, "string", _text, "the display's name (NAME)"),
    Query("manufacturer", "INF1", 1, "string", _text, "manufacturer (INF1)"),
    Query("product", "INF2", 1, "string", _text, "product name (INF2)"),
    Query("other_info", "INFO", 1, "string", _text, "other information (INFO)"),
    Query("pjlink_class", "CLSS", 1, "int", lambda b, _: parse_class(b), "PJLink class, 1 or 2"),
    Query(
        "filter_hours",
        "FILT",
        2,
        "int",
        lambda b, _: parse_hours(b, "FILT"),
        "hours of use of the filter (class 2)",
    ),
    Query("serial", "SNUM", 2, "string", _text, "serial number (class 2)"),
    Query("software_version", "SVER", 2, "string", _text, "software version (class 2)"),
)
QUERIES: Final[Mapping[str, Query]] = {query.name: query for query in _QUERY_LIST}
#: Commands that exist in class 2 only (sent as %2).
CLASS2_ONLY: Final = frozenset(q.command for q in _QUERY_LIST if q.pclass == 2)
#: Commands the driver sends with the display's class (2 where it says so) for its extensions:
#: class 2 adds input codes such as 3A and 6x (internal).
CLASS2_WHERE_AVAILABLE: Final = frozenset({"INPT", "INST"})
