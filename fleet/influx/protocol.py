"""InfluxDB line protocol, pure: readings in, lines out (no I/O, no clock).

Rules: one field per line, `series field=value ts_ns`, the series being the measurement and its
tags sorted by key (empty tags left out). Escaping follows the line protocol reference:
measurements escape comma and space; tag keys, tag values and field keys escape comma, equals and
space; string values escape double quote and backslash. Beyond the reference, so that no parser
(InfluxDB 1.x/2.x, VictoriaMetrics, Telegraf) can read one line as two: a backslash in a name is
doubled, and newline and carriage return anywhere become the two characters `\\n` and `\\r`.
Floats keep their shortest round-trip form (`repr`), integers get the `i` suffix, booleans are
`true`/`false`; a non-finite float has no line protocol form and is left out (counted by the
caller).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

from wire.models import Reading

_NEWLINES = {"\n": "\\n", "\r": "\\r"}
_MEASUREMENT = str.maketrans({",": "\\,", " ": "\\ ", "\\": "\\\\", **_NEWLINES})
_NAME = str.maketrans({",": "\\,", "=": "\\=", " ": "\\ ", "\\": "\\\\", **_NEWLINES})
_STRING = str.maketrans({'"': '\\"', "\\": "\\\\", **_NEWLINES})
_PLAIN = frozenset("abcdefghijklmnopqrstuvwxyz0123456789_.-")


def escape_measurement(name: str) -> str:
    return name.translate(_MEASUREMENT)


def escape_name(name: str) -> str:
    """A tag key, tag value or field key."""
    return name if _PLAIN.issuperset(name) else name.translate(_NAME)


def string_value(text: str) -> str:
    return f'"{text.translate(_STRING)}"'


def field_value(value: bool | int | float | str, integers_as_float: bool = False) -> str | None:
    """The value as line protocol writes it; None for NaN and infinities."""
    kind = type(value)
    if kind is float:
        return repr(value) if math.isfinite(value) else None  # type: ignore[arg-type]
    if kind is bool:
        return "true" if value else "false"
    if kind is int:
        return f"{float(value)!r}" if integers_as_float else f"{value}i"
    return string_value(str(value))


def series(measurement: str, tags: Iterable[tuple[str, str | None]]) -> str:
    """`measurement,k1=v1,k2=v2`, tags sorted by key; tags with no value are left out."""
    parts = [escape_measurement(measurement)]
    parts += [f"{escape_name(k)}={escape_name(v)}" for k, v in sorted(tags) if v]
    return ",".join(parts)


def line(series_key: str, field: str, value: bool | int | float | str, ts_ns: int) -> str | None:
    """One point; None when the value cannot be written (see `field_value`)."""
    text = field_value(value)
    return None if text is None else f"{series_key} {escape_name(field)}={text} {ts_ns}"


def encode_readings(
    readings: Sequence[Reading],
    series_of: Callable[[str], str],
    integers_as_float: bool = False,
) -> tuple[list[str], int]:
    """Lines for the readings, in their order, and how many were left out (non-finite floats).

    The hot path: `series_of` is called once per device and point name of the batch."""
    lines: list[str] = []
    append = lines.append
    heads: dict[tuple[str, str], str] = {}
    isfinite = math.isfinite
    skipped = 0
    for _seq, ts, device, point, value, _quality in readings:
        head = heads.get((device, point))
        if head is None:
            head = heads[(device, point)] = f"{series_of(device)} {escape_name(point)}="
        kind = type(value)
        if kind is float:
            if not isfinite(value):  # type: ignore[arg-type]
                skipped += 1
                continue
            append(f"{head}{value!r} {ts}")
        elif kind is int:
            append(f"{head}{float(value)!r} {ts}" if integers_as_float else f"{head}{value}i {ts}")
        elif kind is bool:
            append(f"{head}{'true' if value else 'false'} {ts}")
        else:
            append(f"{head}{string_value(str(value))} {ts}")
    return lines, skipped
