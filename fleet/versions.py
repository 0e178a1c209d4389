"""Config versions per gateway: what was pushed, what each gateway acknowledged.

Versions only grow: a rollback is a new version carrying an older body, so a gateway never has a
reason to accept a lower number (that would be a replay). A version is `pending` until the service
has signed and published it (retained), `sent` until the gateway answers, then `applied` or
`rejected`; an unanswered version is `superseded` when a newer one is sent.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, Literal

from fleet.store import Store
from wire.control import Ack, AckStatus
from wire.signing import body_hash

PENDING = "pending"
SENT = "sent"
APPLIED = "applied"
REJECTED = "rejected"
SUPERSEDED = "superseded"


@dataclass(frozen=True, slots=True)
class Staged:
    site: str
    gateway: str
    version: int | None  # None: the latest version already carries this body
    sha256: str


def carries(latest: dict[str, Any] | None, sha256: str) -> bool:
    """True when a gateway's newest version already carries this body (and was not rejected
    or superseded): a push of it makes no new version."""
    return (
        latest is not None
        and latest["sha256"] == sha256
        and latest["state"] in (PENDING, SENT, APPLIED)
    )


class Versions:
    """Versions of one kind of signed document: `config` (tables config_versions and
    config_status) or `policy` (policy_versions, policy_status)."""

    def __init__(self, store: Store, kind: Literal["config", "policy"] = "config") -> None:
        self.store = store
        self.conn = store.conn
        self.kind = kind
        self.table = f"{kind}_versions"
        self.status_table = f"{kind}_status"

    def latest(self, site: str, gateway: str) -> dict[str, Any] | None:
        rows = self.store._rows(
            f"SELECT * FROM {self.table} WHERE site = ? AND gateway = ? "
            "ORDER BY version DESC LIMIT 1",
            (site, gateway),
        )
        return rows[0] if rows else None

    def get(self, site: str, gateway: str, version: int) -> dict[str, Any] | None:
        rows = self.store._rows(
            f"SELECT * FROM {self.table} WHERE site = ? AND gateway = ? AND version = ?",
            (site, gateway, version),
        )
        return rows[0] if rows else None

    def body(self, site: str, gateway: str, version: int) -> dict[str, Any] | None:
        row = self.get(site, gateway, version)
        return None if row is None else dict(json.loads(row["body"]))

    def stage(
        self,
        site: str,
        gateway: str,
        body: dict[str, Any],
        *,
        origin: str,
        actor: str,
        force: bool = False,
    ) -> Staged:
        """Adds a pending version unless the newest one already carries this body (and was
        not rejected); call inside a transaction."""
        sha = body_hash(body)
        latest = self.latest(site, gateway)
        if not force and carries(latest, sha):
            return Staged(site, gateway, None, sha)
        version = max(latest["version"] if latest else 0, self._reported(site, gateway)) + 1
        self.conn.execute(
            f"INSERT INTO {self.table} (site, gateway, version, sha256, body, origin, actor, "
            "state, created_ns) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                site,
                gateway,
                version,
                sha,
                json.dumps(body, sort_keys=True),
                origin,
                actor,
                PENDING,
                time.time_ns(),
            ),
        )
        return Staged(site, gateway, version, sha)

    def _reported(self, site: str, gateway: str) -> int:
        """The version the gateway says it runs (its state): after the fleet database was
        reset or restored from an older backup, new versions still start above it, or the
        gateway would refuse them as replays."""
        row = self.conn.execute(
            f"SELECT {self.kind}_version FROM gateways WHERE site = ? AND gateway = ?",
            (site, gateway),
        ).fetchone()
        return int(row[0]) if row and row[0] is not None else 0

    def pending(self, limit: int = 5000) -> list[dict[str, Any]]:
        return self.store._rows(
            f"SELECT site, gateway, version, body FROM {self.table} WHERE state = ? "
            "ORDER BY created_ns, site, gateway LIMIT ?",
            (PENDING, limit),
        )

    def mark_sent(self, rows: list[tuple[str, str, int, str]]) -> None:
        """(site, gateway, version, signed document JSON) published; call inside a transaction.
        Older unanswered versions of the same gateways are superseded."""
        now = time.time_ns()
        # The gateway may have answered before the PUBACK came: its answer stays, and the
        # document is kept all the same. A reason noted while it waited is over.
        self.conn.executemany(
            f"UPDATE {self.table} SET document = ?, sent_ns = ?, "
            "reason = CASE WHEN state = ? THEN NULL ELSE reason END, "
            "state = CASE WHEN state = ? THEN ? ELSE state END "
            "WHERE site = ? AND gateway = ? AND version = ?",
            [(document, now, PENDING, PENDING, SENT, s, g, v) for s, g, v, document in rows],
        )
        self.conn.executemany(
            f"UPDATE {self.table} SET state = ? WHERE site = ? AND gateway = ? "
            "AND version < ? AND state IN (?, ?)",
            [(SUPERSEDED, s, g, v, PENDING, SENT) for s, g, v, _ in rows],
        )

    def mark_unsendable(self, site: str, gateway: str, version: int, reason: str) -> None:
        """Why a pending version has not gone out yet (shown by `config status`)."""
        self.conn.execute(
            f"UPDATE {self.table} SET reason = ? "
            "WHERE site = ? AND gateway = ? AND version = ? AND state = ?",
            (reason, site, gateway, version, PENDING),
        )

    def record_ack(self, site: str, gateway: str, ack: Ack) -> None:
        """Stores a gateway's answer; call inside a transaction. The answer is about one of
        our versions only when its hash matches; the refusal of an old version replayed to a
        gateway that runs a newer one does not rewrite that version's history."""
        state = APPLIED if ack.status is AckStatus.APPLIED else REJECTED
        self.conn.execute(
            f"UPDATE {self.table} SET state = ?, reason = ?, acked_ns = ? "
            "WHERE site = ? AND gateway = ? AND version = ? AND sha256 = ? "
            "AND NOT (? = ? AND state = ? AND ? > version)",
            (
                state,
                ack.reason,
                ack.ts_ns,
                site,
                gateway,
                ack.version,
                ack.sha256,
                state,
                REJECTED,
                APPLIED,
                ack.applied_version,
            ),
        )
        applied_sha = ack.sha256 if state == APPLIED else None
        self.conn.execute(
            f"INSERT INTO {self.status_table} (site, gateway, applied_version, applied_sha256, "
            "last_version, last_status, last_reason, last_ack_ns) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (site, gateway) DO UPDATE SET "
            "applied_version = excluded.applied_version, "
            "applied_sha256 = coalesce(excluded.applied_sha256, "
            f"  CASE WHEN excluded.applied_version = {self.status_table}.applied_version "
            f"  THEN {self.status_table}.applied_sha256 END), "
            "last_version = excluded.last_version, last_status = excluded.last_status, "
            "last_reason = excluded.last_reason, last_ack_ns = excluded.last_ack_ns",
            (
                site,
                gateway,
                ack.applied_version,
                applied_sha,
                ack.version,
                state,
                ack.reason,
                ack.ts_ns,
            ),
        )

    def applied_version(self, site: str, gateway: str) -> int:
        row = self.conn.execute(
            f"SELECT applied_version FROM {self.status_table} WHERE site = ? AND gateway = ?",
            (site, gateway),
        ).fetchone()
        return int(row[0]) if row and row[0] is not None else 0

    def status(self, gateways: list[tuple[str, str]] | None = None) -> list[dict[str, Any]]:
        """Desired vs applied per gateway (every registered gateway, or these)."""
        rows = self.store._rows(
            "SELECT g.site, g.gateway, v.version AS desired_version, v.state AS desired_state, "
            "v.reason AS desired_reason, v.origin, v.created_ns AS desired_ns, "
            "s.applied_version, s.last_version, s.last_status, s.last_reason, s.last_ack_ns, "
            "o.status AS gateway_status "
            "FROM registry_gateways g "
            f"LEFT JOIN {self.table} v ON v.site = g.site AND v.gateway = g.gateway "
            f"  AND v.version = (SELECT max(version) FROM {self.table} x "
            "                   WHERE x.site = g.site AND x.gateway = g.gateway) "
            f"LEFT JOIN {self.status_table} s ON s.site = g.site AND s.gateway = g.gateway "
            "LEFT JOIN gateways o ON o.site = g.site AND o.gateway = g.gateway "
            "ORDER BY g.site, g.gateway"
        )
        if gateways is not None:
            wanted = set(gateways)
            rows = [r for r in rows if (r["site"], r["gateway"]) in wanted]
        for row in rows:
            row["in_sync"] = (
                row["desired_version"] is not None
                and row["applied_version"] == row["desired_version"]
            )
        return rows
