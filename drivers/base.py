"""The one interface every device driver implements.

A driver is created from a validated profile and a connection; it does its own protocol I/O and
nothing else: no buffering, no scheduling, no MQTT. `read()` returns every point it could decode
and names the ones it refused, so one bad value never hides the others.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

from drivers.profile_base import Point

Value = bool | int | float | str


@dataclass(slots=True)
class PollResult:
    values: list[tuple[str, Value]] = field(default_factory=list)
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (point, why)

    def add(self, point: Point, raw: Any) -> bool:
        """Keeps `raw` as the point's value if its type and range allow, else the reason."""
        value, why = point.check(raw)
        if value is None:
            self.rejected.append((point.name, why or "no value"))
            return False
        self.values.append((point.name, value))
        return True


class Driver(ABC):
    """open → read* → close. Errors are `drivers.errors.DriverError` subclasses."""

    #: Requests for drivers with the same bus key are serialised (one RS-485 line, one TCP peer).
    bus: str
    #: The longest a `read()` may take within the driver's own bounds (e.g. connection attempts
    #: with back-off); the agent allows the larger of this and the device's `timeout_s`.
    poll_timeout_s: float = 0.0

    @abstractmethod
    async def open(self) -> None: ...

    @abstractmethod
    async def read(self) -> PollResult: ...

    @abstractmethod
    async def close(self) -> None: ...

    async def command(
        self, name: str, argument: Any = None, options: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """Runs a profile command and returns what the device reports back. ValueError: the
        request is wrong (nothing was sent); DriverError: the device failed."""
        raise ValueError(f"{type(self).__name__} has no command path")
