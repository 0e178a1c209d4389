"""The sink's schema: which measurement and tags a device's points get (documented, stable).

Rules: measurement = the device's kind (sensor, meter, display, board, camera), `device` when the
kind is unknown; tags building, device, gateway, profile, room, site. Kind, profile and room come
from the registry when the device is registered there, else from what its gateway reported (kind,
profile) and where the gateway is registered (room, building); a room decides its building. A tag
with no value is left out. Series are cached per gateway: dropped when that gateway reports its
devices again, and all of them when another process changed the database (the registry CLI).
"""

from __future__ import annotations

import sqlite3
from typing import Final

from drivers.profiles import DeviceKind
from fleet.influx.protocol import series

UNKNOWN_KIND: Final = "device"
MEASUREMENTS: Final = (*(kind.value for kind in DeviceKind), UNKNOWN_KIND)
TAGS: Final = ("building", "device", "gateway", "profile", "room", "site")  # as written: sorted

_LOOKUP = (
    "SELECT coalesce(d.kind, o.kind), coalesce(d.profile, o.profile), coalesce(d.room, g.room), "
    "coalesce(r.building, g.building) "
    "FROM (SELECT ? AS site, ? AS gateway, ? AS device) AS k "
    "LEFT JOIN registry_devices d ON d.site = k.site AND d.device = k.device "
    "LEFT JOIN devices o ON o.site = k.site AND o.gateway = k.gateway AND o.device = k.device "
    "LEFT JOIN registry_gateways g ON g.site = k.site AND g.gateway = k.gateway "
    "LEFT JOIN rooms r ON r.site = k.site AND r.room = coalesce(d.room, g.room)"
)


def measurement_of(kind: str | None) -> str:
    return kind if kind in MEASUREMENTS and kind != UNKNOWN_KIND else UNKNOWN_KIND


class Schema:
    """Series keys (`measurement,tags`) of devices, looked up in the fleet database."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self._cache: dict[tuple[str, str], dict[str, str]] = {}
        self._data_version = self._version()

    def _version(self) -> int:
        return int(self.conn.execute("PRAGMA data_version").fetchone()[0])

    def for_gateway(self, site: str, gateway: str) -> dict[str, str]:
        """Device → series key of one gateway's devices (filled as devices are asked for)."""
        version = self._version()
        if version != self._data_version:  # another connection committed: maybe the registry
            self._data_version = version
            self._cache.clear()
        return self._cache.setdefault((site, gateway), {})

    def series_of(self, site: str, gateway: str, device: str) -> str:
        kind, profile, room, building = self.conn.execute(
            _LOOKUP, (site, gateway, device)
        ).fetchone()
        tags = {
            "site": site,
            "building": building,
            "room": room,
            "gateway": gateway,
            "device": device,
            "profile": profile,
        }
        return series(measurement_of(kind), tags.items())

    def forget(self, site: str, gateway: str) -> None:
        """The gateway reported its devices (kind, profile): look them up again."""
        self._cache.pop((site, gateway), None)
