"""The camera part of a firmware profile: health only (ONVIF device information and clock, an
RTSP probe of the stream, the firmware against a known-good range), never video or images.

Each point names its `source`; the sources and the value type each one gives are a fixed table
here, so an unknown source or a wrong type fails when the profile is loaded.
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Annotated, Final, Literal

from pydantic import Field, model_validator

from drivers.profile_base import CommandBase, Point, ProfileBase, ValueType


class Source(StrEnum):
    ONVIF_OK = "onvif.ok"
    ONVIF_RESPONSE_MS = "onvif.response_ms"
    MANUFACTURER = "onvif.manufacturer"
    MODEL = "onvif.model"
    FIRMWARE = "onvif.firmware"
    SERIAL = "onvif.serial"
    HARDWARE_ID = "onvif.hardware_id"
    CLOCK_DRIFT_S = "onvif.clock_drift_s"
    DATE_TIME_TYPE = "onvif.date_time_type"
    FIRMWARE_OUTDATED = "firmware.outdated"
    FIRMWARE_KNOWN_GOOD = "firmware.known_good"
    RTSP_OK = "rtsp.ok"
    RTSP_RESPONSE_MS = "rtsp.response_ms"
    RTSP_TRACKS = "rtsp.tracks"
    RTSP_STATUS = "rtsp.status"


_NUMERIC = (ValueType.INT, ValueType.FLOAT)
#: the value types each source can fill
SOURCE_TYPES: Final[dict[Source, tuple[ValueType, ...]]] = {
    Source.ONVIF_OK: (ValueType.BOOL,),
    Source.ONVIF_RESPONSE_MS: _NUMERIC,
    Source.MANUFACTURER: (ValueType.STRING,),
    Source.MODEL: (ValueType.STRING,),
    Source.FIRMWARE: (ValueType.STRING,),
    Source.SERIAL: (ValueType.STRING,),
    Source.HARDWARE_ID: (ValueType.STRING,),
    Source.CLOCK_DRIFT_S: _NUMERIC,
    Source.DATE_TIME_TYPE: (ValueType.STRING,),
    Source.FIRMWARE_OUTDATED: (ValueType.BOOL,),
    Source.FIRMWARE_KNOWN_GOOD: (ValueType.BOOL,),
    Source.RTSP_OK: (ValueType.BOOL,),
    Source.RTSP_RESPONSE_MS: _NUMERIC,
    Source.RTSP_TRACKS: (ValueType.INT,),
    Source.RTSP_STATUS: (ValueType.STRING,),
}

#: what each ONVIF call fills; the firmware checks need GetDeviceInformation too
DEVICE_INFORMATION_SOURCES: Final = frozenset(
    {
        Source.MANUFACTURER,
        Source.MODEL,
        Source.FIRMWARE,
        Source.SERIAL,
        Source.HARDWARE_ID,
        Source.FIRMWARE_OUTDATED,
        Source.FIRMWARE_KNOWN_GOOD,
    }
)
DATE_AND_TIME_SOURCES: Final = frozenset(
    {Source.CLOCK_DRIFT_S, Source.DATE_TIME_TYPE, Source.ONVIF_OK, Source.ONVIF_RESPONSE_MS}
)
RTSP_SOURCES: Final = frozenset(
    {Source.RTSP_OK, Source.RTSP_RESPONSE_MS, Source.RTSP_TRACKS, Source.RTSP_STATUS}
)

_DOTTED = re.compile(r"\d+(?:\.\d+)+")
_NUMBER = re.compile(r"\d+")

Version = tuple[int, ...]


def parse_version(text: str) -> Version | None:
    """The first dotted number in a firmware string ("V5.7.3 build 220715" -> (5, 7, 3),
    "2.800.0000000.18.R" -> (2, 800, 0, 18)), else its first number; trailing zeros dropped so
    that 5.6 == 5.6.0. None when the string has no number at all."""
    match = _DOTTED.search(text) or _NUMBER.search(text)
    if match is None:
        return None
    parts = [int(part) for part in match.group().split(".")]
    while len(parts) > 1 and parts[-1] == 0:
        parts.pop()
    return tuple(parts)


def _version(text: str | None, field: str) -> Version | None:
    if text is None:
        return None
    version = parse_version(text)
    if version is None:
        raise ValueError(f"{field} {text!r} has no version number")
    return version


class CameraPoint(Point):
    """A health value: `source` names where it comes from (see the table above)."""

    source: Source = Field(
        description="onvif.ok, onvif.clock_drift_s, onvif.firmware, rtsp.ok, firmware.outdated…"
    )

    @model_validator(mode="after")
    def _type_fits_source(self) -> CameraPoint:
        allowed = SOURCE_TYPES[self.source]
        if self.type not in allowed:
            names = " or ".join(t.value for t in allowed)
            raise ValueError(f"source {self.source.value} gives {names}, not {self.type.value}")
        return self


class CameraProfile(ProfileBase):
    protocol: Literal["onvif"]
    firmware_min: str | None = Field(
        None, description="oldest known-good firmware, e.g. '5.6.0' (older: firmware_outdated)"
    )
    firmware_max: str | None = Field(
        None, description="newest firmware the installer has checked (newer: not known good)"
    )
    points: Annotated[list[CameraPoint], Field(min_length=1)]
    commands: list[CommandBase] = Field(default_factory=list)

    @model_validator(mode="after")
    def _consistent(self) -> CameraProfile:
        if self.commands:
            raise ValueError("camera profiles are health only: they have no commands")
        low = _version(self.firmware_min, "firmware_min")
        high = _version(self.firmware_max, "firmware_max")
        if low is not None and high is not None and low > high:
            raise ValueError(f"firmware_min {self.firmware_min} is above {self.firmware_max}")
        sources: dict[Source, str] = {}
        for point in self.points:
            if point.source in sources:
                raise ValueError(
                    f"points {sources[point.source]!r} and {point.name!r} "
                    f"both read {point.source.value}"
                )
            sources[point.source] = point.name
        if Source.FIRMWARE_OUTDATED in sources and low is None:
            raise ValueError("source firmware.outdated needs firmware_min")
        if Source.FIRMWARE_KNOWN_GOOD in sources and low is None and high is None:
            raise ValueError("source firmware.known_good needs firmware_min or firmware_max")
        return self

    @property
    def firmware_range(self) -> tuple[Version | None, Version | None]:
        return (
            _version(self.firmware_min, "firmware_min"),
            _version(self.firmware_max, "firmware_max"),
        )
