"""Builds a gateway's desired config from the registry tree, validated before anyone may push it.

The body is a `wire.gateway_config.ManagedConfig`: the gateway's registered devices (profile,
kind, connection) with their effective poll interval, timeout and alarm thresholds, and the
gateway's effective schedules, jitter and time zone. Effective = inherited site → building →
room → gateway (→ device), nearest wins (see `fleet.settings.merge`); a rollout's settings file
(`overlay`) goes on top of all of them.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from drivers.profiles import ProfileLibrary
from fleet.registry import Registry, Target
from fleet.settings import NodeSettings, merge
from wire.errors import Problem, WireError, problems_from
from wire.gateway_config import ManagedConfig, Schedule, check_against_profiles


class DesiredConfigError(WireError):
    """The tree gives a gateway a config that would be refused: nothing is pushed."""

    def __init__(self, site: str, gateway: str, problems: list[Problem]) -> None:
        self.site = site
        self.gateway = gateway
        self.problems = problems
        listed = "; ".join(str(problem) for problem in problems)
        super().__init__(f"config of {site}/{gateway} is not valid: {listed}")


def build_config(
    registry: Registry,
    library: ProfileLibrary,
    site: str,
    gateway: str,
    overlay: NodeSettings | None = None,
    overlay_at: str = "all",
) -> ManagedConfig:
    """`overlay` (a rollout's settings) sits at the level of `overlay_at` (the rollout's
    target, e.g. `building:S/B`; `all` = the site), exactly where it is merged when the
    rollout is done: a setting made lower in the tree still wins over it."""
    gateway_settings = merge(
        _chain(registry, Target("gateway", site, gateway), overlay, overlay_at)
    )
    devices: list[dict[str, Any]] = []
    for row in registry.devices_of_gateway(site, gateway):
        target = Target("device", site, row["device"])
        effective = merge(_chain(registry, target, overlay, overlay_at))
        device: dict[str, Any] = {
            "id": row["device"],
            "profile": row["profile"],
            "connection": row["connection"],
        }
        if row.get("kind"):
            device["kind"] = row["kind"]
        if effective.interval_s is not None:
            device["interval_s"] = effective.interval_s
        if effective.timeout_s is not None:
            device["timeout_s"] = effective.timeout_s
        profile = library.profiles.get(row["profile"])
        if effective.alarms and profile is not None:
            points = {point.name for point in profile.points}
            alarms = {name: a for name, a in effective.alarms.items() if name in points}
            if alarms:
                device["alarms"] = {
                    name: alarm.model_dump(mode="json", exclude_defaults=True)
                    for name, alarm in alarms.items()
                }
        devices.append(device)
    body: dict[str, Any] = {
        "devices": devices,
        "schedules": [
            schedule.model_dump(mode="json", exclude_defaults=True)
            for schedule in _schedules_for(gateway_settings.schedules, devices, library)
        ],
    }
    if gateway_settings.poll_jitter_s is not None:
        body["poll_jitter_s"] = gateway_settings.poll_jitter_s
    if gateway_settings.timezone is not None:
        body["timezone"] = gateway_settings.timezone
    return validate_body(body, library, site, gateway)


def _schedules_for(
    schedules: list[Schedule], devices: list[dict[str, Any]], library: ProfileLibrary
) -> list[Schedule]:
    """A schedule set high in the tree (e.g. 'every display of the site off at 22:00') goes to
    the gateways that have one of its devices or kinds, narrowed to those; the others do not
    get it, rather than a config that would be refused for naming what they lack."""
    ids = {device["id"] for device in devices}
    kinds = set()
    for device in devices:
        profile = library.profiles.get(device["profile"])
        kind = device.get("kind") or (profile.kind.value if profile else None)
        if kind:
            kinds.add(kind)
    kept = []
    for schedule in schedules:
        targets = [name for name in schedule.devices if name in ids]
        of_kinds = [kind for kind in schedule.kinds if kind.value in kinds]
        if targets or of_kinds:
            kept.append(schedule.model_copy(update={"devices": targets, "kinds": of_kinds}))
    return kept


def _chain(
    registry: Registry, target: Target, overlay: NodeSettings | None, overlay_at: str
) -> list[NodeSettings]:
    lineage = registry.lineage(target)
    chain = [settings for _node, settings in lineage]
    if overlay is None:
        return chain
    names = [str(node) for node, _settings in lineage]
    anchor = overlay_at if overlay_at in names else f"site:{target.site}"
    index = names.index(anchor) + 1 if anchor in names else 1
    return [*chain[:index], overlay, *chain[index:]]


def validate_body(
    body: dict[str, Any], library: ProfileLibrary, site: str, gateway: str
) -> ManagedConfig:
    try:
        config = ManagedConfig.model_validate(body)
    except ValidationError as exc:
        raise DesiredConfigError(site, gateway, problems_from(exc)) from None
    problems = check_against_profiles(config, library)
    if problems:
        raise DesiredConfigError(site, gateway, problems)
    return config


def body_of(config: ManagedConfig) -> dict[str, Any]:
    """The JSON body that is signed: defaults left out, so it stays small and diffable."""
    return config.model_dump(mode="json", exclude_defaults=True)
