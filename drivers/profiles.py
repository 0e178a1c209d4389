"""Firmware profiles: declarative YAML, one file per device model, validated once at load.

A profile's id is its file name without `.yaml` (e.g. `campussim-thc100`). Everything a poll
needs (register counts, tables, scaling) is checked here so that a bad profile fails when it is
loaded, with file, line and field, never later in the middle of a poll.
"""

from __future__ import annotations

import os
import re
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from drivers.modbus.codec import DataType, Table, WordOrder, register_count
from wire.documents import load_document
from wire.errors import DocumentError, Problem

PROFILE_ID = re.compile(r"^[a-z0-9][a-z0-9_-]{0,80}$")
PointName = Annotated[str, Field(pattern=r"^[a-z0-9_][a-z0-9_.-]{0,63}$")]


class DeviceKind(StrEnum):
    SENSOR = "sensor"
    METER = "meter"
    DISPLAY = "display"
    BOARD = "board"
    CAMERA = "camera"


class ModbusPoint(BaseModel):
    """One value a device exposes: where it lives and how to turn registers into it."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: PointName
    table: Table
    address: Annotated[int, Field(ge=0, le=65535)]
    type: DataType = DataType.UINT16
    word_order: WordOrder = WordOrder.BIG
    scale: float = 1.0
    offset: float = 0.0
    unit: str = ""
    description: str = ""
    min: float | None = None
    max: float | None = None
    writable: bool = False
    priority: Literal["low", "normal", "high"] = Field(
        "normal", description="buffer eviction order: low goes first, high (alarms) last"
    )

    @property
    def count(self) -> int:
        """Registers (or bits) this point occupies."""
        if self.table in (Table.COIL, Table.DISCRETE):
            return 1
        return register_count(self.type)

    @model_validator(mode="after")
    def _consistent(self) -> ModbusPoint:
        if self.scale == 0:
            raise ValueError("scale must not be 0")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min {self.min} is above max {self.max}")
        if self.address + self.count - 1 > 65535:
            raise ValueError(f"{self.type} at {self.address} runs past register 65535")
        if self.writable and self.table in (Table.INPUT, Table.DISCRETE):
            raise ValueError(f"a point in the {self.table} table cannot be writable")
        return self

    def to_engineering(self, raw: float | int) -> float | int:
        """Raw register value → value in `unit` (`raw * scale + offset`)."""
        if self.scale == 1.0 and self.offset == 0.0:
            return raw
        return round(raw * self.scale + self.offset, 6)

    def to_raw(self, value: float) -> float:
        return (value - self.offset) / self.scale


class Profile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    id: str = ""
    vendor: str
    model: str
    firmware: str = Field("*", description="firmware versions this map is valid for, e.g. '>=1.2'")
    protocol: Literal["modbus"]
    kind: DeviceKind
    description: str = ""
    source: str = Field(description="where the register map comes from (manual, section)")
    points: Annotated[list[ModbusPoint], Field(min_length=1)]

    @field_validator("points")
    @classmethod
    def _points_do_not_clash(cls, points: list[ModbusPoint]) -> list[ModbusPoint]:
        names: set[str] = set()
        taken: dict[tuple[Table, int], str] = {}
        for point in points:
            if point.name in names:
                raise ValueError(f"point name {point.name!r} is used twice")
            names.add(point.name)
            for address in range(point.address, point.address + point.count):
                other = taken.get((point.table, address))
                if other is not None:
                    raise ValueError(
                        f"points {other!r} and {point.name!r} overlap at {point.table} {address}"
                    )
                taken[(point.table, address)] = point.name
        return points

    def point(self, name: str) -> ModbusPoint:
        for point in self.points:
            if point.name == name:
                return point
        raise KeyError(name)


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
        profiles = {path.stem: load_profile(path) for path in sorted(directory.glob("*.yaml"))}
        return cls(profiles, directory)

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
