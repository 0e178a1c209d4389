"""What every firmware profile has, whatever its protocol: identity, device kind, points with
units, priorities and alarm thresholds, and commands with checked arguments.

Each protocol extends these in its own package (`drivers/<protocol>/profile.py`) with where a point
comes from on the wire (a Modbus register, a PJLink query, an MQTT topic and JSON path, a BTHome
object id…); `drivers/profiles.py` puts them together and loads the files.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

PointName = Annotated[str, Field(pattern=r"^[a-z0-9_][a-z0-9_.-]{0,63}$")]


class DeviceKind(StrEnum):
    SENSOR = "sensor"
    METER = "meter"
    DISPLAY = "display"
    BOARD = "board"
    CAMERA = "camera"


class _Strict(BaseModel):
    # Built on first use: the bases are never validated on their own, and a gateway only pays
    # for the protocols its profiles use.
    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)


class Alarm(_Strict):
    """Thresholds that raise an `alarm` event when crossed, and clear it with hysteresis."""

    low: float | None = None
    high: float | None = None
    hysteresis: Annotated[float, Field(ge=0)] = 0.0

    @model_validator(mode="after")
    def _consistent(self) -> Alarm:
        if self.low is None and self.high is None:
            raise ValueError("an alarm needs 'low', 'high' or both")
        if self.low is not None and self.high is not None and self.low >= self.high:
            raise ValueError(f"alarm low {self.low} must be below high {self.high}")
        return self


TRUE_WORDS = ("on", "true", "1", "yes")
FALSE_WORDS = ("off", "false", "0", "no")


def to_bool(value: Any) -> bool:
    """on/off, true/false, yes/no, 1/0 (as words or numbers); ValueError for anything else."""
    if isinstance(value, bool):
        return value
    word = str(value).strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise ValueError(f"{value!r} is not on/off (true/false)")


class ValueType(StrEnum):
    """The type of a point's value, for protocols that do not spell out bit layouts."""

    INT = "int"
    FLOAT = "float"
    BOOL = "bool"
    STRING = "string"

    @property
    def numeric(self) -> bool:
        return self in (ValueType.INT, ValueType.FLOAT)


class PointBase(_Strict):
    """A value a device exposes, as dashboards and alerts see it."""

    name: PointName
    unit: str = ""
    description: str = ""
    min: float | None = None
    max: float | None = None
    priority: Literal["low", "normal", "high"] = Field(
        "normal", description="buffer eviction order: low goes first, high (alarms) last"
    )
    alarm: Alarm | None = None
    poll_interval_s: Annotated[float, Field(gt=0, le=86_400)] | None = None

    @property
    def writable(self) -> bool:
        return False

    def _check_limits(self, numeric: bool, kind: str) -> None:
        if not numeric and (self.min is not None or self.max is not None or self.alarm):
            raise ValueError(f"min, max and alarm apply to numbers, not to a {kind}")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min {self.min} is above max {self.max}")


class Point(PointBase):
    """A point of a protocol whose values arrive already typed (PJLink, MQTT, ONVIF, BLE)."""

    type: ValueType = ValueType.FLOAT

    @model_validator(mode="after")
    def _limits(self) -> Point:
        self._check_limits(self.type.numeric, self.type.value)
        return self

    def check(self, value: Any) -> tuple[bool | int | float | str | None, str | None]:
        """(value converted to the point's type, None) or (None, why it is refused)."""
        try:
            if self.type is ValueType.BOOL:
                return to_bool(value), None
            if self.type is ValueType.STRING:
                if isinstance(value, dict | list):
                    return None, f"expected text, got {type(value).__name__}"
                return str(value)[:256], None
            if isinstance(value, bool) or not isinstance(value, int | float | str):
                return None, f"expected a number, got {value!r:.40}"
            number: int | float = float(value)
            if not math.isfinite(number):
                return None, f"not a finite number: {value!r:.40}"
            if self.type is ValueType.INT:
                number = int(value) if isinstance(value, int | str) else int(number)
        except (TypeError, ValueError, OverflowError):
            return None, f"expected {self.type.value}, got {value!r:.40}"
        if self.min is not None and number < self.min:
            return None, f"{number} below the valid minimum {self.min:g}"
        if self.max is not None and number > self.max:
            return None, f"{number} above the valid maximum {self.max:g}"
        return number, None


class Argument(_Strict):
    """What a command accepts; checked before anything is sent to the device."""

    type: Literal["bool", "int", "float", "choice", "text"]
    min: float | None = None
    max: float | None = None
    choices: dict[str, int] | None = Field(None, description="for 'choice': word -> raw value")
    max_length: Annotated[int, Field(ge=1, le=4000)] | None = Field(
        None, description="for 'text': the most characters the device shows"
    )
    default: Any = Field(None, description="for an option: its value when not given")

    @model_validator(mode="after")
    def _consistent(self) -> Argument:
        if (self.choices is not None) != (self.type == "choice"):
            raise ValueError("'choices' is needed by, and only by, type 'choice'")
        if self.type in ("bool", "choice", "text") and (
            self.min is not None or self.max is not None
        ):
            raise ValueError(f"min and max do not apply to type '{self.type}'")
        if self.max_length is not None and self.type != "text":
            raise ValueError("'max_length' applies to type 'text' only")
        if self.default is not None:
            self.check(self.default)
        return self

    def check(self, value: Any) -> int | float | bool | str:
        """The value to send, or ValueError naming what is wrong with `value`."""
        if self.type == "bool":
            return to_bool(value)
        if self.type == "text":
            if not isinstance(value, str | int | float) or isinstance(value, bool):
                raise ValueError(f"{value!r} is not text")
            text = str(value)
            if not text.strip():
                raise ValueError("the text is empty")
            if self.max_length is not None and len(text) > self.max_length:
                raise ValueError(f"the text has {len(text)} characters, at most {self.max_length}")
            if any(ord(c) < 32 and c not in "\n\t" for c in text):
                raise ValueError("the text contains control characters")
            return text
        if self.type == "choice":
            assert self.choices is not None
            word = value if value in self.choices else str(value)  # 9600 given for "9600"
            if word not in self.choices:
                raise ValueError(f"{value!r} is not one of {', '.join(self.choices)}")
            return self.choices[word]
        try:
            number: int | float = int(value) if self.type == "int" else float(value)
        except (TypeError, ValueError):
            what = "an integer" if self.type == "int" else "a number"
            raise ValueError(f"{value!r} is not {what}") from None
        if isinstance(value, float) and self.type == "int" and not value.is_integer():
            raise ValueError(f"{value!r} is not a whole number")
        if self.min is not None and number < self.min:
            raise ValueError(f"{number} is below the minimum {self.min:g}")
        if self.max is not None and number > self.max:
            raise ValueError(f"{number} is above the maximum {self.max:g}")
        return number


class CommandBase(_Strict):
    """A named action IT staff can run on a device (from the CLI, a schedule or a script)."""

    name: PointName
    description: str = ""
    argument: Argument | None = None
    options: dict[PointName, Argument] = Field(
        default_factory=dict,
        description="named extras, e.g. {minutes: {type: int, min: 1, max: 1440, default: 10}}",
    )

    def check_argument(self, argument: Any) -> Any:
        """The checked positional argument, or ValueError (None when the command takes none)."""
        if self.argument is None:
            if argument is not None:
                raise ValueError(f"command {self.name!r} takes no argument")
            return None
        if argument is None:
            raise ValueError(f"command {self.name!r} needs an argument ({self.argument.type})")
        return self.argument.check(argument)

    def check_options(self, given: Mapping[str, Any] | None) -> dict[str, Any]:
        """Every option with its checked value or its default; ValueError naming a bad one."""
        given = dict(given or {})
        unknown = sorted(set(given) - set(self.options))
        if unknown:
            known = ", ".join(f"--{name}" for name in self.options) or "none"
            raise ValueError(
                f"command {self.name!r} has no option {', '.join(unknown)} (options: {known})"
            )
        checked: dict[str, Any] = {}
        for name, spec in self.options.items():
            if name in given:
                try:
                    checked[name] = spec.check(given[name])
                except ValueError as exc:
                    raise ValueError(f"--{name}: {exc}") from None
            elif spec.default is not None:
                checked[name] = spec.check(spec.default)
            else:
                raise ValueError(f"command {self.name!r} needs --{name} ({spec.type})")
        return checked


class ProfileBase(_Strict):
    """Identity and contents shared by every protocol's profile."""

    id: str = ""
    vendor: str
    model: str
    firmware: str = Field("*", description="firmware versions this map is valid for, e.g. '>=1.2'")
    protocol: str
    kind: DeviceKind
    description: str = ""
    source: str = Field(description="where the map comes from (manual, section, standard)")
    points: Sequence[PointBase]
    commands: Sequence[CommandBase] = ()

    @model_validator(mode="after")
    def _unique_names(self) -> ProfileBase:
        for what, names in (
            ("point", [p.name for p in self.points]),
            ("command", [c.name for c in self.commands]),
        ):
            seen: set[str] = set()
            for name in names:
                if name in seen:
                    raise ValueError(f"{what} name {name!r} is used twice")
                seen.add(name)
        return self

    def point(self, name: str) -> PointBase:
        for point in self.points:
            if point.name == name:
                return point
        raise KeyError(name)

    def command(self, name: str) -> CommandBase:
        for command in self.commands:
            if command.name == name:
                return command
        known = ", ".join(c.name for c in self.commands) or "none"
        raise KeyError(f"{self.id} has no command {name!r} (commands: {known})")
