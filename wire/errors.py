"""Errors of the wire package: one root, data-carrying subclasses.

Every message or document that crosses a boundary and fails validation raises a subclass of
`WireError` whose text names where (topic or file, field, line) and why.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pydantic import ValidationError


class WireError(Exception):
    """Root of every error raised by `wire`."""


@dataclass(frozen=True)
class Problem:
    """One reason a message or document was refused."""

    field: str
    message: str
    line: int | None = None

    def __str__(self) -> str:
        where = f"line {self.line}, " if self.line is not None else ""
        return f"{where}{self.field or '(document)'}: {self.message}"


class InvalidMessage(WireError):
    """An MQTT payload that does not match its model."""

    def __init__(self, topic: str, problems: Sequence[Problem]) -> None:
        self.topic = topic
        self.problems = tuple(problems)
        shown = "; ".join(str(p) for p in self.problems[:5])
        more = f" (+{len(self.problems) - 5} more)" if len(self.problems) > 5 else ""
        super().__init__(f"invalid message on {topic}: {shown}{more}")


class InvalidTopic(WireError):
    """A topic outside the wire contract."""

    def __init__(self, topic: str, reason: str) -> None:
        self.topic = topic
        self.reason = reason
        super().__init__(f"topic {topic!r} is not part of the wire contract: {reason}")


class DocumentError(WireError):
    """A configuration, profile or scenario file that cannot be used."""

    def __init__(self, path: str, problems: Sequence[Problem]) -> None:
        self.path = path
        self.problems = tuple(problems)
        lines = "\n".join(f"  {path}: {p}" for p in self.problems)
        super().__init__(f"{path} is not valid:\n{lines}")


class DocumentErrors(DocumentError):
    """Several documents that cannot be used (e.g. every bad profile of a folder)."""

    def __init__(self, errors: Sequence[DocumentError]) -> None:
        self.errors = tuple(errors)
        self.path = errors[0].path
        self.problems = tuple(problem for error in errors for problem in error.problems)
        WireError.__init__(self, "\n".join(str(error) for error in errors))


def problems_from(error: ValidationError) -> list[Problem]:
    """Turns pydantic's errors into `Problem`s with dotted field paths."""
    return [
        Problem(".".join(str(part) for part in err["loc"]), err["msg"]) for err in error.errors()
    ]
