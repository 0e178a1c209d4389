"""The sink's writer: takes batches from the queue head, writes them, then accepts or keeps them.

Rules: one request in flight, batches in queue order; a batch leaves the queue only after the
server answered for every point (written, or rejected with the server's message). Points the
server refuses (4xx) are isolated by splitting the batch in halves (at most `ISOLATION_REQUESTS`
requests per batch; past that a failing part is rejected whole); configuration problems
(401/403/404, unreadable secret) and outages keep every point and retry with a capped, jittered
back-off. A failure is logged when it starts or changes, and once more when writing works again.
SQLite is only touched on the event loop, between awaits; HTTP runs in a worker thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Final

from fleet.influx.queue import Batch, InfluxQueue
from fleet.influx.settings import InfluxSettings, SecretError
from fleet.influx.transport import Transport, WriteError, make_transport

log = logging.getLogger(__name__)

ISOLATION_REQUESTS: Final = 128
_CONFLICT_HINT = (
    "; a point that is an integer on some devices and a float on others of the same kind "
    "needs `integers: float` in the influx: section"
)
_HINTS = {
    401: "check the token or user and password (campus-fleet influx check)",
    403: "the token or user may not write there (campus-fleet influx check)",
    404: "create the bucket or database, or fix its name (campus-fleet influx check)",
}


class Backoff:
    """Delays between failed attempts: doubling from `initial_s` up to `max_s`, each drawn in
    the upper half of its step so that many fleets do not retry in step."""

    def __init__(
        self,
        initial_s: float,
        max_s: float,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.initial_s = initial_s
        self.max_s = max_s
        self.rand = rand
        self.failures = 0

    def next(self) -> float:
        step = min(self.max_s, self.initial_s * 2 ** min(self.failures, 30))
        self.failures += 1
        return float(step / 2 + self.rand() * step / 2)

    def reset(self) -> None:
        self.failures = 0


class InfluxWriter:
    def __init__(
        self,
        queue: InfluxQueue,
        settings: InfluxSettings,
        *,
        transport_factory: Callable[[InfluxSettings], Transport] = make_transport,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.queue = queue
        self.settings = settings
        self.batch_size = settings.batch_size
        self.transport_factory = transport_factory
        self.sleep = sleep
        self.backoff = Backoff(settings.retry_initial_s, settings.retry_max_s)
        self._transport: Transport | None = None
        self._arrived = asyncio.Event()
        self._full = asyncio.Event()
        self._failing: str | None = None  # the kind of failure logged, while failing
        self._failing_since = 0.0
        self._retry_after: float | None = None

    def notify(self, queued: int) -> None:
        """Points were queued (`queued` now waiting); called by the ingest side."""
        self._arrived.set()
        if queued >= self.batch_size:
            self._full.set()

    async def run(self) -> None:
        """Writes until cancelled; raises only when the fleet database fails."""
        log.info("writing telemetry to InfluxDB at %s", self.settings.target)
        try:
            while True:
                await self._linger()
                while (batch := self.queue.head(self.batch_size)) is not None:
                    if not await self._deliver(batch):
                        await self.sleep(self._delay())
                    elif len(batch.lines) < self.batch_size:
                        break  # drained: wait for the next batch to fill
        finally:
            if self._transport is not None:
                self._transport.close()

    async def _linger(self) -> None:
        """Until a full batch waits, or some points waited `flush_interval_s`."""
        while self.queue.queued() == 0:
            self._arrived.clear()
            await self._arrived.wait()
        self._full.clear()
        if self.queue.queued() >= self.batch_size:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._full.wait(), self.settings.flush_interval_s)

    # -- one batch ---------------------------------------------------------------------------

    async def _deliver(self, batch: Batch) -> bool:
        """Writes the batch (in chunks of `batch_size`); False when it must be tried again."""
        written = 0
        rejects: list[tuple[str, str]] = []
        size = self.batch_size
        for start in range(0, len(batch.lines), size):
            chunk = batch.lines[start : start + size]
            error = await self._write(chunk)
            if error is None:
                written += len(chunk)
                continue
            if error.kind not in ("rejected", "too_large"):
                return self._failed(error)
            isolated = await self._isolate(chunk, error)
            if isolated is None:
                return False
            written += isolated[0]
            rejects += isolated[1]
        if rejects:
            line, why = rejects[0]
            hint = _CONFLICT_HINT if "type conflict" in why else ""
            log.warning(
                "InfluxDB refused %d of %d points (counted as rejected, not tried again): %s; "
                "first refused: %s%s",
                len(rejects),
                len(batch.lines),
                why,
                line[:300],
                hint,
            )
        self.queue.ack(batch, written, rejects)
        self._succeeded()
        return True

    async def _write(self, lines: Sequence[str]) -> WriteError | None:
        try:
            transport = self._transport or self.transport_factory(self.settings)
        except SecretError as exc:
            return WriteError("config", str(exc))
        self._transport = transport
        body = "\n".join(lines).encode()
        error = await asyncio.to_thread(transport.write, body)
        if error is not None and error.kind == "config":
            self._transport = None  # read the secret again before the next try
            transport.close()
        return error

    async def _isolate(
        self, lines: Sequence[str], error: WriteError
    ) -> tuple[int, list[tuple[str, str]]] | None:
        """Splits a refused chunk until the refused lines are found: (written, rejects), or
        None when the server failed otherwise meanwhile (the whole batch is tried again)."""
        budget = ISOLATION_REQUESTS
        written = 0
        rejects: list[tuple[str, str]] = []

        async def settle(part: Sequence[str], why: WriteError) -> bool:
            nonlocal budget, written
            if len(part) == 1 or budget <= 0:
                rejects.extend((line, str(why)) for line in part)
                return True
            middle = len(part) // 2
            for half in (part[:middle], part[middle:]):
                budget -= 1
                problem = await self._write(half)
                if problem is None:
                    written += len(half)
                elif problem.kind in ("rejected", "too_large"):
                    if not await settle(half, problem):
                        return False
                else:
                    self._failed(problem)
                    return False
            return True

        return (written, rejects) if await settle(lines, error) else None

    # -- health --------------------------------------------------------------------------------

    def _failed(self, error: WriteError) -> bool:
        self.queue.failed(str(error))
        self._retry_after = error.retry_after_s
        kind = f"{error.kind}:{error.status}"
        if self._failing != kind:
            if self._failing is None:
                self._failing_since = time.monotonic()
            self._failing = kind
            queued = self.queue.queued()
            if error.kind == "config":
                hint = _HINTS.get(error.status or 0, "fix the influx: section of the fleet config")
                log.error(
                    "InfluxDB at %s: %s; %d points kept, retrying; %s",
                    self.settings.target,
                    error,
                    queued,
                    hint,
                )
            else:
                log.warning(
                    "InfluxDB at %s: %s; %d points kept, retrying with back-off up to %g s",
                    self.settings.target,
                    error,
                    queued,
                    self.settings.retry_max_s,
                )
        return False

    def _delay(self) -> float:
        delay = self.backoff.next()
        if self._retry_after is None:
            return delay
        return max(delay, min(self._retry_after, self.settings.retry_max_s))

    def _succeeded(self) -> None:
        self.backoff.reset()
        if self._failing is not None:
            log.info(
                "InfluxDB at %s: writing again after %.0f s of failures",
                self.settings.target,
                time.monotonic() - self._failing_since,
            )
            self._failing = None
