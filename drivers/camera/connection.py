"""`connection:` of a security camera: its ONVIF device service and, optionally, a stream URL to
probe with RTSP (OPTIONS/DESCRIBE only: no video is ever read)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from wire.net import bare_host


class OnvifConnection(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    type: Literal["onvif"]
    host: Annotated[str, AfterValidator(bare_host)]
    port: Annotated[int, Field(ge=1, le=65535)] = 80
    path: Annotated[str, Field(pattern=r"^/[^\s]*$")] = "/onvif/device_service"
    https: bool = False
    username: str | None = None
    password: str | None = None
    rtsp_url: Annotated[str, Field(pattern=r"^rtsp://\S+$")] | None = Field(
        None, description="stream to probe, e.g. rtsp://[fd00::30]:554/stream1"
    )
    timeout_s: Annotated[float, Field(gt=0, le=60)] = 5.0
