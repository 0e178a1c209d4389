"""The PJLink part of a firmware profile: which PJLink values a display answers, as points, and
its commands (power, input, mute).

PJLink (JBMIA, class 1 and 2) is the same on every projector and flat panel that speaks it, so a
profile mostly says which class the model supports, its inputs' names, and the lamp/filter life
limits to alert on. Everything is checked at load: query names, each point's type against its
query, class 2 queries in a class 1 profile, command parameters and input codes.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from drivers.pjlink.codec import MUTE_SETTINGS, QUERIES, input_code, valid_input
from drivers.profile_base import CommandBase, Point, ProfileBase, ValueType

#: The point types a query's value may be stored as.
_TYPES_OF = {
    "int": (ValueType.INT, ValueType.FLOAT),
    "bool": (ValueType.BOOL,),
    "string": (ValueType.STRING,),
}


class PjlinkPoint(Point):
    """A point read by a PJLink query, e.g. `query: lamp_hours` (drivers/pjlink/codec.py,
    QUERIES). `type` defaults to the query's own type."""

    query: str = Field(description="what the point reads: power, input, error.lamp, …")

    @model_validator(mode="before")
    @classmethod
    def _type_from_query(cls, data: Any) -> Any:
        if isinstance(data, dict) and "type" not in data:
            query = QUERIES.get(str(data.get("query")))
            if query is not None:
                data = {**data, "type": query.type}
        return data

    @model_validator(mode="after")
    def _known_query(self) -> PjlinkPoint:
        query = QUERIES.get(self.query)
        if query is None:
            raise ValueError(f"unknown PJLink query {self.query!r} (queries: {', '.join(QUERIES)})")
        if self.type not in _TYPES_OF[query.type]:
            allowed = " or ".join(t.value for t in _TYPES_OF[query.type])
            raise ValueError(f"query {self.query!r} gives {query.type}: type must be {allowed}")
        return self

    @property
    def pclass(self) -> int:
        """The PJLink class the point's query needs."""
        return QUERIES[self.query].pclass


SETTABLE = ("POWR", "INPT", "AVMT")


class PjlinkCommand(CommandBase):
    """A set request: `set: POWR` with a fixed `value` (1 for power on), or with the argument.

    POWR takes 0/1 (argument: bool); AVMT takes 10, 11, 20, 21, 30, 31 (argument: bool, true =
    31, or a choice of those numbers); INPT takes an input code such as 31, a name from the
    profile's `inputs:`, or a specification name such as digital1 (argument: text or choice).
    After the request the driver reads the state back (POWR ?, INPT ?, AVMT ?).
    """

    set: Literal["POWR", "INPT", "AVMT"] = Field(description="the PJLink command to send")
    value: str | None = Field(None, description="a fixed parameter, e.g. 1 for power on")

    @field_validator("value", mode="before")
    @classmethod
    def _value_as_text(cls, value: Any) -> Any:
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value

    @model_validator(mode="after")
    def _value_or_argument(self) -> PjlinkCommand:
        if (self.value is None) == (self.argument is None):
            raise ValueError("a command has either a fixed 'value' or an 'argument'")
        argument = self.argument
        if self.set == "POWR":
            if self.value is not None and self.value not in ("0", "1"):
                raise ValueError(f"POWR takes 0 (standby) or 1 (on), not {self.value!r}")
            if argument is not None and argument.type != "bool":
                raise ValueError("the argument of a POWR command is a bool (on/off)")
        elif self.set == "AVMT":
            if self.value is not None and self.value not in MUTE_SETTINGS:
                raise ValueError(f"AVMT takes {', '.join(MUTE_SETTINGS)}, not {self.value!r}")
            if argument is not None and argument.type not in ("bool", "choice"):
                raise ValueError("the argument of an AVMT command is a bool or a choice")
            for word, raw in (argument.choices or {}).items() if argument else ():
                if str(raw) not in MUTE_SETTINGS:
                    raise ValueError(f"choice {word!r}: AVMT takes {', '.join(MUTE_SETTINGS)}")
        elif argument is not None and argument.type not in ("text", "choice"):
            raise ValueError("the argument of an INPT command is text or a choice")
        return self


InputName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,31}$")]


class PjlinkProfile(ProfileBase):
    protocol: Literal["pjlink"]
    pjlink_class: Literal[1, 2] = Field(1, description="2 where the device says so (CLSS ?)")
    inputs: dict[InputName, str] = Field(
        default_factory=dict,
        description="the model's input names and their codes, e.g. {HDMI1: '32', VGA: '11'}",
    )
    points: Annotated[list[PjlinkPoint], Field(min_length=1)]
    commands: list[PjlinkCommand] = Field(default_factory=list)

    @field_validator("inputs", mode="before")
    @classmethod
    def _codes_as_text(cls, inputs: Any) -> Any:
        if isinstance(inputs, dict):
            return {k: str(v) if isinstance(v, int) else v for k, v in inputs.items()}
        return inputs

    @model_validator(mode="after")
    def _fits_class(self) -> PjlinkProfile:
        for point in self.points:
            if point.pclass > self.pjlink_class:
                raise ValueError(
                    f"point {point.name!r}: query {point.query!r} needs PJLink class "
                    f"{point.pclass}, the profile says pjlink_class {self.pjlink_class}"
                )
        seen: dict[str, str] = {}
        for name, code in self.inputs.items():
            if not valid_input(code, self.pjlink_class):
                raise ValueError(
                    f"input {name!r}: {code!r} is not a class {self.pjlink_class} input code"
                )
            if name.lower() in seen:
                raise ValueError(f"input names {seen[name.lower()]!r} and {name!r} are the same")
            seen[name.lower()] = name
        for command in self.commands:
            if command.set != "INPT":
                continue
            if command.value is not None:
                self.input_parameter(command.value)  # ValueError names the unknown input
            for word, raw in ((command.argument and command.argument.choices) or {}).items():
                if not valid_input(str(raw), self.pjlink_class):
                    raise ValueError(
                        f"command {command.name!r}, choice {word!r}: {raw} is not an input code"
                    )
        return self

    def input_parameter(self, given: str) -> str:
        """The INPT code for a name of this profile ("HDMI1"), a specification name
        ("digital1") or a code ("31"); ValueError naming the inputs otherwise."""
        word = given.strip()
        for name, code in self.inputs.items():
            if name.lower() == word.lower():
                return code
        spec_code = input_code(word)
        if spec_code is not None and valid_input(spec_code, self.pjlink_class):
            return spec_code
        known = ", ".join(self.inputs) or "none named in the profile"
        raise ValueError(
            f"{given!r} is not an input: give a code such as 31, a name such as digital1, or "
            f"one of the profile's inputs ({known})"
        )

    def input_names(self) -> dict[str, str]:
        """code -> the profile's name, for `input_name` points (the first name of a code)."""
        names: dict[str, str] = {}
        for name, code in self.inputs.items():
            names.setdefault(code, name)
        return names

    def point(self, name: str) -> PjlinkPoint:
        for point in self.points:
            if point.name == name:
                return point
        raise KeyError(name)

    def command(self, name: str) -> PjlinkCommand:
        found = super().command(name)
        assert isinstance(found, PjlinkCommand)
        return found
