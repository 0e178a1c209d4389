"""Control-plane messages (fleet → agent → fleet): signed documents, acknowledgements, commands
and alerts.

| topic | direction | QoS / retain | model |
|---|---|---|---|
| `…/gw/{gw}/config`, `…/policy` | fleet → agent | 1, retained | `SignedDocument` |
| `…/gw/{gw}/ack` | agent → fleet | 1 | `Ack` |
| `…/gw/{gw}/cmd` | fleet → agent | 1 | `CommandRequest` |
| `…/gw/{gw}/cmd/result` | agent → fleet | 1 | `CommandResult` |
| `campus/{site}/alerts` | fleet → anyone | 1 | `AlertMessage` |
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from wire.models import Id, Nanos, PointName

CorrelationId = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")]
Version = Annotated[int, Field(ge=1, lt=2**63)]


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    v: Literal[1] = 1


class SignedDocument(_Message):
    """A versioned, signed config or policy for one gateway (see `wire.signing`)."""

    kind: Literal["config", "policy"]
    site: Id
    gateway: Id
    version: Version
    issued_ns: Nanos
    key_id: Annotated[str, Field(pattern=r"^[0-9a-f]{16}$")]
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    body: dict[str, Any]
    signature: str


class AckStatus(StrEnum):
    APPLIED = "applied"
    REJECTED = "rejected"


class Ack(_Message):
    """The agent's answer to a signed document: applied, or rejected with the reason."""

    kind: Literal["config", "policy"]
    version: Annotated[int, Field(ge=0, lt=2**63)]
    sha256: str | None = None
    status: AckStatus
    reason: Annotated[str, Field(max_length=4000)] | None = None
    applied_version: Annotated[int, Field(ge=0, lt=2**63)] = 0
    ts_ns: Nanos


class CommandRequest(_Message):
    """Run `action` on `device` (a command of the device's profile), before `deadline_ns`."""

    id: CorrelationId
    device: Id
    action: PointName
    argument: Any = None
    options: dict[PointName, Any] = Field(
        default_factory=dict, description="named extras of the command, e.g. {minutes: 10}"
    )
    issued_ns: Nanos
    deadline_ns: Nanos


class CommandOutcome(StrEnum):
    OK = "ok"
    UNKNOWN_DEVICE = "unknown_device"
    UNKNOWN_ACTION = "unknown_action"
    BAD_ARGUMENT = "bad_argument"
    DEVICE_ERROR = "device_error"
    TIMEOUT = "timeout"
    EXPIRED = "expired"  # arrived after its deadline (e.g. the gateway was offline): not run


class CommandResult(_Message):
    id: CorrelationId
    device: Id
    outcome: CommandOutcome
    result: dict[str, Any] = Field(default_factory=dict)
    error: Annotated[str, Field(max_length=4000)] | None = None
    finished_ns: Nanos


class AlertState(StrEnum):
    RAISED = "raised"
    CLEARED = "cleared"


class AlertMessage(_Message):
    """Published by the fleet when an alert is raised or cleared, for other systems."""

    id: Annotated[int, Field(ge=1)]
    rule: Annotated[str, Field(min_length=1, max_length=100)]
    severity: Literal["info", "warning", "critical"] | None = None
    state: AlertState
    site: Id
    gateway: Id | None = None
    device: Id | None = None
    point: PointName | None = None
    value: float | None = None
    message: Annotated[str, Field(max_length=2000)]
    raised_ns: Nanos
    cleared_ns: Nanos | None = None
