"""The BLE part of a firmware profile: BTHome advert objects or GATT characteristics as points."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from drivers.profile_base import CommandBase, Point, ProfileBase


class BlePoint(Point):
    """A value from a BTHome object (`object: temperature`) or a GATT characteristic
    (`characteristic: 2a6e`), or the radio itself (`source: rssi`)."""

    source: str


class BleProfile(ProfileBase):
    protocol: Literal["ble"]
    mode: Literal["bthome", "gatt"]
    points: Annotated[list[BlePoint], Field(min_length=1)]
    commands: list[CommandBase] = Field(default_factory=list)
