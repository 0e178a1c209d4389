"""`connection:` of a security camera: its ONVIF device service and, optionally, a stream URL to
probe with RTSP (OPTIONS/DESCRIBE only: no video is ever read)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from drivers.camera.rtsp_url import parse_url
from wire.net import bare_host


class OnvifConnection(BaseModel):
    # Python's re for the patterns: pydantic-core's engine spends most of a megabyte on
    # these Unicode classes, on a 1 GB gateway (see benchmarks/agent_e2e.py).
    model_config = ConfigDict(extra="forbid", frozen=True, regex_engine="python-re")
    type: Literal["onvif"]
    host: Annotated[str, AfterValidator(bare_host)]
    port: Annotated[int, Field(ge=1, le=65535, description="80, or 443 with https")] = 80
    path: Annotated[str, Field(pattern=r"^/[^\s]*$")] = "/onvif/device_service"
    https: bool = False
    verify_tls: bool = Field(
        True, description="false accepts any certificate (cameras with self-signed ones)"
    )
    username: str | None = None
    password: str | None = None
    rtsp_url: Annotated[str, Field(pattern=r"^rtsp://\S+$")] | None = Field(
        None, description="stream to probe, e.g. rtsp://[fd00::30]:554/stream1"
    )
    timeout_s: Annotated[float, Field(gt=0, le=60)] = Field(
        3.0,
        description="for the ONVIF calls of one poll, and for the RTSP probe (run side by side); "
        "keep it below the device's timeout_s",
    )

    @model_validator(mode="before")
    @classmethod
    def _https_port(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("https") is True and "port" not in data:
            return {**data, "port": 443}
        return data

    @model_validator(mode="after")
    def _rtsp_url(self) -> OnvifConnection:
        if self.rtsp_url is not None:
            parse_url(self.rtsp_url)
        return self
