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
    timeout_s: Annotated[float, Field(gt=0, le=60)] = Field(
        10.0, description="GATT: the longest one connection attempt may take"
    )
    local_name: Annotated[str, Field(min_length=1, max_length=29)] | None = Field(
        None,
        description="recognise the sensor by the name it advertises instead of its address "
        "(sensors with rotating private addresses); the address still names it in messages",
    )
    advert_interval_s: Annotated[float, Field(gt=0, le=86_400)] | None = Field(
        None, description="BTHome: how often this sensor advertises, if not the profile's"
    )
    scan: Literal["passive", "active"] = Field(
        "passive",
        description="active: ask for scan responses too (a name sent only there); the "
        "adapter scans actively as soon as one of its devices asks for it",
    )
