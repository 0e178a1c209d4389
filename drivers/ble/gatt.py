"""GATT characteristic values of the Environmental Sensing and Battery services: bytes in,
numbers out, and back (for the simulator and the tests). Pure: no bleak, no I/O.

Formats and "value is not known" markers follow the Bluetooth GATT Specification Supplement
(little-endian; value = raw × 10^exponent). A characteristic is named by its 16-bit UUID in
lower-case hex ("2a6e"); `short_uuid` also accepts the full Bluetooth base UUID form.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

BASE_UUID_SUFFIX = "-0000-1000-8000-00805f9b34fb"
_SHORT = re.compile(r"^(0x)?([0-9a-f]{4})$")
_FULL = re.compile(r"^0000([0-9a-f]{4})" + re.escape(BASE_UUID_SUFFIX) + "$")
_ANY_FULL = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


class GattDecodeError(ValueError):
    """The bytes read from a characteristic are not a value of its format."""


@dataclass(frozen=True, slots=True)
class Characteristic:
    uuid: str
    name: str
    kind: str  # struct code, little-endian ("<h")
    exponent: int  # value = raw × 10^exponent
    unit: str
    unknown: tuple[int, ...] = ()  # raw values meaning "value is not known"
    valid: tuple[float, float] | None = None  # the range the specification allows

    @property
    def size(self) -> int:
        return struct.calcsize(self.kind)


CHARACTERISTICS: dict[str, Characteristic] = {
    c.uuid: c
    for c in (
        Characteristic("2a19", "battery_level", "<B", 0, "%", valid=(0, 100)),
        Characteristic("2a6d", "pressure", "<I", -1, "Pa"),
        Characteristic("2a6e", "temperature", "<h", -2, "degC", (-0x8000,), (-273.15, 327.67)),
        Characteristic("2a6f", "humidity", "<H", -2, "%RH", (0xFFFF,), (0, 100)),
        Characteristic("2a76", "uv_index", "<B", 0, ""),
        Characteristic("2a7b", "dew_point", "<b", 0, "degC"),
        Characteristic("2b8c", "co2_concentration", "<H", 0, "ppm", (0xFFFF,)),
        Characteristic("2be7", "voc_concentration", "<H", 0, "ppb", (0xFFFF,)),
    )
}


def short_uuid(uuid: str) -> str | None:
    """The 16-bit form of "2a6e", "0x2A6E" or "00002a6e-0000-1000-8000-00805f9b34fb" ("2a6e");
    None for a UUID outside the Bluetooth base range (a vendor's 128-bit UUID)."""
    text = uuid.strip().lower()
    if match := _SHORT.match(text):
        return match.group(2)
    if match := _FULL.match(text):
        return match.group(1)
    return None


def full_uuid(uuid: str) -> str:
    """The 128-bit form bleak reports ("2a6e" -> "00002a6e-0000-1000-8000-00805f9b34fb")."""
    short = short_uuid(uuid)
    if short is not None:
        return f"0000{short}{BASE_UUID_SUFFIX}"
    text = uuid.strip().lower()
    if not _ANY_FULL.match(text):
        raise ValueError(f"{uuid!r} is not a Bluetooth UUID (e.g. 2a6e or a 128-bit UUID)")
    return text


def characteristic(uuid: str) -> Characteristic:
    short = short_uuid(uuid)
    if short is None or short not in CHARACTERISTICS:
        known = ", ".join(f"{c.uuid} ({c.name})" for c in CHARACTERISTICS.values())
        raise KeyError(f"no decoder for characteristic {uuid} (known: {known})")
    return CHARACTERISTICS[short]


def decode(uuid: str, data: bytes) -> float | int | None:
    """The value of characteristic `uuid` read as `data`; None when the device says "value is
    not known". GattDecodeError for data of the wrong length or a value outside the format."""
    spec = characteristic(uuid)
    if len(data) != spec.size:
        raise GattDecodeError(
            f"characteristic {spec.uuid} ({spec.name}) is {spec.size} bytes, got {len(data)}: "
            f"{bytes(data).hex()}"
        )
    (raw,) = struct.unpack(spec.kind, data)
    if raw in spec.unknown:
        return None
    value: float | int = int(raw) if spec.exponent == 0 else round(raw * 10.0**spec.exponent, 2)
    if spec.valid is not None and not spec.valid[0] <= value <= spec.valid[1]:
        raise GattDecodeError(
            f"characteristic {spec.uuid} ({spec.name}) reads {value} {spec.unit}, outside "
            f"{spec.valid[0]}..{spec.valid[1]}"
        )
    return value


def encode(uuid: str, value: float | int | None) -> bytes:
    """The bytes a device sends for `value` (None: "value is not known")."""
    spec = characteristic(uuid)
    if value is None:
        if not spec.unknown:
            raise ValueError(f"characteristic {spec.uuid} has no 'not known' value")
        return struct.pack(spec.kind, spec.unknown[0])
    raw = round(value / 10.0**spec.exponent)
    try:
        return struct.pack(spec.kind, raw)
    except struct.error:
        raise ValueError(f"{value} does not fit characteristic {spec.uuid} ({spec.name})") from None
