"""`connection:` of a device that publishes on an MQTT broker (an e-class board, a sensor hub):
the broker (the gateway's own by default, or a vendor's) and the device's base topic.

The port is 1883, or 8883 with `tls: true` when none is given. Devices with the same broker,
port, credentials, TLS settings and MQTT version share one client session on the gateway."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from wire.net import bare_host

TOPIC_PATTERN = r"^[^#+\x00]{1,200}$"
MQTT_TLS_PORT = 8883  # as mqtts:// URLs mean


class MqttDeviceConnection(BaseModel):
    # Python's re for the patterns: pydantic-core's engine spends most of a megabyte on
    # these Unicode classes, on a 1 GB gateway (see benchmarks/agent_e2e.py).
    model_config = ConfigDict(extra="forbid", frozen=True, regex_engine="python-re")
    type: Literal["mqtt"]
    host: Annotated[str, AfterValidator(bare_host)] = "localhost"
    port: Annotated[int, Field(ge=1, le=65535, description="1883, or 8883 with tls")] = 1883
    username: str | None = None
    password: str | None = None
    tls: bool = False
    ca_file: Path | None = Field(
        None, description="CA of the broker's certificate (TLS); default: the system's CAs"
    )
    mqtt_version: Literal["5", "3.1.1"] = Field("5", description="3.1.1 for an older vendor broker")
    keepalive_s: Annotated[int, Field(ge=5, le=3600)] = 30
    topic: Annotated[str, Field(pattern=TOPIC_PATTERN)] = Field(
        description="the device's base topic, e.g. eclass/board-101 (no wildcards)"
    )
    timeout_s: Annotated[float, Field(gt=0, le=60)] = Field(
        3.0,
        description="waits for the broker (first connection, acknowledgements) and for a "
        "first status; below the device's own timeout_s (5 s) so that its reason is the one "
        "reported",
    )

    @model_validator(mode="before")
    @classmethod
    def _tls_port(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("tls") is True and "port" not in data:
            return {**data, "port": MQTT_TLS_PORT}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> MqttDeviceConnection:
        if self.topic.startswith("/") or self.topic.endswith("/"):
            raise ValueError(f"topic {self.topic!r}: no leading or ending /")
        if self.ca_file is not None and not self.tls:
            raise ValueError("'ca_file' is for TLS: set 'tls: true' too")
        if self.password is not None and self.username is None:
            raise ValueError("a 'password' needs a 'username'")
        return self

    def session_key(self) -> tuple[object, ...]:
        """What devices must have in common to share one client session."""
        return (
            self.host,
            self.port,
            self.username,
            self.password,
            self.tls,
            self.ca_file,
            self.mqtt_version,
            self.keepalive_s,
        )
