"""The MQTT part of a firmware profile: the topics a device publishes, the JSON fields in them
that are points, how it says it is online, and the publishes that are its commands."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from drivers.profile_base import CommandBase, Point, ProfileBase


class MqttPoint(Point):
    """`topic` is relative to the device's base topic (the connection's `topic`); `path` is a
    dotted JSON path in its payload (empty: the whole payload is the value)."""

    topic: str
    path: str = ""


class MqttCommand(CommandBase):
    """A publish on `topic` (relative to the device's base topic) with a JSON payload template."""

    topic: str
    payload: dict[str, object] = Field(default_factory=dict)


class MqttProfile(ProfileBase):
    protocol: Literal["mqtt"]
    points: Annotated[list[MqttPoint], Field(min_length=1)]
    commands: list[MqttCommand] = Field(default_factory=list)
