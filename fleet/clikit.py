"""What every `campus-fleet` command shares: the context (config, database), exit codes, options
and output helpers.

Exit codes: 0 success; 1 runtime failure (e.g. unreadable database, a push that failed);
2 bad command line or configuration; 3 the thing asked for does not exist (e.g. an unknown
device); 4 the work was done but not everywhere (e.g. some devices failed a command, a wait timed
out).
"""

from __future__ import annotations

import getpass
import json
import os
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

import click

from fleet.config import FleetConfig, load_config
from fleet.store import Store
from fleet.timefmt import parse_since
from wire.errors import DocumentError
from wire.terminal import make_console

EXIT_RUNTIME = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_PARTIAL = 4


console = make_console()


def fail(message: str, code: int) -> NoReturn:
    click.echo(f"campus-fleet: {message}", err=True)
    sys.exit(code)


class Context:
    def __init__(self, config_path: Path, db_path: Path | None, actor: str | None = None) -> None:
        self.config_path = config_path
        self.db_path = db_path
        self.actor = actor or default_actor()
        self._config: FleetConfig | None = None

    @property
    def config(self) -> FleetConfig:
        if self._config is None:
            try:
                self._config = load_config(self.config_path)
            except DocumentError as exc:
                fail(str(exc), EXIT_USAGE)
        return self._config

    def store(self) -> Store:
        path = self.db_path or self.config.database
        if not path.exists():
            fail(f"no fleet database at {path} (has 'campus-fleet serve' run yet?)", EXIT_RUNTIME)
        try:
            store = Store(path, read_only=True)
            store.conn.execute("SELECT count(*) FROM gateways").fetchone()
        except sqlite3.Error as exc:
            fail(f"cannot read the fleet database {path}: {exc}", EXIT_RUNTIME)
        return store

    def writable_store(self) -> Store:
        """For commands that change the registry: creates the database when it is new."""
        path = self.db_path or self.config.database
        try:
            return Store(path)
        except (sqlite3.Error, OSError) as exc:
            fail(f"cannot open the fleet database {path} for writing: {exc}", EXIT_RUNTIME)


def default_actor() -> str:
    """Who is making a change, for the audit log: the OS user (behind sudo, the real one)."""
    sudo_user = os.environ.get("SUDO_USER")
    if sudo_user:
        return sudo_user
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid:{os.getuid()}"


pass_context = click.make_pass_decorator(Context)
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")


def _set_config(ctx: click.Context, _param: click.Parameter, value: Path | None) -> None:
    if value is not None:
        ctx.ensure_object(Context).config_path = value


config_option = click.option(
    "--config",
    type=click.Path(path_type=Path),
    expose_value=False,
    callback=_set_config,
    help="Fleet configuration file (same as the option before the command).",
)


def since_option(text: str) -> int:
    try:
        return parse_since(text, time.time_ns())
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--since") from None


def emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=False))


def show_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)
