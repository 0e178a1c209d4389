"""The fleet service's configuration file (YAML), validated before anything starts."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

from wire.documents import load_document
from wire.models import Id
from wire.mqtt import MqttSettings

DEFAULT_CONFIG = Path("/etc/campus-iot/fleet.yaml")


class FleetConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: Id = "fleet"
    mqtt: MqttSettings = MqttSettings()
    database: Path = Path("/var/lib/campus-fleet/fleet.db")
    sites: list[Id] | None = None
    profiles_dir: Path | None = None
    log_level: Literal["debug", "info", "warning", "error"] = "info"


def load_config(path: Path) -> FleetConfig:
    config = load_document(FleetConfig, path)
    if not config.database.is_absolute():
        config = config.model_copy(update={"database": path.parent / config.database})
    return config
