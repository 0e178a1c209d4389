"""The `influx:` section of fleet.yaml: where the sink writes, and how hard it tries.

Rules: secrets are never in the config itself, only where to read them (a file or an environment
variable), so dumping or logging the settings cannot leak them. `mode: v2` writes through
influxdb-client to /api/v2/write (InfluxDB 2.x/3.x, VictoriaMetrics); `mode: v1` posts the same line
protocol to /write of InfluxDB 1.x.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    field_validator,
    model_validator,
)

EnvName = Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]


class SecretError(Exception):
    """A configured secret cannot be read (missing file, unset variable, empty)."""


class _Influx(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    url: str = Field(description="base URL, e.g. http://influx.school.lan:8086")
    batch_size: Annotated[int, Field(ge=1, le=100_000)] = Field(
        5000, description="points per write request"
    )
    flush_interval_s: Annotated[float, Field(gt=0, le=60)] = Field(
        1.0, description="a batch that is not full is written after this long"
    )
    queue_max_points: Annotated[int, Field(ge=1000, le=100_000_000)] = Field(
        5_000_000, description="points kept while InfluxDB is unreachable; beyond, the oldest go"
    )
    timeout_s: Annotated[float, Field(gt=0, le=300)] = 10.0
    retry_initial_s: Annotated[float, Field(gt=0, le=60)] = 1.0
    retry_max_s: Annotated[float, Field(gt=0, le=3600)] = Field(
        60.0, description="cap of the back-off between failed writes (jittered)"
    )
    gzip: bool = True
    integers: Literal["integer", "float"] = Field(
        "float",
        description="numbers are written as floats by default: one point name can be an integer "
        "in one profile and a float in another (e.g. active_power), and InfluxDB refuses a "
        "field that changes type; 'integer' keeps integer readings as integer fields",
    )
    ca_file: Path | None = Field(None, description="CA bundle for https (default: the system's)")
    verify_tls: bool = True

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/")

    def relative_to(self, base: Path) -> Self:
        """The settings with relative file paths taken from `base` (the config's folder)."""
        updates = {
            name: base / value
            for name in ("ca_file", "token_file", "password_file")
            if isinstance(value := getattr(self, name, None), Path) and not value.is_absolute()
        }
        return self.model_copy(update=updates) if updates else self

    @property
    def target(self) -> str:
        """Where points go, for logs and status (never with a secret)."""
        raise NotImplementedError


class InfluxV2(_Influx):
    """InfluxDB 2.x/3.x (or any server with /api/v2/write) through influxdb-client."""

    mode: Literal["v2"] = "v2"
    org: str = Field(min_length=1)
    bucket: str = Field(min_length=1)
    token_file: Path | None = Field(None, description="file holding the API token")
    token_env: EnvName | None = Field(None, description="environment variable holding the token")

    @model_validator(mode="after")
    def _one_token(self) -> InfluxV2:
        if self.token_file is not None and self.token_env is not None:
            raise ValueError("set token_file or token_env, not both")
        return self

    @property
    def target(self) -> str:
        return f"{self.url} org {self.org} bucket {self.bucket}"

    def token(self) -> str | None:
        return read_secret(self.token_file, self.token_env, "token")


class InfluxV1(_Influx):
    """InfluxDB 1.x: line protocol posted to /write?db=…&precision=ns."""

    mode: Literal["v1"]
    database: str = Field(min_length=1)
    retention_policy: str | None = Field(None, description="default: the database's default")
    username: str | None = None
    password_file: Path | None = None
    password_env: EnvName | None = None

    @model_validator(mode="after")
    def _credentials(self) -> InfluxV1:
        if self.password_file is not None and self.password_env is not None:
            raise ValueError("set password_file or password_env, not both")
        if self.username is None and (self.password_file or self.password_env):
            raise ValueError("a password needs a username")
        return self

    @property
    def target(self) -> str:
        rp = f" retention policy {self.retention_policy}" if self.retention_policy else ""
        return f"{self.url} database {self.database}{rp}"

    def password(self) -> str | None:
        return read_secret(self.password_file, self.password_env, "password")


def _mode(value: Any) -> str:
    if isinstance(value, dict):
        return str(value.get("mode", "v2"))
    return str(getattr(value, "mode", "v2"))


InfluxSettings = Annotated[
    Annotated[InfluxV2, Tag("v2")] | Annotated[InfluxV1, Tag("v1")],
    Discriminator(_mode, custom_error_type="mode", custom_error_message="mode must be v2 or v1"),
]


def read_secret(path: Path | None, env: str | None, what: str) -> str | None:
    """The secret from its file (surrounding whitespace stripped) or variable; None when the
    config names neither. Raises `SecretError` naming where it looked, never the value."""
    if path is not None:
        try:
            value = path.read_text().strip()
        except OSError as exc:
            raise SecretError(f"cannot read the {what} file {path}: {exc.strerror}") from None
        if not value:
            raise SecretError(f"the {what} file {path} is empty")
        return value
    if env is not None:
        value = os.environ.get(env, "").strip()
        if not value:
            raise SecretError(f"the environment variable {env} (the {what}) is not set")
        return value
    return None
