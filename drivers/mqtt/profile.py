"""The MQTT part of a firmware profile: the topics a device publishes, the JSON fields in them
that are points, how it says it is online, and the publishes that are its commands.

Every topic here is relative to the device's base topic (the connection's `topic`, e.g.
`eclass/board-101`): `state` means `eclass/board-101/state`, and '' the base topic itself.
Templates are checked at load: every placeholder must have a value, the argument and every
option must be sent, and a command whose answer is matched by id must send `{request}`. A point
has no `poll_interval_s`: the device pushes its values, each poll records the latest.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from drivers.mqtt.codec import placeholders, split_path, template_problems
from drivers.profile_base import CommandBase, Point, ProfileBase

#: placeholders every command template may use besides its argument and options
BUILTIN_PLACEHOLDERS = frozenset({"request", "command"})


def _relative_topic(value: str) -> str:
    if any(c in value for c in "#+\x00"):
        raise ValueError(f"topic {value!r}: no wildcards (# +) in a profile topic")
    if value.startswith("/") or value.endswith("/"):
        raise ValueError(f"topic {value!r} is relative to the base topic: no leading or ending /")
    if len(value) > 200:
        raise ValueError("a topic has at most 200 characters")
    return value


def _json_path(value: str) -> str:
    split_path(value)
    return value


RelativeTopic = Annotated[str, AfterValidator(_relative_topic)]
JsonPath = Annotated[
    str,
    AfterValidator(_json_path),
    Field(description="dotted path in a JSON payload, e.g. display.screen or disks.0.free_mb"),
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MqttPoint(Point):
    """`topic` is relative to the device's base topic; `path` is a dotted JSON path in its
    payload (empty: the whole payload is the value, JSON or plain text)."""

    topic: RelativeTopic
    path: JsonPath = ""

    @model_validator(mode="after")
    def _pushed(self) -> MqttPoint:
        if self.poll_interval_s is not None:
            raise ValueError(
                "MQTT devices are push devices, they report when they publish: "
                "poll_interval_s does not apply (remove it; each poll records the latest value "
                "heard, every interval_s of the device)"
            )
        return self


class StatusSpec(_Strict):
    """A status topic the device keeps retained, usually also its MQTT Last Will."""

    topic: RelativeTopic = "status"
    path: JsonPath = Field("", description="where the word is in a JSON payload ('' = all of it)")
    online: str = "online"
    offline: str = "offline"

    @model_validator(mode="after")
    def _distinct(self) -> StatusSpec:
        if self.online.strip().lower() == self.offline.strip().lower():
            raise ValueError("'online' and 'offline' must be different words")
        return self


class HeartbeatSpec(_Strict):
    """A topic the device publishes on at least every `interval_s`; silent for `missed`
    intervals means offline. `topic: null`: any message of the device counts."""

    topic: RelativeTopic | None = "heartbeat"
    interval_s: Annotated[float, Field(gt=0, le=86_400)]
    missed: Annotated[int, Field(ge=1, le=100)] = 3

    @property
    def window_s(self) -> float:
        return self.interval_s * self.missed


class OnlineSpec(_Strict):
    """How the device says it is alive: a status topic, a heartbeat, or both."""

    status: StatusSpec | None = None
    heartbeat: HeartbeatSpec | None = None

    @model_validator(mode="after")
    def _something(self) -> OnlineSpec:
        if self.status is None and self.heartbeat is None:
            raise ValueError("'online' needs a 'status' topic, a 'heartbeat', or both")
        return self


class ReplySpec(_Strict):
    """Where a device answers commands and how an answer is told apart."""

    topic: RelativeTopic = "result"
    match: JsonPath = Field(
        "id",
        description="path in the answer holding the {request} id sent; '' = the first message",
    )
    error: JsonPath = Field(
        "", description="path of an error text: when present and not empty, the command failed"
    )
    timeout_s: Annotated[float, Field(gt=0, le=300)] = 10.0


class MqttCommand(CommandBase):
    """A QoS 1 publish on `topic` of `payload` with its placeholders filled: `{argument}`,
    `{request}` (an id made for each run), `{command}` and each option by name. A mapping or
    list is sent as JSON, a string as plain text."""

    topic: RelativeTopic
    payload: dict[str, Any] | list[Any] | str = Field(default_factory=dict)
    reply: ReplySpec | Literal[False] | None = Field(
        None, description="None: the profile's `reply`; false: the device never answers"
    )

    @model_validator(mode="after")
    def _template(self) -> MqttCommand:
        known = set(BUILTIN_PLACEHOLDERS) | set(self.options)
        if self.argument is not None:
            known.add("argument")
        problems = template_problems(self.payload, known)
        if problems:
            raise ValueError(f"command {self.name!r} payload: {'; '.join(problems)}")
        used = placeholders(self.payload)
        unsent = sorted((known - set(BUILTIN_PLACEHOLDERS)) - used)
        if unsent:
            raise ValueError(
                f"command {self.name!r} never sends {', '.join('{' + n + '}' for n in unsent)}"
            )
        return self


class MqttProfile(ProfileBase):
    protocol: Literal["mqtt"]
    online: OnlineSpec
    reply: ReplySpec | None = Field(
        None, description="where commands are answered, for commands that do not say"
    )
    max_payload_bytes: Annotated[int, Field(ge=64, le=1_048_576)] = Field(
        65_536, description="larger payloads are refused, their points rejected"
    )
    points: Annotated[list[MqttPoint], Field(min_length=1)]
    commands: list[MqttCommand] = Field(default_factory=list)

    @model_validator(mode="after")
    def _replies(self) -> MqttProfile:
        for command in self.commands:
            reply = self.reply_of(command)
            if reply is not None and reply.match and "request" not in placeholders(command.payload):
                raise ValueError(
                    f"command {command.name!r}: its answer is matched on '{reply.match}', "
                    "so its payload must send {request}"
                )
        return self

    def reply_of(self, command: MqttCommand) -> ReplySpec | None:
        """Where `command` is answered; None when the device never answers it."""
        if command.reply is False:
            return None
        return command.reply if command.reply is not None else self.reply
