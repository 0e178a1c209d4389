"""`campus-fleet`: the fleet service and the commands school IT staff use.

Exit codes: 0 success; 1 runtime failure (e.g. unreadable database); 2 bad command line or
configuration; 3 the thing asked for does not exist (e.g. an unknown device).
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys
import time
from pathlib import Path
from typing import Any

import click
from rich.markup import escape
from rich.table import Table

from drivers.profile_base import DeviceKind, ValueType
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
    show_value,
    since_option,
)
from fleet.config import DEFAULT_CONFIG
from fleet.store import Store
from fleet.timefmt import ago, iso
from wire.errors import WireError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="campus-iot", prog_name="campus-fleet")
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path),
    default=DEFAULT_CONFIG,
    show_default=True,
    envvar="CAMPUS_FLEET_CONFIG",
    help="Fleet configuration file (YAML). Env: CAMPUS_FLEET_CONFIG.",
)
@click.option(
    "--db",
    "db_path",
    type=click.Path(path_type=Path),
    envvar="CAMPUS_FLEET_DB",
    help="Read this fleet database instead of the one the config names. Env: CAMPUS_FLEET_DB.",
)
@click.option(
    "--actor",
    envvar="CAMPUS_FLEET_ACTOR",
    help="Who makes the change, for the audit log (default: your OS user). "
    "Env: CAMPUS_FLEET_ACTOR.",
)
@click.pass_context
def main(ctx: click.Context, config_path: Path, db_path: Path | None, actor: str | None) -> None:
    """Fleet manager of a school's (or district's) campus-iot gateways.

    `serve` runs the service that receives every gateway's telemetry, state and events over MQTT
    and keeps them in SQLite; the other commands read what it stored. Tables are for people;
    add --json for scripts.

    \b
    Examples:
      campus-fleet serve --config /etc/campus-iot/fleet.yaml
      campus-fleet --config /etc/campus-iot/fleet.yaml gateways list
      campus-fleet gateways list
      campus-fleet devices list --json
      campus-fleet readings room-101-env --since 15m
    """
    ctx.obj = Context(config_path, db_path, actor)


@main.command()
@config_option
@pass_context
def serve(ctx: Context) -> None:
    """Run the fleet service until SIGTERM or Ctrl-C."""
    config = ctx.config
    logging.basicConfig(
        level=config.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    from fleet.service import FleetService, IngestStopped

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await FleetService(config).run(stop)

    try:
        asyncio.run(run())
    except IngestStopped as exc:
        fail(f"ingest stopped: {exc}", EXIT_RUNTIME)


@main.group()
def gateways() -> None:
    """Gateways that have reported to this fleet."""


@gateways.command("list")
@config_option
@json_option
@pass_context
def gateways_list(ctx: Context, as_json: bool) -> None:
    """Every gateway with its status (online/offline), agent version and buffer depth."""
    rows = ctx.store().gateways()
    if as_json:
        emit_json(
            [
                {
                    "site": r["site"],
                    "gateway": r["gateway"],
                    "status": r["status"] or "unknown",
                    "reason": r["reason"],
                    "agent_version": r["agent_version"],
                    "devices": r["devices"],
                    "buffer_depth": r["buffer_depth"],
                    "evicted": r["evicted"],
                    "lost": r["lost"],
                    "received": r["received"],
                    "duplicates": r["duplicates"],
                    "last_seq": r["last_seq"],
                    "last_seen": iso(r["last_seen_ns"]),
                }
                for r in rows
            ]
        )
        return
    now = time.time_ns()
    table = Table(title=f"Gateways ({len(rows)})")
    for column in ("site", "gateway", "status", "devices", "buffered", "received", "last seen"):
        table.add_column(column)
    for r in rows:
        status = r["status"] or "unknown"
        style = "green" if status == "online" else "red"
        table.add_row(
            r["site"],
            r["gateway"],
            f"[{style}]{status}[/]" + (f" ({r['reason']})" if r["reason"] else ""),
            str(r["devices"]),
            str(r["buffer_depth"] if r["buffer_depth"] is not None else "-"),
            str(r["received"]),
            ago(r["last_seen_ns"], now),
        )
    console.print(table)


@main.group()
def devices() -> None:
    """Devices the gateways poll."""


@devices.command("list")
@click.option("--site", "site_id", help="Only this site's devices.")
@click.option("--gateway", "gateway_id", help="Only this gateway's devices.")
@click.option(
    "--kind",
    type=click.Choice([kind.value for kind in DeviceKind]),
    help="Only devices of this kind.",
)
@click.option(
    "--points",
    "with_points",
    is_flag=True,
    help="Also the latest value of every point, with its unit and age.",
)
@config_option
@json_option
@pass_context
def devices_list(
    ctx: Context,
    site_id: str | None,
    gateway_id: str | None,
    kind: str | None,
    with_points: bool,
    as_json: bool,
) -> None:
    """Every device the gateways report: its profile, whether it answers, its last reading.

    \b
    availability  up or down as its gateway reports it ("down 5m": for 5 minutes),
                  unknown while the gateway is offline or has not said yet
    reason        why a down device is down: the gateway's last error for it
                  (the column appears when a device is down)
    last reading  when its newest reading was taken
    --points      a second table: the latest value of every point each device reports,
                  with its unit and age (the health points of projectors, boards and
                  cameras: power, lamp hours, errors, screen, stream…)

    \b
    Examples:
      campus-fleet devices list --site school-42 --points
      campus-fleet devices list --kind camera --points --json
    """
    store = ctx.store()
    rows = [
        r
        for r in store.devices()
        if (site_id is None or r["site"] == site_id)
        and (gateway_id is None or r["gateway"] == gateway_id)
        and (kind is None or r["kind"] == kind)
    ]
    points = _latest_points(store, ctx) if with_points else {}
    now = time.time_ns()

    def availability(r: dict[str, Any]) -> str:
        if r["gateway_status"] != "online":
            return "unknown"
        return {1: "up", 0: "down"}.get(r["up"], "unknown")

    def listed(r: dict[str, Any]) -> list[dict[str, Any]]:
        return points.get((r["site"], r["gateway"], r["device"]), [])

    if as_json:
        shown = []
        for r in rows:
            state = availability(r)
            entry = {
                "site": r["site"],
                "gateway": r["gateway"],
                "device": r["device"],
                "profile": r["profile"],
                "kind": r["kind"],
                "availability": state,
                "gateway_status": r["gateway_status"] or "unknown",
                "down_since": iso(r["down_since_ns"]) if state == "down" else None,
                "reason": r.get("reason") if state == "down" else None,
                "last_reading": iso(r["last_seen_ns"]),
            }
            if with_points:
                entry["points"] = [
                    {
                        "point": p["point"],
                        "value": p["value"],
                        "unit": p["unit"],
                        "time": iso(p["ts_ns"]),
                        "age_s": round(max(0, now - p["ts_ns"]) / 1e9, 3),
                    }
                    for p in listed(r)
                ]
            shown.append(entry)
        emit_json(shown)
        return
    table = Table(title=f"Devices ({len(rows)})")
    columns = ["site", "gateway", "device", "kind", "profile", "availability", "last reading"]
    any_down = any(availability(r) == "down" for r in rows)
    for column in [*columns, "reason"] if any_down else columns:
        table.add_column(column)
    for r in rows:
        state = availability(r)
        style = {"up": "green", "down": "red"}.get(state, "yellow")
        since = f" {ago(r['down_since_ns'], now).removesuffix(' ago')}" if state == "down" else ""
        cells = [
            r["site"],
            r["gateway"],
            r["device"],
            r["kind"] or "-",
            r["profile"] or "-",
            f"[{style}]{state}[/]{since}",
            ago(r["last_seen_ns"], now),
        ]
        if any_down:
            cells.append(escape(r.get("reason") or "-") if state == "down" else "")
        table.add_row(*cells)
    console.print(table)
    if not with_points:
        return
    table = Table(title="Latest points")
    for column in ("device", "point", "value", "age"):
        table.add_column(column, justify="right" if column == "value" else "left")
    for r in rows:
        for index, p in enumerate(listed(r)):
            unit = f" {p['unit']}" if p["unit"] else ""
            table.add_row(
                f"{r['gateway']}/{r['device']}" if index == 0 else "",
                escape(p["point"]),
                escape(f"{show_value(p['value'])}{unit}"),
                ago(p["ts_ns"], now),
            )
    console.print(table)


def _latest_points(store: Store, ctx: Context) -> dict[tuple[str, str, str], list[dict[str, Any]]]:
    """(site, gateway, device) -> its points' latest values, with the units of its profile."""
    declared = _declared_points(ctx)
    found: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for row in store.latest():
        unit, flag = declared.get((row["profile"], row["point"]), ("", False))
        value = bool(row["value"]) if flag and isinstance(row["value"], int) else row["value"]
        found.setdefault((row["site"], row["gateway"], row["device"]), []).append(
            {**row, "value": value, "unit": unit}
        )
    return found


def _declared_points(ctx: Context) -> dict[tuple[str, str], tuple[str, bool]]:
    """(profile, point) -> (unit, whether it is on/off), from the fleet's profiles (SQLite
    keeps true as 1); empty when they cannot be read: the listing goes on without units."""
    from drivers.profiles import ProfileLibrary

    try:
        directory = (
            None
            if ctx.db_path is not None and not ctx.config_path.exists()
            else ctx.config.profiles_dir
        )
        library = ProfileLibrary.load(directory)
    except (WireError, OSError):
        return {}
    return {
        (profile.id, point.name): (point.unit, getattr(point, "type", None) == ValueType.BOOL)
        for profile in library.profiles.values()
        for point in profile.points
    }


@main.command()
@config_option
@click.argument("device")
@click.option(
    "--since",
    default="1h",
    show_default=True,
    help="How far back: 30s, 15m, 2h, 1d, 1w, or an ISO 8601 time.",
)
@click.option(
    "--limit",
    type=click.IntRange(1, 1_000_000),
    default=1000,
    show_default=True,
    help="At most this many readings (the newest).",
)
@json_option
@pass_context
def readings(ctx: Context, device: str, since: str, limit: int, as_json: bool) -> None:
    """Readings of DEVICE, oldest first, with their sequence numbers.

    DEVICE is a device id, or gateway/device or site/gateway/device when the id alone is
    ambiguous.
    """
    since_ns = since_option(since)
    store = ctx.store()
    matches = store.find_device(device)
    if not matches:
        fail(f"no device {device!r} (see 'campus-fleet devices list')", EXIT_NOT_FOUND)
    if len(matches) > 1:
        names = ", ".join(f"{m['site']}/{m['gateway']}/{m['device']}" for m in matches)
        fail(f"{device!r} is ambiguous: {names}", EXIT_USAGE)
    match = matches[0]
    rows = store.readings(match["site"], match["gateway"], match["device"], since_ns, limit)
    if as_json:
        emit_json(
            [
                {
                    "site": match["site"],
                    "gateway": match["gateway"],
                    "device": match["device"],
                    "seq": r["seq"],
                    "ts_ns": r["ts_ns"],
                    "time": iso(r["ts_ns"]),
                    "point": r["point"],
                    "value": r["value"],
                    "quality": r["quality"],
                }
                for r in rows
            ]
        )
        return
    table = Table(title=f"{match['site']}/{match['gateway']}/{match['device']} since {since}")
    for column in ("seq", "time (UTC)", "point", "value"):
        table.add_column(column, justify="right" if column in ("seq", "value") else "left")
    for r in rows:
        table.add_row(str(r["seq"]), iso(r["ts_ns"]) or "", r["point"], show_value(r["value"]))
    console.print(table)


@main.command()
@config_option
@json_option
@pass_context
def stats(ctx: Context, as_json: bool) -> None:
    """Delivery accounting per gateway: received, duplicates, gaps, evicted.

    \b
    received    readings stored (each (gateway, seq) once)
    duplicates  readings that arrived again and were not stored twice
    gaps        sequence ranges below last_seq that have not arrived (yet)
    evicted     readings the agent dropped from its full buffer (as it reported)
    lost        readings the agent could not store at all (disk full)
    """
    rows = ctx.store().stats()
    if as_json:
        emit_json(rows)
        return
    table = Table(title="Delivery per gateway")
    for column in (
        "gateway",
        "received",
        "duplicates",
        "last seq",
        "missing",
        "gaps",
        "evicted",
        "lost",
        "buffered",
    ):
        table.add_column(column, justify="left" if column in ("gateway", "gaps") else "right")
    for r in rows:
        gaps = ", ".join(f"{a}..{b}" if a != b else str(a) for a, b in r["gaps"][:3])
        if len(r["gaps"]) > 3:
            more = "many" if r["gaps_truncated"] else str(len(r["gaps"]) - 3)
            gaps += f" (+{more} more)"
        table.add_row(
            f"{r['site']}/{r['gateway']}",
            str(r["received"]),
            str(r["duplicates"]),
            str(r["last_seq"]),
            str(r["missing"]),
            gaps or "-",
            str(r["evicted"]),
            str(r["lost"]),
            "-" if r["buffer_depth"] is None else str(r["buffer_depth"]),
        )
    console.print(table)


@main.command()
@config_option
@click.option(
    "--since",
    default="1d",
    show_default=True,
    help="How far back: 30s, 15m, 2h, 1d, 1w, or an ISO 8601 time.",
)
@click.option("--limit", type=click.IntRange(1, 100_000), default=200, show_default=True)
@json_option
@pass_context
def events(ctx: Context, since: str, limit: int, as_json: bool) -> None:
    """Events the gateways reported: devices up/down, rejected input, buffer trouble, clock."""
    since_ns = since_option(since)
    rows = ctx.store().events(since_ns, limit)
    if as_json:
        emit_json(
            [
                {
                    "site": r["site"],
                    "gateway": r["gateway"],
                    "time": iso(r["ts_ns"]),
                    "ts_ns": r["ts_ns"],
                    "kind": r["kind"],
                    "device": r["device"],
                    "message": r["message"],
                    "data": json.loads(r["data"] or "{}"),
                }
                for r in rows
            ]
        )
        return
    table = Table(title=f"Events since {since}")
    for column in ("time (UTC)", "gateway", "kind", "device", "message"):
        table.add_column(column)
    for r in rows:
        table.add_row(
            iso(r["ts_ns"]) or "",
            f"{r['site']}/{r['gateway']}",
            r["kind"],
            r["device"] or "-",
            r["message"],
        )
    console.print(table)


@main.group()
def profiles() -> None:
    """Firmware profiles: check them before a site uses them, export their JSON Schema."""


@profiles.command("check")
@click.argument("paths", nargs=-1, type=click.Path(path_type=Path, exists=True))
@json_option
def profiles_check(paths: tuple[Path, ...], as_json: bool) -> None:
    """Validate profiles: files, or folders of *.yaml (default: the shipped profiles).

    Every problem is listed with file, line and field. Exit code 0 when all are valid, 1 when
    one is not.
    """
    from drivers.profiles import check_profiles, default_profiles_dir

    found, errors = check_profiles(list(paths) or [default_profiles_dir()])
    if as_json:
        emit_json(
            {
                "valid": [
                    {
                        "id": p.id,
                        "vendor": p.vendor,
                        "model": p.model,
                        "protocol": p.protocol,
                        "kind": p.kind.value,
                        "points": len(p.points),
                        "commands": len(p.commands),
                    }
                    for p in found
                ],
                "problems": [
                    {
                        "file": e.path,
                        "line": problem.line,
                        "field": problem.field,
                        "message": problem.message,
                    }
                    for e in errors
                    for problem in e.problems
                ],
            }
        )
    else:
        for profile in found:
            click.echo(
                f"ok   {profile.id}: {profile.vendor} {profile.model} ({profile.protocol} "
                f"{profile.kind.value}), {len(profile.points)} points, "
                f"{len(profile.commands)} commands"
            )
        for error in errors:
            for problem in error.problems:
                click.echo(f"FAIL {error.path}: {problem}", err=True)
    if errors:
        sys.exit(EXIT_RUNTIME)


@profiles.command("schema")
@click.option(
    "--out",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Write to this file instead of standard output.",
)
def profiles_schema(out: Path | None) -> None:
    """The JSON Schema of a firmware profile (for editors and other tools)."""
    from drivers.profiles import profile_schema

    text = json.dumps(profile_schema(), indent=2)
    if out is None:
        click.echo(text)
    else:
        out.write_text(text + "\n")
        click.echo(str(out))


@main.group()
def schema() -> None:
    """JSON Schema of the wire messages, for clients in other languages."""


@schema.command("export")
@click.argument("directory", type=click.Path(path_type=Path, file_okay=False))
def schema_export(directory: Path) -> None:
    """Write one <channel>.schema.json per message type into DIRECTORY."""
    from wire.schema import export

    for path in export(directory):
        click.echo(str(path))


# Command groups that live in their own modules (registry, desired state, alerts).
from fleet import (  # noqa: E402
    cli_alerts,
    cli_bridge,
    cli_control,
    cli_influx,
    cli_policy,
    cli_registry,
    cli_report,
)

cli_registry.register(main, gateways, devices)
cli_control.register(main)
cli_policy.register(main)
cli_alerts.register(main)
cli_influx.register(main)
cli_bridge.register(main)
cli_report.register(main)

if __name__ == "__main__":
    main()
