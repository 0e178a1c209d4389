"""What the fleet manages on a gateway: its devices, their poll intervals, alarm thresholds and
schedules. The same model validates the `devices:` of a local agent file and the body of a signed
config the fleet pushes, so both sides agree on what is valid before anything is applied.

`check_against_profiles()` is the second half of validation: every profile known, every connection
of the profile's protocol, every schedule naming devices and commands that exist.
"""

from __future__ import annotations

import re
from datetime import date
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from drivers.profiles import Alarm, DeviceKind, ProfileLibrary
from drivers.registry import PROTOCOL_OF_CONNECTION, Connection
from wire.errors import Problem
from wire.models import Id, PointName
from wire.topics import ID_PATTERN

Weekday = Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
WEEKDAYS: tuple[Weekday, ...] = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_TIME = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)$")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


#: Device ids the agent keeps for itself: `policy` is the command path of its network policy.
RESERVED_DEVICE_IDS = frozenset({"policy"})


def not_reserved(device_id: str) -> str:
    if device_id in RESERVED_DEVICE_IDS:
        raise ValueError(f"device id {device_id!r} is reserved (the gateway's network policy)")
    return device_id


class DeviceConfig(_Section):
    id: Annotated[str, Field(pattern=ID_PATTERN), AfterValidator(not_reserved)]
    profile: str
    kind: DeviceKind | None = Field(None, description="defaults to the profile's kind")
    interval_s: Annotated[float, Field(ge=0.01, le=86_400)] = 10.0
    timeout_s: Annotated[float, Field(gt=0, le=120)] = 5.0
    connection: Connection
    alarms: dict[PointName, Alarm] = Field(
        default_factory=dict, description="thresholds replacing the profile's, per point"
    )


class Schedule(_Section):
    """Runs a command on the gateway at a local time, whether or not the fleet is reachable.

    Example: power off every display at 22:00 on school days:
    `{id: displays-off, at: "22:00", days: [mon, tue, wed, thu, fri], kinds: [display],
    action: power_off}`."""

    id: Id
    at: str = Field(description="local time HH:MM (24 h)")
    days: Annotated[list[Weekday], Field(min_length=1)] = list(WEEKDAYS)
    except_dates: list[date] = Field(default_factory=list, description="holidays: skipped")
    devices: list[Id] = Field(default_factory=list)
    kinds: list[DeviceKind] = Field(default_factory=list)
    action: PointName
    argument: Any = None
    options: dict[PointName, Any] = Field(
        default_factory=dict, description="named extras of the command, e.g. {minutes: 10}"
    )

    @field_validator("at")
    @classmethod
    def _time_of_day(cls, value: str) -> str:
        if not _TIME.match(value):
            raise ValueError(f"{value!r} is not a time of day HH:MM (00:00 to 23:59)")
        return value

    @model_validator(mode="after")
    def _has_targets(self) -> Schedule:
        if not self.devices and not self.kinds:
            raise ValueError("a schedule needs 'devices', 'kinds' or both")
        return self

    @property
    def hour_minute(self) -> tuple[int, int]:
        hour, minute = self.at.split(":")
        return int(hour), int(minute)


class ManagedConfig(_Section):
    """The body of a signed config (and the managed part of a local agent file)."""

    devices: list[DeviceConfig] = []
    schedules: list[Schedule] = []
    poll_jitter_s: Annotated[float, Field(ge=0, le=3600)] | None = None
    timezone: str | None = Field(
        None, description="IANA zone for schedules, e.g. Asia/Shanghai; default: the gateway's"
    )

    @field_validator("devices")
    @classmethod
    def _unique_device_ids(cls, devices: list[DeviceConfig]) -> list[DeviceConfig]:
        return check_devices(devices)

    @field_validator("schedules")
    @classmethod
    def _unique_schedule_ids(cls, schedules: list[Schedule]) -> list[Schedule]:
        seen: set[str] = set()
        for index, schedule in enumerate(schedules):
            if schedule.id in seen:
                raise ValueError(f"schedule id {schedule.id!r} is used twice (again at {index})")
            seen.add(schedule.id)
        return schedules

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str | None) -> str | None:
        if value is not None:
            from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

            try:
                ZoneInfo(value)
            except (ZoneInfoNotFoundError, ValueError):
                raise ValueError(f"unknown time zone {value!r} (e.g. Europe/Paris)") from None
        return value


def check_devices(devices: list[DeviceConfig]) -> list[DeviceConfig]:
    """Unique ids; devices sharing a serial port agree on its line settings."""
    seen: set[str] = set()
    for index, device in enumerate(devices):
        if device.id in seen:
            raise ValueError(f"device id {device.id!r} is used twice (again at {index})")
        seen.add(device.id)
    lines: dict[str, tuple[int, str, int]] = {}
    for device in devices:
        connection = device.connection
        if connection.type != "modbus-rtu":
            continue
        line = lines.setdefault(connection.port, connection.line())
        if line != connection.line():
            raise ValueError(
                f"devices on serial port {connection.port} need the same baudrate, parity "
                f"and stopbits ({line} and {connection.line()})"
            )
    return devices


def device_kind(device: DeviceConfig, library: ProfileLibrary) -> DeviceKind:
    return device.kind or library.get(device.profile).kind


def check_against_profiles(
    config: ManagedConfig,
    library: ProfileLibrary,
    line_of: Any = None,
    prefix: tuple[str | int, ...] = (),
) -> list[Problem]:
    """Problems that need the profiles to find. `line_of(path)` gives a source line or None."""

    def where(*path: str | int) -> tuple[str, int | None]:
        full = (*prefix, *path)
        return ".".join(map(str, full)), (line_of(full) if line_of else None)

    problems: list[Problem] = []
    known: dict[str, DeviceConfig] = {}
    for index, device in enumerate(config.devices):
        field, line = where("devices", index, "profile")
        if unknown := library.unknown(device.profile, field, line):
            problems.append(unknown)
            continue
        known[device.id] = device
        profile = library.get(device.profile)
        if PROTOCOL_OF_CONNECTION[device.connection.type] != profile.protocol:
            problems.append(
                Problem(
                    field,
                    f"profile speaks {profile.protocol}, connection is {device.connection.type}",
                    line,
                )
            )
        points = {point.name for point in profile.points}
        for point in device.alarms:
            if point not in points:
                field, line = where("devices", index, "alarms", point)
                problems.append(
                    Problem(field, f"profile {profile.id} has no point {point!r}", line)
                )
    for index, schedule in enumerate(config.schedules):
        for name in schedule.devices:
            if name not in known and all(d.id != name for d in config.devices):
                field, line = where("schedules", index, "devices")
                problems.append(Problem(field, f"no device {name!r} in this config", line))
        targets = [known[name] for name in schedule.devices if name in known]
        targets += [d for d in known.values() if device_kind(d, library) in schedule.kinds]
        if not targets:
            field, line = where("schedules", index)
            problems.append(Problem(field, "no device of this config matches the schedule", line))
        checked: set[str] = set()
        for device in targets:
            profile = library.get(device.profile)
            try:
                command = profile.command(schedule.action)
            except KeyError:
                field, line = where("schedules", index, "action")
                problems.append(
                    Problem(
                        field,
                        f"device {device.id} (profile {profile.id}) has no command "
                        f"{schedule.action!r}",
                        line,
                    )
                )
                continue
            if profile.id in checked:
                continue
            checked.add(profile.id)
            try:
                command.check_argument(schedule.argument)
                command.check_options(schedule.options)
            except ValueError as exc:
                field, line = where("schedules", index)
                problems.append(Problem(field, f"{schedule.action} on {profile.id}: {exc}", line))
    return problems
