"""Imports the inventory spreadsheet schools keep: one row per device, with its place and gateway.

Rules: the whole file is checked before anything is written and every problem is reported with
its line; a file with one problem imports nothing. A clean file is applied in one transaction
through the registry's upserts, so importing the same file again changes nothing. Connections are
written as URLs a spreadsheet cell can hold, one scheme per connection type (`connection_url()`
is the inverse of the parser); passwords and keys are shown masked (`mask=True`,
`mask_connection()`), and parse errors never repeat a password.
"""

from __future__ import annotations

import csv
import io
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit

from pydantic import BaseModel, ValidationError

from drivers.ble.connection import MAC_PATTERN
from drivers.profile_base import to_bool
from drivers.profiles import DeviceKind
from drivers.registry import Connection
from fleet.registry import (
    KINDS,
    Change,
    DeviceSpec,
    Registry,
    RegistryError,
    bus_conflicts,
    parse_connection,
)
from fleet.settings import NodeSettings
from wire.errors import problems_from
from wire.gateway_config import not_reserved
from wire.topics import check_id

REQUIRED = ("site", "gateway", "device", "profile", "connection")
OPTIONAL = ("building", "room", "kind", "interval_s", "building_name", "room_name")
COLUMNS = (*REQUIRED, *OPTIONAL)
IDS = ("site", "building", "room", "gateway", "device")
LEVELS = ("sites", "buildings", "rooms", "gateways", "devices")

# -- connection URLs ---------------------------------------------------------------------------


_FORMS = {
    "modbus-tcp": "modbus-tcp://HOST[:PORT]?unit=N",
    "modbus-rtu": "modbus-rtu:///dev/PORT?unit=N",
    "pjlink": "pjlink://[:PASSWORD@]HOST[:PORT]",
    "mqtt": "mqtt://[USER[:PASSWORD]@][HOST[:PORT]]/BASE/TOPIC (mqtts:// for TLS)",
    "onvif": "onvif://[USER:PASSWORD@]HOST[:PORT][/PATH][?rtsp=URL]",
    "ble": "ble://AA:BB:CC:DD:EE:FF",
}
URL_FORMS = ", ".join(_FORMS.values())

SECRET = "***"
#: Connection fields that are secrets: masked wherever a connection is shown.
SECRET_FIELDS = ("password", "bind_key")

_Convert = Callable[[str, str], Any]


def _int(name: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not a whole number") from None


def _float(name: str, value: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not a number") from None


def _upper(_name: str, value: str) -> str:
    return value.upper()


def _flag(name: str, value: str) -> bool:
    try:
        return to_bool(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not 1 or 0 (true or false)") from None


def _rtsp(name: str, value: str) -> str:
    if not value.lower().startswith("rtsp://"):
        raise ValueError(
            f"{name}= must be an rtsp:// URL (percent-encoded or not), e.g. "
            "rtsp=rtsp://[fd00::30]:554/stream1"
        )
    return value


def _adapter(name: str, value: str) -> str:
    if not re.fullmatch(r"hci\d{1,2}", value):
        raise ValueError(f"{name}={value!r} is not a Bluetooth adapter (hci0, hci1, …)")
    return value


def _bind_key(name: str, value: str) -> str:
    if not re.fullmatch(r"[0-9A-Fa-f]{32}", value):
        raise ValueError(f"{name} must be the sensor's 32 hex digits (got {len(value)} characters)")
    return value.lower()


def _text(_name: str, value: str) -> str:
    return value


def _by_type(annotation: Any) -> _Convert:
    """The converter of a connection field the tables below do not name, from its type."""
    types = _base_types(annotation)
    if bool in types:
        return _flag
    if int in types:
        return _int
    if float in types:
        return _float
    return _text


def _base_types(annotation: Any) -> set[Any]:
    origin = get_origin(annotation)
    if origin is Annotated:
        return _base_types(get_args(annotation)[0])
    if origin in (Union, UnionType):
        return set().union(*(_base_types(arg) for arg in get_args(annotation)))
    if origin is Literal:
        return {type(arg) for arg in get_args(annotation)}
    return {annotation}


_MODELS: dict[str, type[BaseModel]] = {
    model.model_fields["type"].annotation.__args__[0]: model
    for model in get_args(get_args(Connection)[0])
}
#: fields written in the URL itself (scheme, user, password, host, port, path), not after '?'
_IN_URL = {
    "modbus-tcp": {"host", "port"},
    "modbus-rtu": {"port"},
    "pjlink": {"host", "port", "password"},
    "mqtt": {"host", "port", "username", "password", "topic"},
    "onvif": {"host", "port", "path", "username", "password"},
    "ble": {"address"},
}
#: options with their own name or check; every other field of the connection is an option
#: under its own name, converted by its type (new connection fields need no change here)
_NAMED: dict[str, dict[str, tuple[str, _Convert]]] = {
    "modbus-tcp": {"unit": ("unit", _int)},
    "modbus-rtu": {
        "unit": ("unit", _int),
        "baudrate": ("baudrate", _int),
        "parity": ("parity", _upper),
        "stopbits": ("stopbits", _int),
    },
    "mqtt": {"tls": ("tls", _flag)},
    "onvif": {"rtsp": ("rtsp_url", _rtsp), "https": ("https", _flag)},
    "ble": {"adapter": ("adapter", _adapter), "bind_key": ("bind_key", _bind_key)},
}


def _options_of(kind: str) -> dict[str, tuple[str, _Convert]]:
    """query option -> (connection field, converter), in the order URLs are written."""
    named = _NAMED.get(kind, {})
    taken = _IN_URL[kind] | {"type"} | {field_name for field_name, _ in named.values()}
    fields = _MODELS[kind].model_fields
    rest = {
        name: (name, _by_type(info.annotation))
        for name, info in fields.items()
        if name not in taken
    }
    return {**named, **rest}


_OPTIONS: dict[str, dict[str, tuple[str, _Convert]]] = {
    scheme: _options_of("mqtt" if scheme == "mqtts" else scheme)
    for scheme in ("modbus-tcp", "modbus-rtu", "pjlink", "mqtt", "mqtts", "onvif", "ble")
}
SCHEMES = tuple(_OPTIONS)
#: Every form with an example, for the --help of `device add` and `import` (click prints
#: paragraphs that start with \b as they are).
_URL_HELP = """\b
  modbus-tcp://192.168.10.21?unit=1        Modbus TCP (port 502 unless given)
  modbus-tcp://[fd00::5]:1502?unit=3       an IPv6 address goes in brackets
  modbus-rtu:///dev/ttyUSB0?unit=3&baudrate=9600&parity=E&stopbits=1
                                           Modbus RTU (RS-485): three slashes
  pjlink://[fd00:10::21]                   PJLink projector or display (port 4352)
  pjlink://:s3cret@10.1.2.21:4352          ... whose PJLink password is s3cret (no user)
  mqtt:///eclass/board-101                 MQTT device on the gateway's own broker,
                                           base topic eclass/board-101
  mqtts://board:s3cret@broker.example/eclass/board-101
                                           ... on another broker, with TLS (port 8883)
  onvif://admin:s3cret@[fd00::30]?rtsp=rtsp://[fd00::30]:554/stream1
                                           ONVIF camera (port 80, /onvif/device_service)
                                           and the stream its RTSP check probes
  ble://A4:C1:38:12:34:56                  BLE sensor (BTHome adverts), adapter hci0
  ble://A4:C1:38:12:34:56?bind_key=231d39c1d7cc1ab1aee224cd096db932
                                           ... that encrypts its adverts

\b
  Options after '?', name=value joined by '&' (on/off as 1/0):
{options}
\b
  In passwords and topics, percent-encode what URLs reserve (@ as %40, / as %2F, # as %23,
  ? as %3F). Tables and --json show passwords and keys as ***.
"""

URL_HELP = _URL_HELP.format(
    options="".join(
        f"    {scheme:<12}{', '.join(options)}\n"
        for scheme, options in _OPTIONS.items()
        if scheme != "mqtts"
    )
)
MQTT_TLS_PORT = 8883
HTTPS_PORT = 443


def parse_connection_url(text: str) -> dict[str, Any]:
    """A connection URL (see `URL_FORMS`; an IPv6 host in brackets) as the dict a `Connection`
    validates. Raises ValueError saying what is wrong, never repeating a password."""
    text = text.strip()
    scheme, sep, rest = text.partition("://")
    scheme = scheme.lower()
    if not sep:
        raise ValueError(f"{mask_url(text)!r} is not a connection URL ({URL_FORMS})")
    if scheme not in _OPTIONS:
        known = ", ".join(f"{name}://" for name in SCHEMES)
        raise ValueError(f"unknown scheme {scheme!r} (use {known})")
    if "#" in rest:
        if scheme in ("mqtt", "mqtts"):
            raise ValueError("'#' is a wildcard: the base topic names one device (no + or #)")
        fragment = rest.partition("#")[2]
        raise ValueError(f"unexpected '#{fragment}' (write '#' as %23)")
    if scheme == "ble":
        return _ble(rest)
    try:
        parts = urlsplit(text)
    except ValueError as exc:
        raise ValueError(f"{mask_url(text)!r} is not a valid URL: {exc}") from None
    options = _query(parts.query, scheme)
    if scheme == "modbus-rtu":
        return {"type": scheme, "port": _serial_port(parts.netloc, parts.path), **options}
    if scheme == "modbus-tcp":
        if "@" in parts.netloc:
            raise ValueError("a Modbus TCP URL takes no user or password")
        _no_path(scheme, parts.path)
        return {"type": scheme, **_address(scheme, parts.netloc).place(), **options}
    if scheme == "pjlink":
        return _pjlink(parts.netloc, parts.path, options)
    if scheme in ("mqtt", "mqtts"):
        return _mqtt(scheme, parts.netloc, parts.path, options)
    return _onvif(parts.netloc, parts.path, options)


@dataclass(frozen=True)
class _Address:
    user: str | None
    password: str | None
    host: str | None
    port: int | None

    def place(self) -> dict[str, Any]:
        found: dict[str, Any] = {"host": self.host} if self.host else {}
        if self.port is not None:
            found["port"] = self.port
        return found


_DEFAULT_PORTS = {"modbus-tcp": 502, "pjlink": 4352, "mqtt": 1883, "mqtts": 8883, "onvif": 80}


def _address(scheme: str, netloc: str, *, host_required: bool = True) -> _Address:
    """USER:PASSWORD@HOST:PORT, each part percent-decoded (the host is lowercased)."""
    userinfo, at, hostport = netloc.rpartition("@")
    parts = urlsplit(f"//{hostport}")
    try:
        port = parts.port
    except ValueError:
        example = f"{scheme}://[fd00::5]:{_DEFAULT_PORTS.get(scheme, 80)}"
        raise ValueError(
            f"bad port in {hostport!r} (an IPv6 address goes in brackets: {example})"
        ) from None
    if host_required and not parts.hostname:
        form = _FORMS[scheme.removesuffix("s") if scheme == "mqtts" else scheme]
        raise ValueError(f"no host in {scheme}://{mask_netloc(netloc)} ({form})")
    user = password = None
    if at:
        user_text, colon, password_text = userinfo.partition(":")
        user = unquote(user_text) if user_text else None
        password = unquote(password_text) if colon else None
    return _Address(user, password, parts.hostname, port)


def _no_path(scheme: str, path: str) -> None:
    if path not in ("", "/"):
        raise ValueError(
            f"unexpected path {path!r} after the host of a {scheme} URL (options go after '?')"
        )


def _serial_port(netloc: str, path: str) -> str:
    if netloc or not path.startswith("/"):
        raise ValueError(
            f"modbus-rtu:// takes the serial device's path: modbus-rtu:///dev/ttyUSB0 "
            f"(three slashes), not modbus-rtu://{netloc}{path}"
        )
    return unquote(path)


def _pjlink(netloc: str, path: str, options: dict[str, Any]) -> dict[str, Any]:
    _no_path("pjlink", path)
    address = _address("pjlink", netloc)
    if address.user is not None:
        raise ValueError(
            "PJLink has no user name: write the password after a colon, pjlink://:PASSWORD@HOST"
        )
    found: dict[str, Any] = {"type": "pjlink", **address.place()}
    if address.password is not None:
        if not address.password:
            raise ValueError("empty PJLink password (leave ':@' out when the display has none)")
        found["password"] = address.password
    return {**found, **options}


def _mqtt(scheme: str, netloc: str, path: str, options: dict[str, Any]) -> dict[str, Any]:
    address = _address(scheme, netloc, host_required=False)
    if not address.host and (address.port is not None or address.user is not None):
        raise ValueError(
            f"a port or a user needs a host: {scheme}://USER@HOST:PORT/TOPIC, not "
            f"{scheme}://{mask_netloc(netloc)}"
        )
    topic = unquote(path[1:]) if path.startswith("/") else ""
    if not topic:
        raise ValueError(
            f"no base topic: {scheme}://[HOST]/BASE/TOPIC, e.g. mqtt:///eclass/board-101 "
            "(the gateway's own broker) or mqtt://[fd00::1]:1883/eclass/board-101"
        )
    if "+" in topic or "#" in topic:
        raise ValueError(f"base topic {topic!r} has a wildcard (+ or #): name one device's topic")
    if topic.endswith("/"):
        raise ValueError(f"base topic {topic!r} ends in '/': leave the last '/' out")
    if "\x00" in topic:
        raise ValueError("base topic contains a NUL character")
    found: dict[str, Any] = {"type": "mqtt", **address.place(), "topic": topic}
    if address.user is not None:
        found["username"] = address.user
    if address.password is not None:
        if address.user is None:
            raise ValueError("an MQTT password needs a user name: mqtt://USER:PASSWORD@HOST/TOPIC")
        found["password"] = address.password
    if scheme == "mqtts":
        if options.get("tls") is False:
            raise ValueError("mqtts:// is MQTT over TLS: tls=0 contradicts it")
        options = {**options, "tls": True}
    if options.get("tls") and "port" not in found:
        found["port"] = MQTT_TLS_PORT
    return {**found, **options}


def _onvif(netloc: str, path: str, options: dict[str, Any]) -> dict[str, Any]:
    address = _address("onvif", netloc)
    found: dict[str, Any] = {"type": "onvif", **address.place()}
    if path not in ("", "/"):
        found["path"] = path
    if address.user is not None:
        found["username"] = address.user
    if address.password is not None:
        if address.user is None:
            raise ValueError("an ONVIF password needs a user name: onvif://USER:PASSWORD@HOST")
        found["password"] = address.password
    if options.get("https") and "port" not in found:
        found["port"] = HTTPS_PORT
    return {**found, **options}


def _ble(rest: str) -> dict[str, Any]:
    """By hand: the colons of a MAC address in a netloc confuse urlsplit."""
    body, _, query = rest.partition("?")
    address = unquote(body.removesuffix("/")).replace("-", ":").upper()
    if not re.fullmatch(MAC_PATTERN, address):
        raise ValueError(
            f"{body!r} is not a Bluetooth address: six pairs of hex digits, "
            "e.g. ble://A4:C1:38:12:34:56"
        )
    return {"type": "ble", "address": address, **_query(query, "ble")}


def _query(query: str, scheme: str) -> dict[str, Any]:
    allowed = _OPTIONS[scheme]
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=True) if query else []
    except ValueError:
        raise ValueError(f"options {query!r} must be name=value pairs joined by '&'") from None
    repeated = [name for name, count in Counter(name for name, _ in pairs).items() if count > 1]
    if repeated:
        raise ValueError(f"option {repeated[0]!r} is given twice")
    options: dict[str, Any] = {}
    for name, value in pairs:
        if name not in allowed:
            known = ", ".join(allowed)
            raise ValueError(f"unknown option {name!r} for {scheme} (options: {known})")
        field_name, convert = allowed[name]
        options[field_name] = convert(name, value)
    return options


def connection_url(connection: Connection | Mapping[str, Any], *, mask: bool = False) -> str:
    """The URL of a connection (the inverse of `parse_connection_url`); `mask` writes
    passwords and keys as ***."""
    data = (
        dict(connection)
        if isinstance(connection, Mapping)
        else connection.model_dump(mode="json", exclude_unset=True)
    )
    kind = str(data["type"])
    query = _query_text(data, kind, mask)
    if kind == "modbus-rtu":
        return f"modbus-rtu://{quote(str(data['port']))}{query}"
    if kind == "ble":
        return f"ble://{data['address']}{query}"
    if kind == "modbus-tcp":
        return f"modbus-tcp://{_host_port(data['host'], data.get('port'))}{query}"
    userinfo = _userinfo(data.get("username"), data.get("password"), mask)
    if kind == "pjlink":
        return f"pjlink://{userinfo}{_host_port(data['host'], data.get('port'))}{query}"
    if kind == "onvif":
        port = _port(data, bool(data.get("https")), 80, HTTPS_PORT)
        path = str(data.get("path", ""))
        where = _host_port(data["host"], port)
        return f"onvif://{userinfo}{where}{'' if path == '/' else path}{query}"
    tls = bool(data.get("tls"))
    port = _port(data, tls, 1883, MQTT_TLS_PORT)
    host = data.get("host")
    if host is None and (port is not None or userinfo):
        host = "localhost"  # the default, written out: a port or user needs a host before it
    where = "" if host is None else _host_port(str(host), port)
    topic = quote(str(data["topic"]), safe="/")
    return f"{'mqtts' if tls else 'mqtt'}://{userinfo}{where}/{topic}{query}"


def _port(data: Mapping[str, Any], secure: bool, plain: int, secured: int) -> int | None:
    """The port to write: none when it is what the URL implies (given, or the secure default
    for mqtts:// and https=1), else the one set (or the plain default under TLS)."""
    if secure:
        port = int(data.get("port", plain))
        return None if port == secured else port
    return None if data.get("port") is None else int(data["port"])


def _host_port(host: str, port: int | None) -> str:
    where = f"[{host}]" if ":" in host else host
    return where if port is None else f"{where}:{port}"


def _userinfo(user: str | None, password: str | None, mask: bool) -> str:
    if user is None and password is None:
        return ""
    name = quote(user, safe="") if user is not None else ""
    return f"{name}:{_secret(password, mask)}@" if password is not None else f"{name}@"


def _secret(value: str, mask: bool) -> str:
    return SECRET if mask else quote(value, safe="")


def _query_text(data: Mapping[str, Any], scheme: str, mask: bool) -> str:
    pairs: list[tuple[str, Any]] = []
    kind = str(data["type"])
    for name, (field_name, _convert) in _OPTIONS[scheme].items():
        value = data.get(field_name)
        if value is None or (scheme == "mqtt" and name == "tls"):
            continue  # tls is the scheme: mqtts://
        if isinstance(value, bool):
            if value != _MODELS[kind].model_fields[field_name].default:
                pairs.append((name, int(value)))
            continue
        if field_name in SECRET_FIELDS and mask:
            value = SECRET
        elif field_name == "rtsp_url" and mask:
            value = mask_url(str(value))
        elif isinstance(value, float):
            value = f"{value:g}"  # 3, not 3.0
        pairs.append((name, value))
    return f"?{urlencode(pairs, safe=':/@[]*')}" if pairs else ""


def mask_url(text: str) -> str:
    """The text with the password of every URL in it written as ***."""
    return _URL_PASSWORD.sub(rf"\1{SECRET}@", text)


def mask_netloc(netloc: str) -> str:
    return mask_url(f"//{netloc}")[2:]


def mask_connection(data: Mapping[str, Any]) -> dict[str, Any]:
    """A connection as a dict, its passwords and keys written as *** (also one in an RTSP URL)."""
    masked = dict(data)
    for name in SECRET_FIELDS:
        if masked.get(name) is not None:
            masked[name] = SECRET
    if isinstance(masked.get("rtsp_url"), str):
        masked["rtsp_url"] = mask_url(masked["rtsp_url"])
    return masked


_URL_PASSWORD = re.compile(r"(//[^/?#@:\[\]]*:)[^/?#]*@")


# -- reading and checking the file --------------------------------------------------------------


@dataclass(frozen=True)
class RowProblem:
    line: int
    message: str
    column: str = ""

    def __str__(self) -> str:
        return f"line {self.line}: {_where(self)}{self.message}"

    def located(self, path: Path) -> str:
        """As compilers print it: FILE:LINE: column: message."""
        return f"{path}:{self.line}: {_where(self)}{self.message}"


class InventoryError(Exception):
    """A file that cannot be imported, with every problem found in it."""

    def __init__(self, path: Path, problems: Iterable[RowProblem]) -> None:
        self.path = path
        self.problems = sorted(problems, key=lambda p: (p.line, p.column))
        count = len(self.problems)
        listing = "".join(f"\n  {p.located(path)}" for p in self.problems)
        super().__init__(
            f"{path}: {count} problem{'s' if count != 1 else ''}, nothing imported{listing}"
        )


def _where(problem: RowProblem) -> str:
    return f"{problem.column}: " if problem.column else ""


@dataclass(frozen=True)
class _Facts:
    """What a row says about places, even when the row has problems (None: missing or bad)."""

    line: int
    site: str | None
    building: str | None
    room: str | None
    gateway: str | None
    device: str | None
    building_name: str | None
    room_name: str | None


@dataclass(frozen=True)
class InventoryRow:
    line: int
    site: str
    building: str | None
    room: str | None
    gateway: str
    device: str
    spec: DeviceSpec
    settings: dict[str, Any]
    building_name: str | None
    room_name: str | None


def read_cells(path: Path) -> tuple[list[tuple[int, dict[str, str]]], list[RowProblem]]:
    """The rows of the file as {column: value} with their first line, and the header's
    problems. UTF-8 with or without a BOM; ',' or ';' between cells; headers in any case."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InventoryError(path, [RowProblem(0, f"cannot read: {exc.strerror or exc}")]) from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        problem = RowProblem(line, "not UTF-8 text (in Excel: save as 'CSV UTF-8')")
        raise InventoryError(path, [problem]) from None
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=_delimiter(text))
    header = next(reader, None)
    if header is None:
        raise InventoryError(path, [RowProblem(1, "the file is empty: it needs a header row")])
    columns = [_column(name) for name in header]
    problems = _header_problems(columns, reader.line_num)
    rows: list[tuple[int, dict[str, str]]] = []
    line = reader.line_num + 1
    for cells in reader:
        values = [cell.strip() for cell in cells]
        if any(values):
            if len(values) > len(columns) and any(values[len(columns) :]):
                problems.append(
                    RowProblem(line, f"{len(values)} cells, the header has {len(columns)} columns")
                )
            padded = values + [""] * (len(columns) - len(values))
            rows.append((line, dict(zip(columns, padded, strict=False))))
        line = reader.line_num + 1
    return rows, problems


def _delimiter(text: str) -> str:
    first = text.lstrip("\r\n").split("\n", 1)[0]
    try:
        return csv.Sniffer().sniff(first, delimiters=",;").delimiter
    except csv.Error:
        return ";" if first.count(";") > first.count(",") else ","


def _column(name: str) -> str:
    return "_".join(name.strip().lower().replace("-", " ").split())


def _header_problems(columns: list[str], line: int) -> list[RowProblem]:
    problems = [
        RowProblem(line, f"unknown column {name!r} (columns: {', '.join(COLUMNS)})")
        for name in columns
        if name and name not in COLUMNS
    ]
    problems += [
        RowProblem(line, f"column {name!r} appears twice")
        for name, count in Counter(columns).items()
        if count > 1 and name
    ]
    problems += [
        RowProblem(line, f"missing column {name!r}") for name in REQUIRED if name not in columns
    ]
    return problems


class _RowChecker:
    """Checks one row at a time against the profiles and the registry, collecting problems."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.problems: list[RowProblem] = []

    def add(self, line: int, column: str, message: str) -> None:
        self.problems.append(RowProblem(line, message, column))

    def row(self, line: int, cells: Mapping[str, str]) -> tuple[_Facts, InventoryRow | None]:
        """The row's facts, and the row itself when it has no problem."""
        before = len(self.problems)
        value = {name: cells.get(name) or None for name in COLUMNS}
        for name in REQUIRED:
            if value[name] is None:
                self.add(line, name, "missing value")
        for name in IDS:
            if (given := value[name]) is not None:
                try:
                    check_id(name, given)
                    if name == "device":
                        not_reserved(given)
                except ValueError as exc:
                    self.add(line, name, str(exc))
                    value[name] = None
        spec = self._spec(line, value)
        settings = self._settings(line, value) if "interval_s" in cells else {}
        building = self._building(line, value)
        facts = _Facts(
            line,
            value["site"],
            building,
            value["room"],
            value["gateway"],
            value["device"],
            value["building_name"],
            value["room_name"],
        )
        if len(self.problems) > before or spec is None:
            return facts, None
        return facts, InventoryRow(
            line,
            str(value["site"]),
            building,
            value["room"],
            str(value["gateway"]),
            str(value["device"]),
            spec,
            settings,
            value["building_name"],
            value["room_name"],
        )

    def _spec(self, line: int, value: Mapping[str, str | None]) -> DeviceSpec | None:
        profile, kind, url = value["profile"], value["kind"], value["connection"]
        ok = True
        if profile is not None and profile not in self.registry.library.profiles:
            known = ", ".join(sorted(self.registry.library.profiles))
            self.add(line, "profile", f"unknown profile {profile!r} (known: {known})")
            ok = False
        if kind is not None and kind not in {k.value for k in DeviceKind}:
            self.add(line, "kind", f"unknown kind {kind!r} (kinds: {KINDS})")
            ok = False
        connection: Connection | None = None
        if url is not None:
            try:
                connection = parse_connection(parse_connection_url(url))
            except (ValueError, RegistryError) as exc:
                self.add(line, "connection", str(exc))
        if not ok or profile is None or connection is None:
            return None
        try:
            return self.registry.validate_device(profile, kind, connection)
        except RegistryError as exc:
            self.add(line, "connection", str(exc))
            return None

    def _settings(self, line: int, value: Mapping[str, str | None]) -> dict[str, Any]:
        text = value["interval_s"]
        if text is None:
            return {"interval_s": None}
        try:
            interval = float(text.replace(",", "."))  # 2,5 from a spreadsheet with a comma
        except ValueError:
            self.add(line, "interval_s", f"{text!r} is not a number of seconds")
            return {}
        try:
            NodeSettings(interval_s=interval)
        except ValidationError as exc:
            self.add(line, "interval_s", problems_from(exc)[0].message)
            return {}
        return {"interval_s": interval}

    def _building(self, line: int, value: Mapping[str, str | None]) -> str | None:
        """The row's building; a room already registered gives its own when none is given."""
        building, room, site = value["building"], value["room"], value["site"]
        if building is None and value["building_name"] is not None:
            self.add(line, "building_name", "a building name needs the building's id")
        if room is None and value["room_name"] is not None:
            self.add(line, "room_name", "a room name needs the room's id")
        if room is None or building is not None or site is None:
            return building
        known = self.registry.building_of_room(site, room)
        if known is None:
            self.add(line, "building", f"room {room!r} is new: give the building it is in")
        return known


def check_file(registry: Registry, path: Path) -> list[InventoryRow]:
    """Every row of the file, checked; raises InventoryError listing every problem."""
    cells, problems = read_cells(path)
    if any(p.message.startswith("missing column") for p in problems):
        raise InventoryError(path, problems)
    checker = _RowChecker(registry)
    checked = [checker.row(line, values) for line, values in cells]
    rows = [row for _, row in checked if row is not None]
    facts = [fact for fact, _ in checked]
    problems += checker.problems + _cross_problems(facts) + _bus_problems(registry, rows)
    if not cells and not problems:
        problems.append(RowProblem(2, "no rows below the header"))
    if problems:
        raise InventoryError(path, problems)
    return rows


def _cross_problems(rows: list[_Facts]) -> list[RowProblem]:
    """Rows that contradict an earlier row: a device twice, a room in two buildings, two names."""
    problems: list[RowProblem] = []
    devices: dict[tuple[str, str], _Facts] = {}
    places: dict[tuple[str, str, str], tuple[str | None, int]] = {}

    def agree(row: _Facts, site: str, kind: str, key: str | None, column: str) -> None:
        value = getattr(row, column)
        if key is None or value is None:
            return
        first, line = places.setdefault((site, column, key), (value, row.line))
        if first != value:
            what = "is in building" if column == "building" else "is named"
            message = f"{kind} {key!r} {what} {value!r} here but {first!r} on line {line}"
            problems.append(RowProblem(row.line, message, column))

    for row in rows:
        if (site := row.site) is None:
            continue
        if row.device is not None:
            first = devices.setdefault((site, row.device), row)
            if first is not row:
                problems.append(RowProblem(row.line, _twice(row, first), "device"))
        agree(row, site, "room", row.room, "building")
        agree(row, site, "building", row.building, "building_name")
        agree(row, site, "room", row.room, "room_name")
    return problems


def _twice(row: _Facts, first: _Facts) -> str:
    if None not in (first.gateway, row.gateway) and first.gateway != row.gateway:
        return (
            f"device {row.device!r} is on gateway {row.gateway!r} here but on "
            f"{first.gateway!r} on line {first.line}"
        )
    return f"device {row.device!r} is listed twice (also on line {first.line})"


def _bus_problems(registry: Registry, rows: list[InventoryRow]) -> list[RowProblem]:
    """Devices of one gateway (those listed, and the registered ones not listed) that cannot
    share its serial ports or unit ids."""
    listed = {(row.site, row.device) for row in rows}
    by_gateway: dict[tuple[str, str], list[tuple[str, Connection]]] = {}
    for device in registry.devices():
        if (device["site"], device["device"]) not in listed:
            by_gateway.setdefault((device["site"], device["gateway"]), []).append(
                (device["device"], parse_connection(device["connection"]))
            )
    lines: dict[tuple[str, str], int] = {}
    for row in rows:
        by_gateway.setdefault((row.site, row.gateway), []).append((row.device, row.spec.connection))
        lines.setdefault((row.site, row.device), row.line)
    return [
        RowProblem(lines[(site, device)], f"on gateway {gateway!r}: {why}", "connection")
        for (site, gateway), devices in by_gateway.items()
        for device, why in bus_conflicts(devices)
        if (site, device) in lines
    ]


# -- applying ----------------------------------------------------------------------------------


@dataclass
class ImportResult:
    path: Path
    rows: int
    dry_run: bool
    counts: dict[str, dict[Change, int]] = field(
        default_factory=lambda: {
            level: {"created": 0, "updated": 0, "unchanged": 0} for level in LEVELS
        }
    )

    @property
    def changed(self) -> bool:
        return any(c["created"] or c["updated"] for c in self.counts.values())

    def as_json(self) -> dict[str, Any]:
        return {
            "file": str(self.path),
            "dry_run": self.dry_run,
            "rows": self.rows,
            "changed": self.changed,
            "counts": self.counts,
        }


class _DryRun(Exception):
    """Raised at the end of a dry run so that its transaction rolls back."""


def import_file(registry: Registry, path: Path, *, dry_run: bool = False) -> ImportResult:
    """Checks the whole file, then applies it in one transaction (rolled back for a dry run,
    which so counts exactly what a real import would do)."""
    rows = check_file(registry, path)
    result = ImportResult(path, len(rows), dry_run)
    try:
        with registry.store.transaction():
            _apply(registry, rows, result)
            if dry_run:
                raise _DryRun
    except _DryRun:
        pass
    return result


def _apply(registry: Registry, rows: list[InventoryRow], result: ImportResult) -> None:
    """Row by row, each site, building, room and gateway once (at the first row naming it)."""
    names = _names(rows)
    places = _gateway_places(rows)
    done: set[tuple[str, ...]] = set()

    def put(
        level: str, key: tuple[str, ...], line: int, call: Callable[..., Change], *args: Any
    ) -> None:
        if (level, *key) in done:
            return
        done.add((level, *key))
        try:
            change = call(*args)
        except RegistryError as exc:
            raise InventoryError(result.path, [RowProblem(line, str(exc))]) from None
        result.counts[level][change] += 1

    for row in rows:
        site, building, room, gateway, line = (
            row.site,
            row.building,
            row.room,
            row.gateway,
            row.line,
        )
        put("sites", (site,), line, registry.put_site, site)
        if building is not None:
            name = names.get(("building", site, building))
            put("buildings", (site, building), line, registry.put_building, site, building, name)
        if room is not None and building is not None:
            name = names.get(("room", site, room))
            put("rooms", (site, room), line, registry.put_room, site, room, building, name)
        place = places[(site, gateway)]
        put("gateways", (site, gateway), line, registry.put_gateway, site, gateway, *place)
        device = (site, row.device, gateway, room, row.spec, row.settings)
        put("devices", (site, row.device), line, registry.put_device, *device)


def _names(rows: list[InventoryRow]) -> dict[tuple[str, str, str], str]:
    """("building"|"room", site, id) -> the name a row gives it (rows agree, checked before)."""
    names: dict[tuple[str, str, str], str] = {}
    for row in rows:
        if row.building is not None and row.building_name is not None:
            names.setdefault(("building", row.site, row.building), row.building_name)
        if row.room is not None and row.room_name is not None:
            names.setdefault(("room", row.site, row.room), row.room_name)
    return names


def _gateway_places(
    rows: list[InventoryRow],
) -> dict[tuple[str, str], tuple[str | None, str | None]]:
    """Where a new gateway goes: the building, and the room, that all its devices share."""
    mine: dict[tuple[str, str], list[InventoryRow]] = {}
    for row in rows:
        mine.setdefault((row.site, row.gateway), []).append(row)
    return {
        key: (_shared(r.building for r in listed), _shared(r.room for r in listed))
        for key, listed in mine.items()
    }


def _shared(values: Iterable[str | None]) -> str | None:
    """The value every row agrees on, else None (a gateway's devices in several rooms)."""
    distinct = set(values)
    return distinct.pop() if len(distinct) == 1 else None
