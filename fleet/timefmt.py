"""Time as people and scripts read it: ISO 8601 UTC for JSON, short local forms for tables."""

from __future__ import annotations

import re
from datetime import UTC, datetime

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhdw])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}


def iso(ts_ns: int | None) -> str | None:
    if ts_ns is None:
        return None
    moment = datetime.fromtimestamp(ts_ns / 1e9, tz=UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def ago(ts_ns: int | None, now_ns: int) -> str:
    if ts_ns is None:
        return "never"
    seconds = max(0, (now_ns - ts_ns) // 1_000_000_000)
    if seconds < 120:
        return f"{seconds}s ago"
    if seconds < 7200:
        return f"{seconds // 60}m ago"
    if seconds < 172_800:
        return f"{seconds // 3600}h ago"
    return f"{seconds // 86_400}d ago"


def parse_since(text: str, now_ns: int) -> int:
    """'90s', '15m', '2h', '1d', '1w' before now, or an ISO 8601 time (UTC if no zone)."""
    if match := _DURATION.match(text.strip()):
        return now_ns - int(float(match[1]) * _UNIT_S[match[2]] * 1e9)
    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(
            f"{text!r} is neither a duration (30s, 15m, 2h, 1d, 1w) nor an ISO 8601 time"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1e9)
