"""Staged rollouts: push a config to a few gateways first, then more, halting on failures.

A rollout targets the gateways of a selector (`site:S`, `building:S/B`, …), split into cumulative
stages (`1,10%,50%,100%`: one canary, then up to 10 % of them, …). Each stage's gateways get a
new config version; the stage is over when every one of them acknowledged it or timed out. When
the failures so far (rejected or unanswered) exceed `max_failures` of the gateways pushed so far,
the rollout halts and the failed stage is rolled back: each of its gateways gets a new version
carrying the body it ran before. A paused rollout still records its stage's answers (and halts
on failures), but starts no new stage. All state is in the registry, so a fleet restart resumes
where it was; `tick()` is called by the service about every second.

An optional settings overlay (a rollout's `--config` file) is laid over each gateway's effective
settings; once the rollout is done it is merged into the target's own settings, so later pushes
keep it.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from typing import Any

from drivers.profiles import ProfileLibrary
from fleet.desired import body_of, build_config
from fleet.registry import Registry
from fleet.settings import NodeSettings, dump_settings, merge, parse_settings
from fleet.store import Store
from fleet.versions import APPLIED, REJECTED, SUPERSEDED, Versions

log = logging.getLogger(__name__)

RUNNING = "running"
PAUSED = "paused"
HALTED = "halted"
ABORTED = "aborted"
DONE = "done"
ACTIVE = (RUNNING, PAUSED)

WAITING = "waiting"
PUSHED = "pushed"
TIMEOUT = "timeout"
ROLLED_BACK = "rolled_back"
FAILED = (REJECTED, TIMEOUT, SUPERSEDED)


class RolloutError(ValueError):
    """A rollout that cannot start or change state, with the reason."""


def parse_stages(text: str, total: int) -> list[int]:
    """`1,10%,50%,100%` → cumulative gateway counts, e.g. [1, 2, 10, 20] for 20 gateways."""
    if total == 0:
        raise RolloutError("the target has no gateways")
    counts: list[int] = []
    for part in (p.strip() for p in text.split(",")):
        try:
            if part.endswith("%"):
                percent = float(part[:-1])
                if not 0 < percent <= 100:
                    raise ValueError
                count = max(1, math.ceil(total * percent / 100))
            else:
                count = int(part)
                if count < 1:
                    raise ValueError
        except ValueError:
            raise RolloutError(
                f"stage {part!r} is not a count (e.g. 1) or a percentage (e.g. 10%)"
            ) from None
        count = min(count, total)
        if counts and count <= counts[-1]:
            continue  # e.g. 10% of 5 gateways is the same single gateway as the canary
        counts.append(count)
    if counts[-1] != total:
        counts.append(total)  # a rollout always ends with every targeted gateway
    return counts


def parse_fraction(text: str) -> float:
    """`5%` or `0.05` → 0.05."""
    try:
        value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise RolloutError(f"{text!r} is not a fraction (e.g. 5% or 0.05)") from None
    if not 0 <= value < 1:
        raise RolloutError(f"max failures {text!r} must be from 0% up to (not including) 100%")
    return value


def too_many_failures(failed: int, pushed: int, fraction: float) -> bool:
    """More than `fraction` of `pushed`: 29 of 100 is not more than 29 %, although
    0.29 * 100 is 28.999999999999996 in floating point."""
    return failed > math.floor(fraction * pushed + 1e-9)


@dataclass(frozen=True, slots=True)
class Progress:
    total: int
    applied: int
    failed: int
    waiting: int
    rolled_back: int


class Rollouts:
    def __init__(self, store: Store, registry: Registry, library: ProfileLibrary) -> None:
        self.store = store
        self.conn = store.conn
        self.registry = registry
        self.library = library
        self.versions = Versions(store)

    # -- commands from the CLI ---------------------------------------------------------------

    def start(
        self,
        target: str,
        stages: str,
        max_failures: str,
        overlay: NodeSettings | None,
        ack_timeout_s: float,
        actor: str,
    ) -> int:
        """Validates every targeted gateway's config first: a rollout that would be refused
        somewhere never starts."""
        gateways = sorted(self.registry.gateways_matching(target))
        counts = parse_stages(stages, len(gateways))
        fraction = parse_fraction(max_failures)
        for site, gateway in gateways:
            build_config(self.registry, self.library, site, gateway, overlay, target)
        busy = self.store._rows(
            "SELECT r.id, g.site, g.gateway FROM rollout_gateways g JOIN rollouts r "
            "ON r.id = g.rollout WHERE r.state IN (?, ?)",
            ACTIVE,
        )
        targeted = set(gateways)
        clashes = [r for r in busy if (r["site"], r["gateway"]) in targeted]
        if clashes:
            first = clashes[0]
            raise RolloutError(
                f"{len(clashes)} of these gateways are in rollout {first['id']} "
                f"(e.g. {first['site']}/{first['gateway']}): finish, pause or abort it first"
            )
        now = time.time_ns()
        with self.store.transaction():
            cursor = self.conn.execute(
                "INSERT INTO rollouts (target, stages, max_failures, ack_timeout_s, overlay, "
                "state, stage, message, actor, created_ns, updated_ns) "
                "VALUES (?, ?, ?, ?, ?, ?, 0, ?, ?, ?, ?)",
                (
                    target,
                    json.dumps({"spec": stages, "counts": counts}),
                    fraction,
                    ack_timeout_s,
                    dump_settings(overlay) if overlay is not None else None,
                    RUNNING,
                    "starting",
                    actor,
                    now,
                    now,
                ),
            )
            rollout_id = int(cursor.lastrowid or 0)
            rows = []
            for index, (site, gateway) in enumerate(gateways):
                stage = next(i for i, count in enumerate(counts) if index < count)
                rows.append((rollout_id, site, gateway, stage, WAITING))
            self.conn.executemany(
                "INSERT INTO rollout_gateways (rollout, site, gateway, stage, status) "
                "VALUES (?, ?, ?, ?, ?)",
                rows,
            )
        return rollout_id

    def set_state(self, rollout_id: int, action: str, *, rollback: bool = False) -> str:
        if action not in ("pause", "resume", "abort"):
            raise RolloutError(f"unknown action {action!r}")
        with self.store.transaction():  # the state read here is the one changed
            state = self.get(rollout_id)["state"]
            if action == "pause":
                if state != RUNNING:
                    raise RolloutError(f"rollout {rollout_id} is {state}, not running")
                new, message = PAUSED, "paused: no new stage starts"
            elif action == "resume":
                if state not in (PAUSED, HALTED):
                    raise RolloutError(
                        f"rollout {rollout_id} is {state}: only paused or halted rollouts resume"
                    )
                new, message = RUNNING, "resumed"
            else:
                if state not in (*ACTIVE, HALTED):
                    raise RolloutError(f"rollout {rollout_id} is already {state}")
                new, message = ABORTED, "aborted"
            if action == "resume" and state == HALTED:
                # The halted stage was rolled back: it is pushed again (after a fix).
                self.conn.execute(
                    "UPDATE rollouts SET stage_started_ns = NULL WHERE id = ?", (rollout_id,)
                )
                message = "resumed: the halted stage is pushed again"
            if action == "abort" and rollback:
                reached = self.store._rows(
                    "SELECT * FROM rollout_gateways WHERE rollout = ? AND version IS NOT NULL "
                    "AND status NOT IN (?, ?)",
                    (rollout_id, WAITING, ROLLED_BACK),
                )
                rolled = self._roll_back(rollout_id, reached)
                message += f", {rolled} gateways rolled back"
            self._update(rollout_id, state=new, message=message)
        return new

    # -- reads -----------------------------------------------------------------------------------

    def get(self, rollout_id: int) -> dict[str, Any]:
        rows = self.store._rows("SELECT * FROM rollouts WHERE id = ?", (rollout_id,))
        if not rows:
            raise LookupError(f"no rollout {rollout_id}")
        return rows[0]

    def recent(self, limit: int = 50) -> list[dict[str, Any]]:
        return self.store._rows("SELECT * FROM rollouts ORDER BY id DESC LIMIT ?", (limit,))

    def gateways(self, rollout_id: int) -> list[dict[str, Any]]:
        return self.store._rows(
            "SELECT * FROM rollout_gateways WHERE rollout = ? ORDER BY stage, site, gateway",
            (rollout_id,),
        )

    def progress(self, rollout_id: int) -> Progress:
        rows = self.gateways(rollout_id)
        statuses = [r["status"] for r in rows]
        return Progress(
            total=len(rows),
            applied=statuses.count(APPLIED),
            failed=sum(statuses.count(s) for s in FAILED),
            waiting=statuses.count(WAITING) + statuses.count(PUSHED),
            rolled_back=statuses.count(ROLLED_BACK),
        )

    # -- the engine (service) --------------------------------------------------------------------

    def tick(self, now_ns: int, heard_since_ns: int = 0) -> None:
        """Advances every running rollout, and records the answers of paused ones.
        Acknowledgement timeouts count from the later of a stage's start and `heard_since_ns`
        (when the service last began hearing the gateways): time in which no answer could
        arrive, e.g. while the service was down, does not count."""
        rollouts = self.store._rows("SELECT id FROM rollouts WHERE state IN (?, ?)", ACTIVE)
        for rollout_id in (row["id"] for row in rollouts):
            with self.store.transaction():
                rollout = self.get(rollout_id)  # read again: the CLI may have changed it
                if rollout["state"] in ACTIVE:
                    self._advance(rollout, now_ns, heard_since_ns)

    def _advance(self, rollout: dict[str, Any], now_ns: int, heard_since_ns: int) -> None:
        rollout_id, stage = rollout["id"], rollout["stage"]
        paused = rollout["state"] == PAUSED
        counts: list[int] = json.loads(rollout["stages"])["counts"]
        members = self.store._rows(
            "SELECT * FROM rollout_gateways WHERE rollout = ? AND stage = ?", (rollout_id, stage)
        )
        if rollout["stage_started_ns"] is None:
            if not paused:  # paused: no new stage starts
                self._push_stage(rollout, members, now_ns)
            return
        timeout_ns = int(rollout["ack_timeout_s"] * 1e9)
        waited_since = max(rollout["stage_started_ns"], heard_since_ns)
        for member in members:
            if member["status"] != PUSHED:
                continue
            row = self.versions.get(member["site"], member["gateway"], member["version"])
            state = row["state"] if row else SUPERSEDED
            if state in (APPLIED, REJECTED, SUPERSEDED):
                reason = row["reason"] if row and state == REJECTED else None
                if state == SUPERSEDED:
                    reason = "a newer version was pushed to this gateway meanwhile"
                self._set_member(member, state, reason)
            elif now_ns - waited_since > timeout_ns:
                self._set_member(
                    member, TIMEOUT, f"no acknowledgement within {rollout['ack_timeout_s']:g} s"
                )
        everyone = self.store._rows(
            "SELECT status FROM rollout_gateways WHERE rollout = ? AND stage <= ?",
            (rollout_id, stage),
        )
        failed = sum(1 for r in everyone if r["status"] in FAILED)
        waiting = sum(1 for r in everyone if r["status"] == PUSHED)
        if too_many_failures(failed, len(everyone), rollout["max_failures"]):
            members = self.store._rows(
                "SELECT * FROM rollout_gateways WHERE rollout = ? AND stage = ?",
                (rollout_id, stage),
            )
            rolled = self._roll_back(rollout_id, members)
            message = (
                f"halted at stage {stage + 1}/{len(counts)}: {failed} of {len(everyone)} "
                f"gateways failed (max {rollout['max_failures']:.0%}); {rolled} rolled back"
            )
            log.warning("rollout %d %s", rollout_id, message)
            self._update(rollout_id, state=HALTED, message=message)
            return
        if waiting or paused:
            return
        if stage + 1 >= len(counts):
            self._finish(rollout)
            return
        self._update(
            rollout_id,
            stage=stage + 1,
            stage_started_ns=None,
            message=f"stage {stage + 1}/{len(counts)} done",
        )

    def _push_stage(
        self, rollout: dict[str, Any], members: list[dict[str, Any]], now_ns: int
    ) -> None:
        overlay = parse_settings(rollout["overlay"], f"rollout {rollout['id']}")
        for member in members:
            site, gateway = member["site"], member["gateway"]
            previous = self.versions.applied_version(site, gateway)
            try:
                config = build_config(
                    self.registry, self.library, site, gateway, overlay, rollout["target"]
                )
            except Exception as exc:  # the tree changed since the start and is now invalid
                self._set_member(member, REJECTED, f"not pushed: {exc}")
                continue
            staged = self.versions.stage(
                site,
                gateway,
                body_of(config),
                origin=f"rollout:{rollout['id']}",
                actor=rollout["actor"],
            )
            version = staged.version
            if version is None:  # it already has this body
                latest = self.versions.latest(site, gateway)
                version = latest["version"] if latest else 0
            self.conn.execute(
                # A stage pushed again (a halted rollout resumed) keeps what ran before the
                # rollout: the rollback's own version may not even be applied yet.
                "UPDATE rollout_gateways SET version = ?, "
                "previous_version = coalesce(previous_version, ?), status = ? "
                "WHERE rollout = ? AND site = ? AND gateway = ?",
                (version, previous, PUSHED, rollout["id"], site, gateway),
            )
        counts = json.loads(rollout["stages"])["counts"]
        self._update(
            rollout["id"],
            stage_started_ns=now_ns,
            message=f"stage {rollout['stage'] + 1}/{len(counts)}: {len(members)} gateways pushed",
        )

    def _roll_back(self, rollout_id: int, members: list[dict[str, Any]]) -> int:
        """Gives each gateway a new version with the body it ran before the rollout."""
        rolled = 0
        for member in members:
            site, gateway = member["site"], member["gateway"]
            previous = member["previous_version"]
            body = self.versions.body(site, gateway, previous) if previous else None
            if body is None:
                note = "nothing to roll back to (no config applied before the rollout)"
                self._set_member(member, member["status"], _join(member["reason"], note))
                continue
            self.versions.stage(
                site, gateway, body, origin=f"rollback:{rollout_id}", actor="rollout", force=True
            )
            self._set_member(
                member,
                ROLLED_BACK,
                _join(member["reason"] or member["status"], f"rolled back to v{previous}"),
            )
            rolled += 1
        return rolled

    def _finish(self, rollout: dict[str, Any]) -> None:
        if rollout["overlay"]:
            overlay = parse_settings(rollout["overlay"], f"rollout {rollout['id']}")
            self._merge_into_target(rollout["target"], overlay)
        self._update(rollout["id"], state=DONE, message="done: every stage acknowledged")

    def _merge_into_target(self, target: str, overlay: NodeSettings) -> None:
        kind, _, name = target.partition(":")
        places = {
            "site": ("sites", ("site",)),
            "building": ("buildings", ("site", "building")),
            "room": ("rooms", ("site", "room")),
            "gateway": ("registry_gateways", ("site", "gateway")),
        }
        keys: list[tuple[str, ...]]
        if kind == "all":
            keys = [(site,) for (site,) in self.conn.execute("SELECT site FROM sites")]
            table, columns = places["site"]
        elif kind in places:
            table, columns = places[kind]
            keys = [tuple(name.split("/"))]
        else:
            return
        where = " AND ".join(f"{c} = ?" for c in columns)
        for key in keys:
            row = self.conn.execute(f"SELECT settings FROM {table} WHERE {where}", key).fetchone()
            if row is None:
                continue
            merged = merge([parse_settings(row[0], target), overlay])
            self.conn.execute(
                f"UPDATE {table} SET settings = ? WHERE {where}", (dump_settings(merged), *key)
            )

    def _set_member(self, member: dict[str, Any], status: str, reason: str | None) -> None:
        self.conn.execute(
            "UPDATE rollout_gateways SET status = ?, reason = ? "
            "WHERE rollout = ? AND site = ? AND gateway = ?",
            (status, reason, member["rollout"], member["site"], member["gateway"]),
        )

    def _update(self, rollout_id: int, **fields: Any) -> None:
        fields["updated_ns"] = time.time_ns()
        assignments = ", ".join(f"{name} = ?" for name in fields)
        self.conn.execute(
            f"UPDATE rollouts SET {assignments} WHERE id = ?", (*fields.values(), rollout_id)
        )


def _join(first: str | None, second: str) -> str:
    return f"{first}; {second}" if first else second
