"""`connection:` of a device that publishes on an MQTT broker (an e-class board, a sensor hub):
the broker (the gateway's own by default, or a vendor's) and the device's base topic."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from wire.net import bare_host

TOPIC_PATTERN = r"^[^#+\x00]{1,200}$"


class MqttDeviceConnection(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    type: Literal["mqtt"]
    host: Annotated[str, AfterValidator(bare_host)] = "localhost"
    port: Annotated[int, Field(ge=1, le=65535)] = 1883
    username: str | None = None
    password: str | None = None
    tls: bool = False
    topic: Annotated[str, Field(pattern=TOPIC_PATTERN)] = Field(
        description="the device's base topic, e.g. eclass/board-101 (no wildcards)"
    )
    timeout_s: Annotated[float, Field(gt=0, le=60)] = 5.0
