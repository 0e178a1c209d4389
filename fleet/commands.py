"""Device commands: the CLI queues them, the service sends them, the gateways answer.

A command row is `pending` until the service published it on the gateway's `…/cmd` topic, then
`sent`, then the outcome the gateway reported (`ok`, `device_error`, …), or `timeout` when no
answer came before its deadline. `sent_ns` is written when the service publishes it (a quick
device answers before the PUBACK is seen) and cleared if that publication fails. Each row's id
is the correlation id that travels with the request and comes back with the result. A command
carries its argument and named options (`--minutes 10`), checked against every targeted device's
profile before it is queued (`check_command`).
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from drivers.profile_base import Argument
from drivers.profiles import ProfileLibrary
from fleet.store import Store
from wire.control import CommandOutcome, CommandRequest, CommandResult

PENDING = "pending"
SENT = "sent"
TIMEOUT = "timeout"
FINAL = {outcome.value for outcome in CommandOutcome} | {TIMEOUT}


@dataclass(frozen=True, slots=True)
class Target:
    site: str
    gateway: str
    device: str
    profile: str


def new_id() -> str:
    return secrets.token_hex(8)


def check_command(
    library: ProfileLibrary,
    targets: Sequence[Target],
    action: str,
    argument: Any,
    options: Mapping[str, Any],
) -> tuple[dict[str, Any], list[str]]:
    """Checks the argument and the named options against the profile of every target whose
    profile has the action (the others are answered `unknown_action` by `Commands.queue`).
    Returns the options as they are sent — typed (10, not "10") where every profile takes the
    option as the same number or on/off, else as given — and what is wrong, one line per
    profile naming it and some of its devices ([]: the command can be sent)."""
    devices: dict[str, list[str]] = {}
    for target in targets:
        devices.setdefault(target.profile, []).append(target.device)
    problems: list[str] = []
    specs: dict[str, list[Argument]] = {name: [] for name in options}
    for profile_id, names in sorted(devices.items()):
        profile = library.profiles.get(profile_id)
        command = next((c for c in profile.commands if c.name == action), None) if profile else None
        if command is None:
            continue
        where = f"profile {profile_id} ({_some(names)})"
        try:
            command.check_argument(argument)
        except ValueError as exc:
            problems.append(f"{where}: argument: {exc}")
        try:
            command.check_options(options)
        except ValueError as exc:
            problems.append(f"{where}: {exc}")
        for name in options:
            if name in command.options:
                specs[name].append(command.options[name])
    typed = {name: _typed(value, specs[name]) for name, value in options.items()}
    return typed, problems


def _typed(value: Any, specs: list[Argument]) -> Any:
    """A number or on/off given as text, as that type when every profile agrees on it."""
    kinds = {spec.type for spec in specs}
    if not isinstance(value, str) or len(kinds) != 1 or kinds - {"int", "float", "bool"}:
        return value
    try:
        return specs[0].check(value)
    except ValueError:
        return value


def _some(names: list[str], shown: int = 3) -> str:
    more = len(names) - shown
    return ", ".join(names[:shown]) + (f" and {more} more" if more > 0 else "")


class Commands:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.conn = store.conn

    def queue(
        self,
        targets: list[Target],
        action: str,
        argument: Any,
        *,
        timeout_s: float,
        actor: str,
        library: ProfileLibrary | None,
        options: Mapping[str, Any] | None = None,
    ) -> str:
        """Queues one command per device; a device whose profile lacks the action gets its
        answer at once (`unknown_action`) and nothing is sent to it. Returns the batch id.
        Without `library` (the gateway's own `policy` pseudo-device) nothing is checked here:
        the gateway checks. Arguments and options are checked before (`check_command`)."""
        options_json = json.dumps(dict(options or {}))
        batch = new_id()
        now = time.time_ns()
        deadline = now + int(timeout_s * 1e9)
        rows = []
        for target in targets:
            status, error = PENDING, None
            profile = library.profiles.get(target.profile) if library else None
            if library is None:
                pass
            elif profile is None:
                status, error = (
                    CommandOutcome.DEVICE_ERROR.value,
                    (f"profile {target.profile!r} is not known to the fleet"),
                )
            elif all(command.name != action for command in profile.commands):
                names = ", ".join(c.name for c in profile.commands) or "none"
                status, error = (
                    CommandOutcome.UNKNOWN_ACTION.value,
                    (f"profile {profile.id} has no command {action!r} (commands: {names})"),
                )
            rows.append(
                (
                    new_id(),
                    batch,
                    target.site,
                    target.gateway,
                    target.device,
                    action,
                    json.dumps(argument),
                    options_json,
                    actor,
                    status,
                    error,
                    now,
                    deadline,
                    None if status == PENDING else now,
                )
            )
        with self.store.transaction():
            self.conn.executemany(
                "INSERT INTO commands (id, batch, site, gateway, device, action, argument, "
                "options, actor, status, error, created_ns, deadline_ns, done_ns) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
        return batch

    def pending(self) -> list[tuple[str, str, CommandRequest]]:
        rows = self.store._rows(
            "SELECT * FROM commands WHERE status = ? ORDER BY created_ns LIMIT 5000", (PENDING,)
        )
        return [
            (
                r["site"],
                r["gateway"],
                CommandRequest(
                    id=r["id"],
                    device=r["device"],
                    action=r["action"],
                    argument=json.loads(r["argument"]),
                    options=json.loads(r["options"] or "{}"),
                    issued_ns=r["created_ns"],
                    deadline_ns=r["deadline_ns"],
                ),
            )
            for r in rows
        ]

    def mark_publishing(self, ids: list[str], now_ns: int) -> None:
        """The service publishes these pending commands now: their sent time (call inside a
        transaction, before publishing)."""
        self.conn.executemany(
            "UPDATE commands SET sent_ns = ? WHERE id = ? AND status = ?",
            [(now_ns, command_id, PENDING) for command_id in ids],
        )

    def mark_unsent(self, ids: list[str]) -> None:
        """Their publication failed (to be tried again): not sent after all, unless answered."""
        self.conn.executemany(
            "UPDATE commands SET sent_ns = NULL WHERE id = ? AND status = ?",
            [(command_id, PENDING) for command_id in ids],
        )

    def mark_sent(self, ids: list[str]) -> None:
        """The broker acknowledged them. One already answered keeps its outcome; either way
        the sent time is the publication's (`mark_publishing`)."""
        now = time.time_ns()
        self.conn.executemany(
            "UPDATE commands SET status = ?, sent_ns = coalesce(sent_ns, ?) "
            "WHERE id = ? AND status = ?",
            [(SENT, now, command_id, PENDING) for command_id in ids],
        )

    def record_result(self, site: str, gateway: str, result: CommandResult) -> bool:
        """Stores an answer (the first one wins; a late answer after a timeout is kept too,
        since it says what really happened). False when no such command was sent there."""
        cursor = self.conn.execute(
            "UPDATE commands SET status = ?, result = ?, error = ?, done_ns = ? "
            "WHERE id = ? AND site = ? AND gateway = ? AND device = ? AND status IN (?, ?, ?)",
            (
                result.outcome.value,
                json.dumps(result.result),
                result.error,
                result.finished_ns,
                result.id,
                site,
                gateway,
                result.device,
                PENDING,
                SENT,
                TIMEOUT,
            ),
        )
        return cursor.rowcount > 0

    def expire(self, now_ns: int) -> int:
        cursor = self.conn.execute(
            "UPDATE commands SET status = ?, error = ?, done_ns = ? "
            "WHERE status IN (?, ?) AND deadline_ns < ?",
            (
                TIMEOUT,
                "no answer from the gateway before the deadline (offline, or the device is slow)",
                now_ns,
                PENDING,
                SENT,
                now_ns,
            ),
        )
        return cursor.rowcount

    def batch(self, batch: str) -> list[dict[str, Any]]:
        return self.store._rows(
            "SELECT * FROM commands WHERE batch = ? ORDER BY site, gateway, device", (batch,)
        )

    def recent(self, limit: int = 50) -> list[dict[str, Any]]:
        return self.store._rows(
            "SELECT batch, action, actor, min(created_ns) AS created_ns, count(*) AS devices, "
            "sum(status = 'ok') AS ok, sum(status IN ('pending', 'sent')) AS waiting "
            "FROM commands GROUP BY batch ORDER BY created_ns DESC LIMIT ?",
            (limit,),
        )
