"""The BLE part of a firmware profile: BTHome advert objects or GATT characteristics as points.

`mode: bthome` — the sensor broadcasts BTHome v2 adverts; a point's `source` is a BTHome object
name (`temperature`, `humidity`, `co2`…; a second object of the same name is `temperature_2`),
or `rssi` / `last_seen_s` (the radio). The device is down when no advert was heard for
`offline_after` × `advert_interval_s`.
`mode: gatt` — the gateway connects on each poll and reads characteristics; a point's `source`
is a characteristic UUID that `drivers/ble/gatt.py` decodes ("2a6e" or its 128-bit form).
Neither has a per-point `poll_interval_s`: it is refused.
Imports neither bleak nor cryptography: profiles load on gateways without BLE devices too.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from drivers.ble import bthome, gatt
from drivers.profile_base import CommandBase, Point, ProfileBase, ValueType

RADIO_SOURCES = ("rssi", "last_seen_s")
_REPEAT = re.compile(r"^(?P<name>[a-z0-9_]+?)_(?P<n>[2-9])$")


def bthome_object(source: str) -> str | None:
    """The BTHome object name behind `source` ("temperature_2" -> "temperature"), or None."""
    if source in bthome.OBJECT_NAMES:
        return source
    match = _REPEAT.match(source)
    if match and match["name"] in bthome.OBJECT_NAMES:
        return match["name"]
    return None


class BlePoint(Point):
    """A value from a BTHome object (`source: temperature`), a GATT characteristic
    (`source: 2a6e`), or the radio itself (`source: rssi`, `source: last_seen_s`)."""

    source: str

    @field_validator("source")
    @classmethod
    def _normalised(cls, source: str) -> str:
        text = source.strip().lower()
        short = gatt.short_uuid(text)
        return short if short is not None else text

    @model_validator(mode="after")
    def _no_poll_interval(self) -> BlePoint:
        if self.poll_interval_s is not None:
            raise ValueError(
                "BTHome sensors are push devices, they report when they advertise, and a GATT "
                "sensor is read whole at each poll: poll_interval_s does not apply to BLE "
                "points (remove it; the device's interval_s sets how often they are recorded)"
            )
        return self


class BleProfile(ProfileBase):
    protocol: Literal["ble"]
    mode: Literal["bthome", "gatt"]
    advert_interval_s: Annotated[float, Field(gt=0, le=86_400)] = Field(
        60.0, description="how often the sensor advertises (bthome); a device may override it"
    )
    offline_after: Annotated[int, Field(ge=1, le=1000)] = Field(
        3, description="adverts missed in a row before the device is reported down (bthome)"
    )
    points: Annotated[list[BlePoint], Field(min_length=1)]
    commands: list[CommandBase] = Field(default_factory=list)

    @model_validator(mode="after")
    def _sources(self) -> BleProfile:
        if self.commands:
            raise ValueError("BLE sensors take no commands: remove 'commands'")
        for index, point in enumerate(self.points):
            where = f"points.{index} ({point.name})"
            if self.mode == "gatt":
                _check_gatt(point, where)
            else:
                _check_bthome(point, where)
        return self

    @property
    def offline_window_s(self) -> float:
        return self.advert_interval_s * self.offline_after


def _check_gatt(point: BlePoint, where: str) -> None:
    try:
        spec = gatt.characteristic(point.source)
    except KeyError as exc:
        raise ValueError(f"{where}: {exc.args[0]}") from None
    if not point.type.numeric:
        raise ValueError(f"{where}: characteristic {spec.uuid} ({spec.name}) is a number")


def _check_bthome(point: BlePoint, where: str) -> None:
    if point.source == "rssi":
        if point.type is not ValueType.INT:
            raise ValueError(f"{where}: rssi is an int (dBm)")
        return
    if point.source == "last_seen_s":
        if not point.type.numeric:
            raise ValueError(f"{where}: last_seen_s is a number of seconds")
        return
    name = bthome_object(point.source)
    if name is None:
        raise ValueError(
            f"{where}: {point.source!r} is not a BTHome object name (e.g. temperature, "
            f"humidity, co2, battery, pm25; temperature_2 for a second one) nor "
            f"{' / '.join(RADIO_SOURCES)}"
        )
    if bthome.value_type(name) == "string" and point.type is not ValueType.STRING:
        raise ValueError(f"{where}: BTHome object {name!r} is text: use type: string")
