"""Message models of the wire contract (agent ⇄ fleet), version 1.

Rules: every model forbids unknown fields and carries `v` (the contract version); timestamps are
UTC nanoseconds; ids follow `topics.ID_PATTERN`. A telemetry batch carries readings as compact
arrays `[seq, ts_ns, device, point, value, quality]` so the agent can encode them straight from its
buffer rows without building one object per reading.
"""

from __future__ import annotations

from enum import IntFlag, StrEnum
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from wire.errors import InvalidMessage, problems_from
from wire.topics import ID_PATTERN

WIRE_VERSION = 1

Id = Annotated[str, Field(pattern=ID_PATTERN)]
PointName = Annotated[str, Field(pattern=r"^[a-z0-9_][a-z0-9_.-]{0,63}$")]
Nanos = Annotated[int, Field(ge=0, lt=2**63)]
Seq = Annotated[int, Field(ge=1, lt=2**63)]
Int64 = Annotated[int, Field(ge=-(2**63), lt=2**63)]  # what SQLite (and InfluxDB) can store
Value = bool | Int64 | float | str


class Quality(IntFlag):
    """Bits of a reading's quality field."""

    GOOD = 0
    CLOCK_UNSYNCED = 1  # stamped before the gateway's clock was synced, not corrected
    CLOCK_CORRECTED = 2  # stamped before sync, corrected from monotonic time once synced


Reading = tuple[Seq, Nanos, Id, PointName, Value, Annotated[int, Field(ge=0, le=255)]]


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    v: Literal[1] = 1


class TelemetryBatch(_Message):
    """A batch of readings, in sequence order, covering `first_seq..last_seq` (maybe with holes
    where readings were evicted before they were sent)."""

    first_seq: Seq
    last_seq: Seq
    sent_ns: Nanos
    readings: Annotated[list[Reading], Field(min_length=1, max_length=100_000)]

    @model_validator(mode="after")
    def _sequence_is_ordered(self) -> TelemetryBatch:
        if self.last_seq < self.first_seq:
            raise ValueError(f"last_seq {self.last_seq} is before first_seq {self.first_seq}")
        previous = self.first_seq - 1
        for index, reading in enumerate(self.readings):
            seq = reading[0]
            if seq <= previous or seq > self.last_seq:
                raise ValueError(
                    f"readings.{index}: seq {seq} is out of order or outside "
                    f"{self.first_seq}..{self.last_seq}"
                )
            previous = seq
        return self


class Status(StrEnum):
    ONLINE = "online"
    OFFLINE = "offline"


class BufferState(_Message):
    depth: Annotated[int, Field(ge=0)] = 0
    bytes: Annotated[int, Field(ge=0)] = 0
    evicted: Annotated[int, Field(ge=0)] = 0
    lost: Annotated[int, Field(ge=0)] = 0
    events: Annotated[int, Field(ge=0)] = 0
    last_seq: Annotated[int, Field(ge=0)] = 0


#: The longest `DeviceState.reason`; the agent cuts a longer error to it.
DEVICE_REASON_MAX = 500


class DeviceState(_Message):
    """`reason`: why the device is down (its last error), only while `up` is false. `alarms`:
    the points whose alarm threshold is crossed now (raised and not yet cleared), while the
    device answers (None: not known, e.g. before its first poll). Agents before them omit
    them."""

    id: Id
    profile: str
    kind: str
    up: bool | None = None
    reason: Annotated[str, Field(max_length=DEVICE_REASON_MAX)] | None = None
    alarms: Annotated[list[PointName], Field(max_length=1000)] | None = None


class PolicyCounter(_Message):
    """The counters of the nftables rules that carry one comment (`flow:<id>`, `drop:<chain>`,
    `admit:<zone>`…; see `wire.policy_nft`), summed."""

    rule: Annotated[str, Field(max_length=128)]
    verdict: Literal["accept", "drop", "jump", "other"]
    packets: Annotated[int, Field(ge=0)]
    bytes: Annotated[int, Field(ge=0)]


class PolicyState(_Message):
    """The network policy in force: its version, the SHA-256 of its compiled nftables text, and
    its rule counters as of `counters_ns`; `error` says why enforcement is not as pushed."""

    version: Annotated[int, Field(ge=0)] = 0
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")] | None = None
    table: str | None = None
    counters: list[PolicyCounter] = Field(default_factory=list)
    counters_ns: Nanos | None = None
    error: Annotated[str, Field(max_length=2000)] | None = None


class GatewayState(_Message):
    """Retained on `…/state`; the Last Will is the same model with only `status: offline`."""

    status: Status
    ts_ns: Nanos | None = None
    reason: str | None = None
    agent_version: str | None = None
    started_ns: Nanos | None = None
    clock_synced: bool | None = None
    keepalive_s: Annotated[int, Field(ge=1)] | None = None
    buffer: BufferState | None = None
    devices: list[DeviceState] | None = None
    config_version: Annotated[int, Field(ge=0)] | None = None
    policy_version: Annotated[int, Field(ge=0)] | None = None
    policy: PolicyState | None = None


class EventKind(StrEnum):
    DEVICE_UP = "device_up"
    DEVICE_DOWN = "device_down"
    REJECTED_INPUT = "rejected_input"
    BUFFER_EVICTION = "buffer_eviction"
    BUFFER_RESET = "buffer_reset"
    CLOCK_STEP = "clock_step"
    ALARM = "alarm"
    CONFIG = "config"  # a pushed config applied or rejected
    SCHEDULE = "schedule"  # a schedule ran (per-device outcomes) or was skipped
    COMMAND = "command"  # a fleet command ran on a device
    POLICY = "policy"  # a pushed network policy applied, rejected or rolled back; set changes


class Event(_Message):
    ts_ns: Nanos
    kind: EventKind
    device: Id | None = None
    message: Annotated[str, Field(max_length=2000)]
    data: dict[str, Any] = Field(default_factory=dict)


M = TypeVar("M", bound=BaseModel)


def decode(model: type[M], topic: str, payload: bytes | str) -> M:
    """Validates a JSON payload; raises `InvalidMessage` naming the topic, field and reason."""
    try:
        return model.model_validate_json(payload)
    except ValidationError as exc:
        raise InvalidMessage(topic, problems_from(exc)) from None


def encode(message: BaseModel) -> bytes:
    return message.model_dump_json(exclude_none=True).encode()


MODELS: dict[str, type[BaseModel]] = {
    "telemetry": TelemetryBatch,
    "state": GatewayState,
    "events": Event,
}
