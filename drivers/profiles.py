"""Firmware profiles: declarative YAML, one file per device model, validated once at load.

A profile's id is its file name without `.yaml` (e.g. `eastron-sdm120`). Everything a poll or a
command needs (register counts, tables, types, scaling, argument limits) is checked here, so a
bad profile fails when it is loaded, with file, line and field — never later, in the middle of a
poll. The shape follows EdgeX device profiles: protocol-neutral properties (type, unit, range,
access) beside Modbus attributes (table, address, orders).
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Iterable
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from drivers.modbus.codec import DataType, Table, WordOrder, register_count
from wire.documents import load_document
from wire.errors import DocumentError, DocumentErrors, Problem

PROFILE_ID = re.compile(r"^[a-z0-9][a-z0-9_-]{0,80}$")
PointName = Annotated[str, Field(pattern=r"^[a-z0-9_][a-z0-9_.-]{0,63}$")]
NUMERIC = {t.value for t in DataType}


class DeviceKind(StrEnum):
    SENSOR = "sensor"
    METER = "meter"
    DISPLAY = "display"
    BOARD = "board"
    CAMERA = "camera"


class PointType(StrEnum):
    INT16 = "int16"
    UINT16 = "uint16"
    INT32 = "int32"
    UINT32 = "uint32"
    INT64 = "int64"
    UINT64 = "uint64"
    FLOAT32 = "float32"
    FLOAT64 = "float64"
    BOOL = "bool"  # a coil, a discrete input, or one `bit` of a register
    BITFIELD = "bitfield"  # a 16-bit register of flags, named in `bits`
    STRING = "string"  # `length` registers of text, two characters each

    @property
    def numeric(self) -> bool:
        return self.value in NUMERIC


class ByteOrder(StrEnum):
    """Order of the two bytes inside each register ('little' = swapped, as some meters do)."""

    BIG = "big"
    LITTLE = "little"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Alarm(_Strict):
    """Thresholds that raise an `alarm` event when crossed, and clear it with hysteresis."""

    low: float | None = None
    high: float | None = None
    hysteresis: Annotated[float, Field(ge=0)] = 0.0

    @model_validator(mode="after")
    def _consistent(self) -> Alarm:
        if self.low is None and self.high is None:
            raise ValueError("an alarm needs 'low', 'high' or both")
        if self.low is not None and self.high is not None and self.low >= self.high:
            raise ValueError(f"alarm low {self.low} must be below high {self.high}")
        return self


class ModbusPoint(_Strict):
    """One value a device exposes: where it lives and how registers become that value."""

    name: PointName
    table: Table
    address: Annotated[int, Field(ge=0, le=65535)]
    type: PointType | None = Field(
        None, description="default: uint16 in register tables, bool in bit tables"
    )
    word_order: WordOrder = WordOrder.BIG
    byte_order: ByteOrder = ByteOrder.BIG
    bit: Annotated[int, Field(ge=0, le=15)] | None = Field(
        None, description="for a bool kept in one bit of a register"
    )
    bits: dict[Annotated[int, Field(ge=0, le=15)], PointName] | None = Field(
        None, description="for a bitfield: bit number -> flag name"
    )
    length: Annotated[int, Field(ge=1, le=125)] | None = Field(
        None, description="for a string: registers it spans"
    )
    scale: float = 1.0
    offset: float = 0.0
    unit: str = ""
    description: str = ""
    access: Literal["read", "read-write"] = "read"
    min: float | None = None
    max: float | None = None
    poll_interval_s: Annotated[float, Field(gt=0, le=86_400)] | None = None
    priority: Literal["low", "normal", "high"] = Field(
        "normal", description="buffer eviction order: low goes first, high (alarms) last"
    )
    alarm: Alarm | None = None

    @property
    def kind(self) -> PointType:
        if self.type is not None:
            return self.type
        return PointType.BOOL if self.table.is_bits else PointType.UINT16

    @property
    def count(self) -> int:
        """Registers (or bits) this point occupies."""
        kind = self.kind
        if self.table.is_bits or kind in (PointType.BOOL, PointType.BITFIELD):
            return 1
        if kind is PointType.STRING:
            return self.length or 0
        return register_count(DataType(kind.value))

    @property
    def writable(self) -> bool:
        return self.access == "read-write"

    @model_validator(mode="after")
    def _consistent(self) -> ModbusPoint:
        kind = self.kind
        if self.table.is_bits and kind is not PointType.BOOL:
            raise ValueError(f"a point in the {self.table} table is a bool, not {kind}")
        if (self.bit is not None) != (kind is PointType.BOOL and not self.table.is_bits):
            raise ValueError("'bit' is needed by, and only by, a bool kept in a register")
        if self.bit is not None and self.byte_order is ByteOrder.LITTLE:
            raise ValueError("give 'bit' as numbered after the byte swap: use byte_order big")
        if (self.bits is not None) != (kind is PointType.BITFIELD):
            raise ValueError("'bits' is needed by, and only by, a bitfield")
        if (self.length is not None) != (kind is PointType.STRING):
            raise ValueError("'length' is needed by, and only by, a string")
        numeric = kind.numeric
        if not numeric and (self.scale != 1.0 or self.offset != 0.0):
            raise ValueError(f"scale and offset apply to numbers, not to a {kind}")
        if not numeric and (self.min is not None or self.max is not None or self.alarm):
            raise ValueError(f"min, max and alarm apply to numbers, not to a {kind}")
        if self.scale == 0:
            raise ValueError("scale must not be 0")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min {self.min} is above max {self.max}")
        if self.address + self.count - 1 > 65535:
            raise ValueError(f"{kind} at {self.address} runs past register 65535")
        if self.writable and self.table in (Table.INPUT, Table.DISCRETE):
            raise ValueError(f"a point in the {self.table} table cannot be read-write")
        return self

    def to_engineering(self, raw: float | int) -> float | int:
        """Raw register value → value in `unit` (`raw * scale + offset`)."""
        if self.scale == 1.0 and self.offset == 0.0:
            return raw
        return round(raw * self.scale + self.offset, 6)

    def to_raw(self, value: float) -> float:
        return (value - self.offset) / self.scale


TRUE_WORDS = ("on", "true", "1", "yes")
FALSE_WORDS = ("off", "false", "0", "no")


def to_bool(value: Any) -> bool:
    """on/off, true/false, yes/no, 1/0 (as words or numbers); ValueError for anything else."""
    if isinstance(value, bool):
        return value
    word = str(value).strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise ValueError(f"{value!r} is not on/off (true/false)")


class Argument(_Strict):
    """What a command accepts; checked before anything is written."""

    type: Literal["bool", "int", "float", "choice"]
    min: float | None = None
    max: float | None = None
    choices: dict[str, int] | None = Field(None, description="for 'choice': word -> raw value")

    @model_validator(mode="after")
    def _consistent(self) -> Argument:
        if (self.choices is not None) != (self.type == "choice"):
            raise ValueError("'choices' is needed by, and only by, type 'choice'")
        if self.type in ("bool", "choice") and (self.min is not None or self.max is not None):
            raise ValueError(f"min and max do not apply to type '{self.type}'")
        return self

    def check(self, value: Any) -> int | float | bool:
        """The value to write, or ValueError naming what is wrong with `value`."""
        if self.type == "bool":
            return to_bool(value)
        if self.type == "choice":
            assert self.choices is not None
            word = value if value in self.choices else str(value)  # 9600 given for "9600"
            if word not in self.choices:
                raise ValueError(f"{value!r} is not one of {', '.join(self.choices)}")
            return self.choices[word]
        try:
            number: int | float = int(value) if self.type == "int" else float(value)
        except (TypeError, ValueError):
            what = "an integer" if self.type == "int" else "a number"
            raise ValueError(f"{value!r} is not {what}") from None
        if isinstance(value, float) and self.type == "int" and not value.is_integer():
            raise ValueError(f"{value!r} is not a whole number")
        if self.min is not None and number < self.min:
            raise ValueError(f"{number} is below the minimum {self.min}")
        if self.max is not None and number > self.max:
            raise ValueError(f"{number} is above the maximum {self.max}")
        return number


class Command(_Strict):
    """A named write: to a read-write point (the argument is in its unit), or a fixed raw value
    to a register or coil (e.g. 'reset energy counter' = write 0x0003 to holding 0xF010)."""

    name: PointName
    description: str = ""
    point: PointName | None = None
    table: Literal[Table.HOLDING, Table.COIL] | None = None
    address: Annotated[int, Field(ge=0, le=65535)] | None = None
    value: int | None = Field(
        None,
        description="what a fixed command writes: raw for a table + address, in the point's "
        "unit for a point",
    )
    argument: Argument | None = None
    readback: bool = Field(True, description="read the target again and compare")

    @model_validator(mode="after")
    def _one_target(self) -> Command:
        raw = self.table is not None or self.address is not None
        if (self.point is None) == (not raw):
            raise ValueError("a command writes either to a 'point' or to a 'table' + 'address'")
        if raw and (self.table is None or self.address is None):
            raise ValueError("a raw command needs both 'table' and 'address'")
        if raw and (self.value is None) == (self.argument is None):
            raise ValueError("a raw command needs either a fixed 'value' or an 'argument'")
        if self.point is not None and (self.value is None) == (self.argument is None):
            raise ValueError("a point command needs either a fixed 'value' or an 'argument'")
        return self


class Profile(_Strict):
    id: str = ""
    vendor: str
    model: str
    firmware: str = Field("*", description="firmware versions this map is valid for, e.g. '>=1.2'")
    protocol: Literal["modbus"]
    kind: DeviceKind
    description: str = ""
    source: str = Field(description="where the register map comes from (manual, section)")
    max_read_registers: Annotated[int, Field(ge=1, le=125)] = Field(
        125, description="the most registers the device answers in one read request"
    )
    write_multiple_only: bool = Field(
        False, description="the device refuses FC06: write every register with FC16"
    )
    points: Annotated[list[ModbusPoint], Field(min_length=1)]
    commands: list[Command] = []

    @model_validator(mode="after")
    def _points_fit_one_read(self) -> Profile:
        for point in self.points:
            if not point.table.is_bits and point.count > self.max_read_registers:
                raise ValueError(
                    f"point {point.name!r} spans {point.count} registers, more than "
                    f"max_read_registers {self.max_read_registers}"
                )
        return self

    @field_validator("points")
    @classmethod
    def _points_do_not_clash(cls, points: list[ModbusPoint]) -> list[ModbusPoint]:
        names: set[str] = set()
        # (table, address) -> [(bit mask, point)]: flags may share a register, bit by bit
        taken: dict[tuple[Table, int], list[tuple[int, str]]] = {}
        for point in points:
            if point.name in names:
                raise ValueError(f"point name {point.name!r} is used twice")
            names.add(point.name)
            mask = 0xFFFF if point.bit is None else 1 << point.bit
            for address in range(point.address, point.address + point.count):
                owners = taken.setdefault((point.table, address), [])
                for other_mask, other in owners:
                    if other_mask & mask:
                        raise ValueError(
                            f"points {other!r} and {point.name!r} overlap at "
                            f"{point.table} {address}"
                        )
                owners.append((mask, point.name))
        return points

    @model_validator(mode="after")
    def _commands_fit_points(self) -> Profile:
        names: set[str] = set()
        for command in self.commands:
            if command.name in names:
                raise ValueError(f"command name {command.name!r} is used twice")
            names.add(command.name)
            if command.point is None:
                continue
            point = next((p for p in self.points if p.name == command.point), None)
            if point is None:
                raise ValueError(f"command {command.name!r}: no point {command.point!r}")
            if not point.writable:
                raise ValueError(
                    f"command {command.name!r}: point {point.name!r} is not read-write"
                )
        return self

    def point(self, name: str) -> ModbusPoint:
        for point in self.points:
            if point.name == name:
                return point
        raise KeyError(name)

    def command(self, name: str) -> Command:
        for command in self.commands:
            if command.name == name:
                return command
        known = ", ".join(c.name for c in self.commands) or "none"
        raise KeyError(f"{self.id} has no command {name!r} (commands: {known})")


def profile_schema() -> dict[str, Any]:
    return Profile.model_json_schema()


def write_profile_schema(path: Path) -> None:
    path.write_text(json.dumps(profile_schema(), indent=2) + "\n")


def default_profiles_dir() -> Path:
    """`$CAMPUS_PROFILES_DIR`, else the repository's folder, else the installed copy."""
    if env := os.environ.get("CAMPUS_PROFILES_DIR"):
        return Path(env)
    source_tree = Path(__file__).resolve().parents[1] / "firmware-profiles"
    if source_tree.is_dir():
        return source_tree
    return Path(sys.prefix) / "share" / "campus-iot" / "firmware-profiles"


def load_profile(path: Path) -> Profile:
    profile_id = path.stem
    if not PROFILE_ID.match(profile_id):
        raise DocumentError(
            str(path), [Problem("", "file name must be lowercase [a-z0-9_-] ending in .yaml")]
        )
    profile = load_document(Profile, path)
    return profile.model_copy(update={"id": profile_id})


def profile_files(paths: Iterable[Path]) -> list[Path]:
    """Files named directly, and the *.yaml files of folders named."""
    found: list[Path] = []
    for path in paths:
        found.extend(sorted(path.glob("*.yaml")) if path.is_dir() else [path])
    return found


def check_profiles(paths: Iterable[Path]) -> tuple[list[Profile], list[DocumentError]]:
    """Loads every profile it can and collects every problem, instead of stopping at one."""
    profiles: list[Profile] = []
    errors: list[DocumentError] = []
    seen: dict[str, Path] = {}
    for path in profile_files(paths):
        try:
            profile = load_profile(path)
        except DocumentError as exc:
            errors.append(exc)
            continue
        if profile.id in seen:
            errors.append(
                DocumentError(str(path), [Problem("", f"profile id also in {seen[profile.id]}")])
            )
            continue
        seen[profile.id] = path
        profiles.append(profile)
    return profiles, errors


class ProfileLibrary:
    """Every profile of one folder, loaded and validated up front."""

    def __init__(self, profiles: dict[str, Profile], directory: Path) -> None:
        self.profiles = profiles
        self.directory = directory

    @classmethod
    def load(cls, directory: Path | None = None) -> ProfileLibrary:
        directory = directory or default_profiles_dir()
        if not directory.is_dir():
            raise DocumentError(str(directory), [Problem("", "profiles folder does not exist")])
        profiles, errors = check_profiles([directory])
        if errors:
            raise DocumentErrors(errors)
        return cls({profile.id: profile for profile in profiles}, directory)

    @classmethod
    def for_document(cls, profiles_dir: Path | None, document: Path) -> ProfileLibrary:
        """The library a config or scenario names; a relative folder is read from its file."""
        if profiles_dir is not None and not profiles_dir.is_absolute():
            profiles_dir = document.parent / profiles_dir
        return cls.load(profiles_dir)

    def unknown(self, profile_id: str, field: str, line: int | None) -> Problem | None:
        """A problem naming the known profiles when `profile_id` is not one of them."""
        if profile_id in self.profiles:
            return None
        known = ", ".join(sorted(self.profiles)) or "none"
        return Problem(field, f"unknown profile {profile_id!r} (known: {known})", line)

    def get(self, profile_id: str) -> Profile:
        try:
            return self.profiles[profile_id]
        except KeyError:
            known = ", ".join(sorted(self.profiles)) or "none"
            raise KeyError(
                f"unknown profile {profile_id!r} (profiles in {self.directory}: {known})"
            ) from None
