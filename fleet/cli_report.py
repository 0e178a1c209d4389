"""campus-fleet commands: report (usage and health of a site's equipment over a month).

Rules: arguments are checked before the database is opened (bad month, lessons, days or zone:
exit 2); an unknown site exits 3; a binary format needs --out. Everything is read from the fleet
database, read-only.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from zoneinfo import ZoneInfo

import click

from fleet.clikit import (
    EXIT_NOT_FOUND,
    EXIT_RUNTIME,
    EXIT_USAGE,
    Context,
    config_option,
    console,
    fail,
    json_option,
    pass_context,
)
from fleet.registry import NotFound, Registry, RegistryError, Target
from fleet.reports.period import (
    ReportError,
    host_zone,
    month_period,
    parse_days,
    parse_lessons,
    parse_month,
    parse_zone,
)
from fleet.reports.usage import CO2_LIMIT_PPM, UsageReport, usage_report
from fleet.settings import SettingsError

FORMATS = ("table", "csv", "json", "png", "html")


def register(main: click.Group) -> None:
    """Adds this module's commands to the CLI."""
    main.add_command(report)


@click.group()
def report() -> None:
    """Reports for the people who ask how the school's equipment is used."""


@report.command("usage")
@config_option
@click.option(
    "--site",
    "site_id",
    envvar="CAMPUS_FLEET_SITE",
    help="Site id (default: the registry's only site). Env: CAMPUS_FLEET_SITE.",
)
@click.option("--month", required=True, help="The month, YYYY-MM (a month not over: up to now).")
@click.option(
    "--format",
    "output_format",
    type=click.Choice(FORMATS),
    default="table",
    show_default=True,
    help="table for people, csv (one row per room), json for scripts, png (charts), html "
    "(a self-contained page with tables and charts).",
)
@click.option(
    "--out",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Write to this file (required for png; default: standard output).",
)
@click.option(
    "--lessons",
    default="08:00-17:00",
    show_default=True,
    help="Lesson hours, local time: HH:MM-HH:MM, or several ranges 08:00-12:00,13:30-17:00.",
)
@click.option(
    "--days",
    default="mon-fri",
    show_default=True,
    help="School days: mon-fri, sun-thu, mon,tue,thu,fri …",
)
@click.option(
    "--timezone",
    "zone_name",
    help="IANA time zone of the month and lesson hours (default: the site's 'timezone' "
    "setting, else the fleet host's zone).",
)
@click.option(
    "--co2-limit",
    type=click.FloatRange(min=1, max=100_000),
    default=CO2_LIMIT_PPM,
    show_default=True,
    help="CO2 comfort limit in ppm: lesson time under it counts as comfortable.",
)
@json_option
@pass_context
def usage(
    ctx: Context,
    site_id: str | None,
    month: str,
    output_format: str,
    out: Path | None,
    lessons: str,
    days: str,
    zone_name: str | None,
    co2_limit: float,
    as_json: bool,
) -> None:
    """Per room: display on-hours, board uptime, sensor availability, comfort during lessons
    (share of lesson time with CO2 under the limit; mean and max CO2, temperature, humidity) and
    cameras healthy, over one month in the site's local time.

    A figure nothing can be computed from shows "no data", never 0. The rules behind each
    figure are in the README (section "Usage and health reports").

    \b
    Examples:
      campus-fleet report usage --site lycee-jean-moulin --month 2026-11
      campus-fleet report usage --month 2026-11 --format csv --out november.csv
      campus-fleet report usage --month 2026-11 --format html --out november.html \\
          --lessons 08:00-12:00,13:30-17:00 --days mon-fri --timezone Europe/Paris
    """
    if as_json:
        if output_format not in ("table", "json"):
            fail(f"--json and --format {output_format} contradict each other", EXIT_USAGE)
        output_format = "json"
    if output_format == "png" and out is None:
        fail("--format png writes a binary file: give --out FILE.png", EXIT_USAGE)
    try:
        parse_month(month)
        lesson_ranges = parse_lessons(lessons)
        school_days = parse_days(days)
        zone = parse_zone(zone_name) if zone_name is not None else None
    except ReportError as exc:
        fail(str(exc), EXIT_USAGE)
    store = ctx.store()
    registry = Registry(store, profiles_dir=_profiles_dir(ctx))
    now = time.time_ns()
    try:
        site = site_id if site_id is not None else registry.default_site()
        zone, source = (zone, "option") if zone is not None else _site_zone(registry, site)
        period = month_period(month, zone, lesson_ranges, school_days, now)
        result = usage_report(
            registry, site, period, zone_source=source, co2_limit=co2_limit, now_ns=now
        )
    except NotFound as exc:
        fail(str(exc), EXIT_NOT_FOUND)
    except (RegistryError, ReportError) as exc:
        fail(str(exc), EXIT_USAGE)
    except (SettingsError, sqlite3.Error) as exc:
        fail(f"cannot read the fleet database: {exc}", EXIT_RUNTIME)
    finally:
        store.close()
    _emit(result, output_format, out)


def _site_zone(registry: Registry, site: str) -> tuple[ZoneInfo, str]:
    """The site's `timezone` setting, else the fleet host's zone, else UTC; and which it was."""
    setting = registry.settings_of(Target("site", site, site)).timezone
    if setting is not None:
        return parse_zone(setting), "site settings"
    host = host_zone()
    if host is not None:
        return host, "fleet host"
    return ZoneInfo("UTC"), "default (UTC)"


def _profiles_dir(ctx: Context) -> Path | None:
    """The config's profiles_dir; with --db and no config file, the default profiles."""
    if ctx.db_path is not None and not ctx.config_path.exists():
        return None
    return ctx.config.profiles_dir


def _emit(result: UsageReport, output_format: str, out: Path | None) -> None:
    """To --out, or standard output (the table in colour when it is a terminal)."""
    if out is None and output_format == "table":
        from fleet.reports.render import to_table

        console.print(to_table(result))
        return
    data = _render(result, output_format)
    if out is None:
        click.echo(data, nl=False)  # never png: it needs --out, checked first
        return
    try:
        if isinstance(data, bytes):
            out.write_bytes(data)
        else:
            out.write_text(data, encoding="utf-8")
    except OSError as exc:
        fail(f"cannot write {out}: {exc}", EXIT_RUNTIME)
    click.echo(str(out))


def _render(result: UsageReport, output_format: str) -> str | bytes:
    from fleet.reports import render

    if output_format == "table":
        return render.table_text(result)
    if output_format == "json":
        return json.dumps(render.to_json(result), indent=2) + "\n"
    if output_format == "csv":
        return render.to_csv(result)
    from fleet.reports import charts  # matplotlib is slow to import: only when drawing

    if output_format == "png":
        return charts.report_png(result)
    return render.to_html(result, charts.chart_pngs(result))
