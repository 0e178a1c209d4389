"""campus-fleet commands: influx (the InfluxDB sink: check its target, show its counters)."""

from __future__ import annotations

import time
from typing import Any

import click
from rich.table import Table

from fleet.clikit import (
    EXIT_USAGE,
    Context,
    config_option,
    console,
    emit_json,
    fail,
    json_option,
    pass_context,
)
from fleet.influx.check import run_check
from fleet.influx.queue import read_status
from fleet.influx.settings import InfluxSettings
from fleet.timefmt import ago, iso


def register(main: click.Group) -> None:
    """Adds this module's commands to the CLI."""
    main.add_command(influx)


@click.group()
def influx() -> None:
    """The InfluxDB sink: every reading the fleet accepts, written to InfluxDB.

    It is on when the fleet config has an `influx:` section (mode v2: url, org, bucket,
    token_file; mode v1: url, database, username, password_file). Points wait in the fleet
    database while InfluxDB is unreachable or refuses them.

    \b
    Examples:
      campus-fleet influx check            # URL, credentials, bucket or database
      campus-fleet influx status           # written, waiting, rejected, last error
      campus-fleet influx status --json
    """


def _settings(ctx: Context) -> InfluxSettings:
    settings = ctx.config.influx
    if settings is None:
        fail(f"no influx: section in {ctx.config_path}: the InfluxDB sink is off", EXIT_USAGE)
    return settings


@influx.command("check")
@config_option
@json_option
@pass_context
def influx_check(ctx: Context, as_json: bool) -> None:
    """Check that the sink can write: the server answers, the credentials are accepted, the
    bucket (v2) or database (v1) exists. Writes nothing.

    Exit codes: 0 all good; 1 the server cannot be reached; 2 the configuration is wrong
    (unreadable token or password file, refused credentials, wrong mode); 3 the bucket, org,
    database or retention policy does not exist.
    """
    settings = _settings(ctx)
    steps = run_check(settings)
    failed = next((step for step in steps if not step.ok), None)
    if as_json:
        emit_json(
            {
                "ok": failed is None,
                "mode": settings.mode,
                "target": settings.target,
                "steps": [{"step": s.name, "ok": s.ok, "message": s.message} for s in steps],
            }
        )
    else:
        console.print(f"InfluxDB sink, mode {settings.mode}: {settings.target}")
        for step in steps:
            mark = "[green]ok[/]  " if step.ok else "[bold red]FAIL[/]"
            console.print(f"  {mark} {step.name:<16} {step.message}", highlight=False)
    if failed is not None:
        if not as_json:
            click.echo(f"campus-fleet: influx check failed: {failed.message}", err=True)
        raise SystemExit(failed.code)


@influx.command("status")
@config_option
@json_option
@pass_context
def influx_status(ctx: Context, as_json: bool) -> None:
    """What the sink wrote, what waits, what InfluxDB refused and the last error.

    Counters are kept in the fleet database by `campus-fleet serve`: written (accepted by
    InfluxDB), queued (waiting), evicted (the oldest, dropped when the queue was full), rejected
    (refused by InfluxDB, e.g. a field type conflict; not tried again), skipped (NaN or infinite
    values, which line protocol cannot carry).
    """
    # With --db the counters need no config file; the settings are shown when there is one.
    settings = ctx.config.influx if ctx.db_path is None or ctx.config_path.exists() else None
    status = read_status(ctx.store())
    now = time.time_ns()
    if as_json:
        report: dict[str, Any] = {
            "configured": settings is not None,
            "mode": settings.mode if settings else None,
            "target": settings.target if settings else None,
        }
        if status is not None:
            for name in ("enqueued", "queued", "written", "evicted", "rejected", "skipped"):
                report[name] = status[name]
            report["last_error"] = status["last_error"]
            for name in ("last_error", "failing_since", "last_success", "oldest_queued"):
                report[f"{name}_at"] = iso(status[f"{name}_ns"])
            report["recent_rejects"] = [
                {"at": iso(r["ts_ns"]), "line": r["line"], "error": r["error"]}
                for r in status["recent_rejects"]
            ]
        emit_json(report)
        return
    if settings is None:
        console.print(f"No influx: section in {ctx.config_path}: the InfluxDB sink is off.")
    else:
        console.print(f"InfluxDB sink, mode {settings.mode}: {settings.target}")
    if status is None:
        console.print("The sink has not run on this fleet database yet.")
        return
    table = Table(show_header=False, box=None)
    table.add_column(style="bold")
    table.add_column(justify="right")
    table.add_column()
    oldest = status["oldest_queued_ns"]
    table.add_row(
        "written", f"{status['written']:,}", f"last {ago(status['last_success_ns'], now)}"
    )
    table.add_row("queued", f"{status['queued']:,}", f"oldest {ago(oldest, now)}" if oldest else "")
    table.add_row("rejected", f"{status['rejected']:,}", "refused by InfluxDB, not retried")
    table.add_row("evicted", f"{status['evicted']:,}", "dropped: the queue was full")
    table.add_row("skipped", f"{status['skipped']:,}", "NaN or infinite values")
    console.print(table)
    if status["failing_since_ns"] is not None:
        console.print(
            f"[bold red]failing[/] since {ago(status['failing_since_ns'], now)}: "
            f"{status['last_error']} (last try {ago(status['last_error_ns'], now)})",
            highlight=False,
        )
    elif status["last_error"]:
        console.print(
            f"last error {ago(status['last_error_ns'], now)}: {status['last_error']}",
            highlight=False,
        )
    for reject in status["recent_rejects"]:
        console.print(
            f"rejected {ago(reject['ts_ns'], now)}: {reject['error']}\n  {reject['line'][:200]}",
            highlight=False,
        )
