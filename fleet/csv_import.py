"""Imports the inventory spreadsheet schools keep: one row per device, with its place and gateway.

Rules: the whole file is checked before anything is written and every problem is reported with
its line; a file with one problem imports nothing. A clean file is applied in one transaction
through the registry's upserts, so importing the same file again changes nothing. Connections are
written as URLs a spreadsheet cell can hold (`connection_url()` is the inverse of the parser).
"""

from __future__ import annotations

import csv
import io
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit

from pydantic import ValidationError

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

URL_FORMS = "modbus-tcp://HOST[:PORT]?unit=N or modbus-rtu:///dev/ttyUSB0?unit=N&baudrate=9600"
_COMMON: dict[str, type] = {"unit": int, "timeout_s": float, "retries": int, "max_gap": int}
_OPTIONS: dict[str, dict[str, type]] = {
    "modbus-tcp": _COMMON,
    "modbus-rtu": {**_COMMON, "baudrate": int, "parity": str, "stopbits": int},
}
_QUERY_ORDER = ("unit", "baudrate", "parity", "stopbits", "timeout_s", "retries", "max_gap")


# -- connection URLs ---------------------------------------------------------------------------


def parse_connection_url(text: str) -> dict[str, Any]:
    """`modbus-tcp://HOST[:PORT]?unit=N` ([IPv6] in brackets) or
    `modbus-rtu:///dev/PORT?unit=N&baudrate=9600&parity=E&stopbits=1` (+ timeout_s, retries,
    max_gap) as the dict a `Connection` validates. Raises ValueError saying what is wrong."""
    text = text.strip()
    scheme, sep, _ = text.partition("://")
    scheme = scheme.lower()
    if not sep:
        raise ValueError(f"{text!r} is not a connection URL ({URL_FORMS})")
    if scheme not in _OPTIONS:
        raise ValueError(f"unknown scheme {scheme!r} (use modbus-tcp:// or modbus-rtu://)")
    try:
        parts = urlsplit(text)
    except ValueError as exc:
        raise ValueError(f"{text!r} is not a valid URL: {exc}") from None
    if parts.fragment:
        raise ValueError(f"unexpected '#{parts.fragment}' in {text!r}")
    options = _query(parts.query, scheme)
    if scheme == "modbus-rtu":
        return {"type": scheme, "port": _serial_port(parts.netloc, parts.path), **options}
    return {"type": scheme, **_tcp_address(parts.netloc, parts.path), **options}


def _tcp_address(netloc: str, path: str) -> dict[str, Any]:
    if path not in ("", "/"):
        raise ValueError(f"unexpected path {path!r} after the host (options go after '?')")
    if "@" in netloc:
        raise ValueError("a Modbus TCP URL takes no user or password")
    parts = urlsplit(f"//{netloc}")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(
            f"bad port in {netloc!r} (an IPv6 address goes in brackets: modbus-tcp://[fd00::5]:502)"
        ) from None
    if not parts.hostname:
        raise ValueError(f"no host in modbus-tcp://{netloc} ({URL_FORMS})")
    address: dict[str, Any] = {"host": parts.hostname}
    if port is not None:
        address["port"] = port
    return address


def _serial_port(netloc: str, path: str) -> str:
    if netloc or not path.startswith("/"):
        raise ValueError(
            f"modbus-rtu:// takes the serial device's path: modbus-rtu:///dev/ttyUSB0 "
            f"(three slashes), not modbus-rtu://{netloc}{path}"
        )
    return unquote(path)


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
        kind = allowed.get(name)
        if kind is None:
            raise ValueError(
                f"unknown option {name!r} for {scheme} (options: {', '.join(allowed)})"
            )
        options[name] = _option(name, value, kind)
    return options


def _option(name: str, value: str, kind: type) -> Any:
    if kind is str:
        return value.upper()
    try:
        return kind(value)
    except ValueError:
        what = "a whole number" if kind is int else "a number"
        raise ValueError(f"{name}={value!r} is not {what}") from None


def connection_url(connection: Connection | Mapping[str, Any]) -> str:
    """The URL of a connection (the inverse of `parse_connection_url`)."""
    data = (
        dict(connection)
        if isinstance(connection, Mapping)
        else connection.model_dump(mode="json", exclude_unset=True)
    )
    query = urlencode([(name, data[name]) for name in _QUERY_ORDER if name in data])
    suffix = f"?{query}" if query else ""
    if data["type"] == "modbus-rtu":
        return f"modbus-rtu://{quote(str(data['port']))}{suffix}"
    host = str(data["host"])
    host = f"[{host}]" if ":" in host else host
    port = f":{data['port']}" if "port" in data else ""
    return f"modbus-tcp://{host}{port}{suffix}"


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
