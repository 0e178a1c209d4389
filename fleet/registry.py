"""The registry: the sites, buildings, rooms, gateways and devices IT staff declare.

Rules: every change is validated here before it is written (ids, parents in the same site, known
profiles, connections of the profile's protocol, buses a gateway can share); a refusal raises
`RegistryError` naming what is wrong, an unknown target `NotFound`. A gateway in a room is in that
room's building, always. What gateways report (tables `gateways`, `devices`) is only read here.
"""

from __future__ import annotations

import ipaddress
import json
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple, get_args

from pydantic import TypeAdapter, ValidationError

from drivers.ble.connection import BleConnection
from drivers.camera.connection import OnvifConnection
from drivers.modbus.driver import ModbusRtuConnection, ModbusTcpConnection
from drivers.mqtt.connection import MqttDeviceConnection
from drivers.pjlink.connection import PjlinkConnection
from drivers.profiles import AnyProfile, DeviceKind, ProfileLibrary
from drivers.registry import PROTOCOL_OF_CONNECTION, Connection
from fleet.settings import (
    NodeSettings,
    SettingsError,
    dump_settings,
    merge,
    parse_settings,
    validate_settings,
)
from fleet.store import Store
from fleet.timefmt import iso
from wire.errors import DocumentError, problems_from
from wire.gateway_config import RESERVED_DEVICE_IDS
from wire.net import host_port
from wire.topics import check_id

Level = Literal["site", "building", "room", "gateway", "device"]
LEVELS: tuple[Level, ...] = get_args(Level)
Change = Literal["created", "updated", "unchanged"]
KINDS = ", ".join(kind.value for kind in DeviceKind)
DEVICE_SETTINGS = frozenset({"interval_s", "timeout_s", "alarms"})
NAME_MAX = 200

# level -> (table, key column)
_TABLES: dict[Level, tuple[str, str]] = {
    "site": ("sites", "site"),
    "building": ("buildings", "building"),
    "room": ("rooms", "room"),
    "gateway": ("registry_gateways", "gateway"),
    "device": ("registry_devices", "device"),
}
_LEVEL_OF_KIND: dict[str, Level] = {f"{level}s": level for level in LEVELS}
_CONNECTION: TypeAdapter[Connection] = TypeAdapter(Connection)


class RegistryError(Exception):
    """A change or a query the registry refuses; the message says what is wrong and where."""


class NotFound(RegistryError):
    """The target does not exist."""

    def __init__(self, target: Target, hint: str = "") -> None:
        self.target = target
        where = f" in site {target.site!r}" if target.level != "site" and target.site else ""
        super().__init__(
            f"no {target.level} {target.name!r}{where}" + (f" ({hint})" if hint else "")
        )


class HasChildren(RegistryError):
    """A removal refused because things still belong to the target."""

    def __init__(self, target: Target, children: dict[str, list[str]]) -> None:
        self.target = target
        self.children = children
        listing = "; ".join(f"{kind}: {', '.join(names)}" for kind, names in children.items())
        super().__init__(
            f"{target} still has {listing} — move or remove them first, or remove everything "
            "with --cascade"
        )


class Target(NamedTuple):
    """One node of the registry tree: `site:S`, `building:S/B`, `room:S/R`, `gateway:S/G` or
    `device:S/D` (for a site, `name` is the site id)."""

    level: Level
    site: str
    name: str

    def __str__(self) -> str:
        if self.level == "site":
            return f"site:{self.site}"
        return f"{self.level}:{self.site}/{self.name}"


TARGET_FORMS = "site:S, building:S/B, room:S/R, gateway:S/G or device:S/D"


def parse_target(text: str) -> Target:
    level, colon, rest = text.partition(":")
    if not colon or level not in LEVELS:
        raise RegistryError(f"target {text!r} must be {TARGET_FORMS}")
    if level == "site":
        return Target("site", _id("site", rest), rest)
    site, slash, name = rest.partition("/")
    if not slash:
        raise RegistryError(f"target {text!r}: a {level} is named {level}:SITE/{level.upper()}")
    return Target(level, _id("site", site), _id(level, name))


def _id(kind: str, value: str) -> str:
    try:
        return check_id(kind, value)
    except ValueError as exc:
        raise RegistryError(str(exc)) from None


def _name(value: str | None) -> str | None:
    if value is None:
        return None
    value = value.strip()
    if len(value) > NAME_MAX or "\n" in value:
        raise RegistryError(f"name {value[:40]!r}… must be one line of at most {NAME_MAX} chars")
    return value or None


@dataclass(frozen=True)
class DeviceSpec:
    """What a device is, validated against the profiles: kind, profile and connection."""

    kind: DeviceKind
    profile: AnyProfile
    connection: Connection

    def connection_json(self) -> str:
        """As given (what was not given stays the driver's default)."""
        return json.dumps(self.connection.model_dump(mode="json", exclude_unset=True))


def parse_connection(data: Connection | Mapping[str, Any]) -> Connection:
    if not isinstance(data, Mapping):
        return data
    try:
        return _CONNECTION.validate_python(dict(data))
    except ValidationError as exc:
        problems = "; ".join(str(p) for p in problems_from(exc))
        raise RegistryError(f"connection: {problems}") from None


def bus_conflicts(devices: Sequence[tuple[str, Connection]]) -> list[tuple[str, str]]:
    """(device, why) for devices of one gateway that cannot share what reaches them: devices on
    one serial port need the same line settings, and one Modbus unit id answers once per port or
    host; one PJLink display or ONVIF camera listens on a host and port, one MQTT device
    publishes under a base topic of a broker, one BLE device has an address."""
    problems: list[tuple[str, str]] = []
    lines: dict[str, tuple[str, tuple[int, str, int]]] = {}
    units: dict[tuple[str, int], str] = {}
    endpoints: dict[tuple[Any, ...], str] = {}
    for device, connection in devices:
        if not isinstance(connection, ModbusTcpConnection | ModbusRtuConnection):
            key, where = _endpoint(connection)
            other = endpoints.setdefault(key, device)
            if other != device:
                problems.append((device, f"{where} is device {other} already"))
            continue
        if connection.type == "modbus-rtu":
            bus = connection.port
            first, line = lines.setdefault(bus, (device, connection.line()))
            if line != connection.line():
                problems.append(
                    (
                        device,
                        f"serial port {bus} runs at {_line(line)} for device {first}, "
                        f"not {_line(connection.line())}",
                    )
                )
                continue
        else:
            bus = host_port(connection.host, connection.port)
        other = units.setdefault((bus, connection.unit), device)
        if other != device:
            problems.append((device, f"unit {connection.unit} at {bus} is device {other} already"))
    return problems


def _endpoint(
    connection: PjlinkConnection | MqttDeviceConnection | OnvifConnection | BleConnection,
) -> tuple[tuple[Any, ...], str]:
    """What only one device may be at (a key compared across devices) and how to name it."""
    if isinstance(connection, BleConnection):
        return ("ble", connection.address.upper()), f"BLE address {connection.address}"
    host = _host_key(connection.host)
    where = host_port(connection.host, connection.port)
    if isinstance(connection, MqttDeviceConnection):
        return (
            ("mqtt", host, connection.port, connection.topic),
            f"MQTT base topic {connection.topic!r} on broker {where}",
        )
    what = "PJLink" if isinstance(connection, PjlinkConnection) else "ONVIF"
    return ("tcp", host, connection.port), f"{what} endpoint {where}"


def _host_key(host: str) -> str:
    """One spelling per host: fd00:0::1 is fd00::1, names are case-blind."""
    try:
        return ipaddress.ip_address(host).compressed
    except ValueError:
        return host.lower()


def _line(line: tuple[int, str, int]) -> str:
    baudrate, parity, stopbits = line
    return f"{baudrate} {parity} {stopbits}"


class Registry:
    """Validated reads and changes of the registry tables of one store. A change runs in its
    own transaction, or in the caller's when one is open (the CSV import)."""

    def __init__(
        self,
        store: Store,
        profiles: ProfileLibrary | None = None,
        profiles_dir: Path | None = None,
    ) -> None:
        self.store = store
        self._library = profiles
        self._profiles_dir = profiles_dir

    # -- plumbing ----------------------------------------------------------------------------

    @property
    def library(self) -> ProfileLibrary:
        """The firmware profiles, loaded the first time a device needs them."""
        if self._library is None:
            try:
                self._library = ProfileLibrary.load(self._profiles_dir)
            except DocumentError as exc:
                raise RegistryError(f"cannot load the firmware profiles: {exc}") from None
        return self._library

    @contextmanager
    def _writing(self) -> Iterator[None]:
        """One transaction, or the caller's when it already opened one (the CSV import)."""
        if self.store.conn.in_transaction:
            yield
            return
        with self.store.transaction():
            yield

    def _rows(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        cursor = self.store.conn.execute(sql, params)
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]

    def _ids(self, sql: str, params: Sequence[Any] = ()) -> list[str]:
        return [str(row[0]) for row in self.store.conn.execute(sql, params).fetchall()]

    def _find(self, target: Target) -> dict[str, Any] | None:
        table, key = _TABLES[target.level]
        if target.level == "site":
            rows = self._rows(f"SELECT * FROM {table} WHERE site = ?", (target.site,))
        else:
            rows = self._rows(
                f"SELECT * FROM {table} WHERE site = ? AND {key} = ?", (target.site, target.name)
            )
        return rows[0] if rows else None

    def _get(self, target: Target) -> dict[str, Any]:
        row = self._find(target)
        if row is None:
            hint = f"see 'campus-fleet {target.level} list'"
            if target.level != "site" and self._find(Target("site", target.site, target.site)):
                hint = f"see 'campus-fleet {target.level} list --site {target.site}'"
            elif target.level != "site":
                hint = f"no site {target.site!r} either; see 'campus-fleet site list'"
            raise NotFound(target, hint)
        return row

    def _refuse_existing(self, target: Target) -> None:
        if self._find(target) is not None:
            raise RegistryError(f"{target} already exists")

    def _update(self, target: Target, **values: Any) -> None:
        table, key = _TABLES[target.level]
        assignments = ", ".join(f"{column} = ?" for column in values)
        where = "site = ?" if target.level == "site" else f"site = ? AND {key} = ?"
        params = (target.site,) if target.level == "site" else (target.site, target.name)
        self.store.conn.execute(
            f"UPDATE {table} SET {assignments} WHERE {where}", (*values.values(), *params)
        )

    def _insert(self, level: Level, **values: Any) -> None:
        table, _ = _TABLES[level]
        values["created_ns"] = time.time_ns()
        columns = ", ".join(values)
        marks = ", ".join("?" for _ in values)
        self.store.conn.execute(
            f"INSERT INTO {table} ({columns}) VALUES ({marks})", tuple(values.values())
        )

    # -- sites -------------------------------------------------------------------------------

    def add_site(self, site: str, name: str | None = None) -> dict[str, Any]:
        target = Target("site", _id("site", site), site)
        with self._writing():
            self._refuse_existing(target)
            self._insert("site", site=site, name=_name(name))
        return self.site(site)

    def sites(self) -> list[dict[str, Any]]:
        rows = self._rows(
            "SELECT s.*, "
            "(SELECT count(*) FROM buildings b WHERE b.site = s.site) AS buildings, "
            "(SELECT count(*) FROM rooms r WHERE r.site = s.site) AS rooms, "
            "(SELECT count(*) FROM registry_gateways g WHERE g.site = s.site) AS gateways, "
            "(SELECT count(*) FROM registry_devices d WHERE d.site = s.site) AS devices "
            "FROM sites s ORDER BY site"
        )
        return [_public(row) for row in rows]

    def site(self, site: str) -> dict[str, Any]:
        target = Target("site", site, site)
        self._get(target)
        entry = next(row for row in self.sites() if row["site"] == site)
        return {**entry, "children": self._children(target)}

    def default_site(self) -> str:
        """The only site, for commands given no --site."""
        sites = self._ids("SELECT site FROM sites ORDER BY site")
        if len(sites) == 1:
            return sites[0]
        if not sites:
            raise RegistryError("no site yet: add one with 'campus-fleet site add SITE'")
        raise RegistryError(f"several sites ({', '.join(sites)}): give --site")

    # -- buildings ---------------------------------------------------------------------------

    def add_building(self, site: str, building: str, name: str | None = None) -> dict[str, Any]:
        target = Target("building", _id("site", site), _id("building", building))
        with self._writing():
            self._get(Target("site", site, site))
            self._refuse_existing(target)
            self._insert("building", site=site, building=building, name=_name(name))
        return self.building(site, building)

    def buildings(self, site: str | None = None) -> list[dict[str, Any]]:
        rows = self._rows(
            "SELECT b.*, "
            "(SELECT count(*) FROM rooms r WHERE r.site = b.site AND r.building = b.building) "
            "AS rooms, (SELECT count(*) FROM registry_gateways g WHERE g.site = b.site "
            "AND g.building = b.building) AS gateways FROM buildings b "
            "WHERE ? IS NULL OR site = ? ORDER BY site, building",
            (site, site),
        )
        return [_public(row) for row in rows]

    def building(self, site: str, building: str) -> dict[str, Any]:
        target = Target("building", site, building)
        self._get(target)
        entry = next(row for row in self.buildings(site) if row["building"] == building)
        return {**entry, "children": self._children(target)}

    # -- rooms -------------------------------------------------------------------------------

    def add_room(
        self, site: str, room: str, building: str, name: str | None = None
    ) -> dict[str, Any]:
        target = Target("room", _id("site", site), _id("room", room))
        with self._writing():
            self._get(Target("building", site, _id("building", building)))
            self._refuse_existing(target)
            self._insert("room", site=site, room=room, building=building, name=_name(name))
        return self.room(site, room)

    def rooms(self, site: str | None = None, building: str | None = None) -> list[dict[str, Any]]:
        rows = self._rows(
            "SELECT r.*, (SELECT count(*) FROM registry_gateways g WHERE g.site = r.site "
            "AND g.room = r.room) AS gateways, (SELECT count(*) FROM registry_devices d "
            "WHERE d.site = r.site AND d.room = r.room) AS devices FROM rooms r "
            "WHERE (? IS NULL OR site = ?) AND (? IS NULL OR building = ?) ORDER BY site, room",
            (site, site, building, building),
        )
        return [_public(row) for row in rows]

    def room(self, site: str, room: str) -> dict[str, Any]:
        target = Target("room", site, room)
        self._get(target)
        entry = next(row for row in self.rooms(site) if row["room"] == room)
        return {**entry, "children": self._children(target)}

    def building_of_room(self, site: str, room: str) -> str | None:
        """The building of a registered room (None: no such room)."""
        found = self._find(Target("room", site, room))
        return None if found is None else str(found["building"])

    def move_room(self, site: str, room: str, building: str) -> dict[str, Any]:
        """Moves the room, and the gateways in it, to another building of the same site."""
        target = Target("room", site, room)
        with self._writing():
            self._get(target)
            self._get(Target("building", site, _id("building", building)))
            self._update(target, building=building)
            self.store.conn.execute(
                "UPDATE registry_gateways SET building = ? WHERE site = ? AND room = ?",
                (building, site, room),
            )
        return self.room(site, room)

    # -- gateways ----------------------------------------------------------------------------

    def _place(
        self, site: str, building: str | None, room: str | None
    ) -> tuple[str | None, str | None]:
        """(building, room) of a gateway, checked: a room decides its building."""
        if room is None:
            if building is not None:
                self._get(Target("building", site, _id("building", building)))
            return building, None
        row = self._get(Target("room", site, _id("room", room)))
        if building is not None and building != row["building"]:
            raise RegistryError(
                f"room {room!r} is in building {row['building']!r}, not {building!r}"
            )
        return row["building"], room

    def add_gateway(
        self, site: str, gateway: str, building: str | None = None, room: str | None = None
    ) -> dict[str, Any]:
        target = Target("gateway", _id("site", site), _id("gateway", gateway))
        with self._writing():
            self._get(Target("site", site, site))
            self._refuse_existing(target)
            building, room = self._place(site, building, room)
            self._insert("gateway", site=site, gateway=gateway, building=building, room=room)
        return self.gateway(site, gateway)

    def gateways(self, site: str | None = None) -> list[dict[str, Any]]:
        rows = self._rows(
            "SELECT g.*, (SELECT count(*) FROM registry_devices d WHERE d.site = g.site "
            "AND d.gateway = g.gateway) AS devices, o.status, o.last_seen_ns "
            "FROM registry_gateways g LEFT JOIN gateways o USING (site, gateway) "
            "WHERE ? IS NULL OR g.site = ? ORDER BY g.site, g.gateway",
            (site, site),
        )
        return [_public(row) for row in rows]

    def gateway(self, site: str, gateway: str) -> dict[str, Any]:
        target = Target("gateway", site, gateway)
        self._get(target)
        entry = next(row for row in self.gateways(site) if row["gateway"] == gateway)
        return {**entry, "children": self._children(target)}

    def move_gateway(
        self, site: str, gateway: str, building: str | None = None, room: str | None = None
    ) -> dict[str, Any]:
        """Places the gateway in `building` (no room), or in `room` (and its building)."""
        if building is None and room is None:
            raise RegistryError("a move needs a building, a room or both")
        target = Target("gateway", site, gateway)
        with self._writing():
            self._get(target)
            building, room = self._place(site, building, room)
            self._update(target, building=building, room=room)
        return self.gateway(site, gateway)

    def enroll(
        self, site: str, gateway: str, building: str | None = None, room: str | None = None
    ) -> tuple[dict[str, Any], bool]:
        """Registers the gateway when it is new and stamps its enrolment; (gateway, created)."""
        target = Target("gateway", _id("site", site), _id("gateway", gateway))
        with self._writing():
            existing = self._find(target)
            if existing is None:
                self._get(Target("site", site, site))
                place = self._place(site, building, room)
                self._insert(
                    "gateway", site=site, gateway=gateway, building=place[0], room=place[1]
                )
            elif building is not None or room is not None:
                place = self._place(site, building, room)
                if place != (existing["building"], existing["room"]):
                    raise RegistryError(
                        f"{target} is registered in building {existing['building']!r}, room "
                        f"{existing['room']!r}; use 'campus-fleet gateway move' to move it"
                    )
            self._update(target, enrolled_ns=time.time_ns())
        return self.gateway(site, gateway), existing is None

    # -- devices -----------------------------------------------------------------------------

    def validate_device(
        self, profile: str, kind: str | None, connection: Connection | Mapping[str, Any]
    ) -> DeviceSpec:
        """Kind, profile and connection checked together (what a CSV row is checked with)."""
        try:
            found = self.library.get(profile)
        except KeyError as exc:
            raise RegistryError(str(exc.args[0])) from None
        try:
            device_kind = DeviceKind(kind) if kind else found.kind
        except ValueError:
            raise RegistryError(f"unknown kind {kind!r} (kinds: {KINDS})") from None
        parsed = parse_connection(connection)
        if PROTOCOL_OF_CONNECTION[parsed.type] != found.protocol:
            raise RegistryError(
                f"profile {profile} speaks {found.protocol}, connection is {parsed.type}"
            )
        return DeviceSpec(device_kind, found, parsed)

    def _check_bus(self, site: str, gateway: str, device: str, connection: Connection) -> None:
        others = [
            (row["device"], parse_connection(row["connection"]))
            for row in self.devices_of_gateway(site, gateway)
            if row["device"] != device
        ]
        for name, why in bus_conflicts([*others, (device, connection)]):
            if name == device:
                raise RegistryError(f"device {device!r} on gateway {gateway!r}: {why}")

    def _check_device_settings(self, settings: NodeSettings, profile: AnyProfile) -> None:
        given = set(json.loads(dump_settings(settings)))
        if extra := sorted(given - DEVICE_SETTINGS):
            raise RegistryError(
                f"a device takes only {', '.join(sorted(DEVICE_SETTINGS))} "
                f"(not {', '.join(extra)}); set the others on its gateway, room, building or site"
            )
        points = {point.name for point in profile.points}
        for point in settings.alarms:
            if point not in points:
                raise RegistryError(f"alarms: profile {profile.id} has no point {point!r}")

    def add_device(
        self,
        site: str,
        device: str,
        gateway: str,
        profile: str,
        connection: Connection | Mapping[str, Any],
        kind: str | None = None,
        room: str | None = None,
        settings: NodeSettings | None = None,
    ) -> dict[str, Any]:
        if device in RESERVED_DEVICE_IDS:
            raise RegistryError(f"device id {device!r} is reserved (the gateway's network policy)")
        target = Target("device", _id("site", site), _id("device", device))
        spec = self.validate_device(profile, kind, connection)
        settings = settings or NodeSettings()
        self._check_device_settings(settings, spec.profile)
        with self._writing():
            self._refuse_existing(target)
            self._get(Target("gateway", site, _id("gateway", gateway)))
            if room is not None:
                self._get(Target("room", site, _id("room", room)))
            self._check_bus(site, gateway, device, spec.connection)
            self._insert(
                "device",
                site=site,
                device=device,
                gateway=gateway,
                room=room,
                kind=spec.kind.value,
                profile=profile,
                connection=spec.connection_json(),
                settings=dump_settings(settings),
            )
        return self.device(site, device)

    def devices(self, site: str | None = None, gateway: str | None = None) -> list[dict[str, Any]]:
        rows = self._rows(
            "SELECT * FROM registry_devices WHERE (? IS NULL OR site = ?) "
            "AND (? IS NULL OR gateway = ?) ORDER BY site, gateway, device",
            (site, site, gateway, gateway),
        )
        return [_public(row) for row in rows]

    def device(self, site: str, device: str) -> dict[str, Any]:
        row = _public(self._get(Target("device", site, device)))
        observed = self._rows(
            "SELECT gateway, up, last_seen_ns FROM devices WHERE site = ? AND device = ?",
            (site, device),
        )
        row["observed"] = [
            {
                "gateway": o["gateway"],
                "up": None if o["up"] is None else bool(o["up"]),
                "last_seen": iso(o["last_seen_ns"]),
            }
            for o in observed
        ]
        return row

    def move_device(
        self,
        site: str,
        device: str,
        gateway: str | None = None,
        room: str | None = None,
        *,
        clear_room: bool = False,
    ) -> dict[str, Any]:
        """Onto another gateway and/or into another room (`clear_room`: in its gateway's)."""
        if gateway is None and room is None and not clear_room:
            raise RegistryError("a move needs a gateway, a room or both")
        if room is not None and clear_room:
            raise RegistryError("give a room or clear it, not both")
        target = Target("device", site, device)
        with self._writing():
            row = self._get(target)
            values: dict[str, Any] = {}
            if gateway is not None:
                self._get(Target("gateway", site, _id("gateway", gateway)))
                self._check_bus(
                    site, gateway, device, parse_connection(json.loads(row["connection"]))
                )
                values["gateway"] = gateway
            if room is not None:
                self._get(Target("room", site, _id("room", room)))
            if room is not None or clear_room:
                values["room"] = room
            self._update(target, **values)
        return self.device(site, device)

    # -- removal -----------------------------------------------------------------------------

    def _children(self, target: Target) -> dict[str, list[str]]:
        """What belongs to the target: the things a removal would take with it."""
        level, site, name = target
        if level == "device":
            return {}
        rooms = self._rows("SELECT room, building FROM rooms WHERE site = ?", (site,))
        gateways = self._rows(
            "SELECT gateway, building, room FROM registry_gateways WHERE site = ?", (site,)
        )
        devices = self._rows(
            "SELECT device, gateway, room FROM registry_devices WHERE site = ?", (site,)
        )
        buildings = self._ids("SELECT building FROM buildings WHERE site = ?", (site,))
        everything = level == "site"
        in_rooms = {
            r["room"]
            for r in rooms
            if everything or (level == "building" and r["building"] == name)
        } | ({name} if level == "room" else set())
        in_gateways = {
            g["gateway"]
            for g in gateways
            if everything
            or g["room"] in in_rooms
            or (level == "building" and g["building"] == name)
            or (level == "gateway" and g["gateway"] == name)
        }
        found = {
            "buildings": buildings if everything else [],
            "rooms": sorted(in_rooms - {name} if level == "room" else in_rooms),
            "gateways": sorted(in_gateways - {name} if level == "gateway" else in_gateways),
            "devices": sorted(
                d["device"]
                for d in devices
                if everything or d["room"] in in_rooms or d["gateway"] in in_gateways
            ),
        }
        return {kind: names for kind, names in found.items() if names}

    def remove(self, target: Target, cascade: bool = False) -> dict[str, list[str]]:
        """Removes the target, refusing while things belong to it unless `cascade`; returns
        what was removed, by kind."""
        with self._writing():
            self._get(target)
            children = self._children(target)
            if children and not cascade:
                raise HasChildren(target, children)
            site = target.site
            for kind, names in children.items():
                for name in names:
                    self._delete(Target(_LEVEL_OF_KIND[kind], site, name))
            self._delete(target)
        return {f"{target.level}s": [target.name], **children}

    def _delete(self, target: Target) -> None:
        table, key = _TABLES[target.level]
        if target.level == "site":
            self.store.conn.execute(f"DELETE FROM {table} WHERE site = ?", (target.site,))
        else:
            self.store.conn.execute(
                f"DELETE FROM {table} WHERE site = ? AND {key} = ?", (target.site, target.name)
            )

    # -- settings ----------------------------------------------------------------------------

    def settings_of(self, target: Target) -> NodeSettings:
        return parse_settings(self._get(target)["settings"], str(target))

    def set_settings(self, target: Target, settings: NodeSettings) -> NodeSettings:
        """Replaces the target's own settings (validated for a device against its profile)."""
        with self._writing():
            row = self._get(target)
            if target.level == "device":
                self._check_device_settings(settings, self.library.get(row["profile"]))
            self._update(target, settings=dump_settings(settings))
        return settings

    def chain(self, target: Target) -> list[NodeSettings]:
        """The settings the target inherits, from its site down to itself."""
        return [settings for _, settings in self.lineage(target)]

    def lineage(self, target: Target) -> list[tuple[Target, NodeSettings]]:
        """The target's chain with the node each settings come from (levels that do not apply
        are skipped)."""
        site = target.site
        row = self._get(target)
        if target.level == "gateway":
            room = row["room"]
            nodes = [self._building_target(site, room, row["building"]), _room(site, room)]
        elif target.level == "device":
            gateway = self._get(Target("gateway", site, row["gateway"]))
            room = row["room"] or gateway["room"]
            nodes = [
                self._building_target(site, room, gateway["building"]),
                _room(site, room),
                Target("gateway", site, row["gateway"]),
            ]
        elif target.level == "room":
            nodes = [Target("building", site, row["building"])]
        else:
            nodes = []
        nodes = [Target("site", site, site), *nodes, target]
        found = [(node, self._find(node)) for node in nodes if node is not None]
        return [
            (node, parse_settings(found_row["settings"], str(node)))
            for node, found_row in found
            if found_row is not None
        ]

    def gateway_chain(self, site: str, gateway: str) -> list[NodeSettings]:
        """Site, building, room, gateway settings (levels the gateway is not in are skipped)."""
        return self.chain(Target("gateway", site, gateway))

    def device_chain(self, site: str, device: str) -> list[NodeSettings]:
        """Site, building, room (the device's, else its gateway's), gateway, device settings."""
        return self.chain(Target("device", site, device))

    def effective(self, target: Target) -> NodeSettings:
        return merge(self.chain(target))

    def _building_target(self, site: str, room: str | None, building: str | None) -> Target | None:
        """The building a room is in, else the one given (a gateway's own)."""
        if room is not None and (found := self._find(Target("room", site, room))) is not None:
            building = found["building"]
        return None if building is None else Target("building", site, building)

    # -- for the desired-config builder -------------------------------------------------------

    def devices_of_gateway(self, site: str, gateway: str) -> list[dict[str, Any]]:
        """Registry rows of the gateway's devices, connection and settings decoded to dicts."""
        self._get(Target("gateway", site, gateway))
        rows = self._rows(
            "SELECT * FROM registry_devices WHERE site = ? AND gateway = ? ORDER BY device",
            (site, gateway),
        )
        for row in rows:
            row["connection"] = json.loads(row["connection"])
            row["settings"] = json.loads(row["settings"] or "{}")
        return rows

    def gateways_matching(self, selector: str) -> list[tuple[str, str]]:
        """Gateways a selector names: all, site:S, building:S/B, room:S/R or gateway:S/G."""
        if selector.strip() == "all":
            return [(r["site"], r["gateway"]) for r in self._located_gateways()]
        target = parse_target(selector.strip())
        if target.level == "device":
            raise RegistryError(f"selector {selector!r} names a device, not gateways")
        self._get(target)
        return [
            (r["site"], r["gateway"]) for r in self._located_gateways() if _located_in(r, target)
        ]

    def _located_gateways(self) -> list[dict[str, Any]]:
        return self._rows(
            "SELECT g.site, g.gateway, g.room AS at_room, "
            "coalesce(r.building, g.building) AS at_building FROM registry_gateways g "
            "LEFT JOIN rooms r ON r.site = g.site AND r.room = g.room ORDER BY g.site, g.gateway"
        )

    def devices_matching(self, selector: str, kind: str | None = None) -> list[dict[str, Any]]:
        """Devices a selector names (as `gateways_matching`, plus device:S/D or a bare device
        id unique across sites), optionally of one kind: dicts of site, device, gateway, kind,
        profile."""
        if kind is not None and kind not in {k.value for k in DeviceKind}:
            raise RegistryError(f"unknown kind {kind!r} (kinds: {KINDS})")
        selector = selector.strip()
        target: Target | None = None
        if selector != "all":
            target = parse_target(selector) if ":" in selector else self._device_target(selector)
            self._get(target)
        return [
            {key: row[key] for key in ("site", "device", "gateway", "kind", "profile")}
            for row in self._located_devices()
            if (target is None or _located_in(row, target))
            and (kind is None or row["kind"] == kind)
        ]

    def _device_target(self, device: str) -> Target:
        sites = self._ids(
            "SELECT site FROM registry_devices WHERE device = ? ORDER BY site", (device,)
        )
        if not sites:
            raise NotFound(
                Target("device", "", _id("device", device)), "see 'campus-fleet device list'"
            )
        if len(sites) > 1:
            candidates = ", ".join(f"device:{site}/{device}" for site in sites)
            raise RegistryError(f"device {device!r} is in several sites: {candidates}")
        return Target("device", sites[0], device)

    def _located_devices(self) -> list[dict[str, Any]]:
        return self._rows(
            "SELECT d.site, d.device, d.gateway, d.kind, d.profile, "
            "coalesce(d.room, g.room) AS at_room, "
            "coalesce(r.building, g.building) AS at_building FROM registry_devices d "
            "LEFT JOIN registry_gateways g ON g.site = d.site AND g.gateway = d.gateway "
            "LEFT JOIN rooms r ON r.site = d.site AND r.room = coalesce(d.room, g.room) "
            "ORDER BY d.site, d.gateway, d.device"
        )

    def unassigned(self) -> list[dict[str, Any]]:
        """Devices gateways report that the registry does not have (same site and device id)."""
        rows = self._rows(
            "SELECT o.site, o.gateway, o.device, o.profile, o.kind, o.up, o.last_seen_ns "
            "FROM devices o WHERE NOT EXISTS (SELECT 1 FROM registry_devices d "
            "WHERE d.site = o.site AND d.device = o.device) ORDER BY o.site, o.gateway, o.device"
        )
        return [
            {
                "site": r["site"],
                "gateway": r["gateway"],
                "device": r["device"],
                "profile": r["profile"],
                "kind": r["kind"],
                "up": None if r["up"] is None else bool(r["up"]),
                "last_seen": iso(r["last_seen_ns"]),
            }
            for r in rows
        ]

    # -- upserts (the CSV import) -------------------------------------------------------------

    def put_site(self, site: str) -> Change:
        if self._find(Target("site", site, site)) is not None:
            return "unchanged"
        self.add_site(site)
        return "created"

    def put_building(self, site: str, building: str, name: str | None) -> Change:
        """Creates the building, or renames it when `name` is given and differs."""
        found = self._find(Target("building", site, building))
        if found is None:
            self.add_building(site, building, name)
            return "created"
        if name is None or _name(name) == found["name"]:
            return "unchanged"
        self._update(Target("building", site, building), name=_name(name))
        return "updated"

    def put_room(self, site: str, room: str, building: str, name: str | None) -> Change:
        """Creates the room, or moves it to `building` and renames it when they differ."""
        target = Target("room", site, room)
        found = self._find(target)
        if found is None:
            self.add_room(site, room, building, name)
            return "created"
        changed = False
        if building != found["building"]:
            self.move_room(site, room, building)
            changed = True
        if name is not None and _name(name) != found["name"]:
            self._update(target, name=_name(name))
            changed = True
        return "updated" if changed else "unchanged"

    def put_gateway(
        self, site: str, gateway: str, building: str | None, room: str | None
    ) -> Change:
        """Creates the gateway at that place; an existing gateway is never moved by this."""
        if self._find(Target("gateway", site, gateway)) is not None:
            return "unchanged"
        self.add_gateway(site, gateway, building, room)
        return "created"

    def put_device(
        self,
        site: str,
        device: str,
        gateway: str,
        room: str | None,
        spec: DeviceSpec,
        settings: Mapping[str, Any],
    ) -> Change:
        """Creates or updates the device. `settings` are merged into its own (None removes)."""
        target = Target("device", site, device)
        found = self._find(target)
        own = json.loads(found["settings"] or "{}") if found else {}
        own.update(settings)
        try:
            merged = validate_settings({k: v for k, v in own.items() if v is not None}, str(target))
        except SettingsError as exc:
            raise RegistryError(str(exc)) from None
        if found is None:
            self.add_device(
                site, device, gateway, spec.profile.id, spec.connection, spec.kind, room, merged
            )
            return "created"
        self._check_device_settings(merged, spec.profile)
        values = {
            "gateway": gateway,
            "room": room,
            "kind": spec.kind.value,
            "profile": spec.profile.id,
            "connection": spec.connection_json(),
            "settings": dump_settings(merged),
        }
        if all(found[column] == value for column, value in values.items()):
            return "unchanged"
        self._get(Target("gateway", site, gateway))
        if room is not None:
            self._get(Target("room", site, room))
        self._check_bus(site, gateway, device, spec.connection)
        self._update(target, **values)
        return "updated"


def _room(site: str, room: str | None) -> Target | None:
    return None if room is None else Target("room", site, room)


_LOCATION_COLUMN = {
    "building": "at_building",
    "room": "at_room",
    "gateway": "gateway",
    "device": "device",
}


def _located_in(row: dict[str, Any], target: Target) -> bool:
    """Whether a located gateway or device row is at or under the target."""
    if row["site"] != target.site:
        return False
    column = _LOCATION_COLUMN.get(target.level)
    return column is None or row[column] == target.name


def _public(row: dict[str, Any]) -> dict[str, Any]:
    """A registry row as the CLI prints it: JSON decoded, times in ISO 8601."""
    out = dict(row)
    if "settings" in out:
        out["settings"] = json.loads(out["settings"] or "{}")
    if "connection" in out:
        out["connection"] = json.loads(out["connection"] or "{}")
    for column in ("created_ns", "enrolled_ns", "last_seen_ns"):
        if column in out:
            out[column.removesuffix("_ns")] = iso(out.pop(column))
    if "status" in out:
        out["status"] = out["status"] or "never seen"
    return out
