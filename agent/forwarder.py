"""Drains the buffer to the broker: batches in sequence order, QoS 1, a bounded window in flight.

Transaction rules (as Telegraf's output buffer): take a batch, publish, and only on a successful
PUBACK delete exactly that batch's range. A refusal (a failure reason code), a timeout or a lost
connection keeps the batch; the next round starts again from the oldest reading still buffered, so
a reading is re-sent rather than lost, and the fleet's (gateway, seq) dedup absorbs the repeat.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from agent.buffer import Buffer, Row
from agent.events import EventQueue
from wire.models import EventKind
from wire.mqtt import MqttError, MqttLink, PublishRefused

log = logging.getLogger(__name__)

REFUSAL_BACKOFF_S = 5.0


def encode_batch(rows: list[Row], sent_ns: int) -> bytes:
    """The `…/telemetry` payload for buffer rows, without building a model per reading."""
    return json.dumps(
        {
            "v": 1,
            "first_seq": rows[0][0],
            "last_seq": rows[-1][0],
            "sent_ns": sent_ns,
            "readings": rows,
        },
        separators=(",", ":"),
    ).encode()


@dataclass(slots=True)
class ForwarderStats:
    batches_sent: int = 0
    readings_acked: int = 0
    refusals: int = 0
    timeouts: int = 0
    rewinds: int = 0


class Forwarder:
    """Two lanes share the window: *live* (readings committed since this connection began) goes
    first, the *backlog* (everything older) takes the remaining slots but never the last one. So a
    day of backlog drains at full speed while today's alarm still leaves within one batch."""

    def __init__(
        self,
        buffer: Buffer,
        link: MqttLink,
        topic: str,
        events: EventQueue,
        *,
        batch_max: int = 1000,
        window: int = 8,
        ack_timeout_s: float = 30.0,
        may_send: Callable[[], bool] = lambda: True,
    ) -> None:
        self.buffer = buffer
        self.link = link
        self.topic = topic
        self.events = events
        self.batch_max = batch_max
        self.window = window
        self.ack_timeout_s = ack_timeout_s
        self.may_send = may_send
        self.stats = ForwarderStats()
        self._slots = asyncio.Semaphore(window)
        self._wake = asyncio.Event()
        self._failed = False
        self._refused = False
        self._refusal_reported = False
        self._backlog_in_flight = 0
        self._in_flight: set[asyncio.Task[None]] = set()

    def wake(self) -> None:
        """Called after readings were committed to the buffer."""
        self._wake.set()

    async def settle(self, timeout: float) -> None:
        """Waits for the PUBACKs of batches in flight (on a planned stop), so that they are
        deleted now rather than sent again after the restart."""
        if self._in_flight:
            await asyncio.wait(set(self._in_flight), timeout=timeout)

    async def run(self) -> None:
        while True:
            await self.link.wait_connected()
            await self._drain()
            # Let everything in flight settle before starting over from the oldest reading.
            if self._in_flight:
                await asyncio.wait(self._in_flight)
            if self._failed:
                self._failed = False
                self.stats.rewinds += 1
                await asyncio.sleep(REFUSAL_BACKOFF_S if self._refused else 0.5)
                self._refused = False

    async def _sleep_until_woken(self, timeout: float = 1.0) -> None:
        self._wake.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._wake.wait()

    def _next_batch(self, live: int, backlog: int, live_from: int) -> tuple[list[Row], bool]:
        rows = self.buffer.take(live, self.batch_max)
        if rows:
            return rows, False
        if backlog < live_from and self._backlog_in_flight < max(1, self.window - 1):
            return self.buffer.take(backlog, self.batch_max, upto_seq=live_from), True
        return [], False

    async def _drain(self) -> None:
        live_from = self.buffer.last_seq
        live, backlog = live_from, 0
        while self.link.connected and not self._failed:
            if not self.may_send():
                await self._sleep_until_woken()
                continue
            await self._slots.acquire()
            rows, from_backlog = self._next_batch(live, backlog, live_from)
            if not rows:
                self._slots.release()
                if backlog < live_from and self._backlog_in_flight == 0:
                    backlog = live_from  # the backlog has been sent
                await self._sleep_until_woken()
                continue
            if from_backlog:
                backlog = rows[-1][0]
                self._backlog_in_flight += 1
            else:
                live = rows[-1][0]
            future = self.link.publish(self.topic, encode_batch(rows, time.time_ns()), qos=1)
            self.stats.batches_sent += 1
            task = asyncio.create_task(
                self._settle(future, rows[0][0], rows[-1][0], len(rows), from_backlog)
            )
            self._in_flight.add(task)
            task.add_done_callback(self._in_flight.discard)

    async def _settle(
        self, future: asyncio.Future[int], first: int, last: int, count: int, from_backlog: bool
    ) -> None:
        try:
            await self.link.acknowledged(future, self.ack_timeout_s)
        except PublishRefused as exc:
            self.stats.refusals += 1
            self._failed = self._refused = True
            if not self._refusal_reported:  # once per run of refusals: events must not
                self._refusal_reported = True  # crowd out the readings they are about
                log.error("telemetry %d..%d refused by the broker: %s", first, last, exc.reason)
                self.events.raise_event(
                    EventKind.REJECTED_INPUT,
                    f"broker refused telemetry: {exc.reason}",
                    reason_code=exc.reason_code,
                    first_seq=first,
                    last_seq=last,
                )
        except TimeoutError:
            self.stats.timeouts += 1
            self._failed = True
            log.warning(
                "no PUBACK for telemetry %d..%d within %.0fs", first, last, self.ack_timeout_s
            )
        except MqttError as exc:
            self._failed = True
            log.info("telemetry %d..%d not sent: %s", first, last, exc)
        else:
            self.buffer.delete_range(first, last)
            self.stats.readings_acked += count
            self._refusal_reported = False
        finally:
            if from_backlog:
                self._backlog_in_flight -= 1
            self._slots.release()
            self._wake.set()
