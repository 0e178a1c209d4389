"""Firmware profiles: declarative YAML, one file per device model, validated once at load.

A profile's id is its file name without `.yaml` (e.g. `eastron-sdm120`). Everything a poll or a
command needs (register counts, tables, types, scaling, argument limits) is checked here, so a
bad profile fails when it is loaded, with file, line and field — never later, in the middle of a
poll. The shape follows EdgeX device profiles: protocol-neutral properties (type, unit, range,
access; `drivers/profile_base.py`) beside each protocol's attributes
(`drivers/<protocol>/profile.py`: Modbus registers, PJLink queries, MQTT topics and JSON paths,
ONVIF calls, BTHome objects).
"""

from __future__ import annotations

import importlib
import json
import os
import re
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeAlias, Union, cast

from pydantic import Field, TypeAdapter

from drivers.profile_base import Alarm, DeviceKind, ProfileBase
from wire.documents import line_of, read_yaml, validate_document
from wire.errors import DocumentError, DocumentErrors, Problem

if TYPE_CHECKING:
    from drivers.ble.profile import BleProfile
    from drivers.camera.profile import CameraProfile
    from drivers.modbus.profile import ModbusProfile
    from drivers.mqtt.profile import MqttProfile
    from drivers.pjlink.profile import PjlinkProfile

__all__ = ["Alarm", "AnyProfile", "DeviceKind", "ProfileBase", "ProfileLibrary"]

PROFILE_ID = re.compile(r"^[a-z0-9][a-z0-9_-]{0,80}$")

#: A profile of any protocol, told apart by its `protocol:` field.
AnyProfile: TypeAlias = "ModbusProfile | PjlinkProfile | MqttProfile | CameraProfile | BleProfile"

#: Where the model of each `protocol:` lives. A protocol's model (and the codec tables it checks
#: points against) is imported when the first profile of that protocol is read: a gateway whose
#: profiles are all Modbus never holds the others in memory.
PROFILE_MODELS: dict[str, str] = {
    "modbus": "drivers.modbus.profile:ModbusProfile",
    "pjlink": "drivers.pjlink.profile:PjlinkProfile",
    "mqtt": "drivers.mqtt.profile:MqttProfile",
    "onvif": "drivers.camera.profile:CameraProfile",
    "ble": "drivers.ble.profile:BleProfile",
}


def profile_model(protocol: str) -> type[ProfileBase]:
    module, _, name = PROFILE_MODELS[protocol].partition(":")
    model: type[ProfileBase] = getattr(importlib.import_module(module), name)
    return model


def profile_schema() -> dict[str, Any]:
    """The JSON Schema of a profile of any protocol."""
    models = [profile_model(protocol) for protocol in PROFILE_MODELS]
    union: Any = Union[tuple(models)]  # noqa: UP007 (built at run time)
    adapter: TypeAdapter[Any] = TypeAdapter(Annotated[union, Field(discriminator="protocol")])
    return adapter.json_schema()


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


def load_profile(path: Path) -> AnyProfile:
    profile_id = path.stem
    if not PROFILE_ID.match(profile_id):
        raise DocumentError(
            str(path), [Problem("", "file name must be lowercase [a-z0-9_-] ending in .yaml")]
        )
    data, root = read_yaml(path)
    protocol = data.get("protocol") if isinstance(data, dict) else None
    if not isinstance(protocol, str) or protocol not in PROFILE_MODELS:
        known = ", ".join(PROFILE_MODELS)
        problem = "is missing" if protocol is None else f"{protocol!r} is not known"
        where = line_of(root, ("protocol",))
        raise DocumentError(
            str(path), [Problem("protocol", f"protocol {problem} (protocols: {known})", where)]
        )
    profile = validate_document(profile_model(protocol), data, str(path), root)
    return cast("AnyProfile", profile.model_copy(update={"id": profile_id}))


def profile_files(paths: Iterable[Path]) -> list[Path]:
    """Files named directly, and the *.yaml files of folders named."""
    found: list[Path] = []
    for path in paths:
        found.extend(sorted(path.glob("*.yaml")) if path.is_dir() else [path])
    return found


def check_profiles(paths: Iterable[Path]) -> tuple[list[AnyProfile], list[DocumentError]]:
    """Loads every profile it can and collects every problem, instead of stopping at one."""
    profiles: list[AnyProfile] = []
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

    def __init__(self, profiles: dict[str, AnyProfile], directory: Path) -> None:
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

    def get(self, profile_id: str) -> AnyProfile:
        try:
            return self.profiles[profile_id]
        except KeyError:
            known = ", ".join(sorted(self.profiles)) or "none"
            raise KeyError(
                f"unknown profile {profile_id!r} (profiles in {self.directory}: {known})"
            ) from None
