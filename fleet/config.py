"""The fleet service's configuration file (YAML), validated before anything starts."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from fleet.alerts import AlertRules
from fleet.influx.settings import InfluxSettings
from wire.documents import load_document
from wire.models import Id
from wire.mqtt import MqttSettings

DEFAULT_CONFIG = Path("/etc/campus-iot/fleet.yaml")


class AgentBroker(BaseModel):
    """The broker address written into gateways' bootstrap bundles (as the gateways see it,
    which may differ from how the fleet reaches it)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    host: str
    port: Annotated[int, Field(ge=1, le=65535)] = 1883


class FleetConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: Id = "fleet"
    mqtt: MqttSettings = MqttSettings()
    database: Path = Path("/var/lib/campus-fleet/fleet.db")
    sites: list[Id] | None = None
    profiles_dir: Path | None = None
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    signing_key: Path = Field(
        Path("/etc/campus-iot/fleet-signing.key"),
        description="Ed25519 private key (PEM) that signs configs; its public key is KEY.pub",
    )
    agent_broker: AgentBroker | None = Field(
        None, description="broker address for bootstrap bundles (default: the mqtt section's)"
    )
    ack_timeout_s: Annotated[float, Field(gt=0, le=86_400)] = Field(
        120.0, description="how long a rollout stage waits for every gateway's acknowledgement"
    )
    command_timeout_s: Annotated[float, Field(gt=0, le=3600)] = 30.0
    alerts: AlertRules = Field(
        default_factory=list, description="alert rules (see fleet/alerts.py)"
    )
    influx: InfluxSettings | None = Field(
        None, description="InfluxDB sink (see fleet/influx/); none: the sink is off"
    )


def load_config(path: Path) -> FleetConfig:
    config = load_document(FleetConfig, path)
    updates: dict[str, object] = {}
    for name in ("database", "signing_key", "profiles_dir"):
        value = getattr(config, name)
        if value is not None and not value.is_absolute():
            updates[name] = path.parent / value
    if config.influx is not None:
        updates["influx"] = config.influx.relative_to(path.parent)
    return config.model_copy(update=updates) if updates else config
