"""The audit log: who changed what, when, and whether it worked.

Rules: every command that changes the registry or the desired state runs its change inside
`audited()`, which writes one row after the change, `ok` or `error: <message>`, and re-raises.
Use it outside `store.transaction()`: the row is its own statement, so it survives the rollback of
a change that failed. Rows are never updated or deleted.
"""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fleet.store import Store
from fleet.timefmt import iso

EXPORT_FORMATS = (".csv", ".jsonl")
MESSAGE_MAX = 1000
ERROR_LINES_KEPT = 200
EXPORT_COLUMNS = ("id", "time", "ts_ns", "actor", "action", "target", "result", "details")


def record(
    store: Store, actor: str, action: str, target: str, details: dict[str, Any], result: str
) -> int:
    """Appends one entry and returns its id."""
    cursor = store.conn.execute(
        "INSERT INTO audit (ts_ns, actor, action, target, details, result) "
        "VALUES (?, ?, ?, ?, ?, ?)",
        (time.time_ns(), actor, action, target, json.dumps(details, default=str), result),
    )
    return int(cursor.lastrowid or 0)


@contextmanager
def audited(
    store: Store, actor: str, action: str, target: str, details: dict[str, Any] | None = None
) -> Iterator[dict[str, Any]]:
    """Records the body's outcome. Yields the details dict: what the body adds (counts, the new
    version…) is recorded with it."""
    entry: dict[str, Any] = dict(details or {})
    try:
        yield entry
    except BaseException as exc:
        first, *more = describe(exc).splitlines() or [""]
        if more:  # a multi-line message (every problem of a file): the first line is the gist
            entry["error_details"] = more[:ERROR_LINES_KEPT]
        record(store, actor, action, target, entry, f"error: {first[:MESSAGE_MAX]}")
        raise
    record(store, actor, action, target, entry, "ok")


def describe(exc: BaseException) -> str:
    """The exception's message without blank lines and indentation (its class if it has none)."""
    if isinstance(exc, SystemExit):
        return f"exit code {exc.code}"
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted"
    text = "\n".join(line.strip() for line in str(exc).splitlines() if line.strip())
    return text or type(exc).__name__


def entries(
    store: Store,
    since_ns: int = 0,
    actor: str | None = None,
    action: str | None = None,
    limit: int | None = None,
) -> list[dict[str, Any]]:
    """Entries oldest first. `action` matches itself and its sub-actions (`device` matches
    `device.add`); a trailing `*` matches any action starting with what comes before it."""
    if store.conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'audit'").fetchone() is None:
        return []  # a database older than the audit log
    where = ["ts_ns >= ?"]
    params: list[Any] = [since_ns]
    if actor is not None:
        where.append("actor = ?")
        params.append(actor)
    if action is not None:
        prefix = action.removesuffix("*")
        if action.endswith("*"):
            where.append("substr(action, 1, ?) = ?")
            params += [len(prefix), prefix]
        else:
            where.append("(action = ? OR substr(action, 1, ?) = ?)")
            params += [action, len(action) + 1, action + "."]
    sql = f"SELECT * FROM audit WHERE {' AND '.join(where)} ORDER BY id DESC"
    if limit is not None:
        sql += " LIMIT ?"
        params.append(limit)
    cursor = store.conn.execute(sql, params)
    names = [d[0] for d in cursor.description]
    rows = [dict(zip(names, row, strict=True)) for row in cursor.fetchall()][::-1]
    for row in rows:
        row["time"] = iso(row["ts_ns"])
        row["details"] = json.loads(row["details"] or "{}")
    return rows


def export(rows: list[dict[str, Any]], path: Path) -> None:
    """Writes entries as CSV (details as a JSON cell) or JSON Lines, chosen by the extension."""
    suffix = path.suffix.lower()
    if suffix not in EXPORT_FORMATS:
        raise ValueError(f"{path}: export format comes from the extension: .csv or .jsonl")
    with path.open("w", encoding="utf-8", newline="") as out:
        if suffix == ".jsonl":
            for row in rows:
                out.write(json.dumps({c: row[c] for c in EXPORT_COLUMNS}) + "\n")
            return
        writer = csv.writer(out)
        writer.writerow(EXPORT_COLUMNS)
        for row in rows:
            cells = {**row, "details": json.dumps(row["details"], sort_keys=True)}
            writer.writerow([cells[c] for c in EXPORT_COLUMNS])
