"""`connection:` of a PJLink display (projector or flat panel) in a gateway config."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from wire.net import bare_host


class PjlinkConnection(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    type: Literal["pjlink"]
    host: Annotated[str, AfterValidator(bare_host)]
    port: Annotated[int, Field(ge=1, le=65535)] = 4352
    password: Annotated[str, Field(max_length=32)] | None = Field(
        None, description="the display's PJLink password (none: the display asks for none)"
    )
    timeout_s: Annotated[float, Field(gt=0, le=60)] = 5.0
