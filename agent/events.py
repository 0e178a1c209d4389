"""Events the agent tells the fleet about (device up/down, rejected input, buffer trouble).

Events are kept in the buffer's `events` table, so they survive outages and restarts like
readings do, and are evicted only after every reading.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from agent.buffer import Buffer, event_json
from wire.models import EventKind


class EventQueue:
    def __init__(self, buffer: Buffer, wall_ns: Callable[[], int]) -> None:
        self.buffer = buffer
        self.wall_ns = wall_ns
        self.raised = 0

    def raise_event(
        self, kind: EventKind, message: str, device: str | None = None, **data: Any
    ) -> None:
        self.raised += 1
        self.buffer.add_event(event_json(self.wall_ns(), kind, message, device, **data))
