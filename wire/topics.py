"""Topic names of the wire contract: `campus/{site}/gw/{gateway}/{channel}`.

Site and gateway ids are lowercase `[a-z0-9-]`, 1–63 characters, starting with a letter or digit.
Build topics with `topic()`, read them with `parse_topic()`; nothing else formats them by hand.
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import NamedTuple

from wire.errors import InvalidTopic

ROOT = "campus"
ID_PATTERN = r"^[a-z0-9][a-z0-9-]{0,62}$"
_ID = re.compile(ID_PATTERN)


class Channel(StrEnum):
    TELEMETRY = "telemetry"
    STATE = "state"
    EVENTS = "events"
    CONFIG = "config"
    POLICY = "policy"
    ACK = "ack"
    CMD = "cmd"
    CMD_RESULT = "cmd/result"


class TopicParts(NamedTuple):
    site: str
    gateway: str
    channel: Channel


def valid_id(value: str) -> bool:
    return bool(_ID.match(value))


def check_id(kind: str, value: str) -> str:
    if not valid_id(value):
        raise ValueError(
            f"{kind} id {value!r} must be 1-63 characters of a-z, 0-9 and '-', "
            "starting with a letter or digit"
        )
    return value


def topic(site: str, gateway: str, channel: Channel) -> str:
    check_id("site", site)
    check_id("gateway", gateway)
    return f"{ROOT}/{site}/gw/{gateway}/{channel.value}"


def subscription(channel: Channel, site: str = "+", gateway: str = "+") -> str:
    """A subscription filter for one channel of every (or one) site and gateway."""
    return f"{ROOT}/{site}/gw/{gateway}/{channel.value}"


def alerts_topic(site: str) -> str:
    """Where the fleet publishes raised and cleared alerts of one site."""
    return f"{ROOT}/{check_id('site', site)}/alerts"


def parse_topic(name: str) -> TopicParts:
    parts = name.split("/")
    if len(parts) < 5 or parts[0] != ROOT or parts[2] != "gw":
        raise InvalidTopic(name, f"expected {ROOT}/{{site}}/gw/{{gateway}}/{{channel}}")
    site, gateway = parts[1], parts[3]
    if not valid_id(site):
        raise InvalidTopic(name, f"site id {site!r} is not lowercase [a-z0-9-]")
    if not valid_id(gateway):
        raise InvalidTopic(name, f"gateway id {gateway!r} is not lowercase [a-z0-9-]")
    try:
        channel = Channel("/".join(parts[4:]))
    except ValueError:
        raise InvalidTopic(name, f"unknown channel {'/'.join(parts[4:])!r}") from None
    return TopicParts(site, gateway, channel)
