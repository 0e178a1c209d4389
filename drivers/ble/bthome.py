"""BTHome v2 codec (bthome.io/format, bthome.io/encryption): service data in, named values out,
and back for the simulator and the tests.

Pure and stateless: no I/O, no clock. Dropping duplicate adverts (same `packet_id`) and replay
protection (`last_counter`) are the caller's state. Bytes from a device that break the format raise
BthomeError (a ValueError) naming the byte offset and the object; bad arguments from the caller
(a MAC or key of the wrong length, a value out of range) raise a plain ValueError. `cryptography`
is imported only when an advert is encrypted or encrypting.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from enum import Enum
from typing import TYPE_CHECKING, Final, Literal, NamedTuple

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.ciphers.aead import AESCCM

BTHOME_UUID: Final = "0000fcd2-0000-1000-8000-00805f9b34fb"
UUID16_LE: Final = b"\xd2\xfc"  # 0xFCD2 as it appears on air and in the nonce
VERSION: Final = 2
MIC_SIZE: Final = 4
COUNTER_SIZE: Final = 4

_ENCRYPTED: Final = 0x01
# Bit 1 is "reserved" in the spec; an early v2 draft put the MAC in the payload (bthome-ble too).
_MAC_INCLUDED: Final = 0x02
_TRIGGER_BASED: Final = 0x04

Value = float | int | bool | str


class BthomeError(ValueError):
    """Service data that breaks the BTHome v2 format, or cannot be authenticated."""

    def __init__(
        self, message: str, *, offset: int | None = None, object_id: int | None = None
    ) -> None:
        super().__init__(message)
        self.offset = offset
        self.object_id = object_id


class BthomeReplay(BthomeError):
    """An authentic advert (its MIC is good) whose counter is not above the last one accepted:
    a replay, a repeated advert, or a sensor whose counter restarted (battery change). `advert`
    holds what it carried, for a caller that resynchronises after a restart."""

    def __init__(self, counter: int, last: int, advert: BthomeAdvert) -> None:
        super().__init__(f"replayed advert (counter {counter} ≤ last {last})")
        self.counter = counter
        self.last = last
        self.advert = advert


class Kind(Enum):
    """How an object's bytes become a value."""

    NUMBER = "number"  # little-endian integer times factor
    BINARY = "binary"  # uint8, 0 off / 1 on
    BUTTON = "button"  # uint8 event id -> event name
    DIMMER = "dimmer"  # event id + steps -> signed steps (left negative)
    COMMAND = "command"  # length (low 5 bits = argument bytes), opcode, arguments
    TEXT = "text"  # length-prefixed UTF-8
    RAW = "raw"  # length-prefixed bytes, as hex
    FIRMWARE = "firmware"  # version parts, least significant first -> "4.2.1.0"


class ObjectSpec(NamedTuple):
    """One row of the BTHome object table. `size` 0: length-prefixed (text, raw, command)."""

    name: str
    size: int
    signed: bool
    factor: float
    unit: str


BUTTON_EVENTS: Final[Mapping[int, str]] = {
    0x00: "none",
    0x01: "press",
    0x02: "double_press",
    0x03: "triple_press",
    0x04: "long_press",
    0x05: "long_double_press",
    0x06: "long_triple_press",
    0x80: "hold_press",
    0x81: "hold_release",
}
COMMAND_OPCODES: Final[Mapping[int, str]] = {
    0x00: "off",
    0x01: "on",
    0x02: "toggle",
    0x03: "step_up",
    0x04: "step_down",
}
_DIMMER_LEFT: Final = 0x01
_DIMMER_RIGHT: Final = 0x02

_N, _B = Kind.NUMBER, Kind.BINARY
# id, name, size, signed, factor, unit, kind: bthome.io/format, cross-checked with bthome-ble 3.25.
# Names are point names: one unit per name; an object whose unit differs gets its own name.
_ROWS: Final[tuple[tuple[int, str, int, bool, float, str, Kind], ...]] = (
    (0x00, "packet_id", 1, False, 1, "", _N),
    (0x01, "battery", 1, False, 1, "%", _N),
    (0x02, "temperature", 2, True, 0.01, "°C", _N),
    (0x03, "humidity", 2, False, 0.01, "%", _N),
    (0x04, "pressure", 3, False, 0.01, "hPa", _N),
    (0x05, "illuminance", 3, False, 0.01, "lx", _N),
    (0x06, "mass", 2, False, 0.01, "kg", _N),
    (0x07, "mass_lb", 2, False, 0.01, "lb", _N),
    (0x08, "dewpoint", 2, True, 0.01, "°C", _N),
    (0x09, "count", 1, False, 1, "", _N),
    (0x0A, "energy", 3, False, 0.001, "kWh", _N),
    (0x0B, "power", 3, False, 0.01, "W", _N),
    (0x0C, "voltage", 2, False, 0.001, "V", _N),
    (0x0D, "pm25", 2, False, 1, "µg/m³", _N),
    (0x0E, "pm10", 2, False, 1, "µg/m³", _N),
    (0x0F, "generic", 1, False, 1, "", _B),
    (0x10, "power_on", 1, False, 1, "", _B),
    (0x11, "opening", 1, False, 1, "", _B),
    (0x12, "co2", 2, False, 1, "ppm", _N),
    (0x13, "tvoc", 2, False, 1, "µg/m³", _N),
    (0x14, "moisture", 2, False, 0.01, "%", _N),
    (0x15, "battery_low", 1, False, 1, "", _B),
    (0x16, "battery_charging", 1, False, 1, "", _B),
    (0x17, "carbon_monoxide", 1, False, 1, "", _B),
    (0x18, "cold", 1, False, 1, "", _B),
    (0x19, "connectivity", 1, False, 1, "", _B),
    (0x1A, "door", 1, False, 1, "", _B),
    (0x1B, "garage_door", 1, False, 1, "", _B),
    (0x1C, "gas_detected", 1, False, 1, "", _B),
    (0x1D, "heat", 1, False, 1, "", _B),
    (0x1E, "light", 1, False, 1, "", _B),
    (0x1F, "unlocked", 1, False, 1, "", _B),  # the spec's "lock": 1 means unlocked
    (0x20, "moisture_detected", 1, False, 1, "", _B),
    (0x21, "motion", 1, False, 1, "", _B),
    (0x22, "moving", 1, False, 1, "", _B),
    (0x23, "occupancy", 1, False, 1, "", _B),
    (0x24, "plug", 1, False, 1, "", _B),
    (0x25, "presence", 1, False, 1, "", _B),
    (0x26, "problem", 1, False, 1, "", _B),
    (0x27, "running", 1, False, 1, "", _B),
    (0x28, "safety", 1, False, 1, "", _B),
    (0x29, "smoke", 1, False, 1, "", _B),
    (0x2A, "sound", 1, False, 1, "", _B),
    (0x2B, "tamper", 1, False, 1, "", _B),
    (0x2C, "vibration", 1, False, 1, "", _B),
    (0x2D, "window", 1, False, 1, "", _B),
    (0x2E, "humidity", 1, False, 1, "%", _N),
    (0x2F, "moisture", 1, False, 1, "%", _N),
    (0x3A, "button", 1, False, 1, "", Kind.BUTTON),
    (0x3B, "command", 0, False, 1, "", Kind.COMMAND),
    (0x3C, "dimmer", 2, False, 1, "steps", Kind.DIMMER),
    (0x3D, "count", 2, False, 1, "", _N),
    (0x3E, "count", 4, False, 1, "", _N),
    (0x3F, "rotation", 2, True, 0.1, "°", _N),
    (0x40, "distance_mm", 2, False, 1, "mm", _N),
    (0x41, "distance_m", 2, False, 0.1, "m", _N),
    (0x42, "duration", 3, False, 0.001, "s", _N),
    (0x43, "current", 2, False, 0.001, "A", _N),
    (0x44, "speed", 2, False, 0.01, "m/s", _N),
    (0x45, "temperature", 2, True, 0.1, "°C", _N),
    (0x46, "uv_index", 1, False, 0.1, "", _N),
    (0x47, "volume", 2, False, 0.1, "L", _N),
    (0x48, "volume_ml", 2, False, 1, "mL", _N),
    (0x49, "volume_flow_rate", 2, False, 0.001, "m³/h", _N),
    (0x4A, "voltage", 2, False, 0.1, "V", _N),
    (0x4B, "gas", 3, False, 0.001, "m³", _N),
    (0x4C, "gas", 4, False, 0.001, "m³", _N),
    (0x4D, "energy", 4, False, 0.001, "kWh", _N),
    (0x4E, "volume", 4, False, 0.001, "L", _N),
    (0x4F, "water", 4, False, 0.001, "L", _N),
    (0x50, "timestamp", 4, False, 1, "s", _N),  # seconds since 1970-01-01 UTC
    (0x51, "acceleration", 2, False, 0.001, "m/s²", _N),
    (0x52, "gyroscope", 2, False, 0.001, "°/s", _N),
    (0x53, "text", 0, False, 1, "", Kind.TEXT),
    (0x54, "raw", 0, False, 1, "", Kind.RAW),
    (0x55, "volume_storage", 4, False, 0.001, "L", _N),
    (0x56, "conductivity", 2, False, 1, "µS/cm", _N),
    (0x57, "temperature", 1, True, 1, "°C", _N),
    (0x58, "temperature", 1, True, 0.35, "°C", _N),
    (0x59, "count", 1, True, 1, "", _N),
    (0x5A, "count", 2, True, 1, "", _N),
    (0x5B, "count", 4, True, 1, "", _N),
    (0x5C, "power", 4, True, 0.01, "W", _N),
    (0x5D, "current", 2, True, 0.001, "A", _N),
    (0x5E, "direction", 2, False, 0.01, "°", _N),
    (0x5F, "precipitation", 2, False, 0.1, "mm", _N),  # factor 0.1 since bthome.io PR #58
    (0x60, "channel", 1, False, 1, "", _N),
    (0x61, "rotational_speed", 2, False, 1, "rpm", _N),
    (0x62, "speed", 4, True, 0.000001, "m/s", _N),
    (0x63, "acceleration", 4, True, 0.000001, "m/s²", _N),
    (0x64, "light_level", 1, False, 1, "", _N),
    (0x65, "settings_revision", 1, False, 1, "", _N),
    (0xF0, "device_type_id", 2, False, 1, "", _N),
    (0xF1, "firmware_version", 4, False, 1, "", Kind.FIRMWARE),
    (0xF2, "firmware_version", 3, False, 1, "", Kind.FIRMWARE),
)

OBJECTS: Final[Mapping[int, ObjectSpec]] = {
    oid: ObjectSpec(name, size, signed, factor, unit)
    for oid, name, size, signed, factor, unit, _ in _ROWS
}
KINDS: Final[Mapping[int, Kind]] = {row[0]: row[6] for row in _ROWS}
PACKET_ID: Final = 0x00
# Point names a profile may use (`source: temperature`); repeats in one advert add _2, _3…
OBJECT_NAMES: Final[frozenset[str]] = frozenset(
    s.name for i, s in OBJECTS.items() if i != PACKET_ID
)
# Object ids by name, in the order encode() prefers them (the table's order).
IDS_BY_NAME: Final[Mapping[str, tuple[int, ...]]] = {
    name: tuple(i for i, s in OBJECTS.items() if s.name == name) for name in OBJECT_NAMES
}


def _decimals(factor: float) -> int:
    return max(0, -int(Decimal(str(factor)).normalize().as_tuple().exponent))


_DECIMALS: Final[Mapping[int, int]] = {oid: _decimals(s.factor) for oid, s in OBJECTS.items()}


def value_type(name: str) -> Literal["float", "int", "bool", "string"]:
    """The type of the values an object name gives (a point's `type`); KeyError if unknown."""
    kinds = {KINDS[i] for i in IDS_BY_NAME[name]}
    if kinds == {Kind.BINARY}:
        return "bool"
    if kinds == {Kind.NUMBER}:
        return "int" if all(OBJECTS[i].factor == 1 for i in IDS_BY_NAME[name]) else "float"
    return "int" if kinds == {Kind.DIMMER} else "string"


def unit(name: str) -> str:
    """The unit of an object name ("" for none); KeyError if unknown."""
    return OBJECTS[IDS_BY_NAME[name][0]].unit


@dataclass(frozen=True, slots=True)
class BthomeAdvert:
    version: int
    encrypted: bool
    trigger_based: bool
    packet_id: int | None  # object 0x00, for dropping repeated adverts
    counter: int | None  # encryption counter of an encrypted advert
    values: tuple[tuple[str, Value], ...]  # (name, value) in advert order
    unknown_ids: tuple[int, ...]  # an object id the codec does not know: decoding stopped there

    def as_dict(self) -> dict[str, Value]:
        return dict(self.values)


# --- decoding -------------------------------------------------------------------------------------


def decode(
    service_data: bytes,
    mac: bytes | str,
    bind_key: bytes | str | None = None,
    last_counter: int | None = None,
) -> BthomeAdvert:
    """Decode the service data of UUID 0xFCD2 (device-information byte first) from the sensor
    with address `mac`. With `bind_key`, only encrypted adverts are accepted; with `last_counter`,
    an encrypted advert must carry a higher counter (BthomeReplay otherwise)."""
    mac_bytes = mac_to_bytes(mac)
    key = _key_bytes(bind_key)
    data = bytes(service_data)
    if not data:
        raise BthomeError("empty service data: no device-information byte", offset=0)
    info = data[0]
    version = info >> 5
    if version != VERSION:
        raise BthomeError(f"BTHome version {version} not supported", offset=0)
    start = 1
    if info & _MAC_INCLUDED:
        if len(data) < 7:
            raise BthomeError(
                f"advert announces a MAC but has {len(data) - 1} bytes after byte 0", offset=1
            )
        mac_bytes = data[1:7][::-1]
        start = 7
    encrypted = bool(info & _ENCRYPTED)
    counter: int | None = None
    if encrypted:
        if key is None:
            raise BthomeError("encrypted advert but no bind_key configured", offset=0)
        end = len(data) - COUNTER_SIZE - MIC_SIZE
        if end < start:
            raise BthomeError(
                f"encrypted advert of {len(data)} bytes is too short for its counter and MIC "
                f"(needs at least {start + COUNTER_SIZE + MIC_SIZE})",
                offset=len(data),
            )
        counter_bytes = data[end : end + COUNTER_SIZE]
        counter = int.from_bytes(counter_bytes, "little")
        nonce = mac_bytes + UUID16_LE + bytes([info]) + counter_bytes
        mic_at = end + COUNTER_SIZE
        payload = _decrypt(key, nonce, data[start:end], data[mic_at:], mic_at)
    else:
        if key is not None:
            raise BthomeError(
                "unencrypted advert but a bind_key is configured (spoofed sensor, or it lost "
                "its encryption setting)",
                offset=0,
            )
        payload = data[start:]
    values, packet_id, unknown = _objects(payload, start)
    advert = BthomeAdvert(
        version=version,
        encrypted=encrypted,
        trigger_based=bool(info & _TRIGGER_BASED),
        packet_id=packet_id,
        counter=counter,
        values=values,
        unknown_ids=unknown,
    )
    if counter is not None and last_counter is not None and counter <= last_counter:
        raise BthomeReplay(counter, last_counter, advert)
    return advert


def _objects(
    payload: bytes, base: int
) -> tuple[tuple[tuple[str, Value], ...], int | None, tuple[int, ...]]:
    """The objects of a (decrypted) payload; `base` is its offset in the service data."""
    values: list[tuple[str, Value]] = []
    seen: dict[str, int] = {}
    packet_id: int | None = None
    pos = 0
    end = len(payload)
    while pos < end:
        oid = payload[pos]
        spec = OBJECTS.get(oid)
        if spec is None:
            return tuple(values), packet_id, (oid,)
        kind = KINDS[oid]
        data_start = pos + 1
        size = spec.size
        if size == 0:
            if data_start >= end:
                raise _truncated(oid, base + pos, "a length byte", 0)
            size = payload[data_start]
            if kind is Kind.COMMAND:
                size = 1 + (size & 0x1F)  # opcode + arguments
            data_start += 1
        data_end = data_start + size
        if data_end > end:
            raise _truncated(oid, base + pos, f"{size} bytes", end - data_start)
        raw = payload[data_start:data_end]
        pos = data_end
        if oid == PACKET_ID:
            if packet_id is None:
                packet_id = raw[0]
            continue
        count = seen.get(spec.name, 0) + 1
        seen[spec.name] = count
        name = spec.name if count == 1 else f"{spec.name}_{count}"
        values.append((name, _value(oid, spec, kind, raw)))
    return tuple(values), packet_id, ()


def _truncated(oid: int, offset: int, needed: str, left: int) -> BthomeError:
    return BthomeError(
        f"object 0x{oid:02x} ({OBJECTS[oid].name}) at offset {offset} needs {needed}, "
        f"{left} left: truncated advert",
        offset=offset,
        object_id=oid,
    )


def _value(oid: int, spec: ObjectSpec, kind: Kind, raw: bytes) -> Value:
    if kind is Kind.NUMBER:
        number = int.from_bytes(raw, "little", signed=spec.signed)
        if spec.factor == 1:
            return number
        return round(number * spec.factor, _DECIMALS[oid])
    if kind is Kind.BINARY:
        return raw[0] != 0
    if kind is Kind.BUTTON:
        return BUTTON_EVENTS.get(raw[0], f"event_0x{raw[0]:02x}")
    if kind is Kind.DIMMER:
        event, steps = raw[0], raw[1]
        return -steps if event == _DIMMER_LEFT else steps if event == _DIMMER_RIGHT else 0
    if kind is Kind.COMMAND:
        word = COMMAND_OPCODES.get(raw[0], f"opcode_0x{raw[0]:02x}")
        return f"{word}:{raw[1:].hex()}" if len(raw) > 1 else word
    if kind is Kind.TEXT:
        return raw.decode("utf-8", errors="replace")
    if kind is Kind.RAW:
        return raw.hex()
    return ".".join(str(part) for part in reversed(raw))  # FIRMWARE


# --- encoding -------------------------------------------------------------------------------------


def encode(
    values: Sequence[tuple[str | int, Value | bytes]],
    *,
    packet_id: int | None = None,
    trigger_based: bool = False,
    mac: bytes | str | None = None,
    bind_key: bytes | str | None = None,
    counter: int | None = None,
) -> bytes:
    """Service data (device-information byte first) carrying `values`, objects in increasing id
    order as the spec asks. A value is named by object name (`temperature`, `temperature_2`: the
    object of that name that represents it best is chosen) or by object id (0x45). With
    `bind_key`, the advert is encrypted for the sensor `mac` with `counter`."""
    objects: list[tuple[int, bytes]] = []
    if packet_id is not None:
        objects.append((PACKET_ID, bytes([PACKET_ID]) + _encode_number(PACKET_ID, packet_id)[0]))
    for name_or_id, value in values:
        objects.append(_encode_object(name_or_id, value))
    objects.sort(key=lambda item: item[0])  # stable: repeats keep their order
    payload = b"".join(body for _, body in objects)
    info = (VERSION << 5) | (_TRIGGER_BASED if trigger_based else 0)
    key = _key_bytes(bind_key)
    if key is None:
        if counter is not None:
            raise ValueError("a counter is only sent in encrypted adverts: give bind_key")
        return bytes([info]) + payload
    if mac is None or counter is None:
        raise ValueError("an encrypted advert needs the sensor's mac and a counter")
    if not 0 <= counter <= 0xFFFFFFFF:
        raise ValueError(f"counter {counter} is not a 32-bit unsigned integer")
    info |= _ENCRYPTED
    counter_bytes = counter.to_bytes(COUNTER_SIZE, "little")
    nonce = mac_to_bytes(mac) + UUID16_LE + bytes([info]) + counter_bytes
    sealed = _cipher(key).encrypt(nonce, payload, None)
    return bytes([info]) + sealed[:-MIC_SIZE] + counter_bytes + sealed[-MIC_SIZE:]


_SUFFIX = re.compile(r"_(\d+)$")


def _candidates(name_or_id: str | int) -> tuple[int, ...]:
    if isinstance(name_or_id, int):
        if name_or_id not in OBJECTS or name_or_id == PACKET_ID:
            raise ValueError(f"no BTHome object 0x{name_or_id:02x} to encode")
        return (name_or_id,)
    ids = IDS_BY_NAME.get(name_or_id)
    if ids is None:
        base = _SUFFIX.sub("", name_or_id)
        ids = IDS_BY_NAME.get(base) if base != name_or_id else None
    if ids is None:
        hint = " (use packet_id=)" if name_or_id == "packet_id" else ""
        raise ValueError(f"no BTHome object named {name_or_id!r}{hint}")
    return ids


def _encode_object(name_or_id: str | int, value: Value | bytes) -> tuple[int, bytes]:
    """(object id, id + body) of the candidate object that represents `value` most closely."""
    best: tuple[float, int, bytes] | None = None
    first_error: ValueError | None = None
    for oid in _candidates(name_or_id):
        try:
            if KINDS[oid] is Kind.NUMBER:
                body, error = _encode_number(oid, value)
            else:
                body, error = _encode_other(oid, value), 0.0
        except ValueError as exc:
            first_error = first_error or exc
            continue
        if best is None or error < best[0]:
            best = (error, oid, body)
    if best is None:
        assert first_error is not None
        raise first_error
    return best[1], bytes([best[1]]) + best[2]


def _limits(spec: ObjectSpec) -> tuple[int, int]:
    bits = 8 * spec.size
    if spec.signed:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def _encode_number(oid: int, value: Value | bytes) -> tuple[bytes, float]:
    spec = OBJECTS[oid]
    what = f"{spec.name} (object 0x{oid:02x})"
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{what} takes a number, not {value!r:.40}")
    if not math.isfinite(value):
        raise ValueError(f"{what} cannot carry {value}")
    raw = round(value / spec.factor)
    low, high = _limits(spec)
    if not low <= raw <= high:
        scale = _DECIMALS[oid]
        raise ValueError(
            f"{value} is out of range for {what}: "
            f"{round(low * spec.factor, scale)} to {round(high * spec.factor, scale)}"
        )
    error = round(abs(round(raw * spec.factor, _DECIMALS[oid]) - value), 9)
    return raw.to_bytes(spec.size, "little", signed=spec.signed), error


def _encode_other(oid: int, value: Value | bytes) -> bytes:
    spec = OBJECTS[oid]
    kind = KINDS[oid]
    what = f"{spec.name} (object 0x{oid:02x})"
    if kind is Kind.BINARY:
        if value not in (0, 1) or isinstance(value, float):
            raise ValueError(f"{what} takes true or false, not {value!r:.40}")
        return bytes([int(value)])
    if kind is Kind.BUTTON:
        events = {word: code for code, word in BUTTON_EVENTS.items()}
        if isinstance(value, str) and value in events:
            return bytes([events[value]])
        raise ValueError(f"{what} takes one of {', '.join(events)}, not {value!r:.40}")
    if kind is Kind.DIMMER:
        if isinstance(value, bool) or not isinstance(value, int) or not -255 <= value <= 255:
            raise ValueError(f"{what} takes steps from -255 (left) to 255 (right), not {value!r}")
        event = _DIMMER_LEFT if value < 0 else _DIMMER_RIGHT if value > 0 else 0
        return bytes([event, abs(value)])
    if kind is Kind.COMMAND:
        return _encode_command(what, value)
    if kind in (Kind.TEXT, Kind.RAW):
        body = _text_or_raw(what, kind, value)
        if len(body) > 255:
            raise ValueError(f"{what} carries at most 255 bytes, not {len(body)}")
        return bytes([len(body)]) + body
    # FIRMWARE: "4.2.1.0" (0xF1) or "6.1.0" (0xF2)
    parts = str(value).split(".")
    if len(parts) != spec.size or not all(p.isdigit() and int(p) < 256 for p in parts):
        raise ValueError(f"{what} takes {spec.size} numbers 0-255 joined by dots, not {value!r}")
    return bytes(int(p) for p in reversed(parts))


def _encode_command(what: str, value: Value | bytes) -> bytes:
    word, _, args_hex = str(value).partition(":")
    opcodes = {name: code for code, name in COMMAND_OPCODES.items()}
    if word in opcodes:
        opcode = opcodes[word]
    elif word.startswith("opcode_0x"):
        opcode = int(word[9:], 16)
    else:
        raise ValueError(f"{what} takes one of {', '.join(opcodes)}[:hex arguments]")
    args = bytes.fromhex(args_hex)
    if len(args) > 0x1F:
        raise ValueError(f"{what} carries at most 31 argument bytes, not {len(args)}")
    return bytes([len(args), opcode]) + args


def _text_or_raw(what: str, kind: Kind, value: Value | bytes) -> bytes:
    if kind is Kind.TEXT:
        if not isinstance(value, str):
            raise ValueError(f"{what} takes text, not {value!r:.40}")
        return value.encode("utf-8")
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return bytes.fromhex(value)
    raise ValueError(f"{what} takes bytes or hex digits, not {value!r:.40}")


# --- addresses, keys, AES-CCM ---------------------------------------------------------------------

_MAC_TEXT = re.compile(r"^[0-9A-Fa-f]{2}([:-]?)[0-9A-Fa-f]{2}(\1[0-9A-Fa-f]{2}){4}$")


def mac_to_bytes(mac: bytes | str) -> bytes:
    """The 6 bytes of an address written AA:BB:CC:DD:EE:FF (or with - or nothing between), in the
    order written, as the nonce wants them."""
    if isinstance(mac, bytes | bytearray):
        if len(mac) != 6:
            raise ValueError(f"a MAC address has 6 bytes, not {len(mac)}")
        return bytes(mac)
    if not _MAC_TEXT.match(mac):
        raise ValueError(f"{mac!r} is not a MAC address like AA:BB:CC:DD:EE:FF")
    return bytes.fromhex(mac.replace(":", "").replace("-", ""))


def _key_bytes(bind_key: bytes | str | None) -> bytes | None:
    if bind_key is None:
        return None
    if isinstance(bind_key, str):
        try:
            bind_key = bytes.fromhex(bind_key)
        except ValueError:
            raise ValueError("a bind key is 32 hex digits") from None
    if len(bind_key) != 16:
        raise ValueError(f"a bind key has 16 bytes (32 hex digits), not {len(bind_key)}")
    return bytes(bind_key)


@functools.lru_cache(maxsize=64)
def _cipher(key: bytes) -> AESCCM:
    from cryptography.hazmat.primitives.ciphers.aead import AESCCM

    return AESCCM(key, tag_length=MIC_SIZE)


def _decrypt(key: bytes, nonce: bytes, ciphertext: bytes, mic: bytes, mic_at: int) -> bytes:
    from cryptography.exceptions import InvalidTag

    try:
        return _cipher(key).decrypt(nonce, ciphertext + mic, None)
    except InvalidTag:
        raise BthomeError("MIC check failed (wrong bind key?)", offset=mic_at) from None
