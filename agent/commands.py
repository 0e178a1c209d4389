"""Runs commands on devices: the fleet's (`…/cmd`) and the schedules'.

Rules: a command goes through the driver's command path holding its bus lock, like a poll, so it
never talks over a poll or another command on the same line; it never runs after its deadline, and
its time limit is the sooner of the deadline and `command_timeout_s`; a fleet command runs at most
once per id: a QoS 1 duplicate or a redelivery after a reconnect gets the stored result again.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from agent.clock import Clock
from agent.coordinator import Coordinator
from agent.events import EventQueue
from drivers.errors import DriverError
from wire.control import CommandOutcome, CommandRequest, CommandResult
from wire.errors import InvalidMessage
from wire.models import EventKind, decode
from wire.topics import valid_id

log = logging.getLogger(__name__)

REMEMBERED_IDS = 1000
MAX_ERROR = 4000
_CORRELATION_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


@dataclass(frozen=True, slots=True)
class Outcome:
    device: str
    outcome: CommandOutcome
    result: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.outcome is CommandOutcome.OK


class CommandExecutor:
    def __init__(
        self,
        coordinator: Coordinator,
        clock: Clock,
        events: EventQueue,
        timeout_s: float,
        *,
        remember: int = REMEMBERED_IDS,
    ) -> None:
        self.coordinator = coordinator
        self.clock = clock
        self.events = events
        self.timeout_s = timeout_s
        self.remember = remember
        self._results: OrderedDict[str, CommandResult] = OrderedDict()
        self._running: set[str] = set()
        #: Payloads on `…/cmd` that were not a valid command request.
        self.rejected = 0
        #: Commands run (not counting duplicates).
        self.executed = 0

    async def run(
        self,
        device_id: str,
        action: str,
        argument: Any,
        deadline_ns: int,
        options: dict[str, Any] | None = None,
    ) -> Outcome:
        """Runs one command now, unless its deadline has passed or it cannot exist."""
        now = self.clock.wall_ns()
        if now > deadline_ns:
            late_s = (now - deadline_ns) / 1e9
            return Outcome(
                device_id,
                CommandOutcome.EXPIRED,
                error=f"arrived {late_s:.1f} s after its deadline: not run",
            )
        loop = self.coordinator.loops.get(device_id)
        if loop is None:
            known = ", ".join(sorted(self.coordinator.loops)) or "none"
            return Outcome(
                device_id,
                CommandOutcome.UNKNOWN_DEVICE,
                error=f"no device {device_id!r} on this gateway (devices: {known})",
            )
        try:
            loop.profile.command(action)
        except KeyError as exc:
            return Outcome(device_id, CommandOutcome.UNKNOWN_ACTION, error=str(exc.args[0]))
        driver = loop.driver
        limit_s = min((deadline_ns - now) / 1e9, self.timeout_s)
        try:
            async with asyncio.timeout(limit_s):
                async with loop.lock:
                    result = await driver.command(action, argument, options)
        except ValueError as exc:
            return Outcome(device_id, CommandOutcome.BAD_ARGUMENT, error=_text(exc))
        except TimeoutError:
            return Outcome(
                device_id,
                CommandOutcome.TIMEOUT,
                error=f"no result within {limit_s:.1f} s (bus {loop.driver.bus})",
            )
        except (DriverError, OSError) as exc:
            return Outcome(device_id, CommandOutcome.DEVICE_ERROR, error=_text(exc))
        except Exception as exc:  # a driver bug must not end the agent: report it
            log.exception("device %s: command %s failed unexpectedly", device_id, action)
            return Outcome(
                device_id,
                CommandOutcome.DEVICE_ERROR,
                error=f"internal error: {type(exc).__name__}: {exc}",
            )
        return Outcome(device_id, CommandOutcome.OK, result=result)

    async def handle(self, topic: str, payload: bytes) -> CommandResult | None:
        """The result to publish for one `…/cmd` message: the stored one for a duplicate, None
        for a payload without a readable id or a duplicate still running."""
        try:
            request = decode(CommandRequest, topic, payload)
        except InvalidMessage as exc:
            return self._invalid(payload, exc)
        stored = self._results.get(request.id)
        if stored is not None:
            log.info("command %s again (duplicate): its result is sent again", request.id)
            return stored
        if request.id in self._running:
            log.info("command %s again while it runs: one result will be sent", request.id)
            return None
        self._running.add(request.id)
        try:
            outcome = await self.run(
                request.device,
                request.action,
                request.argument,
                request.deadline_ns,
                request.options,
            )
        finally:
            self._running.discard(request.id)
        self.executed += 1
        result = self._remember(
            CommandResult(
                id=request.id,
                device=request.device,
                outcome=outcome.outcome,
                result=outcome.result,
                error=_cut(outcome.error),
                finished_ns=self.clock.wall_ns(),
            )
        )
        self._report(request, outcome)
        return result

    def _report(self, request: CommandRequest, outcome: Outcome) -> None:
        shown = f"command {request.action} ({request.id}): {outcome.outcome.value}"
        if outcome.error:
            shown += f": {outcome.error}"
        if outcome.ok:
            log.info("device %s: %s", request.device, shown)
        else:
            log.warning("device %s: %s", request.device, shown)
        device = request.device if outcome.outcome is not CommandOutcome.UNKNOWN_DEVICE else None
        self.events.raise_event(
            EventKind.COMMAND,
            _cut(shown, 2000) or "",
            device,
            id=request.id,
            action=request.action,
            outcome=outcome.outcome.value,
            result=outcome.result,
        )

    def _invalid(self, payload: bytes, error: InvalidMessage) -> CommandResult | None:
        self.rejected += 1
        problems = "; ".join(str(problem) for problem in error.problems)
        log.warning("invalid command request refused: %s", problems)
        self.events.raise_event(
            EventKind.REJECTED_INPUT,
            _cut(f"invalid command request: {problems}", 2000) or "",
            count=self.rejected,
        )
        try:
            raw = json.loads(payload)
        except ValueError:
            return None
        if not isinstance(raw, dict):
            return None
        command_id, device = raw.get("id"), raw.get("device")
        if not isinstance(command_id, str) or not _CORRELATION_ID.match(command_id):
            return None
        if command_id in self._results:
            return self._results[command_id]
        return self._remember(
            CommandResult(
                id=command_id,
                device=device if isinstance(device, str) and valid_id(device) else "unknown",
                outcome=CommandOutcome.BAD_ARGUMENT,
                error=_cut(f"invalid command request: {problems}"),
                finished_ns=self.clock.wall_ns(),
            )
        )

    def _remember(self, result: CommandResult) -> CommandResult:
        self._results[result.id] = result
        while len(self._results) > self.remember:
            self._results.popitem(last=False)
        return result


def _text(error: BaseException) -> str:
    return str(error) or type(error).__name__


def _cut(text: str | None, limit: int = MAX_ERROR) -> str | None:
    if text is None or len(text) <= limit:
        return text
    return text[: limit - 1] + "…"
