"""The fleet's registry and telemetry store (SQLite through sqlite-utils).

Rules: a reading is identified by (site, gateway, seq) and stored once: a repeat is counted as a
duplicate, never stored twice. `ingest_batch()` and the gateway counters change in the same
transaction, so the counters always match the rows. Readers (the CLI) open the same file while
the service writes: WAL mode lets them.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlite_utils

from wire.models import DEVICE_REASON_MAX, Event, GatewayState, Reading, Status

GAPS_SHOWN = 1000


@dataclass(frozen=True)
class TableSpec:
    columns: dict[str, type]
    pk: str | tuple[str, ...]
    defaults: dict[str, int] = field(default_factory=dict)
    indexes: tuple[tuple[str, ...], ...] = ()


def _document_tables(kind: str) -> dict[str, TableSpec]:
    return {
        f"{kind}_versions": TableSpec(
            {
                "site": str,
                "gateway": str,
                "version": int,
                "sha256": str,
                "body": str,
                "document": str,
                "origin": str,
                "actor": str,
                "state": str,
                "reason": str,
                "created_ns": int,
                "sent_ns": int,
                "acked_ns": int,
            },
            pk=("site", "gateway", "version"),
            indexes=(("state",),),
        ),
        f"{kind}_status": TableSpec(
            {
                "site": str,
                "gateway": str,
                "applied_version": int,
                "applied_sha256": str,
                "last_version": int,
                "last_status": str,
                "last_reason": str,
                "last_ack_ns": int,
            },
            pk=("site", "gateway"),
        ),
    }


# Columns are only ever added; an older database gets the missing ones when it is opened.
TABLES: dict[str, TableSpec] = {
    "gateways": TableSpec(
        {
            "site": str,
            "gateway": str,
            "status": str,
            "reason": str,
            "agent_version": str,
            "keepalive_s": int,
            "first_seen_ns": int,
            "last_seen_ns": int,
            "state_ts_ns": int,
            "buffer_depth": int,
            "evicted": int,
            "lost": int,
            "received": int,
            "duplicates": int,
            "last_seq": int,
            # for alerts (fleet/alerts.py), on the fleet's clock: offline since (NULL while
            # online), and when the agent last reported that its buffer evicted readings
            "offline_since_ns": int,
            "last_eviction_ns": int,
            "config_version": int,  # the config version the gateway last reported running
            "policy_version": int,  # and its policy: version, and state (JSON: sha256, counters)
            "policy_state": str,
        },
        pk=("site", "gateway"),
        defaults={"received": 0, "duplicates": 0, "last_seq": 0, "evicted": 0, "lost": 0},
    ),
    "devices": TableSpec(
        {
            "site": str,
            "gateway": str,
            "device": str,
            "profile": str,
            "kind": str,
            "up": int,
            "last_seen_ns": int,
            "down_since_ns": int,  # reported down since (fleet's clock); NULL once up again
            "reason": str,  # why it is down (the agent's last error); NULL once up again
        },
        pk=("site", "gateway", "device"),
    ),
    # value: bytes gives the column no affinity, so ints, floats and text keep their type.
    "readings": TableSpec(
        {
            "site": str,
            "gateway": str,
            "seq": int,
            "ts_ns": int,
            "device": str,
            "point": str,
            "value": bytes,
            "quality": int,
            "received_ns": int,
        },
        pk=("site", "gateway", "seq"),
        indexes=(("device", "ts_ns"),),
    ),
    "latest": TableSpec(
        {
            "site": str,
            "gateway": str,
            "device": str,
            "point": str,
            "value": bytes,
            "ts_ns": int,
            "seq": int,
        },
        pk=("site", "gateway", "device", "point"),
    ),
    "events": TableSpec(
        {
            "id": int,
            "site": str,
            "gateway": str,
            "ts_ns": int,
            "kind": str,
            "device": str,
            "message": str,
            "data": str,
            "received_ns": int,
        },
        pk="id",
    ),
    "rejected": TableSpec({"id": int, "topic": str, "reason": str, "received_ns": int}, pk="id"),
    # -- registry: what IT staff declared (the tables above hold what gateways reported) --------
    # settings: JSON of fleet.settings.NodeSettings, inherited site → building → room → gateway.
    "sites": TableSpec(
        {"site": str, "name": str, "settings": str, "created_ns": int},
        pk="site",
    ),
    "buildings": TableSpec(
        {"site": str, "building": str, "name": str, "settings": str, "created_ns": int},
        pk=("site", "building"),
    ),
    "rooms": TableSpec(
        {
            "site": str,
            "room": str,
            "building": str,
            "name": str,
            "settings": str,
            "created_ns": int,
        },
        pk=("site", "room"),
    ),
    "registry_gateways": TableSpec(
        {
            "site": str,
            "gateway": str,
            "building": str,
            "room": str,
            "settings": str,
            "created_ns": int,
            "enrolled_ns": int,
        },
        pk=("site", "gateway"),
    ),
    # connection: JSON of the driver connection; settings: interval_s, timeout_s, alarms.
    "registry_devices": TableSpec(
        {
            "site": str,
            "device": str,
            "gateway": str,
            "room": str,
            "kind": str,
            "profile": str,
            "connection": str,
            "settings": str,
            "created_ns": int,
        },
        pk=("site", "device"),
        indexes=(("site", "gateway"),),
    ),
    # -- desired state --------------------------------------------------------------------------
    # Per kind of signed document (config, policy): `{kind}_versions`, one row per version pushed
    # to a gateway (state: pending (waiting for the service to sign and publish) → sent → applied
    # | rejected; superseded when a newer version was sent first), and `{kind}_status`, what each
    # gateway last acknowledged (and what it runs).
    **{
        name: spec for kind in ("config", "policy") for name, spec in _document_tables(kind).items()
    },
    "rollouts": TableSpec(
        {
            "id": int,
            "target": str,
            "stages": str,
            "max_failures": float,
            "ack_timeout_s": float,
            "overlay": str,
            "state": str,
            "stage": int,
            "message": str,
            "actor": str,
            "created_ns": int,
            "updated_ns": int,
            "stage_started_ns": int,
        },
        pk="id",
    ),
    "rollout_gateways": TableSpec(
        {
            "rollout": int,
            "site": str,
            "gateway": str,
            "stage": int,
            "version": int,
            "previous_version": int,
            "status": str,
            "reason": str,
        },
        pk=("rollout", "site", "gateway"),
    ),
    # -- commands, alerts, audit ------------------------------------------------------------------
    "commands": TableSpec(
        {
            "id": str,
            "batch": str,
            "site": str,
            "gateway": str,
            "device": str,
            "action": str,
            "argument": str,
            "options": str,  # JSON {name: value} of the command's named options (NULL: none)
            "actor": str,
            "status": str,
            "result": str,
            "error": str,
            "created_ns": int,
            "deadline_ns": int,
            "sent_ns": int,
            "done_ns": int,
        },
        pk="id",
        indexes=(("batch",), ("status",)),
    ),
    "alerts": TableSpec(
        {
            "id": int,
            "rule": str,
            "key": str,
            "site": str,
            "gateway": str,
            "device": str,
            "point": str,
            "state": str,
            "value": float,
            "message": str,
            "raised_ns": int,
            "cleared_ns": int,
        },
        pk="id",
        indexes=(("state",), ("key",)),
    ),
    # The running service's heartbeat: CLI commands that need it (push, cmd, rollouts) check it.
    "service": TableSpec(
        {
            "name": str,
            "pid": int,
            "started_ns": int,
            "heartbeat_ns": int,
            "signing_key": str,
            "connected": int,
        },
        pk="name",
    ),
    "audit": TableSpec(
        {
            "id": int,
            "ts_ns": int,
            "actor": str,
            "action": str,
            "target": str,
            "details": str,
            "result": str,
        },
        pk="id",
    ),
    # -- InfluxDB sink (fleet/influx/) ----------------------------------------------------------
    # Line protocol waiting to be written, one row per telemetry message, in order: inserted in the
    # transaction that stores its readings, deleted in the one that counts them written.
    "influx_queue": TableSpec({"id": int, "points": int, "lines": str, "queued_ns": int}, pk="id"),
    "influx_status": TableSpec(
        {
            "name": str,
            "enqueued": int,
            "queued": int,
            "written": int,
            "evicted": int,
            "rejected": int,
            "skipped": int,
            "last_error": str,
            "last_error_ns": int,
            "failing_since_ns": int,
            "last_success_ns": int,
        },
        pk="name",
        defaults={
            "enqueued": 0,
            "queued": 0,
            "written": 0,
            "evicted": 0,
            "rejected": 0,
            "skipped": 0,
        },
    ),
    "influx_rejects": TableSpec({"id": int, "ts_ns": int, "line": str, "error": str}, pk="id"),
}


@dataclass(frozen=True, slots=True)
class IngestResult:
    new: int
    duplicates: int


class Store:
    def __init__(self, path: Path, *, read_only: bool = False) -> None:
        """`read_only` for the CLI: no schema changes, no write lock, nothing created."""
        self.path = path
        if read_only:
            self.conn = sqlite3.connect(
                f"file:{path}?mode=ro", uri=True, isolation_level=None, check_same_thread=False
            )
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.conn.execute("PRAGMA busy_timeout=5000")
        self.db = sqlite_utils.Database(self.conn)
        if not read_only:
            self._create()

    def _create(self) -> None:
        db = self.db
        if db.conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
            db.conn.execute("PRAGMA journal_mode=WAL")
        # FULL: a message is acknowledged to the broker after its commit, so the commit must be
        # on disk when it returns, or a power cut would lose what the broker already let go of.
        db.conn.execute("PRAGMA synchronous=FULL")
        with self.transaction():
            for name, spec in TABLES.items():
                table = db.table(name)
                if not table.exists():
                    table.create(
                        spec.columns,
                        pk=spec.pk,
                        defaults=spec.defaults or None,
                        not_null=spec.defaults.keys() or None,
                    )
                    for index in spec.indexes:
                        table.create_index(list(index))
                for column, kind in spec.columns.items():  # a database from an older version
                    if column not in table.columns_dict:
                        table.add_column(column, kind, not_null_default=spec.defaults.get(column))
            # An event sent again (its PUBACK was lost) is the same row; NULL devices compare
            # equal through ifnull, which a plain unique index would not do.
            db.conn.execute(
                "CREATE UNIQUE INDEX IF NOT EXISTS events_once ON events "
                "(site, gateway, ts_ns, kind, ifnull(device, ''), message)"
            )

    def transaction(self) -> _Transaction:
        return _Transaction(self.conn)

    def close(self) -> None:
        self.conn.close()

    # -- writes (the ingest path) --------------------------------------------------------------

    def _touch_gateway(self, site: str, gateway: str, now_ns: int) -> None:
        self.conn.execute(
            "INSERT INTO gateways (site, gateway, first_seen_ns, last_seen_ns) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (site, gateway) DO UPDATE SET "
            "last_seen_ns = max(coalesce(last_seen_ns, 0), excluded.last_seen_ns)",
            (site, gateway, now_ns, now_ns),
        )

    def ingest_batch(self, site: str, gateway: str, readings: Sequence[Reading]) -> IngestResult:
        """Stores the readings not seen before; call inside `transaction()`."""
        now = time.time_ns()
        self._touch_gateway(site, gateway, now)
        before = self.conn.total_changes
        self.conn.executemany(
            "INSERT OR IGNORE INTO readings "
            "(site, gateway, seq, ts_ns, device, point, value, quality, received_ns) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [(site, gateway, *reading, now) for reading in readings],
        )
        new = self.conn.total_changes - before
        duplicates = len(readings) - new
        if new:
            latest: dict[tuple[str, str], Reading] = {}
            seen: dict[str, int] = {}
            for reading in readings:  # in seq order: the last one wins
                latest[(reading[2], reading[3])] = reading
                seen[reading[2]] = max(seen.get(reading[2], 0), reading[1])
            self.conn.executemany(
                "INSERT INTO latest (site, gateway, device, point, value, ts_ns, seq) "
                "VALUES (?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (site, gateway, device, point) DO UPDATE SET "
                "value = excluded.value, ts_ns = excluded.ts_ns, seq = excluded.seq "
                "WHERE excluded.seq > latest.seq",
                [(site, gateway, r[2], r[3], r[4], r[1], r[0]) for r in latest.values()],
            )
            self.conn.executemany(
                "INSERT INTO devices (site, gateway, device, last_seen_ns) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (site, gateway, device) DO UPDATE SET "
                "last_seen_ns = max(coalesce(devices.last_seen_ns, 0), excluded.last_seen_ns)",
                [(site, gateway, device, ts) for device, ts in seen.items()],
            )
        self.conn.execute(
            "UPDATE gateways SET received = received + ?, duplicates = duplicates + ?, "
            "last_seq = max(last_seq, ?) WHERE site = ? AND gateway = ?",
            (new, duplicates, max(r[0] for r in readings) if readings else 0, site, gateway),
        )
        return IngestResult(new, duplicates)

    def record_state(
        self, site: str, gateway: str, state: GatewayState, *, retained: bool = False
    ) -> None:
        """A retained state is the broker's copy, delivered again at every subscription: it
        says what the gateway last reported, not that it was seen now."""
        seen_ns = (state.ts_ns or 0) if retained else time.time_ns()
        self._touch_gateway(site, gateway, seen_ns)
        fields: dict[str, Any] = {"status": state.status.value, "reason": state.reason}
        if state.status is Status.ONLINE:
            fields["reason"] = None
        if state.ts_ns is not None:
            fields["state_ts_ns"] = state.ts_ns
        if state.agent_version is not None:
            fields["agent_version"] = state.agent_version
        if state.keepalive_s is not None:
            fields["keepalive_s"] = state.keepalive_s
        if state.config_version is not None:
            fields["config_version"] = state.config_version
        if state.policy_version is not None:
            fields["policy_version"] = state.policy_version
        if state.policy is not None:
            fields["policy_state"] = state.policy.model_dump_json()
        elif state.status is Status.ONLINE and state.buffer is not None:
            # A full online state without a policy: enforcement is off on that gateway now.
            fields["policy_state"] = None
        if state.buffer is not None:
            fields["buffer_depth"] = state.buffer.depth
            fields["evicted"] = state.buffer.evicted
            fields["lost"] = state.buffer.lost
        # Before `evicted` is overwritten: did the counter grow? (A retained state's times are
        # its own stamp; a retained Last Will has none, so offline since last seen.)
        self.conn.execute(
            "UPDATE gateways SET offline_since_ns = CASE WHEN ? THEN "
            "coalesce(offline_since_ns, ?, last_seen_ns) END, last_eviction_ns = CASE "
            "WHEN evicted < ? THEN ? ELSE last_eviction_ns END WHERE site = ? AND gateway = ?",
            (
                state.status is Status.OFFLINE,
                state.ts_ns if retained else seen_ns,
                state.buffer.evicted if state.buffer is not None else 0,
                seen_ns,
                site,
                gateway,
            ),
        )
        assignments = ", ".join(f"{name} = ?" for name in fields)
        self.conn.execute(
            f"UPDATE gateways SET {assignments} WHERE site = ? AND gateway = ?",
            (*fields.values(), site, gateway),
        )
        for device in state.devices or []:
            up = None if device.up is None else int(device.up)
            # While down or unknown, a state without a reason (an older agent) keeps the one
            # the device_down event gave.
            self.conn.execute(
                "INSERT INTO devices (site, gateway, device, profile, kind, up, down_since_ns, "
                "reason) VALUES (?, ?, ?, ?, ?, ?, CASE WHEN ? = 0 THEN ? END, ?) "
                "ON CONFLICT (site, gateway, device) DO UPDATE SET "
                "profile = excluded.profile, kind = excluded.kind, up = excluded.up, "
                "down_since_ns = CASE WHEN excluded.up = 0 THEN "
                "coalesce(devices.down_since_ns, excluded.down_since_ns) "
                "WHEN excluded.up IS NULL THEN devices.down_since_ns END, "  # unknown: not back
                "reason = CASE WHEN excluded.up = 1 THEN NULL "
                "ELSE coalesce(excluded.reason, devices.reason) END",
                (
                    site,
                    gateway,
                    device.id,
                    device.profile,
                    device.kind,
                    up,
                    up,
                    seen_ns,
                    None if up == 1 else _bounded(device.reason),
                ),
            )

    def record_event(self, site: str, gateway: str, event: Event) -> None:
        now = time.time_ns()
        self._touch_gateway(site, gateway, now)
        inserted = self.conn.execute(
            "INSERT OR IGNORE INTO events "
            "(site, gateway, ts_ns, kind, device, message, data, received_ns) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                site,
                gateway,
                event.ts_ns,
                event.kind.value,
                event.device,
                event.message,
                json.dumps(event.data),
                now,
            ),
        ).rowcount
        if event.device is not None and event.kind.value in ("device_up", "device_down"):
            up = int(event.kind.value == "device_up")
            self.conn.execute(
                "UPDATE devices SET up = ?, down_since_ns = CASE WHEN ? THEN NULL "
                "ELSE coalesce(down_since_ns, ?) END, "
                "reason = CASE WHEN ? THEN NULL ELSE coalesce(reason, ?) END "
                "WHERE site = ? AND gateway = ? AND device = ?",
                (
                    up,
                    up,
                    now,
                    up,
                    _bounded(event.message),
                    site,
                    gateway,
                    event.device,
                ),
            )
        if inserted and event.kind.value == "buffer_eviction":
            self.conn.execute(
                "UPDATE gateways SET last_eviction_ns = ? WHERE site = ? AND gateway = ?",
                (now, site, gateway),
            )

    def record_rejected(self, topic: str, reason: str) -> None:
        self.conn.execute(
            "INSERT INTO rejected (topic, reason, received_ns) VALUES (?, ?, ?)",
            (topic, reason[:2000], time.time_ns()),
        )

    # -- reads (the CLI) -----------------------------------------------------------------------

    def _rows(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        cursor = self.conn.execute(sql, params)
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]

    def gateways(self) -> list[dict[str, Any]]:
        return self._rows(
            "SELECT g.*, (SELECT count(*) FROM devices d WHERE d.site = g.site "
            "AND d.gateway = g.gateway) AS devices FROM gateways g ORDER BY site, gateway"
        )

    def devices(self) -> list[dict[str, Any]]:
        return self._rows(
            "SELECT d.*, g.status AS gateway_status FROM devices d JOIN gateways g "
            "USING (site, gateway) ORDER BY d.site, d.gateway, d.device"
        )

    def latest(self) -> list[dict[str, Any]]:
        return self._rows(
            "SELECT l.*, d.profile, d.up, g.status AS gateway_status FROM latest l "
            "JOIN devices d USING (site, gateway, device) JOIN gateways g USING (site, gateway) "
            "ORDER BY l.site, l.gateway, l.device, l.point"
        )

    def find_device(self, name: str) -> list[dict[str, Any]]:
        """Devices matching `device`, `gateway/device` or `site/gateway/device`."""
        parts = name.split("/")
        columns = ("site", "gateway", "device")[-len(parts) :] if len(parts) <= 3 else ()
        if not columns:
            return []
        where = " AND ".join(f"{c} = ?" for c in columns)
        return self._rows(f"SELECT * FROM devices WHERE {where}", parts)

    def readings(
        self, site: str, gateway: str, device: str, since_ns: int, limit: int
    ) -> list[dict[str, Any]]:
        return self._rows(
            "SELECT seq, ts_ns, point, value, quality FROM readings "
            "WHERE site = ? AND gateway = ? AND device = ? AND ts_ns >= ? "
            "ORDER BY seq DESC LIMIT ?",
            (site, gateway, device, since_ns, limit),
        )[::-1]

    def gaps(self, site: str, gateway: str, limit: int = 1000) -> list[tuple[int, int]]:
        """Sequence ranges below the gateway's last seq that never arrived (first, last)."""
        rows = self.conn.execute(
            "SELECT seq + 1, next - 1 FROM (SELECT seq, lead(seq) OVER (ORDER BY seq) AS next "
            "FROM (SELECT 0 AS seq UNION ALL SELECT seq FROM readings "
            "WHERE site = ? AND gateway = ?)) WHERE next > seq + 1 LIMIT ?",
            (site, gateway, limit),
        ).fetchall()
        return [(int(first), int(last)) for first, last in rows]

    def stats(self) -> list[dict[str, Any]]:
        """Per gateway: what arrived, what arrived twice, what is missing, what was evicted."""
        result = []
        for g in self.gateways():
            gaps = self.gaps(g["site"], g["gateway"], limit=GAPS_SHOWN + 1)
            result.append(
                {
                    "site": g["site"],
                    "gateway": g["gateway"],
                    "received": g["received"],
                    "duplicates": g["duplicates"],
                    "last_seq": g["last_seq"],
                    "gaps": [list(gap) for gap in gaps[:GAPS_SHOWN]],
                    "gaps_truncated": len(gaps) > GAPS_SHOWN,
                    "missing": g["last_seq"] - g["received"],
                    "evicted": g["evicted"],
                    "lost": g["lost"],
                    "buffer_depth": g["buffer_depth"],
                }
            )
        return result

    def events(self, since_ns: int, limit: int) -> list[dict[str, Any]]:
        return self._rows(
            "SELECT site, gateway, ts_ns, kind, device, message, data FROM events "
            "WHERE ts_ns >= ? ORDER BY id DESC LIMIT ?",
            (since_ns, limit),
        )[::-1]

    def rejected_count(self) -> int:
        return int(self.conn.execute("SELECT count(*) FROM rejected").fetchone()[0])


def _bounded(reason: str | None) -> str | None:
    return None if reason is None else reason[:DEVICE_REASON_MAX]


class _Transaction:
    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def __enter__(self) -> sqlite3.Connection:
        self.conn.execute("BEGIN IMMEDIATE")
        return self.conn

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is None:
            self.conn.execute("COMMIT")
        elif self.conn.in_transaction:
            self.conn.execute("ROLLBACK")
