"""Events the agent tells the fleet about (device up/down, rejected input, buffer trouble).

Events wait in a bounded queue until the MQTT link can take them; when the queue is full the oldest
are dropped and counted, so a long outage cannot grow memory without bound.
"""

from __future__ import annotations

import collections
import time
from typing import Any

from wire.models import Event, EventKind


class EventQueue:
    def __init__(self, capacity: int = 1000) -> None:
        self._events: collections.deque[Event] = collections.deque(maxlen=capacity)
        self.dropped = 0
        self.raised = 0

    def raise_event(
        self, kind: EventKind, message: str, device: str | None = None, **data: Any
    ) -> None:
        if len(self._events) == self._events.maxlen:
            self.dropped += 1
        self.raised += 1
        self._events.append(
            Event(ts_ns=time.time_ns(), kind=kind, device=device, message=message, data=data)
        )

    def peek(self) -> Event | None:
        return self._events[0] if self._events else None

    def pop(self) -> None:
        self._events.popleft()

    def __len__(self) -> int:
        return len(self._events)
