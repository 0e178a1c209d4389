"""The agent's configuration file (YAML), validated in full before anything starts.

`load_config()` either returns a config whose every device has a known profile and a connection its
driver accepts, or raises `DocumentError` naming the file, line and field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from drivers.profiles import ProfileLibrary
from drivers.registry import PROTOCOL_OF_CONNECTION, Connection
from wire.documents import line_of, read_yaml, validate_document
from wire.errors import DocumentError, Problem
from wire.models import Id
from wire.mqtt import MqttSettings


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BufferSettings(_Section):
    path: Path = Path("/var/lib/campus-agent/buffer.db")
    max_mb: Annotated[float, Field(ge=0.1, le=1_000_000)] = 256.0
    commit_interval_s: Annotated[float, Field(gt=0, le=60)] = 0.05
    commit_max_readings: Annotated[int, Field(ge=1)] = 5000


class ClockSettings(_Section):
    sync_check: Literal["adjtimex", "none", "file"] = "adjtimex"
    file: Path | None = None
    hold_unsynced_s: Annotated[float, Field(ge=0)] = 300.0

    @model_validator(mode="after")
    def _file_when_needed(self) -> ClockSettings:
        if self.sync_check == "file" and self.file is None:
            raise ValueError("sync_check 'file' needs 'file: PATH'")
        return self


class ForwarderSettings(_Section):
    batch_max_readings: Annotated[int, Field(ge=1, le=100_000)] = 1000
    window: Annotated[int, Field(ge=1, le=1000)] = 8
    ack_timeout_s: Annotated[float, Field(gt=0)] = 30.0


class DeviceConfig(_Section):
    id: Id
    profile: str
    interval_s: Annotated[float, Field(ge=0.01, le=86_400)] = 10.0
    timeout_s: Annotated[float, Field(gt=0, le=120)] = 5.0
    connection: Connection


class AgentConfig(_Section):
    site: Id
    gateway: Id
    mqtt: MqttSettings = MqttSettings()
    buffer: BufferSettings = BufferSettings()
    forwarder: ForwarderSettings = ForwarderSettings()
    clock: ClockSettings = ClockSettings()
    profiles_dir: Path | None = None
    state_interval_s: Annotated[float, Field(ge=1)] = 60.0
    poll_jitter_s: Annotated[float, Field(ge=0, le=3600)] = 0.0
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    devices: list[DeviceConfig] = []

    @field_validator("devices")
    @classmethod
    def _unique_device_ids(cls, devices: list[DeviceConfig]) -> list[DeviceConfig]:
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


def load_config(path: Path) -> tuple[AgentConfig, ProfileLibrary]:
    data, root = read_yaml(path)
    config = validate_document(AgentConfig, data, str(path), root)
    library = ProfileLibrary.for_document(config.profiles_dir, path)
    problems = []
    for index, device in enumerate(config.devices):
        where = f"devices.{index}.profile"
        line = line_of(root, ("devices", index, "profile"))
        if unknown := library.unknown(device.profile, where, line):
            problems.append(unknown)
            continue
        protocol = library.profiles[device.profile].protocol
        if PROTOCOL_OF_CONNECTION[device.connection.type] != protocol:
            problems.append(
                Problem(
                    where,
                    f"profile speaks {protocol}, connection is {device.connection.type}",
                    line,
                )
            )
    if problems:
        raise DocumentError(str(path), problems)
    return config, library
