"""`connection:` of a Bluetooth Low Energy sensor: its address, the gateway's adapter, and the
BTHome bind key of a sensor that encrypts its adverts."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

MAC_PATTERN = r"^[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}$"


class BleConnection(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    type: Literal["ble"]
    address: Annotated[str, Field(pattern=MAC_PATTERN), AfterValidator(str.upper)]
    adapter: Annotated[str, Field(pattern=r"^hci\d{1,2}$")] = "hci0"
    bind_key: Annotated[str, Field(pattern=r"^[0-9A-Fa-f]{32}$")] | None = Field(
        None, description="BTHome encryption key (32 hex digits) of a sensor that encrypts"
    )
    timeout_s: Annotated[float, Field(gt=0, le=60)] = 10.0
