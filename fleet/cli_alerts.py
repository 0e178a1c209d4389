"""campus-fleet commands: alerts (what the rules raised and cleared) and the configured rules."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

import click
from rich.markup import escape
from rich.table import Table

from fleet.alerts import AlertRule, span
from fleet.clikit import (
    EXIT_NOT_FOUND,
    EXIT_RUNTIME,
    Context,
    config_option,
    console,
    emit_json,
    fail,
    json_option,
    since_option,
)
from fleet.store import Store
from fleet.timefmt import ago, iso

SEVERITY_STYLE = {"critical": "bold red", "warning": "yellow", "info": "cyan"}
SCOPES = ("sites", "gateways", "devices", "profiles", "kinds")


def register(main: click.Group) -> None:
    """Adds this module's commands to the CLI."""
    main.add_command(alerts)


def _styled(severity: str) -> str:
    """A rule no longer in the config has no known severity: shown plain, as '-'."""
    style = SEVERITY_STYLE.get(severity)
    return f"[{style}]{severity}[/]" if style else escape(severity)


@click.group(invoke_without_command=True)
@config_option
@click.option("--open", "open_only", is_flag=True, help="Only alerts that are still open.")
@click.option(
    "--since",
    default="7d",
    show_default=True,
    help="Alerts open at any time since: 30s, 15m, 2h, 1d, 1w, or an ISO 8601 time. "
    "Open alerts are always listed.",
)
@click.option("--site", help="Only this site.")
@json_option
@click.pass_context
def alerts(
    click_ctx: click.Context, open_only: bool, since: str, site: str | None, as_json: bool
) -> None:
    """Alerts the fleet raised from the rules in its config (`alerts:`), newest first.

    An alert is raised once when its condition held long enough and cleared once when it
    stopped; the same alert is published on the MQTT topic campus/SITE/alerts.

    \b
    Examples:
      campus-fleet alerts                    # open, or open at some time in the last 7 days
      campus-fleet alerts --open             # what needs attention now
      campus-fleet alerts --since 1d --site school-42
      campus-fleet alerts --open --json      # for scripts and monitoring
      campus-fleet alerts rules              # the configured rules
    """
    if click_ctx.invoked_subcommand is not None:
        return
    ctx = click_ctx.find_object(Context)
    assert ctx is not None
    since_ns = since_option(since)
    store = ctx.store()
    if site is not None and not _site_known(store, site):
        fail(f"no site {site!r} in the fleet database", EXIT_NOT_FOUND)
    rows = _query(store, since_ns, open_only, site)
    severities = {rule.id: rule.severity.value for rule in _configured_rules(ctx)}
    now = time.time_ns()
    if as_json:
        emit_json([_as_json(row, severities.get(row["rule"]), now) for row in rows])
        return
    title = "Open alerts" if open_only else f"Alerts since {since}"
    table = Table(title=f"{title} ({len(rows)})")
    for column in ("id", "severity", "rule", "where", "message", "raised", "state"):
        table.add_column(
            column,
            justify="right" if column == "id" else "left",
            no_wrap=column in ("id", "severity", "raised"),
        )
    for row in rows:
        severity = severities.get(row["rule"], "-")
        table.add_row(
            str(row["id"]),
            _styled(severity),
            escape(row["rule"]),
            escape(_where(row)),
            escape(row["message"] or ""),
            ago(row["raised_ns"], now),
            _state(row, now),
        )
    console.print(table)


@alerts.command("rules")
@config_option
@json_option
@click.pass_context
def alerts_rules(click_ctx: click.Context, as_json: bool) -> None:
    """The alert rules of the fleet config, with what each one watches.

    \b
    Examples:
      campus-fleet alerts rules
      campus-fleet --config /etc/campus-iot/fleet.yaml alerts rules --json
    """
    ctx = click_ctx.find_object(Context)
    assert ctx is not None
    rules = ctx.config.alerts
    if as_json:
        emit_json(
            [{**rule.model_dump(mode="json"), "condition": rule.describe()} for rule in rules]
        )
        return
    table = Table(title=f"Alert rules in {ctx.config_path} ({len(rules)})")
    for column in ("id", "type", "severity", "condition", "scope"):
        table.add_column(column)
    for rule in rules:
        severity = rule.severity.value
        table.add_row(
            rule.id,
            rule.type,
            f"[{SEVERITY_STYLE[severity]}]{severity}[/]",
            rule.describe(),
            _scope(rule),
        )
    console.print(table)


def _configured_rules(ctx: Context) -> list[AlertRule]:
    """The config's rules, for severities; none when only a database was given (--db)."""
    if ctx.db_path is not None and not Path(ctx.config_path).exists():
        return []
    return list(ctx.config.alerts)


def _query(store: Store, since_ns: int, open_only: bool, site: str | None) -> list[dict[str, Any]]:
    sql = "SELECT * FROM alerts WHERE (state = 'open' OR cleared_ns >= ?)"
    params: list[Any] = [since_ns]
    if open_only:
        sql += " AND state = 'open'"
    if site is not None:
        sql += " AND site = ?"
        params.append(site)
    try:
        cursor = store.conn.execute(sql + " ORDER BY raised_ns DESC, id DESC", params)
    except sqlite3.Error as exc:
        fail(f"cannot read alerts from {store.path}: {exc}", EXIT_RUNTIME)
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


def _site_known(store: Store, site: str) -> bool:
    for table in ("gateways", "alerts", "sites"):
        try:
            sql = f"SELECT 1 FROM {table} WHERE site = ? LIMIT 1"
            if store.conn.execute(sql, (site,)).fetchone():
                return True
        except sqlite3.Error:
            continue  # a database from before that table existed
    return False


def _as_json(row: dict[str, Any], severity: str | None, now_ns: int) -> dict[str, Any]:
    end_ns = row["cleared_ns"] if row["cleared_ns"] is not None else now_ns
    return {
        "id": row["id"],
        "rule": row["rule"],
        "severity": severity,
        "state": row["state"],
        "site": row["site"],
        "gateway": row["gateway"],
        "device": row["device"],
        "point": row["point"],
        "value": row["value"],
        "message": row["message"],
        "raised": iso(row["raised_ns"]),
        "raised_ns": row["raised_ns"],
        "cleared": iso(row["cleared_ns"]),
        "cleared_ns": row["cleared_ns"],
        "duration_s": round(max(0, end_ns - row["raised_ns"]) / 1e9, 3),
    }


def _where(row: dict[str, Any]) -> str:
    place = "/".join(part for part in (row["site"], row["gateway"], row["device"]) if part)
    return f"{place} {row['point']}" if row["point"] else place


def _state(row: dict[str, Any], now_ns: int) -> str:
    if row["state"] == "open":
        return f"[red]open[/] {span(max(0, now_ns - row['raised_ns']) / 1e9)}"
    return f"cleared after {span(max(0, row['cleared_ns'] - row['raised_ns']) / 1e9)}"


def _scope(rule: AlertRule) -> str:
    parts = []
    for name in SCOPES:
        if values := getattr(rule, name, None):
            parts.append(f"{name}: {', '.join(values)}")
    return "; ".join(parts) or "everywhere"
