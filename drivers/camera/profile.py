"""The camera part of a firmware profile: health only (ONVIF device information and clock, an
RTSP probe of the stream), never video or images."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from drivers.profile_base import CommandBase, Point, ProfileBase


class CameraPoint(Point):
    """A health value: `source` names where it comes from (see drivers/camera/driver.py)."""

    source: str


class CameraProfile(ProfileBase):
    protocol: Literal["onvif"]
    points: Annotated[list[CameraPoint], Field(min_length=1)]
    commands: list[CommandBase] = Field(default_factory=list)
