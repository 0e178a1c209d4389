"""Synthetic device profiles for the Modbus benchmarks (written to a temporary folder)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


def poll_profile(points: int = 20) -> dict[str, Any]:
    """`points` uint16 values two registers apart: one request coalesced, `points` without."""
    return {
        "vendor": "Bench",
        "model": f"P{points}",
        "protocol": "modbus",
        "kind": "sensor",
        "source": "synthetic, for benchmarks",
        "points": [
            {"name": f"value_{i:02d}", "table": "holding", "address": 2 * i, "min": 0, "max": 65535}
            for i in range(points)
        ],
    }


def e2e_profile(points: int = 100) -> dict[str, Any]:
    """`points - 1` uint16 values, then `wall_clock_ms` (uint64): `points` readings, one request
    per poll."""
    values = [
        {"name": f"value_{i:03d}", "table": "holding", "address": i} for i in range(points - 1)
    ]
    clock = {
        "name": "wall_clock_ms",
        "table": "holding",
        "address": points - 1,
        "type": "uint64",
        "unit": "ms",
    }
    return {
        "vendor": "Bench",
        "model": f"E{points}",
        "protocol": "modbus",
        "kind": "sensor",
        "source": "synthetic, for benchmarks",
        "points": [*values, clock],
    }


def write_profiles(folder: Path, profiles: dict[str, dict[str, Any]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, profile in profiles.items():
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(profile, sort_keys=False))
    return folder
