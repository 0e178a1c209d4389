"""Charts of a usage report, drawn with matplotlib's Agg canvas (no display, no pyplot state).

Rules: one horizontal bar per room, rooms in the report's order from the top; a room without data
for a chart gets no bar and the words "no data" instead of a bar of 0.
"""

from __future__ import annotations

import io
from collections.abc import Callable

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from fleet.reports.usage import RoomFigures, UsageReport

GREEN, AMBER, RED, BLUE, GREY = "#2e7d32", "#f9a825", "#c62828", "#1565c0", "#9e9e9e"
DPI = 100


def _label(room: RoomFigures) -> str:
    return f"{room.room} · {room.name}" if room.name else room.room


def _bars(
    axes: Axes,
    report: UsageReport,
    value: Callable[[RoomFigures], float | None],
    colour: Callable[[float], str],
    *,
    xmax: float | None,
    unit: str,
    digits: int = 1,
) -> None:
    rooms = report.rooms
    positions = range(len(rooms))
    values = [value(room) for room in rooms]
    known = [v for v in values if v is not None]
    limit = xmax if xmax is not None else max([*known, 1.0]) * 1.15
    axes.barh(
        list(positions),
        [v or 0.0 for v in values],
        color=[GREY if v is None else colour(v) for v in values],
    )
    for position, shown in zip(positions, values, strict=True):
        text = "no data" if shown is None else f"{shown:.{digits}f}{unit}"
        axes.text(
            (shown or 0.0) + limit * 0.01,
            position,
            text,
            va="center",
            fontsize=8,
            color=GREY if shown is None else "black",
        )
    axes.set_yticks(list(positions), [_label(room) for room in rooms], fontsize=8)
    axes.invert_yaxis()
    axes.set_xlim(0, limit)
    axes.grid(axis="x", alpha=0.3)


def _share_colour(share: float) -> str:
    return GREEN if share >= 90 else AMBER if share >= 70 else RED


def comfort(axes: Axes, report: UsageReport) -> None:
    _bars(
        axes,
        report,
        lambda r: None if r.comfort.co2_under_share is None else r.comfort.co2_under_share * 100,
        _share_colour,
        xmax=110,
        unit=" %",
    )
    axes.set_title(f"Lesson time with CO2 under {report.co2_limit:g} ppm (of time with data)")
    axes.set_xlabel("%")


def co2_levels(axes: Axes, report: UsageReport) -> None:
    limit = report.co2_limit

    def colour(mean: float) -> str:
        return GREEN if mean < limit * 0.8 else AMBER if mean < limit else RED

    _bars(
        axes,
        report,
        lambda r: r.comfort.stats("co2").mean,
        colour,
        xmax=None,
        unit=" ppm",
        digits=0,
    )
    highs = [room.comfort.stats("co2").high for room in report.rooms]
    for position, high in enumerate(highs):
        if high is not None:
            axes.plot([high], [position], marker="|", markersize=14, color="black")
    top = max([h for h in highs if h is not None] + [limit]) * 1.15
    axes.set_xlim(0, top)
    axes.axvline(limit, color=RED, linestyle="--", linewidth=1)
    axes.set_title("Mean CO2 during lessons (| = maximum, dashed = limit)")
    axes.set_xlabel("ppm")


def display_hours(axes: Axes, report: UsageReport) -> None:
    _bars(axes, report, lambda r: r.displays.on_hours, lambda _h: BLUE, xmax=None, unit=" h")
    axes.set_title("Display on-hours")
    axes.set_xlabel("hours")


def availability(axes: Axes, report: UsageReport) -> None:
    """Boards up, sensors available and cameras healthy, side by side per room."""
    rooms = report.rooms
    kinds: tuple[tuple[str, Callable[[RoomFigures], float | None], str], ...] = (
        ("boards up", lambda r: r.boards.up_share, "#6a1b9a"),
        ("sensors available", lambda r: r.sensors.up_share, "#00838f"),
        ("cameras healthy", lambda r: r.cameras.up_share, "#ef6c00"),
    )
    height = 0.8 / len(kinds)
    shown = [False] * len(rooms)
    for index, (_name, share, colour) in enumerate(kinds):
        for position, room in enumerate(rooms):
            value = share(room)
            if value is None:
                continue
            offset = position - 0.4 + height * (index + 0.5)
            axes.barh([offset], [value * 100], height=height, color=colour)
            axes.text(value * 100 + 1, offset, f"{value * 100:.1f} %", va="center", fontsize=7)
            shown[position] = True
    for position, has_bar in enumerate(shown):
        if not has_bar:
            axes.text(1, position, "no data", va="center", fontsize=8, color=GREY)
    axes.set_yticks(list(range(len(rooms))), [_label(room) for room in rooms], fontsize=8)
    axes.invert_yaxis()
    axes.set_xlim(0, 112)
    axes.grid(axis="x", alpha=0.3)
    axes.legend(
        handles=[Patch(color=colour, label=name) for name, _share, colour in kinds],
        fontsize=8,
        loc="upper center",
        bbox_to_anchor=(0.5, -0.12),
        ncol=len(kinds),
    )
    axes.set_title("Equipment up, % of time in service")


CHARTS: tuple[tuple[str, Callable[[Axes, UsageReport], None]], ...] = (
    ("CO2 comfort per room", comfort),
    ("CO2 levels per room", co2_levels),
    ("display on-hours per room", display_hours),
    ("equipment availability per room", availability),
)


def _height(report: UsageReport) -> float:
    return max(2.5, 0.35 * len(report.rooms) + 1.2)


def _png(figure: Figure) -> bytes:
    FigureCanvasAgg(figure)  # attaches itself: savefig draws with Agg
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def report_png(report: UsageReport) -> bytes:
    """All charts on one page, two by two, with the report's title."""
    figure = Figure(figsize=(14, 2 * _height(report) + 0.8), dpi=DPI, layout="constrained")
    figure.suptitle(
        f"{report.site_name or report.site}: usage and health, {report.period.month} "
        f"({report.period.zone.key})",
        fontsize=13,
    )
    grid = figure.subplots(2, 2)
    for axes, (_name, draw) in zip(grid.flat, CHARTS, strict=True):
        draw(axes, report)
    return _png(figure)


def chart_pngs(report: UsageReport) -> list[tuple[str, bytes]]:
    """Each chart on its own, for the HTML page: (description, PNG)."""
    found: list[tuple[str, bytes]] = []
    for name, draw in CHARTS:
        figure = Figure(figsize=(8, _height(report)), dpi=DPI, layout="constrained")
        draw(figure.add_subplot(), report)
        found.append((name, _png(figure)))
    return found
