"""The agent's configuration file (YAML), validated in full before anything starts.

`load_config()` either returns a config whose every device has a known profile and a connection its
driver accepts, or raises `DocumentError` naming the file, line and field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    FilePath,
    ValidationError,
    field_validator,
    model_validator,
)

from drivers.profiles import ProfileLibrary
from wire.documents import line_of, read_yaml, validate_document
from wire.errors import DocumentError, problems_from
from wire.gateway_config import (
    DeviceConfig,
    ManagedConfig,
    Schedule,
    check_against_profiles,
    check_devices,
)
from wire.models import Id
from wire.mqtt import MqttSettings

__all__ = ["AgentConfig", "DeviceConfig", "FleetSettings", "PolicySettings", "load_config"]


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


class FleetSettings(_Section):
    """How the agent trusts the fleet's signed config and where it keeps the applied one."""

    public_keys: list[FilePath] = Field(
        default_factory=list,
        description="the fleet's Ed25519 public keys (PEM); a config signed by another is refused",
    )
    applied_path: Path = Path("/var/lib/campus-agent/config.applied.json")


class PolicySettings(_Section):
    """Network policy enforcement with nftables (needs root or CAP_NET_ADMIN). When disabled, a
    pushed policy is refused with that reason."""

    enabled: bool = False
    nft_path: str = "nft"
    table: Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]{0,31}$")] = "campus_iot"
    applied_path: Path = Path("/var/lib/campus-agent/policy.applied.json")
    confirm_timeout_s: Annotated[float, Field(ge=1, le=600)] = 20.0


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
    fleet: FleetSettings = FleetSettings()
    command_timeout_s: Annotated[float, Field(gt=0, le=600)] = 30.0
    policy: PolicySettings = PolicySettings()
    # The managed part: used until the fleet pushes a signed config, which then replaces it.
    devices: list[DeviceConfig] = []
    schedules: list[Schedule] = []
    timezone: str | None = None

    @field_validator("devices")
    @classmethod
    def _unique_device_ids(cls, devices: list[DeviceConfig]) -> list[DeviceConfig]:
        return check_devices(devices)

    def local_managed(self) -> ManagedConfig:
        """The managed part of this file, checked like a pushed config."""
        return ManagedConfig(
            devices=self.devices,
            schedules=self.schedules,
            poll_jitter_s=self.poll_jitter_s,
            timezone=self.timezone,
        )


def load_config(path: Path) -> tuple[AgentConfig, ProfileLibrary]:
    data, root = read_yaml(path)
    config = validate_document(AgentConfig, data, str(path), root)
    library = ProfileLibrary.for_document(config.profiles_dir, path)
    try:
        managed = config.local_managed()
    except ValidationError as exc:
        raise DocumentError(str(path), problems_from(exc)) from None
    problems = check_against_profiles(managed, library, lambda where: line_of(root, where))
    if problems:
        raise DocumentError(str(path), problems)
    return config, library
