"""campus-fleet commands: the registry (sites, buildings, rooms, gateways, devices and their
settings), the inventory import, gateway enrolment, the fleet's signing key and the audit log.

Rules: every command that changes something runs inside `audit.audited()`, so a refused change is
logged too; registry errors become exit codes here and only here (2 refused input, 3 unknown
target, 1 runtime failure).
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

import click
import yaml
from rich.markup import escape
from rich.table import Table

from fleet import audit
from fleet.clikit import (
    EXIT_NOT_FOUND,
    EXIT_RUNTIME,
    EXIT_USAGE,
    Context,
    config_option,
    console,
    emit_json,
    fail,
    json_option,
    pass_context,
    since_option,
)
from fleet.config import FleetConfig
from fleet.csv_import import (
    URL_HELP,
    InventoryError,
    connection_url,
    import_file,
    mask_connection,
    mask_url,
    parse_connection_url,
)
from fleet.registry import Change, NotFound, Registry, RegistryError, Target, parse_target
from fleet.settings import NodeSettings, SettingsError, dump_settings
from wire.documents import read_yaml, validate_document
from wire.errors import DocumentError
from wire.signing import KeyFileError, generate_key, key_id, load_public_key, public_path

# Where the bootstrap bundle installs the fleet's public key: beside agent.yaml, in the agent
# unit's ConfigurationDirectory (/etc/campus-iot).
AGENT_CONFIG = Path("/etc/campus-iot/agent.yaml")
AGENT_PUBLIC_KEY = Path("/etc/campus-iot/fleet-signing.pub")
LOOPBACK = frozenset({"localhost", "127.0.0.1", "::1"})


def register(main: click.Group, gateways: click.Group, devices: click.Group) -> None:
    """Adds this module's commands to the CLI."""
    for group in (site, building, room, gateway, device, settings, keys):
        main.add_command(group)
    main.add_command(import_inventory)
    main.add_command(audit_log)
    gateways.add_command(enroll)
    gateway.add_command(enroll)
    devices.add_command(unassigned)


# -- plumbing ----------------------------------------------------------------------------------


@contextmanager
def _refusals() -> Iterator[None]:
    """Registry errors as exit codes: 3 unknown target, 2 refused input, 1 runtime."""
    try:
        yield
    except NotFound as exc:
        fail(str(exc), EXIT_NOT_FOUND)
    except (RegistryError, SettingsError, DocumentError) as exc:
        fail(str(exc), EXIT_USAGE)
    except (KeyFileError, sqlite3.Error, OSError) as exc:
        fail(str(exc), EXIT_RUNTIME)


def _profiles_dir(ctx: Context) -> Path | None:
    """The config's profiles_dir; with --db and no config file, the default profiles."""
    if ctx.db_path is not None and not ctx.config_path.exists():
        return None
    return ctx.config.profiles_dir


def _reader(ctx: Context) -> Registry:
    path = ctx.db_path or ctx.config.database
    if not path.exists():
        fail(
            f"no fleet database at {path} yet: add a site ('campus-fleet site add SITE') or "
            "import an inventory ('campus-fleet import FILE.csv')",
            EXIT_RUNTIME,
        )
    return Registry(ctx.store(), profiles_dir=_profiles_dir(ctx))


@contextmanager
def _change(
    ctx: Context, action: str, target: str, details: dict[str, Any] | None = None
) -> Iterator[tuple[Registry, dict[str, Any]]]:
    """A registry change: writable store, audited, errors turned into exit codes."""
    store = ctx.writable_store()
    with _refusals(), audit.audited(store, ctx.actor, action, target, details) as entry:
        yield Registry(store, profiles_dir=_profiles_dir(ctx)), entry


def _site_of(ctx: Context, given: str | None) -> str:
    """--site, else the only site of the registry."""
    if given is not None:
        return given
    path = ctx.db_path or ctx.config.database
    if not path.exists():
        fail("give --site (the registry has no site yet)", EXIT_USAGE)
    with _refusals():
        return Registry(ctx.store()).default_site()


site_option = click.option(
    "--site",
    "site_id",
    envvar="CAMPUS_FLEET_SITE",
    help="Site id (default: the registry's only site). Env: CAMPUS_FLEET_SITE.",
)
cascade_option = click.option(
    "--cascade", is_flag=True, help="Also remove everything that belongs to it."
)


def _cell(value: Any) -> str:
    if value is None or value in ({}, []):
        return "-"
    if isinstance(value, dict):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return ", ".join(map(str, value))
    return str(value)


def _print_entity(title: str, entity: dict[str, Any]) -> None:
    table = Table(title=escape(title), show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    children = entity.get("children", {})
    for key, value in entity.items():
        if key == "children":
            for kind, names in value.items():
                table.add_row(kind, escape(", ".join(names)))
        elif key == "observed":
            table.add_row("reported by", escape(_observed(value)))
        elif key not in children:  # a count the children list replaces
            table.add_row(key, escape(_cell(value)))
    console.print(table)


def _observed(reports: list[dict[str, Any]]) -> str:
    seen = [
        f"{o['gateway']} ({_updown(o['up'])}, {o['last_seen'] or 'no reading'})" for o in reports
    ]
    return ", ".join(seen) or "no gateway yet"


def _updown(up: bool | None) -> str:
    return "unknown" if up is None else "up" if up else "down"


def _print_rows(
    title: str, rows: list[dict[str, Any]], columns: dict[str, Callable[[dict[str, Any]], Any]]
) -> None:
    table = Table(title=escape(f"{title} ({len(rows)})"))
    for header in columns:
        table.add_column(header, overflow="fold")
    for row in rows:
        table.add_row(*(escape(_cell(cell(row))) for cell in columns.values()))
    console.print(table)


def _column(name: str) -> Callable[[dict[str, Any]], Any]:
    return lambda row: row.get(name)


def _done(as_json: bool, data: Any, message: str) -> None:
    if as_json:
        emit_json(data)
    else:
        click.echo(message)


def _removed(removed: dict[str, list[str]]) -> str:
    parts = [f"{kind} {', '.join(names)}" for kind, names in removed.items()]
    return "removed " + "; ".join(parts)


# -- site --------------------------------------------------------------------------------------


@click.group()
def site() -> None:
    """Sites of the registry: a school (or a campus of one) and everything in it.

    \b
    Examples:
      campus-fleet site add lycee-jean-moulin --name "Lycée Jean Moulin"
      campus-fleet site list
      campus-fleet site show lycee-jean-moulin --json
      campus-fleet site remove lycee-jean-moulin --cascade
    """


@site.command("add")
@click.argument("site_id", metavar="SITE")
@click.option("--name", help="The site's name as people know it.")
@config_option
@json_option
@pass_context
def site_add(ctx: Context, site_id: str, name: str | None, as_json: bool) -> None:
    """Add SITE (lowercase a-z, 0-9 and '-': it becomes part of MQTT topics)."""
    with _change(ctx, "site.add", f"site:{site_id}", {"name": name}) as (registry, _):
        added = registry.add_site(site_id, name)
    _done(as_json, added, f"added site:{site_id}")


@site.command("list")
@config_option
@json_option
@pass_context
def site_list(ctx: Context, as_json: bool) -> None:
    """Every site with how many buildings, rooms, gateways and devices it has."""
    with _refusals():
        rows = _reader(ctx).sites()
    if as_json:
        emit_json(rows)
        return
    columns = ("site", "name", "buildings", "rooms", "gateways", "devices")
    _print_rows("Sites", rows, {c: _column(c) for c in columns})


@site.command("show")
@click.argument("site_id", metavar="SITE")
@config_option
@json_option
@pass_context
def site_show(ctx: Context, site_id: str, as_json: bool) -> None:
    """SITE, its settings, and what it holds."""
    with _refusals():
        shown = _reader(ctx).site(site_id)
    emit_json(shown) if as_json else _print_entity(f"site:{site_id}", shown)


@site.command("remove")
@click.argument("site_id", metavar="SITE")
@cascade_option
@config_option
@json_option
@pass_context
def site_remove(ctx: Context, site_id: str, cascade: bool, as_json: bool) -> None:
    """Remove SITE; refused while it holds anything, unless --cascade."""
    target = Target("site", site_id, site_id)
    with _change(ctx, "site.remove", str(target), {"cascade": cascade}) as (registry, entry):
        entry["removed"] = removed = registry.remove(target, cascade)
    _done(as_json, {"removed": removed}, _removed(removed))


# -- building ----------------------------------------------------------------------------------


@click.group()
def building() -> None:
    """Buildings of a site; rooms belong to a building.

    \b
    Examples:
      campus-fleet building add bat-a --site lycee-jean-moulin --name "Bâtiment A"
      campus-fleet building list --site lycee-jean-moulin
      campus-fleet building show bat-a
      campus-fleet building remove bat-a --cascade
    """


@building.command("add")
@click.argument("building_id", metavar="BUILDING")
@site_option
@click.option("--name", help="The building's name as people know it.")
@config_option
@json_option
@pass_context
def building_add(
    ctx: Context, building_id: str, site_id: str | None, name: str | None, as_json: bool
) -> None:
    """Add BUILDING to a site."""
    site_id = _site_of(ctx, site_id)
    target = f"building:{site_id}/{building_id}"
    with _change(ctx, "building.add", target, {"name": name}) as (registry, _):
        added = registry.add_building(site_id, building_id, name)
    _done(as_json, added, f"added {target}")


@building.command("list")
@click.option("--site", "site_id", help="Only this site's buildings.")
@config_option
@json_option
@pass_context
def building_list(ctx: Context, site_id: str | None, as_json: bool) -> None:
    """Buildings with their number of rooms and gateways."""
    with _refusals():
        rows = _reader(ctx).buildings(site_id)
    if as_json:
        emit_json(rows)
        return
    columns = ("site", "building", "name", "rooms", "gateways")
    _print_rows("Buildings", rows, {c: _column(c) for c in columns})


@building.command("show")
@click.argument("building_id", metavar="BUILDING")
@site_option
@config_option
@json_option
@pass_context
def building_show(ctx: Context, building_id: str, site_id: str | None, as_json: bool) -> None:
    """BUILDING, its settings, rooms, gateways and devices."""
    site_id = _site_of(ctx, site_id)
    with _refusals():
        shown = _reader(ctx).building(site_id, building_id)
    emit_json(shown) if as_json else _print_entity(f"building:{site_id}/{building_id}", shown)


@building.command("remove")
@click.argument("building_id", metavar="BUILDING")
@site_option
@cascade_option
@config_option
@json_option
@pass_context
def building_remove(
    ctx: Context, building_id: str, site_id: str | None, cascade: bool, as_json: bool
) -> None:
    """Remove BUILDING; refused while rooms or gateways are in it, unless --cascade."""
    target = Target("building", _site_of(ctx, site_id), building_id)
    with _change(ctx, "building.remove", str(target), {"cascade": cascade}) as (registry, entry):
        entry["removed"] = removed = registry.remove(target, cascade)
    _done(as_json, {"removed": removed}, _removed(removed))


# -- room --------------------------------------------------------------------------------------


@click.group()
def room() -> None:
    """Rooms: each in a building of its site; room ids are unique in the site.

    \b
    Examples:
      campus-fleet room add r-101 --building bat-a --name "Salle 101"
      campus-fleet room list --building bat-a
      campus-fleet room move r-101 --building bat-b
      campus-fleet room remove r-101
    """


@room.command("add")
@click.argument("room_id", metavar="ROOM")
@site_option
@click.option("--building", "building_id", required=True, help="The building it is in.")
@click.option("--name", help="The room's name as people know it.")
@config_option
@json_option
@pass_context
def room_add(
    ctx: Context,
    room_id: str,
    site_id: str | None,
    building_id: str,
    name: str | None,
    as_json: bool,
) -> None:
    """Add ROOM to a building."""
    site_id = _site_of(ctx, site_id)
    target = f"room:{site_id}/{room_id}"
    details = {"building": building_id, "name": name}
    with _change(ctx, "room.add", target, details) as (registry, _):
        added = registry.add_room(site_id, room_id, building_id, name)
    _done(as_json, added, f"added {target} in building {building_id}")


@room.command("list")
@click.option("--site", "site_id", help="Only this site's rooms.")
@click.option("--building", "building_id", help="Only this building's rooms.")
@config_option
@json_option
@pass_context
def room_list(ctx: Context, site_id: str | None, building_id: str | None, as_json: bool) -> None:
    """Rooms with their building and the gateways and devices in them."""
    with _refusals():
        rows = _reader(ctx).rooms(site_id, building_id)
    if as_json:
        emit_json(rows)
        return
    columns = ("site", "room", "building", "name", "gateways", "devices")
    _print_rows("Rooms", rows, {c: _column(c) for c in columns})


@room.command("show")
@click.argument("room_id", metavar="ROOM")
@site_option
@config_option
@json_option
@pass_context
def room_show(ctx: Context, room_id: str, site_id: str | None, as_json: bool) -> None:
    """ROOM, its building, settings, gateways and devices."""
    site_id = _site_of(ctx, site_id)
    with _refusals():
        shown = _reader(ctx).room(site_id, room_id)
    emit_json(shown) if as_json else _print_entity(f"room:{site_id}/{room_id}", shown)


@room.command("move")
@click.argument("room_id", metavar="ROOM")
@site_option
@click.option("--building", "building_id", required=True, help="The building it moves to.")
@config_option
@json_option
@pass_context
def room_move(
    ctx: Context, room_id: str, site_id: str | None, building_id: str, as_json: bool
) -> None:
    """Move ROOM (and the gateways in it) to another building of its site."""
    site_id = _site_of(ctx, site_id)
    target = f"room:{site_id}/{room_id}"
    with _change(ctx, "room.move", target, {"building": building_id}) as (registry, _):
        moved = registry.move_room(site_id, room_id, building_id)
    _done(as_json, moved, f"moved {target} to building {building_id}")


@room.command("remove")
@click.argument("room_id", metavar="ROOM")
@site_option
@cascade_option
@config_option
@json_option
@pass_context
def room_remove(
    ctx: Context, room_id: str, site_id: str | None, cascade: bool, as_json: bool
) -> None:
    """Remove ROOM; refused while gateways or devices are in it, unless --cascade."""
    target = Target("room", _site_of(ctx, site_id), room_id)
    with _change(ctx, "room.remove", str(target), {"cascade": cascade}) as (registry, entry):
        entry["removed"] = removed = registry.remove(target, cascade)
    _done(as_json, {"removed": removed}, _removed(removed))


# -- gateway -----------------------------------------------------------------------------------


@click.group()
def gateway() -> None:
    """Gateways of the registry (what `gateways list` shows is what reported).

    A gateway is in a site, and optionally in a building or a room (then in that room's
    building). Enrol it to get its bootstrap bundle.

    \b
    Examples:
      campus-fleet gateway add gw-bat-a --building bat-a --room r-tech-a
      campus-fleet gateway list
      campus-fleet gateway move gw-bat-a --room r-102
      campus-fleet gateway enroll gw-bat-a --out ./bundle
      campus-fleet gateway remove gw-bat-a --cascade
    """


@gateway.command("add")
@click.argument("gateway_id", metavar="GATEWAY")
@site_option
@click.option("--building", "building_id", help="The building it is in.")
@click.option("--room", "room_id", help="The room it is in (sets its building).")
@config_option
@json_option
@pass_context
def gateway_add(
    ctx: Context,
    gateway_id: str,
    site_id: str | None,
    building_id: str | None,
    room_id: str | None,
    as_json: bool,
) -> None:
    """Add GATEWAY (its id is the agent config's `gateway`)."""
    site_id = _site_of(ctx, site_id)
    target = f"gateway:{site_id}/{gateway_id}"
    details = {"building": building_id, "room": room_id}
    with _change(ctx, "gateway.add", target, details) as (registry, _):
        added = registry.add_gateway(site_id, gateway_id, building_id, room_id)
    _done(as_json, added, f"added {target}")


@gateway.command("list")
@click.option("--site", "site_id", help="Only this site's gateways.")
@config_option
@json_option
@pass_context
def gateway_list(ctx: Context, site_id: str | None, as_json: bool) -> None:
    """Registered gateways: place, devices, enrolment, and status as last reported."""
    with _refusals():
        rows = _reader(ctx).gateways(site_id)
    if as_json:
        emit_json(rows)
        return
    columns = ("site", "gateway", "building", "room", "devices", "enrolled", "status")
    _print_rows("Registered gateways", rows, {c: _column(c) for c in columns})


@gateway.command("show")
@click.argument("gateway_id", metavar="GATEWAY")
@site_option
@config_option
@json_option
@pass_context
def gateway_show(ctx: Context, gateway_id: str, site_id: str | None, as_json: bool) -> None:
    """GATEWAY, its place, settings and devices."""
    site_id = _site_of(ctx, site_id)
    with _refusals():
        shown = _reader(ctx).gateway(site_id, gateway_id)
    emit_json(shown) if as_json else _print_entity(f"gateway:{site_id}/{gateway_id}", shown)


@gateway.command("move")
@click.argument("gateway_id", metavar="GATEWAY")
@site_option
@click.option("--building", "building_id", help="The building it moves to (no room).")
@click.option("--room", "room_id", help="The room it moves to (and that room's building).")
@config_option
@json_option
@pass_context
def gateway_move(
    ctx: Context,
    gateway_id: str,
    site_id: str | None,
    building_id: str | None,
    room_id: str | None,
    as_json: bool,
) -> None:
    """Move GATEWAY to another building or room of its site."""
    site_id = _site_of(ctx, site_id)
    target = f"gateway:{site_id}/{gateway_id}"
    details = {"building": building_id, "room": room_id}
    with _change(ctx, "gateway.move", target, details) as (registry, _):
        moved = registry.move_gateway(site_id, gateway_id, building_id, room_id)
    place = f"room {moved['room']}" if moved["room"] else f"building {moved['building']}"
    _done(as_json, moved, f"moved {target} to {place}")


@gateway.command("remove")
@click.argument("gateway_id", metavar="GATEWAY")
@site_option
@cascade_option
@config_option
@json_option
@pass_context
def gateway_remove(
    ctx: Context, gateway_id: str, site_id: str | None, cascade: bool, as_json: bool
) -> None:
    """Remove GATEWAY; refused while devices are on it, unless --cascade."""
    target = Target("gateway", _site_of(ctx, site_id), gateway_id)
    with _change(ctx, "gateway.remove", str(target), {"cascade": cascade}) as (registry, entry):
        entry["removed"] = removed = registry.remove(target, cascade)
    _done(as_json, {"removed": removed}, _removed(removed))


# -- device ------------------------------------------------------------------------------------


@click.group()
def device() -> None:
    """Devices of the registry: on a gateway, of a firmware profile, reached by a connection.

    Connections are URLs, as in the inventory spreadsheet; 'campus-fleet device add --help'
    teaches every form. Passwords and keys show as *** in tables and --json unless
    --show-secrets is given.

    \b
      modbus-rtu:///dev/ttyUSB0?unit=3&baudrate=9600   modbus-tcp://[fd00::5]:502?unit=1
      pjlink://:PASSWORD@[fd00:10::21]                 mqtt:///eclass/board-101
      onvif://USER:PASSWORD@[fd00::30]?rtsp=rtsp://[fd00::30]:554/stream1
      ble://A4:C1:38:12:34:56?bind_key=…

    \b
    Examples:
      campus-fleet device add r101-co2 --gateway gw-bat-a --profile senseair-s8 \\
          --connection 'modbus-rtu:///dev/ttyUSB0?unit=2' --room r-101 --interval 30
      campus-fleet device list --gateway gw-bat-a
      campus-fleet device show r101-proj --show-secrets
      campus-fleet device move r101-co2 --room r-102
      campus-fleet device remove r101-co2
    """


@device.command(
    "add",
    help=f"""Add DEVICE on a gateway, reached by the connection URL --connection.

The URL's scheme must be the protocol of the profile (modbus-tcp:// or modbus-rtu:// for a
Modbus profile, pjlink://, mqtt:// or mqtts://, onvif://, ble://):

{URL_HELP}
\b
Examples:
  campus-fleet device add r101-co2 --gateway gw-bat-a --profile senseair-s8 \\
      --connection 'modbus-rtu:///dev/ttyUSB0?unit=2' --room r-101 --interval 30
  campus-fleet device add r101-proj --gateway gw-bat-a --profile generic-pjlink-projector \\
      --connection 'pjlink://:s3cret@[fd00:10::21]' --room r-101
  campus-fleet device add r101-board --gateway gw-bat-a \\
      --profile generic-android-eclass-board --connection 'mqtt:///eclass/board-101'
  campus-fleet device add hall-cam --gateway gw-bat-a --profile generic-onvif-camera \\
      --connection 'onvif://admin:s3cret@[fd00::30]?rtsp=rtsp://[fd00::30]:554/stream1'
  campus-fleet device add r101-th --gateway gw-bat-a --profile bthome-lywsd03mmc \\
      --connection 'ble://A4:C1:38:12:34:56?bind_key=231d39c1d7cc1ab1aee224cd096db932'
""",
)
@click.argument("device_id", metavar="DEVICE")
@site_option
@click.option("--gateway", "gateway_id", required=True, help="The gateway that reaches it.")
@click.option("--profile", required=True, help="Firmware profile id (see firmware-profiles/).")
@click.option("--connection", "url", required=True, help="Connection URL (see above).")
@click.option("--kind", help="display, board, sensor, camera or meter (default: the profile's).")
@click.option("--room", "room_id", help="The room it is in (default: its gateway's).")
@click.option("--interval", type=float, help="Poll interval in seconds (default: inherited).")
@click.option("--timeout", type=float, help="Answer timeout in seconds (default: inherited).")
@config_option
@json_option
@pass_context
def device_add(
    ctx: Context,
    device_id: str,
    site_id: str | None,
    gateway_id: str,
    profile: str,
    url: str,
    kind: str | None,
    room_id: str | None,
    interval: float | None,
    timeout: float | None,
    as_json: bool,
) -> None:
    site_id = _site_of(ctx, site_id)
    target = f"device:{site_id}/{device_id}"
    details = {
        "gateway": gateway_id,
        "profile": profile,
        "connection": mask_url(url),
        "room": room_id,
    }
    with _change(ctx, "device.add", target, details) as (registry, _):
        connection = _connection(url)
        own = _device_settings(interval, timeout)
        added = registry.add_device(
            site_id, device_id, gateway_id, profile, connection, kind, room_id, own
        )
    _done(as_json, _shown(added, False), f"added {target} on gateway {gateway_id}")


def _connection(url: str) -> dict[str, Any]:
    try:
        return parse_connection_url(url)
    except ValueError as exc:
        raise RegistryError(f"--connection: {exc}") from None


def _device_settings(interval: float | None, timeout: float | None) -> NodeSettings:
    given = {"interval_s": interval, "timeout_s": timeout}
    try:
        return NodeSettings.model_validate({k: v for k, v in given.items() if v is not None})
    except ValueError as exc:
        raise RegistryError(f"--interval/--timeout: {exc}") from None


def _shown(row: dict[str, Any], show_secrets: bool) -> dict[str, Any]:
    """A device row as printed: with its connection URL, secrets masked unless asked for."""
    connection = row["connection"] if show_secrets else mask_connection(row["connection"])
    url = connection_url(row["connection"], mask=not show_secrets)
    return {**row, "connection": connection, "connection_url": url}


show_secrets_option = click.option(
    "--show-secrets",
    is_flag=True,
    help="Show passwords and keys of connections instead of ***.",
)


@device.command("list")
@click.option("--site", "site_id", help="Only this site's devices.")
@click.option("--gateway", "gateway_id", help="Only this gateway's devices.")
@show_secrets_option
@config_option
@json_option
@pass_context
def device_list(
    ctx: Context, site_id: str | None, gateway_id: str | None, show_secrets: bool, as_json: bool
) -> None:
    """Registered devices (what `devices list` shows is what gateways reported)."""
    with _refusals():
        rows = [_shown(row, show_secrets) for row in _reader(ctx).devices(site_id, gateway_id)]
    if as_json:
        emit_json(rows)
        return
    columns: dict[str, Callable[[dict[str, Any]], Any]] = {
        c: _column(c) for c in ("site", "device", "gateway", "room", "kind", "profile")
    }
    columns["connection"] = _column("connection_url")
    columns["interval"] = lambda row: row["settings"].get("interval_s")
    _print_rows("Registered devices", rows, columns)


@device.command("show")
@click.argument("device_id", metavar="DEVICE")
@site_option
@show_secrets_option
@config_option
@json_option
@pass_context
def device_show(
    ctx: Context, device_id: str, site_id: str | None, show_secrets: bool, as_json: bool
) -> None:
    """DEVICE, its connection, settings, and which gateway reports it."""
    site_id = _site_of(ctx, site_id)
    with _refusals():
        shown = _shown(_reader(ctx).device(site_id, device_id), show_secrets)
    emit_json(shown) if as_json else _print_entity(f"device:{site_id}/{device_id}", shown)


@device.command("move")
@click.argument("device_id", metavar="DEVICE")
@site_option
@click.option("--gateway", "gateway_id", help="The gateway that polls it from now on.")
@click.option("--room", "room_id", help="The room it is in from now on.")
@click.option("--no-room", is_flag=True, help="No room of its own: it is in its gateway's.")
@config_option
@json_option
@pass_context
def device_move(
    ctx: Context,
    device_id: str,
    site_id: str | None,
    gateway_id: str | None,
    room_id: str | None,
    no_room: bool,
    as_json: bool,
) -> None:
    """Move DEVICE onto another gateway and/or into another room."""
    site_id = _site_of(ctx, site_id)
    target = f"device:{site_id}/{device_id}"
    details = {"gateway": gateway_id, "room": room_id, "no_room": no_room}
    with _change(ctx, "device.move", target, details) as (registry, _):
        moved = registry.move_device(site_id, device_id, gateway_id, room_id, clear_room=no_room)
    message = f"moved {target}: gateway {moved['gateway']}, room {moved['room']}"
    _done(as_json, _shown(moved, False), message)


@device.command("remove")
@click.argument("device_id", metavar="DEVICE")
@site_option
@config_option
@json_option
@pass_context
def device_remove(ctx: Context, device_id: str, site_id: str | None, as_json: bool) -> None:
    """Remove DEVICE from the registry (its gateway stops polling it at the next push)."""
    target = Target("device", _site_of(ctx, site_id), device_id)
    with _change(ctx, "device.remove", str(target)) as (registry, entry):
        entry["removed"] = removed = registry.remove(target)
    _done(as_json, {"removed": removed}, _removed(removed))


@click.command("unassigned")
@config_option
@json_option
@pass_context
def unassigned(ctx: Context, as_json: bool) -> None:
    """Devices gateways report that the registry does not have.

    Register them with 'campus-fleet device add' or an inventory import, or remove them from
    the gateway's local config.
    """
    with _refusals():
        rows = _reader(ctx).unassigned()
    if as_json:
        emit_json(rows)
        return
    columns = {c: _column(c) for c in ("site", "gateway", "device", "profile", "kind")}
    columns["availability"] = lambda row: _updown(row["up"])
    columns["last reading"] = _column("last_seen")
    _print_rows("Reported but not registered", rows, columns)


# -- settings ----------------------------------------------------------------------------------


@click.group()
def settings() -> None:
    """Settings inherited down the tree: site → building → room → gateway → device.

    A value set lower overrides the one above; alarms merge per point and schedules per id.
    TARGET is site:S, building:S/B, room:S/R, gateway:S/G or device:S/D. A device takes only
    interval_s, timeout_s and alarms (for points of its profile).

    \b
    Example settings file (bat-a.yaml):
      interval_s: 30
      timezone: Europe/Paris
      alarms:
        co2: {high: 1500, hysteresis: 100}
      schedules:
        - {id: displays-off, at: "22:00", days: [mon, tue, wed, thu, fri],
           kinds: [display], action: power_off}

    \b
    Examples:
      campus-fleet settings set building:lycee-jean-moulin/bat-a bat-a.yaml
      campus-fleet settings show device:lycee-jean-moulin/r101-co2 --effective
    """


@settings.command("set")
@click.argument("target_text", metavar="TARGET")
@click.argument("file", type=click.Path(path_type=Path, dir_okay=False, exists=True))
@config_option
@json_option
@pass_context
def settings_set(ctx: Context, target_text: str, file: Path, as_json: bool) -> None:
    """Replace TARGET's own settings with those of FILE (YAML; an empty file clears them)."""
    with _refusals():
        target = parse_target(target_text)
    with _change(ctx, "settings.set", str(target), {"file": str(file)}) as (registry, entry):
        data, root = read_yaml(file)
        new = validate_document(NodeSettings, data, str(file), root)
        registry.set_settings(target, new)
        entry["settings"] = shown = json.loads(dump_settings(new))
    _done(as_json, {"target": str(target), "settings": shown}, f"set the settings of {target}")


@settings.command("show")
@click.argument("target_text", metavar="TARGET")
@click.option("--effective", is_flag=True, help="Merged with what TARGET inherits.")
@config_option
@json_option
@pass_context
def settings_show(ctx: Context, target_text: str, effective: bool, as_json: bool) -> None:
    """TARGET's own settings, or with --effective those it runs with and where they come from."""
    with _refusals():
        target = parse_target(target_text)
        registry = _reader(ctx)
        own = registry.settings_of(target)
        lineage = registry.lineage(target) if effective else []
        shown = registry.effective(target) if effective else own
    data: dict[str, Any] = {
        "target": str(target),
        "effective": effective,
        "settings": json.loads(dump_settings(shown)),
    }
    if effective:
        data["chain"] = [
            {"target": str(node), "settings": json.loads(dump_settings(values))}
            for node, values in lineage
        ]
    if as_json:
        emit_json(data)
        return
    click.echo(yaml.safe_dump(data["settings"], sort_keys=False, allow_unicode=True), nl=False)
    if effective:
        click.echo("# from: " + " → ".join(entry["target"] for entry in data["chain"]))


# -- import ------------------------------------------------------------------------------------


@click.command(
    "import",
    help=f"""Import the inventory spreadsheet FILE (CSV): one row per device.

\b
Columns (header names in any case; ',' or ';' between cells; UTF-8, BOM or not):
  site, gateway, device, profile, connection   required
  building, room, kind, interval_s             optional
  building_name, room_name                     optional

The connection cell is a URL whose scheme is the protocol of the row's profile:

{URL_HELP}
Missing sites, buildings, rooms and gateways are created (a new gateway goes in the
building and room its devices share); listed devices are created or updated. The whole
file is checked first: with any problem, every bad line is listed and nothing is imported
(exit 2). Importing the same file again changes nothing. Devices of one gateway cannot
share a Modbus unit id on one port, a PJLink or ONVIF host and port, an MQTT base topic of
one broker, or a BLE address.

\b
Example rows:
  site,room,gateway,device,profile,connection
  lycee-a,r-101,gw-a,r101-proj,generic-pjlink-projector,pjlink://:s3cret@[fd00:10::21]
  lycee-a,r-101,gw-a,r101-board,generic-android-eclass-board,mqtt:///eclass/board-101

\b
Examples:
  campus-fleet import inventory.csv --dry-run
  campus-fleet import inventory.csv --json
""",
)
@click.argument("file", type=click.Path(path_type=Path, dir_okay=False, exists=True))
@click.option(
    "--dry-run", is_flag=True, help="Check the file and count the changes; write nothing."
)
@config_option
@json_option
@pass_context
def import_inventory(ctx: Context, file: Path, dry_run: bool, as_json: bool) -> None:
    store = ctx.writable_store()
    registry = Registry(store, profiles_dir=_profiles_dir(ctx))
    try:
        with _refusals():
            if dry_run:
                result = import_file(registry, file, dry_run=True)
            else:
                details = {"file": str(file)}
                target = f"file:{file.name}"
                with audit.audited(store, ctx.actor, "registry.import", target, details) as entry:
                    result = import_file(registry, file)
                    entry.update(rows=result.rows, counts=result.counts, changed=result.changed)
    except InventoryError as exc:
        _report_problems(exc, dry_run, as_json)
    if as_json:
        emit_json(result.as_json())
        return
    _print_counts(result.counts)
    if dry_run:
        click.echo(f"dry run: {file} is valid ({result.rows} devices); nothing was written")
    elif result.changed:
        click.echo(f"imported {result.rows} devices from {file}")
    else:
        click.echo(f"nothing changed: the registry already matches {file}")


def _report_problems(error: InventoryError, dry_run: bool, as_json: bool) -> NoReturn:
    if as_json:
        emit_json(
            {
                "file": str(error.path),
                "dry_run": dry_run,
                "imported": False,
                "problems": [
                    {"line": p.line, "column": p.column or None, "message": p.message}
                    for p in error.problems
                ],
            }
        )
    else:
        for problem in error.problems:
            click.echo(problem.located(error.path), err=True)
    count = len(error.problems)
    fail(f"{error.path}: {count} problem{'s' if count != 1 else ''}, nothing imported", EXIT_USAGE)


def _print_counts(counts: Mapping[str, Mapping[Change, int]]) -> None:
    table = Table(title="Import")
    for column in ("", "created", "updated", "unchanged"):
        table.add_column(column, justify="right" if column else "left")
    for level, count in counts.items():
        table.add_row(level, *(str(count[c]) for c in ("created", "updated", "unchanged")))
    console.print(table)


# -- enrolment and keys ------------------------------------------------------------------------


@click.command("enroll")
@click.argument("gateway_id", metavar="GATEWAY")
@site_option
@click.option("--building", "building_id", help="The building it goes in (when it is new).")
@click.option("--room", "room_id", help="The room it goes in (when it is new).")
@click.option(
    "--out",
    type=click.Path(path_type=Path, file_okay=False),
    help="Write agent.yaml and fleet-signing.pub into this folder instead of printing them.",
)
@click.option("--force", is_flag=True, help="Replace files already in --out.")
@config_option
@json_option
@pass_context
def enroll(
    ctx: Context,
    gateway_id: str,
    site_id: str | None,
    building_id: str | None,
    room_id: str | None,
    out: Path | None,
    force: bool,
    as_json: bool,
) -> None:
    """Register GATEWAY (if new) and print its bootstrap bundle.

    The bundle is an agent.yaml (site, gateway, the broker as gateways reach it: agent_broker
    in fleet.yaml, else its mqtt section) that trusts the fleet's public key, and that key.
    On the gateway: agent.yaml goes to /etc/campus-iot/agent.yaml and fleet-signing.pub to
    /etc/campus-iot/fleet-signing.pub; the fleet then pushes its devices in a signed config.
    Needs the fleet's signing key: 'campus-fleet keys generate'.

    \b
    Examples:
      campus-fleet gateways enroll gw-bat-a --site lycee-jean-moulin --room r-tech-a
      campus-fleet gateway enroll gw-bat-a --out ./gw-bat-a && scp ./gw-bat-a/* pi@gw-bat-a:
    """
    site_id = _site_of(ctx, site_id)
    config = ctx.config
    target = f"gateway:{site_id}/{gateway_id}"
    details = {"building": building_id, "room": room_id, "out": out}
    with _change(ctx, "gateway.enroll", target, details) as (registry, entry):
        pem = _public_pem(config)
        entry["key_id"] = kid = key_id(load_public_key(pem, str(public_path(config.signing_key))))
        agent_yaml = bootstrap_agent_yaml(config, site_id, gateway_id)
        files = {"agent.yaml": agent_yaml.encode(), AGENT_PUBLIC_KEY.name: pem}
        if out is not None and not force:
            _refuse_taken(out, files)
        _, entry["created"] = registry.enroll(site_id, gateway_id, building_id, room_id)
        written = _write_bundle(out, files) if out is not None else []
    _warn_loopback(ctx, config)
    bundle = {
        "site": site_id,
        "gateway": gateway_id,
        "agent_yaml": agent_yaml,
        "public_key_pem": pem.decode(),
        "key_id": kid,
        "created": entry["created"],
        "files": [str(path) for path in written],
    }
    if as_json:
        emit_json(bundle)
    elif written:
        click.echo(f"wrote {', '.join(map(str, written))} (fleet key {kid})")
        click.echo(f"on the gateway: {AGENT_CONFIG} and {AGENT_PUBLIC_KEY}")
    else:
        click.echo(agent_yaml, nl=False)
        click.echo(f"# ---- {AGENT_PUBLIC_KEY} (fleet key {kid}) ----")
        click.echo(pem.decode(), nl=False)


def _public_pem(config: FleetConfig) -> bytes:
    path = public_path(config.signing_key)
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise KeyFileError(
            f"no fleet public key at {path}: run 'campus-fleet keys generate' first"
        ) from None
    except OSError as exc:
        raise KeyFileError(f"cannot read the fleet public key {path}: {exc.strerror}") from None


def _refuse_taken(out: Path, files: dict[str, bytes]) -> None:
    if taken := [str(out / name) for name in files if (out / name).exists()]:
        raise RegistryError(f"{', '.join(taken)} already exist; use --force to replace them")


def bootstrap_agent_yaml(config: FleetConfig, site_id: str, gateway_id: str) -> str:
    """The agent.yaml of a gateway's bootstrap bundle."""
    broker = config.agent_broker or config.mqtt
    document = {
        "site": site_id,
        "gateway": gateway_id,
        "mqtt": {"host": broker.host, "port": broker.port},
        "fleet": {"public_keys": [str(AGENT_PUBLIC_KEY)]},
    }
    notes = [
        f"campus-agent config of gateway {gateway_id} (site {site_id}), from",
        "'campus-fleet gateways enroll'. The fleet pushes its devices in a signed config.",
        f"Install as {AGENT_CONFIG}, the fleet's key as {AGENT_PUBLIC_KEY},",
        f"then check: campus-agent check --config {AGENT_CONFIG}",
    ]
    if config.mqtt.username is not None:
        notes.append("The broker needs a login: add mqtt.username and mqtt.password_file.")
    if config.mqtt.tls is not None:
        notes.append("The broker uses TLS: add mqtt.tls with the CA file on the gateway.")
    header = "".join(f"# {line}\n" for line in notes)
    return header + yaml.safe_dump(document, sort_keys=False)


def _write_bundle(out: Path, files: dict[str, bytes]) -> list[Path]:
    """Writes the files (mode 0644) into `out`, replacing what is there (checked before)."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, data in files.items():
        path = out / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        with os.fdopen(fd, "wb") as stream:
            stream.write(data)
        path.chmod(0o644)
        written.append(path)
    return written


def _warn_loopback(ctx: Context, config: FleetConfig) -> None:
    if config.agent_broker is None and config.mqtt.host in LOOPBACK:
        click.echo(
            f"warning: the bundle's broker is {config.mqtt.host}, the fleet's own loopback: set "
            f"agent_broker (host, port) in {ctx.config_path} to the address gateways reach",
            err=True,
        )


@click.group()
def keys() -> None:
    """The fleet's Ed25519 signing key: it signs every config pushed to the gateways.

    The private key (fleet.yaml's signing_key, mode 0600) stays on the fleet server; the
    public key (KEY.pub) goes to every gateway in its bootstrap bundle.

    \b
    Examples:
      campus-fleet keys generate
      campus-fleet keys show --json
    """


@keys.command("generate")
@click.option(
    "--force",
    is_flag=True,
    help="Replace an existing key: gateways then refuse new configs until they get the new "
    "public key.",
)
@config_option
@json_option
@pass_context
def keys_generate(ctx: Context, force: bool, as_json: bool) -> None:
    """Generate the signing key at fleet.yaml's signing_key (and KEY.pub beside it)."""
    path = ctx.config.signing_key
    store = ctx.writable_store()
    with _refusals(), audit.audited(store, ctx.actor, "keys.generate", f"key:{path}") as entry:
        if path.exists() and not force:
            raise RegistryError(
                f"{path} already exists; --force replaces it (and the key gateways trust)"
            )
        entry["key_id"] = kid = _generate(path)
        entry["replaced"] = force
    pub = public_path(path)
    data = {"private_key": str(path), "public_key": str(pub), "key_id": kid}
    _done(as_json, data, f"wrote {path} (0600) and {pub}; key id {kid}")


def _generate(path: Path) -> str:
    """A new key at `path`, replacing any old one only once the new one is complete."""
    fresh = path.with_name(f".{path.name}.new")
    for stale in (fresh, public_path(fresh)):
        stale.unlink(missing_ok=True)
    public = generate_key(fresh)
    public_path(fresh).chmod(0o644)
    public_path(fresh).replace(public_path(path))
    fresh.replace(path)
    return key_id(public)


@keys.command("show")
@config_option
@json_option
@pass_context
def keys_show(ctx: Context, as_json: bool) -> None:
    """Print the fleet's public key and its id (the key_id of signed configs)."""
    pub = public_path(ctx.config.signing_key)
    with _refusals():
        pem = _public_pem(ctx.config)
        kid = key_id(load_public_key(pem, str(pub)))
    if as_json:
        emit_json({"public_key": str(pub), "key_id": kid, "public_key_pem": pem.decode()})
        return
    click.echo(f"# {pub}, key id {kid}")
    click.echo(pem.decode(), nl=False)


# -- audit -------------------------------------------------------------------------------------


@click.command("audit")
@click.option(
    "--since",
    default="7d",
    show_default=True,
    help="How far back: 30s, 15m, 2h, 1d, 1w, or an ISO 8601 time.",
)
@click.option("--actor", "actor_filter", help="Only this person's changes.")
@click.option("--action", help="Only this action, e.g. device.add; 'device' matches device.*.")
@click.option("--limit", type=click.IntRange(1, 1_000_000), help="Only the newest N entries.")
@click.option(
    "--export",
    "export_path",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Write the entries to FILE: .csv or .jsonl.",
)
@config_option
@json_option
@pass_context
def audit_log(
    ctx: Context,
    since: str,
    actor_filter: str | None,
    action: str | None,
    limit: int | None,
    export_path: Path | None,
    as_json: bool,
) -> None:
    """Who changed what and when, and whether it worked, oldest first.

    Every change made with campus-fleet is logged with its actor (--actor, else your OS
    user), including the refused ones.

    \b
    Examples:
      campus-fleet audit --since 1d
      campus-fleet audit --actor alice --action device
      campus-fleet audit --since 2025-09-01 --export audit-2025.csv
    """
    since_ns = since_option(since)
    if export_path is not None and export_path.suffix.lower() not in audit.EXPORT_FORMATS:
        raise click.BadParameter("the file must end in .csv or .jsonl", param_hint="--export")
    with _refusals():
        rows = audit.entries(_reader(ctx).store, since_ns, actor_filter, action, limit)
        if export_path is not None:
            audit.export(rows, export_path)
    if export_path is not None:
        _done(
            as_json,
            {"exported": len(rows), "file": str(export_path)},
            f"wrote {len(rows)} entries to {export_path}",
        )
        return
    if as_json:
        emit_json([{c: row[c] for c in audit.EXPORT_COLUMNS} for row in rows])
        return
    columns = {c: _column(c) for c in ("time", "actor", "action", "target", "result")}
    _print_rows(f"Audit since {since}", rows, columns)
