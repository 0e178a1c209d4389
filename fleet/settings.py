"""Settings attached to the registry tree, inherited site → building → room → gateway → device.

A value set lower in the tree overrides the one above it; `alarms` merge per point and
`schedules` merge per id (a room can change the 22:00 schedule of its site by reusing its id).
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from drivers.profiles import Alarm
from wire.errors import WireError, problems_from
from wire.gateway_config import Schedule
from wire.models import PointName


class SettingsError(WireError):
    def __init__(self, where: str, message: str) -> None:
        super().__init__(f"settings of {where}: {message}")
        self.where = where


class NodeSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    interval_s: Annotated[float, Field(ge=0.01, le=86_400)] | None = None
    timeout_s: Annotated[float, Field(gt=0, le=120)] | None = None
    poll_jitter_s: Annotated[float, Field(ge=0, le=3600)] | None = None
    timezone: str | None = None
    alarms: dict[PointName, Alarm] = Field(default_factory=dict)
    schedules: list[Schedule] = Field(default_factory=list)
    policy: dict[str, Any] | None = Field(
        None,
        description="a part of the network policy (wire.policy): zones and flows merge by id "
        "down the tree, other fields are overridden; checked whole when built for a gateway",
    )

    @field_validator("policy")
    @classmethod
    def _policy_fields(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is None:
            return None
        from wire.policy import Policy

        known = {field.alias or name for name, field in Policy.model_fields.items()}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(
                f"unknown policy field(s) {', '.join(unknown)} (fields: {', '.join(sorted(known))})"
            )
        for name in ("zones", "flows"):
            items = value.get(name, [])
            if not isinstance(items, list) or not all(
                isinstance(item, dict) and isinstance(item.get("id"), str) for item in items
            ):
                raise ValueError(f"policy {name} must be a list of entries that each have an id")
        return value


def parse_settings(text: str | None, where: str) -> NodeSettings:
    """Settings stored as JSON in the registry (NULL or '' = nothing set)."""
    if not text:
        return NodeSettings()
    try:
        return NodeSettings.model_validate_json(text)
    except ValidationError as exc:
        raise SettingsError(where, "; ".join(map(str, problems_from(exc)))) from None


def validate_settings(data: Any, where: str) -> NodeSettings:
    try:
        return NodeSettings.model_validate(data or {})
    except ValidationError as exc:
        raise SettingsError(where, "; ".join(map(str, problems_from(exc)))) from None


def dump_settings(settings: NodeSettings) -> str:
    return json.dumps(settings.model_dump(mode="json", exclude_defaults=True), sort_keys=True)


def merge(chain: list[NodeSettings]) -> NodeSettings:
    """The effective settings of a node, from the root of its chain down to it."""
    values: dict[str, Any] = {}
    alarms: dict[str, Alarm] = {}
    schedules: dict[str, Schedule] = {}
    policy = merge_policy([settings.policy for settings in chain if settings.policy])
    if policy is not None:
        values["policy"] = policy
    for settings in chain:
        for name in ("interval_s", "timeout_s", "poll_jitter_s", "timezone"):
            if (value := getattr(settings, name)) is not None:
                values[name] = value
        alarms.update(settings.alarms)
        for schedule in settings.schedules:
            schedules[schedule.id] = schedule
    return NodeSettings(**values, alarms=alarms, schedules=list(schedules.values()))


def merge_policy(parts: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The policy of a node from the parts set on its chain, root first: `zones` and `flows`
    merge by id (a lower level replaces an entry with the same id, in place), other fields are
    replaced. None when no level sets one."""
    if not parts:
        return None
    merged: dict[str, Any] = {}
    for part in parts:
        for name, value in part.items():
            if name in ("zones", "flows"):
                entries = {entry["id"]: entry for entry in merged.get(name, [])}
                for entry in value:
                    entries[entry["id"]] = entry
                merged[name] = list(entries.values())
            else:
                merged[name] = value
    return merged
