"""The PJLink part of a firmware profile: which PJLink queries a display answers, as points.

PJLink (JBMIA, class 1 and 2) is the same on every projector and flat panel that speaks it, so a
profile mostly says which class the model supports and the lamp/filter life limits to alert on.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from drivers.profile_base import CommandBase, Point, ProfileBase


class PjlinkPoint(Point):
    """A point read by a PJLink query, e.g. `query: lamp_hours` (see drivers/pjlink/codec.py)."""

    query: str = Field(description="what the point reads: power, input, mute, error.lamp, …")


class PjlinkCommand(CommandBase):
    """power on/off, input select, mute: `set: POWR` with the argument or a fixed `value`."""

    set: str = Field(description="the PJLink command body, e.g. POWR, INPT, AVMT")
    value: str | None = Field(None, description="a fixed parameter, e.g. 1 for power on")


class PjlinkProfile(ProfileBase):
    protocol: Literal["pjlink"]
    pjlink_class: Literal[1, 2] = Field(1, description="2 where the device says so (CLSS ?)")
    points: Annotated[list[PjlinkPoint], Field(min_length=1)]
    commands: list[PjlinkCommand] = Field(default_factory=list)
