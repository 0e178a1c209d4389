"""A usage report as people and scripts read it: rich tables, CSV, JSON and a self-contained
HTML page (the charts come from `fleet.reports.charts`).

Rules: every figure that cannot be computed is "no data" in tables and HTML, an empty cell in
CSV and null in JSON, never 0. Shares are fractions 0..1 in CSV and JSON, percentages for
people. Times in JSON are ISO 8601 UTC; the period is also given in the report's zone.
"""

from __future__ import annotations

import base64
import csv
import html
import io
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from rich.console import Console, Group
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from fleet.reports.period import NS, days_text, lessons_text
from fleet.reports.timeline import GAP_FACTOR, LessonStats
from fleet.reports.usage import Availability, DeviceFigures, RoomFigures, UsageReport
from fleet.timefmt import iso

NO_DATA = "no data"
TEXT_COLUMNS = frozenset(
    {"room", "name", "building", "device", "kind", "gateway", "in service from"}
)
HOUR_NS = 3600 * NS

CSV_COLUMNS = (
    "site",
    "month",
    "timezone",
    "room",
    "room_name",
    "building",
    "lesson_hours",
    "displays",
    "display_on_hours",
    "display_power_known_share",
    "boards",
    "board_up_share",
    "board_down_share",
    "board_unknown_share",
    "sensors",
    "sensor_availability_share",
    "cameras",
    "camera_healthy_share",
    "co2_sensors",
    "co2_coverage_share",
    "co2_under_limit_share",
    "co2_mean_ppm",
    "co2_max_ppm",
    "temperature_mean_c",
    "temperature_min_c",
    "temperature_max_c",
    "humidity_mean_pct",
    "humidity_min_pct",
    "humidity_max_pct",
)


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def _hours(ns: int) -> float:
    return round(ns / HOUR_NS, 4)


def local_time(ts_ns: int, report: UsageReport) -> str:
    moment = datetime.fromtimestamp(ts_ns // NS, tz=UTC).astimezone(report.period.zone)
    return moment.strftime("%Y-%m-%d %H:%M %Z")


# -- JSON ----------------------------------------------------------------------------------------


def to_json(report: UsageReport) -> dict[str, Any]:
    period = report.period
    return {
        "site": report.site,
        "site_name": report.site_name,
        "month": period.month,
        "timezone": period.zone.key,
        "timezone_source": report.zone_source,
        "period": {
            "start": iso(period.start_ns),
            "end": iso(period.end_ns),
            "start_local": local_time(period.start_ns, report),
            "end_local": local_time(period.end_ns, report),
            "complete": period.complete,
            "hours": _hours(period.length_ns),
        },
        "rules": {
            "lessons": lessons_text(period.lesson_ranges),
            "days": days_text(period.days),
            "school_days": period.school_days,
            "lesson_hours": _hours(period.lesson_ns),
            "co2_limit_ppm": report.co2_limit,
            "gap_factor": GAP_FACTOR,
        },
        "rooms": [_room_json(room, devices=True) for room in report.rooms],
        "totals": _room_json(report.totals, devices=False),
        "generated": iso(report.generated_ns),
    }


def _availability(figures: Availability, up_name: str) -> dict[str, Any]:
    return {
        "count": figures.devices,
        up_name: _round(figures.up_share, 6),
        "down_share": _round(figures.down_share, 6),
        "unknown_share": _round(figures.unknown_share, 6),
    }


def _stats(stats: LessonStats, digits: int) -> dict[str, float | None]:
    return {
        "mean": _round(stats.mean, digits),
        "min": _round(stats.low, digits),
        "max": _round(stats.high, digits),
    }


def _room_json(room: RoomFigures, *, devices: bool) -> dict[str, Any]:
    comfort = room.comfort
    data: dict[str, Any] = {
        "room": room.room,
        "name": room.name,
        "building": room.building,
        "displays": {
            "count": room.displays.devices,
            "on_hours": _round(room.displays.on_hours, 4),
            "power_known_share": _round(room.displays.known_share, 6),
        },
        "boards": _availability(room.boards, "up_share"),
        "sensors": _availability(room.sensors, "availability"),
        "cameras": _availability(room.cameras, "healthy_share"),
        "comfort": {
            "co2_sensors": comfort.co2_sensors,
            "lesson_hours": _hours(comfort.lesson_ns),
            "co2_coverage_share": _round(comfort.co2_coverage, 6),
            "co2_under_limit_share": _round(comfort.co2_under_share, 6),
            "co2_ppm": _stats(comfort.stats("co2"), 1),
            "temperature_c": _stats(comfort.stats("temperature"), 2),
            "humidity_pct": _stats(comfort.stats("humidity"), 2),
        },
    }
    if devices:
        data["devices"] = [_device_json(device) for device in room.devices]
    return data


def _device_json(device: DeviceFigures) -> dict[str, Any]:
    health = device.health
    data: dict[str, Any] = {
        "device": device.device,
        "gateway": device.gateway,
        "kind": device.kind,
        "profile": device.profile,
        "registered": device.registered,
        "interval_s": device.interval_s,
        "in_service_from": iso(device.window[0]) if device.window else None,
        "up_share": None,
        "down_share": None,
        "unknown_share": None,
    }
    if health is not None and health.window_ns:
        data["up_share"] = round(health.up_ns / health.window_ns, 6)
        data["down_share"] = round(health.down_ns / health.window_ns, 6)
        data["unknown_share"] = round(health.unknown_ns / health.window_ns, 6)
    if device.on is not None and health is not None:
        data["power_point"] = device.power_point
        data["on_hours"] = _hours(device.on.on_ns) if device.on.known_ns else None
        data["power_known_share"] = round(device.on.known_ns / health.window_ns, 6)
    return data


# -- CSV -----------------------------------------------------------------------------------------


def to_csv(report: UsageReport) -> str:
    """One row per room (the unassigned group last); empty cell = no data."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for room in report.rooms:
        writer.writerow(_csv_cell(value) for value in _csv_row(report, room))
    return out.getvalue()


def _csv_cell(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return str(round(value, 6))
    return str(value)


def _csv_row(report: UsageReport, room: RoomFigures) -> tuple[object, ...]:
    comfort = room.comfort
    co2, temperature, humidity = (comfort.stats(p) for p in ("co2", "temperature", "humidity"))
    return (
        report.site,
        report.period.month,
        report.period.zone.key,
        room.room,
        room.name,
        room.building,
        _hours(comfort.lesson_ns),
        room.displays.devices,
        room.displays.on_hours,
        room.displays.known_share,
        room.boards.devices,
        room.boards.up_share,
        room.boards.down_share,
        room.boards.unknown_share,
        room.sensors.devices,
        room.sensors.up_share,
        room.cameras.devices,
        room.cameras.up_share,
        comfort.co2_sensors,
        comfort.co2_coverage,
        comfort.co2_under_share,
        co2.mean,
        co2.high,
        temperature.mean,
        temperature.low,
        temperature.high,
        humidity.mean,
        humidity.low,
        humidity.high,
    )


# -- for people: table and HTML share these cells ---------------------------------------------


def percent(share: float | None) -> str:
    return NO_DATA if share is None else f"{share * 100:.1f} %"


def _counted(text: str, count: int) -> str:
    return text if text == NO_DATA else f"{text} ({count})"


def _value(value: float | None, unit: str, digits: int = 0) -> str:
    return NO_DATA if value is None else f"{value:.{digits}f} {unit}"


def _mean_max(stats: LessonStats, unit: str, digits: int) -> str:
    if stats.mean is None or stats.high is None:
        return NO_DATA
    return f"{stats.mean:.{digits}f} / {stats.high:.{digits}f} {unit}"


EQUIPMENT: tuple[tuple[str, Callable[[RoomFigures], str]], ...] = (
    ("room", lambda r: r.room),
    ("name", lambda r: r.name or "-"),
    ("building", lambda r: r.building or "-"),
    (
        "display on-hours",
        lambda r: _counted(_value(r.displays.on_hours, "h", 1), r.displays.devices),
    ),
    ("boards up", lambda r: _counted(percent(r.boards.up_share), r.boards.devices)),
    ("sensors available", lambda r: _counted(percent(r.sensors.up_share), r.sensors.devices)),
    ("cameras healthy", lambda r: _counted(percent(r.cameras.up_share), r.cameras.devices)),
)


def _limit(report: UsageReport) -> str:
    return f"{report.co2_limit:g}"


def comfort_columns(
    report: UsageReport,
) -> tuple[tuple[str, Callable[[RoomFigures], str]], ...]:
    return (
        ("room", lambda r: r.room),
        (f"CO2 < {_limit(report)} ppm", lambda r: percent(r.comfort.co2_under_share)),
        (
            "CO2 data",
            lambda r: _counted(percent(r.comfort.co2_coverage), r.comfort.co2_sensors),
        ),
        ("CO2 mean / max", lambda r: _mean_max(r.comfort.stats("co2"), "ppm", 0)),
        ("temperature mean / max", lambda r: _mean_max(r.comfort.stats("temperature"), "°C", 1)),
        ("humidity mean / max", lambda r: _mean_max(r.comfort.stats("humidity"), "%", 0)),
    )


def total_cells(
    report: UsageReport, columns: tuple[tuple[str, Callable[[RoomFigures], str]], ...]
) -> list[str]:
    """The totals row: every room together (the site's sums)."""
    return [
        "all rooms" if header == "room" else "" if header in TEXT_COLUMNS else cell(report.totals)
        for header, cell in columns
    ]


def summary_lines(report: UsageReport) -> list[str]:
    period = report.period
    state = "" if period.complete else " — the month is not over: up to now"
    return [
        f"Period: {local_time(period.start_ns, report)} to {local_time(period.end_ns, report)} "
        f"({_hours(period.length_ns):g} h; time zone {period.zone.key} from "
        f"{report.zone_source}){state}",
        f"Lesson time: {lessons_text(period.lesson_ranges)} on {days_text(period.days)}: "
        f"{period.school_days} days, {_hours(period.lesson_ns):g} h",
        "(n) = devices counted. Shares are of each device's time in service; "
        "comfort is over lesson time with data.",
    ]


def title(report: UsageReport) -> str:
    name = f"{report.site_name} ({report.site})" if report.site_name else report.site
    return f"Usage and health of {name}, {report.period.month}"


# -- table ---------------------------------------------------------------------------------------


def to_table(report: UsageReport) -> Group:
    parts: list[Any] = [Text(title(report), style="bold")]
    parts += [Text(line) for line in summary_lines(report)]
    for heading, columns in (
        ("Equipment", EQUIPMENT),
        (f"Comfort during lessons (CO2 under {_limit(report)} ppm)", comfort_columns(report)),
    ):
        table = Table(title=heading)
        for header, _cell in columns:
            table.add_column(
                header,
                justify="left" if header in TEXT_COLUMNS else "right",
                no_wrap=header in ("room", "name"),
            )
        for room in report.rooms:
            table.add_row(*(_styled(cell(room)) for _header, cell in columns))
        table.add_section()
        table.add_row(*(_styled(text) for text in total_cells(report, columns)), style="bold")
        parts.append(table)
    return Group(*parts)


def _styled(text: str) -> Text | str:
    return Text(text, style="dim") if text == NO_DATA else escape(text)


def table_text(report: UsageReport, width: int = 140) -> str:
    """The tables as plain text (for --out)."""
    console = Console(file=io.StringIO(), width=width, color_system=None, record=True)
    console.print(to_table(report))
    return console.export_text()


# -- HTML ----------------------------------------------------------------------------------------

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 1em 0 2em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; }
th { background: #f0f0f0; }
td.num { text-align: right; }
td.none { color: #999; text-align: right; }
tr.total td { font-weight: bold; border-top: 2px solid #666; }
img { max-width: 100%; display: block; margin: 1em 0; }
dt { font-weight: bold; margin-top: 0.5em; }
"""

DEFINITIONS = (
    (
        "display on-hours",
        "hours a display's power point said on (or warming up), summed over the room's displays",
    ),
    (
        "boards up, cameras healthy, sensors available",
        "share of each device's time in service "
        "during which a reading or device_up held (at most {gap} poll intervals old) and no "
        "device_down came after it",
    ),
    (
        "CO2 under the limit",
        "share of the lesson time with CO2 data in which the CO2 value held was below {limit} ppm",
    ),
    (
        "CO2 data",
        "share of the CO2 sensors' lesson time (while in service) with a CO2 value held",
    ),
    ("no data", "nothing to compute from: no such device in the room, or no reading"),
)


def to_html(report: UsageReport, charts: list[tuple[str, bytes]]) -> str:
    """A self-contained page: the tables, the charts as inline base64 PNG, no external asset."""
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title(report))}</title>",
        f"<style>{_STYLE}</style></head><body>",
        f"<h1>{html.escape(title(report))}</h1>",
    ]
    out += [f"<p>{html.escape(line)}</p>" for line in summary_lines(report)]
    for heading, columns in (
        ("Equipment", EQUIPMENT),
        ("Comfort during lessons", comfort_columns(report)),
    ):
        headers = [header for header, _cell in columns]
        out.append(f"<h2>{html.escape(heading)}</h2><table><tr>")
        out += [f"<th>{html.escape(header)}</th>" for header in headers]
        out.append("</tr>")
        for room in report.rooms:
            cells = [cell(room) for _header, cell in columns]
            out.append("<tr>" + "".join(map(_td, headers, cells)) + "</tr>")
        totals = total_cells(report, columns)
        out.append('<tr class="total">' + "".join(map(_td, headers, totals)) + "</tr>")
        out.append("</table>")
    out += _device_rows(report)
    out.append("<h2>Charts</h2>")
    for alt, png in charts:
        data = base64.b64encode(png).decode("ascii")
        out.append(f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">')
    out.append("<h2>What the figures mean</h2><dl>")
    for term, meaning in DEFINITIONS:
        text = meaning.format(gap=GAP_FACTOR, limit=_limit(report))
        out.append(f"<dt>{html.escape(term)}</dt><dd>{html.escape(text)}</dd>")
    out.append(f"</dl><p>Generated {html.escape(iso(report.generated_ns) or '')}.</p>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


DEVICE_HEADERS = (
    "room",
    "device",
    "kind",
    "gateway",
    "in service from",
    "up",
    "down",
    "unknown",
    "display on-hours",
)


def _device_rows(report: UsageReport) -> list[str]:
    """Every device with its own figures, in a closed <details> (rooms can hold many)."""
    out = ["<details><summary>Devices</summary><table><tr>"]
    out += [f"<th>{header}</th>" for header in DEVICE_HEADERS]
    out.append("</tr>")
    for room in report.rooms:
        for device in room.devices:
            health = device.health
            shares: list[float | None] = [None, None, None]
            if health is not None and health.window_ns:
                shares = [
                    part / health.window_ns
                    for part in (health.up_ns, health.down_ns, health.unknown_ns)
                ]
            on_hours = None
            if device.on is not None and device.on.known_ns:
                on_hours = device.on.on_ns / HOUR_NS
            name = device.device + ("" if device.registered else " (not registered)")
            since = local_time(device.window[0], report) if device.window else "not in service"
            cells = [
                room.room,
                name,
                device.kind,
                device.gateway,
                since,
                *(percent(share) for share in shares),
                "-" if device.on is None else _value(on_hours, "h", 1),
            ]
            out.append("<tr>" + "".join(map(_td, DEVICE_HEADERS, cells)) + "</tr>")
    out.append("</table></details>")
    return out


def _td(header: str, text: str) -> str:
    css = "none" if text == NO_DATA else "" if header in TEXT_COLUMNS else "num"
    attribute = f' class="{css}"' if css else ""
    return f"<td{attribute}>{html.escape(text)}</td>"
