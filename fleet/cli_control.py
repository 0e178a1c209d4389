"""campus-fleet commands that change what runs on gateways: config, rollout, cmd, commands.

They write into the fleet database what should happen (a pending config version, a rollout, a
queued command); the running `campus-fleet serve` signs, publishes and tracks it. With `--wait`
(the default for pushes and commands) the command then follows the gateways' answers.
"""

from __future__ import annotations

import difflib
import json
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import click
import yaml
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from drivers.profiles import ProfileLibrary
from fleet.audit import audited, record
from fleet.clikit import (
    EXIT_NOT_FOUND,
    EXIT_PARTIAL,
    EXIT_RUNTIME,
    EXIT_USAGE,
    Context,
    config_option,
    console,
    emit_json,
    fail,
    json_option,
    pass_context,
)
from fleet.commands import FINAL, Commands, Target, check_command
from fleet.desired import DesiredConfigError, body_of, build_config
from fleet.registry import NotFound, Registry, RegistryError
from fleet.rollouts import ACTIVE, RolloutError, Rollouts
from fleet.settings import NodeSettings, SettingsError, validate_settings
from fleet.store import Store
from fleet.timefmt import ago, iso
from fleet.versions import APPLIED, PENDING, REJECTED, SENT, Versions, carries
from wire.command_words import extra_words, split_words
from wire.documents import read_yaml
from wire.errors import DocumentError
from wire.signing import body_hash

SERVICE_STALE_S = 10.0
TARGET_HELP = "site:SITE, building:SITE/BUILDING, room:SITE/ROOM, gateway:SITE/GATEWAY, or all"


def register(main: click.Group) -> None:
    main.add_command(config)
    main.add_command(rollout)
    main.add_command(cmd)
    main.add_command(commands)


# -- shared helpers ------------------------------------------------------------------------------


def library_of(ctx: Context) -> ProfileLibrary:
    try:
        return ProfileLibrary.load(ctx.config.profiles_dir)
    except DocumentError as exc:
        fail(f"profiles: {exc}", EXIT_USAGE)


def registry_of(ctx: Context, store: Store) -> Registry:
    return Registry(store, profiles_dir=ctx.config.profiles_dir)


def resolve_gateways(registry: Registry, targets: Iterable[str]) -> list[tuple[str, str]]:
    found: dict[tuple[str, str], None] = {}
    for target in targets:
        try:
            for gateway in registry.gateways_matching(target):
                found[gateway] = None
        except NotFound as exc:
            fail(str(exc), EXIT_NOT_FOUND)
        except RegistryError as exc:
            fail(str(exc), EXIT_USAGE)
    if not found:
        fail(f"no registered gateway matches {' '.join(targets)}", EXIT_NOT_FOUND)
    return sorted(found)


def service_problem(store: Store) -> str | None:
    """Why the service cannot carry out a change now (None: it is running and can sign)."""
    row = store.conn.execute(
        "SELECT heartbeat_ns, signing_key, connected FROM service "
        "ORDER BY heartbeat_ns DESC LIMIT 1"
    ).fetchone()
    if row is None or time.time_ns() - row[0] > SERVICE_STALE_S * 1e9:
        return "no 'campus-fleet serve' is running on this database"
    if row[1] is None:
        return "the fleet service has no signing key (run 'campus-fleet keys generate')"
    return None


def service_warning(store: Store) -> str | None:
    """A running service that cannot reach the broker now: changes wait for it."""
    row = store.conn.execute(
        "SELECT connected FROM service ORDER BY heartbeat_ns DESC LIMIT 1"
    ).fetchone()
    if row is not None and row[0] == 0:
        return "'campus-fleet serve' is not connected to the broker right now (see its log)"
    return None


def wait_until(
    check: Callable[[], tuple[int, int]], timeout_s: float, label: str, quiet: bool
) -> bool:
    """Polls `check() -> (done, total)` until done == total or the timeout; a progress bar for
    people. True when everything finished."""
    deadline = time.monotonic() + timeout_s
    done, total = check()
    if quiet or not sys.stderr.isatty():
        while done < total and time.monotonic() < deadline:
            time.sleep(0.1)
            done, total = check()
        return done >= total
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as progress:
        task = progress.add_task(label, total=total, completed=done)
        while done < total and time.monotonic() < deadline:
            time.sleep(0.1)
            done, total = check()
            progress.update(task, completed=done, total=total)
    return done >= total


def parse_argument(text: str | None) -> Any:
    """A command argument: JSON when it parses (42, true, {"text": "…"}), else the text."""
    if text is None:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def load_overlay(path: Path) -> NodeSettings:
    try:
        data, _root = read_yaml(path)
        return validate_settings(data, str(path))
    except (DocumentError, SettingsError) as exc:
        fail(str(exc), EXIT_USAGE)


# -- config --------------------------------------------------------------------------------------


@click.group()
def config() -> None:
    """Desired config of gateways: built from the registry tree, signed, pushed, acknowledged.

    A gateway's config lists its registered devices (profile, connection) with the poll
    interval, timeout and alarm thresholds they inherit (site → building → room → gateway →
    device) and the schedules of its part of the tree. `push` records a new version; the
    fleet service signs it (Ed25519), publishes it retained, and the gateway answers
    applied or rejected (with the reason).

    \b
    Examples:
      campus-fleet config show gateway:school-42/gw-001
      campus-fleet config diff site:school-42
      campus-fleet config push site:school-42 --wait
      campus-fleet config status --json
    """


@config.command("show")
@config_option
@click.argument("gateway")
@click.option("--applied", is_flag=True, help="What the gateway last applied, not the desired.")
@click.option("--version", "version", type=int, help="This pushed version.")
@json_option
@pass_context
def config_show(
    ctx: Context, gateway: str, applied: bool, version: int | None, as_json: bool
) -> None:
    """The config of GATEWAY (gateway:SITE/GW): desired (built now from the tree) by default."""
    store = ctx.writable_store()
    registry = registry_of(ctx, store)
    site, gw = _one_gateway(registry, gateway)
    versions = Versions(store)
    if applied or version is not None:
        wanted = version if version is not None else versions.applied_version(site, gw)
        body = versions.body(site, gw, wanted) if wanted else None
        if body is None:
            fail(f"{site}/{gw} has no version {wanted or '(none applied)'}", EXIT_NOT_FOUND)
        label = f"version {wanted}"
    else:
        body = _desired_body(registry, library_of(ctx), site, gw)
        label = "desired"
    if as_json:
        emit_json({"site": site, "gateway": gw, "which": label, "config": body})
        return
    click.echo(f"# {site}/{gw}: {label}")
    click.echo(yaml.safe_dump(body, sort_keys=False, allow_unicode=True), nl=False)


@config.command("diff")
@config_option
@click.argument("targets", nargs=-1, required=True)
@json_option
@pass_context
def config_diff(ctx: Context, targets: tuple[str, ...], as_json: bool) -> None:
    """What a push would change: applied vs desired config of every gateway of TARGETS.

    TARGETS: site:SITE, building:SITE/BUILDING, room:SITE/ROOM, gateway:SITE/GATEWAY, or all.
    """
    store = ctx.writable_store()
    registry = registry_of(ctx, store)
    library = library_of(ctx)
    versions = Versions(store)
    result = []
    for site, gw in resolve_gateways(registry, targets):
        desired = _desired_body(registry, library, site, gw)
        applied_version = versions.applied_version(site, gw)
        applied = versions.body(site, gw, applied_version) if applied_version else None
        lines = list(
            difflib.unified_diff(
                _yaml_lines(applied),
                _yaml_lines(desired),
                fromfile=f"{site}/{gw} applied v{applied_version}"
                if applied_version
                else f"{site}/{gw} (nothing applied)",
                tofile=f"{site}/{gw} desired",
            )
        )
        result.append(
            {
                "site": site,
                "gateway": gw,
                "applied_version": applied_version,
                "changed": bool(lines),
                "diff": "".join(lines),
            }
        )
    print_diffs(result, as_json)


def print_diffs(result: list[dict[str, Any]], as_json: bool) -> None:
    """The answer of `config diff` and `policy diff`: per gateway, its diff or `no change`."""
    if as_json:
        emit_json(result)
        return
    for entry in result:
        if entry["changed"]:
            click.echo(entry["diff"], nl=False)
        else:
            click.echo(f"{entry['site']}/{entry['gateway']}: no change")


@config.command("push")
@config_option
@click.argument("targets", nargs=-1, required=True)
@click.option("--dry-run", is_flag=True, help="Build and validate, show what would change.")
@click.option(
    "--force",
    is_flag=True,
    help="New version even when nothing changed; also for gateways in an active rollout.",
)
@click.option(
    "--wait/--no-wait", default=True, show_default=True, help="Follow the acknowledgements."
)
@click.option(
    "--timeout",
    "timeout_s",
    type=click.FloatRange(0.1, 86_400),
    default=60.0,
    show_default=True,
    help="Seconds to wait for every acknowledgement.",
)
@json_option
@pass_context
def config_push(
    ctx: Context,
    targets: tuple[str, ...],
    dry_run: bool,
    force: bool,
    wait: bool,
    timeout_s: float,
    as_json: bool,
) -> None:
    """Push the desired config to every gateway of TARGETS.

    Every config is built and validated first; if one is invalid nothing is pushed (exit 2).
    A gateway whose newest version already has the same content gets no new version (use
    --force). Gateways that are offline get their config when they come back (it is
    retained). Exit 0 when every gateway applied it, 4 when some rejected it or did not answer
    in time (see 'config status'), 1 when the service is not running or has no signing key.

    TARGETS: site:SITE, building:SITE/BUILDING, room:SITE/ROOM, gateway:SITE/GATEWAY, or all.
    """
    store = ctx.writable_store()
    registry = registry_of(ctx, store)
    library = library_of(ctx)
    versions = Versions(store)
    gateways = resolve_gateways(registry, targets)
    if not force:
        _refuse_rollout_members(store, gateways)
    bodies: dict[tuple[str, str], dict[str, Any]] = {}
    invalid: list[str] = []
    for site, gw in gateways:
        try:
            bodies[(site, gw)] = body_of(build_config(registry, library, site, gw))
        except DesiredConfigError as exc:
            invalid.append(str(exc))
        except RegistryError as exc:
            invalid.append(f"{site}/{gw}: {exc}")
    if invalid:
        for line in invalid:
            click.echo(f"campus-fleet: {line}", err=True)
        fail(f"nothing pushed: {len(invalid)} of {len(gateways)} configs are invalid", EXIT_USAGE)
    push_bodies(
        ctx, store, versions, bodies, targets, dry_run=dry_run, force=force, wait=wait,
        timeout_s=timeout_s, as_json=as_json,
    )  # fmt: skip


def push_bodies(
    ctx: Context,
    store: Store,
    versions: Versions,
    bodies: dict[tuple[str, str], dict[str, Any]],
    targets: tuple[str, ...],
    *,
    dry_run: bool,
    force: bool,
    wait: bool,
    timeout_s: float,
    as_json: bool,
) -> None:
    """What `config push` and `policy push` share once every body is built and valid: the dry
    run, the new versions (audited), following the acknowledgements, the answer and exit code."""
    kind = versions.kind
    if dry_run:
        plan = [
            {
                "site": site,
                "gateway": gw,
                "changed": force or not carries(versions.latest(site, gw), body_hash(body)),
            }
            for (site, gw), body in bodies.items()
        ]
        if as_json:
            emit_json({"dry_run": True, "gateways": plan})
        else:
            for entry in plan:
                state = "would push" if entry["changed"] else "unchanged"
                click.echo(f"{entry['site']}/{entry['gateway']}: {state}")
        return
    details = {"targets": list(targets), "gateways": len(bodies), "force": force}
    with (
        audited(store, ctx.actor, f"{kind}.push", " ".join(targets), details),
        store.transaction(),
    ):
        staged = [
            versions.stage(site, gw, body, origin="push", actor=ctx.actor, force=force)
            for (site, gw), body in bodies.items()
        ]
    new = [s for s in staged if s.version is not None]
    problem = service_problem(store)
    warning = problem or service_warning(store)
    if warning and new and not as_json:
        click.echo(f"campus-fleet: warning: {warning}; the push waits for it", err=True)
    finished = True
    if wait and new and not problem:
        wanted = {(s.site, s.gateway, s.version) for s in new}

        def answered() -> tuple[int, int]:
            rows = store.conn.execute(
                f"SELECT site, gateway, version FROM {versions.table} WHERE state IN (?, ?)",
                (APPLIED, REJECTED),
            ).fetchall()
            return len(wanted & {tuple(r) for r in rows}), len(wanted)

        finished = wait_until(answered, timeout_s, "acknowledged", as_json)
    rows: list[dict[str, Any]] = []
    for s in staged:
        row = (
            versions.latest(s.site, s.gateway)
            if s.version is None
            else versions.get(s.site, s.gateway, s.version)
        )
        rows.append(
            {
                "site": s.site,
                "gateway": s.gateway,
                "version": row["version"] if row else None,
                "new": s.version is not None,
                "state": row["state"] if row else None,
                "reason": row["reason"] if row else None,
            }
        )
    if as_json:
        emit_json({"service": problem or "running", "gateways": rows})
    else:
        _print_push(rows, f"{kind.capitalize()} push")
    if problem and new:
        sys.exit(EXIT_RUNTIME)
    if wait and (not finished or any(r["new"] and r["state"] != APPLIED for r in rows)):
        sys.exit(EXIT_PARTIAL)


@config.command("status")
@config_option
@click.argument("targets", nargs=-1)
@json_option
@pass_context
def config_status(ctx: Context, targets: tuple[str, ...], as_json: bool) -> None:
    """Desired vs applied config version per gateway, and why a version was rejected.

    Without TARGETS every registered gateway. Exit 0 when all are in sync, 4 when not.
    """
    store = ctx.writable_store()
    registry = registry_of(ctx, store)
    gateways = resolve_gateways(registry, targets) if targets else None
    rows = Versions(store).status(gateways)
    if as_json:
        emit_json(
            [
                {
                    "site": r["site"],
                    "gateway": r["gateway"],
                    "desired_version": r["desired_version"],
                    "desired_state": r["desired_state"],
                    "applied_version": r["applied_version"] or 0,
                    "in_sync": r["in_sync"],
                    "last_ack": r["last_status"],
                    "last_ack_version": r["last_version"],
                    "reason": r["last_reason"]
                    if r["last_status"] == REJECTED
                    else r["desired_reason"],
                    "last_ack_time": iso(r["last_ack_ns"]),
                    "gateway_status": r["gateway_status"] or "unknown",
                }
                for r in rows
            ]
        )
    else:
        now = time.time_ns()
        table = Table(title=f"Config per gateway ({len(rows)})")
        table.add_column("gateway", no_wrap=True)
        for column in ("desired", "applied", "in sync", "last answer", "reason"):
            table.add_column(column)
        for r in rows:
            desired = (
                f"v{r['desired_version']} {r['desired_state']}" if r["desired_version"] else "-"
            )
            sync = "[green]yes[/]" if r["in_sync"] else "[red]no[/]"
            answer = (
                f"{r['last_status']} v{r['last_version']} {ago(r['last_ack_ns'], now)}"
                if r["last_status"]
                else "never"
            )
            reason = r["last_reason"] if r["last_status"] == REJECTED else r["desired_reason"]
            table.add_row(
                f"{r['site']}/{r['gateway']}",
                desired,
                f"v{r['applied_version']}" if r["applied_version"] else "-",
                sync,
                answer,
                reason or "",
            )
        console.print(table)
    if any(not r["in_sync"] for r in rows):
        sys.exit(EXIT_PARTIAL)


def _one_gateway(registry: Registry, text: str) -> tuple[str, str]:
    """gateway:SITE/GW, SITE/GW, or a gateway id that only one site has."""
    if ":" in text:
        selector = text
    elif "/" in text:
        selector = f"gateway:{text}"
    else:
        sites = [site for site, gw in registry.gateways_matching("all") if gw == text]
        if not sites:
            fail(
                f"no registered gateway {text!r} (see 'campus-fleet gateway list')", EXIT_NOT_FOUND
            )
        if len(sites) > 1:
            names = ", ".join(f"gateway:{site}/{text}" for site in sites)
            fail(f"gateway {text!r} is in several sites: {names}", EXIT_USAGE)
        selector = f"gateway:{sites[0]}/{text}"
    gateways = resolve_gateways(registry, [selector])
    if len(gateways) != 1:
        fail(f"{text!r} names {len(gateways)} gateways; name one: gateway:SITE/GW", EXIT_USAGE)
    return gateways[0]


def _desired_body(
    registry: Registry, library: ProfileLibrary, site: str, gateway: str
) -> dict[str, Any]:
    try:
        return body_of(build_config(registry, library, site, gateway))
    except DesiredConfigError as exc:
        fail(str(exc), EXIT_USAGE)


def _yaml_lines(body: dict[str, Any] | None) -> list[str]:
    if body is None:
        return []
    # Sorted keys: the stored body is canonical JSON, the built one in model order.
    return yaml.safe_dump(body, sort_keys=True, allow_unicode=True).splitlines(keepends=True)


def _refuse_rollout_members(store: Store, gateways: list[tuple[str, str]]) -> None:
    busy = store.conn.execute(
        "SELECT g.rollout, g.site, g.gateway FROM rollout_gateways g JOIN rollouts r "
        "ON r.id = g.rollout WHERE r.state IN (?, ?)",
        ACTIVE,
    ).fetchall()
    wanted = set(gateways)
    clashes = [(r, s, g) for r, s, g in busy if (s, g) in wanted]
    if clashes:
        rollout_id, site, gw = clashes[0]
        fail(
            f"{site}/{gw} is in rollout {rollout_id}: pause or abort it, or push with --force",
            EXIT_USAGE,
        )


def _print_push(rows: list[dict[str, Any]], title: str) -> None:
    table = Table(title=title)
    table.add_column("gateway", no_wrap=True)
    for column in ("version", "state", "reason"):
        table.add_column(column)
    styles = {APPLIED: "green", REJECTED: "red", SENT: "yellow", PENDING: "yellow"}
    for r in rows:
        state = r["state"] if r["new"] else f"unchanged ({r['state']})"
        style = styles.get(r["state"], "white")
        table.add_row(
            f"{r['site']}/{r['gateway']}",
            f"v{r['version']}" if r["version"] else "-",
            f"[{style}]{state}[/]",
            r["reason"] or "",
        )
    console.print(table)


# -- rollout -------------------------------------------------------------------------------------


@click.group()
def rollout() -> None:
    """Staged rollouts: a canary first, then more gateways, halting on failures.

    \b
    Examples:
      campus-fleet rollout start --target site:school-42 --stages 1,10%,50%,100% \\
          --max-failures 5% --config new-intervals.yaml
      campus-fleet rollout status
      campus-fleet rollout pause 3
      campus-fleet rollout abort 3 --rollback

    The fleet service drives it; its state is in the database, so a restart of the service
    resumes the rollout where it was.
    """


@rollout.command("start")
@click.option("--target", required=True, help=TARGET_HELP)
@click.option(
    "--stages",
    default="1,10%,50%,100%",
    show_default=True,
    help="Cumulative stages: counts (1) or percentages (10%) of the targeted gateways.",
)
@click.option(
    "--max-failures",
    default="5%",
    show_default=True,
    help="Halt when more than this share of the gateways pushed so far rejected the config "
    "or did not answer; the failed stage is rolled back.",
)
@click.option(
    "--config",
    "overlay_path",
    type=click.Path(path_type=Path, exists=True, dir_okay=False),
    help="Settings YAML (interval_s, timeout_s, alarms, schedules, …) laid over the target's "
    "settings for this rollout, and kept in the target's settings once it is done. Without "
    "it, the current desired config is rolled out.",
)
@click.option(
    "--ack-timeout",
    "ack_timeout_s",
    type=click.FloatRange(1, 86_400),
    help="Seconds a stage waits for acknowledgements (default: ack_timeout_s of fleet.yaml).",
)
@json_option
@pass_context
def rollout_start(
    ctx: Context,
    target: str,
    stages: str,
    max_failures: str,
    overlay_path: Path | None,
    ack_timeout_s: float | None,
    as_json: bool,
) -> None:
    """Start a staged rollout to the gateways of --target.

    The fleet configuration file must come before the command here
    (campus-fleet --config fleet.yaml rollout start …), since --config names the settings.
    """
    store = ctx.writable_store()
    overlay = load_overlay(overlay_path) if overlay_path else None
    rollouts = Rollouts(store, registry_of(ctx, store), library_of(ctx))
    details = {
        "stages": stages,
        "max_failures": max_failures,
        "overlay": overlay.model_dump(mode="json", exclude_defaults=True) if overlay else None,
    }
    try:
        with audited(store, ctx.actor, "rollout.start", target, details):
            rollout_id = rollouts.start(
                target,
                stages,
                max_failures,
                overlay,
                ack_timeout_s or ctx.config.ack_timeout_s,
                ctx.actor,
            )
    except NotFound as exc:
        fail(str(exc), EXIT_NOT_FOUND)
    except (RolloutError, RegistryError, DesiredConfigError) as exc:
        fail(f"rollout not started: {exc}", EXIT_USAGE)
    problem = service_problem(store)
    if as_json:
        emit_json({"rollout": rollout_id, "service": problem or "running"})
    else:
        click.echo(
            f"rollout {rollout_id} started; follow it with 'campus-fleet rollout status "
            f"{rollout_id}'"
        )
        if problem:
            click.echo(f"campus-fleet: warning: {problem}; the rollout waits for it", err=True)


@rollout.command("status")
@config_option
@click.argument("rollout_id", type=int, required=False)
@click.option("--watch", is_flag=True, help="Follow it live until it stops running.")
@json_option
@pass_context
def rollout_status(ctx: Context, rollout_id: int | None, watch: bool, as_json: bool) -> None:
    """A rollout's stage, progress and per-gateway answers (default: the newest rollout)."""
    store = ctx.writable_store()
    rollouts = Rollouts(store, registry_of(ctx, store), library_of(ctx))
    if rollout_id is None:
        recent = rollouts.recent(1)
        if not recent:
            fail("no rollout yet", EXIT_NOT_FOUND)
        rollout_id = int(recent[0]["id"])
    try:
        info = rollouts.get(rollout_id)
    except LookupError as exc:
        fail(str(exc), EXIT_NOT_FOUND)
    if watch and not as_json:
        with Progress(
            TextColumn("rollout {task.fields[rid]} [{task.fields[state]}]"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[message]}"),
            console=console,
        ) as progress:
            task = progress.add_task("", total=1, rid=rollout_id, state="", message="")
            while True:
                info = rollouts.get(rollout_id)
                p = rollouts.progress(rollout_id)
                progress.update(
                    task,
                    total=p.total,
                    completed=p.applied,
                    state=info["state"],
                    message=info["message"] or "",
                )
                if info["state"] not in ACTIVE:
                    break
                time.sleep(0.5)
    p = rollouts.progress(rollout_id)
    members = rollouts.gateways(rollout_id)
    stages = json.loads(info["stages"])
    data = {
        "id": rollout_id,
        "target": info["target"],
        "state": info["state"],
        "stage": info["stage"] + 1,
        "stages": stages["counts"],
        "stages_spec": stages["spec"],
        "max_failures": info["max_failures"],
        "message": info["message"],
        "actor": info["actor"],
        "created": iso(info["created_ns"]),
        "progress": {
            "total": p.total,
            "applied": p.applied,
            "failed": p.failed,
            "waiting": p.waiting,
            "rolled_back": p.rolled_back,
        },
        "gateways": [
            {
                "site": m["site"],
                "gateway": m["gateway"],
                "stage": m["stage"] + 1,
                "version": m["version"],
                "previous_version": m["previous_version"],
                "status": m["status"],
                "reason": m["reason"],
            }
            for m in members
        ],
    }
    if as_json:
        emit_json(data)
        return
    console.print(
        f"rollout {rollout_id} → {info['target']}: [bold]{info['state']}[/], stage "
        f"{info['stage'] + 1}/{len(stages['counts'])} ({stages['spec']}), "
        f"{info['message'] or ''}"
    )
    with Progress(BarColumn(), MofNCompleteColumn(), TextColumn("applied"), console=console) as bar:
        bar.add_task("", total=max(p.total, 1), completed=p.applied)
    console.print(
        f"applied {p.applied}, failed {p.failed}, waiting {p.waiting}, "
        f"rolled back {p.rolled_back} of {p.total}"
    )
    troubled = [m for m in members if m["status"] not in ("applied", "waiting", "pushed")]
    if troubled:
        table = Table(title="Gateways that did not apply it")
        for column in ("gateway", "stage", "status", "reason"):
            table.add_column(column)
        for m in troubled:
            table.add_row(
                f"{m['site']}/{m['gateway']}", str(m["stage"] + 1), m["status"], m["reason"] or ""
            )
        console.print(table)


@rollout.command("list")
@config_option
@json_option
@pass_context
def rollout_list(ctx: Context, as_json: bool) -> None:
    """Recent rollouts, newest first."""
    store = ctx.writable_store()
    rollouts = Rollouts(store, registry_of(ctx, store), library_of(ctx))
    rows = rollouts.recent(50)
    data = []
    for r in rows:
        p = rollouts.progress(r["id"])
        data.append(
            {
                "id": r["id"],
                "target": r["target"],
                "state": r["state"],
                "stage": r["stage"] + 1,
                "stages": len(json.loads(r["stages"])["counts"]),
                "applied": p.applied,
                "failed": p.failed,
                "total": p.total,
                "message": r["message"],
                "actor": r["actor"],
                "created": iso(r["created_ns"]),
            }
        )
    if as_json:
        emit_json(data)
        return
    table = Table(title="Rollouts")
    for column in ("id", "target", "state", "stage", "applied", "failed", "by", "message"):
        table.add_column(column)
    for d in data:
        table.add_row(
            str(d["id"]),
            d["target"],
            d["state"],
            f"{d['stage']}/{d['stages']}",
            f"{d['applied']}/{d['total']}",
            str(d["failed"]),
            d["actor"] or "",
            d["message"] or "",
        )
    console.print(table)


def _rollout_action(action: str) -> click.Command:
    @click.command(action)
    @config_option
    @click.argument("rollout_id", type=int)
    @json_option
    @pass_context
    def command(ctx: Context, /, rollout_id: int, as_json: bool, **options: Any) -> None:
        store = ctx.writable_store()
        rollouts = Rollouts(store, registry_of(ctx, store), library_of(ctx))
        try:
            with audited(store, ctx.actor, f"rollout.{action}", str(rollout_id), options):
                state = rollouts.set_state(
                    rollout_id, action, rollback=options.get("rollback", False)
                )
        except LookupError as exc:
            fail(str(exc), EXIT_NOT_FOUND)
        except RolloutError as exc:
            fail(str(exc), EXIT_USAGE)
        if as_json:
            emit_json({"rollout": rollout_id, "state": state})
        else:
            click.echo(f"rollout {rollout_id}: {state}")

    return command


rollout_pause = _rollout_action("pause")
rollout_pause.help = "Pause a running rollout: the current stage finishes, no new stage starts."
rollout_resume = _rollout_action("resume")
rollout_resume.help = (
    "Resume a paused rollout, or a halted one (its halted stage is pushed again, e.g. after a "
    "fix in the registry)."
)
rollout_abort = _rollout_action("abort")
rollout_abort.help = (
    "Stop a rollout for good; with --rollback every gateway it reached gets "
    "its previous config back."
)
rollout_abort.params.insert(
    -1, click.Option(["--rollback"], is_flag=True, help="Roll back every gateway it reached.")
)
for _command in (rollout_pause, rollout_resume, rollout_abort):
    rollout.add_command(_command)


# -- commands ------------------------------------------------------------------------------------


CMD_HELP = """Run ACTION (a command of the device's profile) on the devices of SELECTOR.

SELECTOR: a device id, device:SITE/DEVICE, or site:, building:, room:, gateway: selectors
(every device there; narrow with --kind); or leave SELECTOR out and give --site SITE.
ARGUMENT is JSON when it parses (42, true), else text: put text with spaces in quotes.

Named options of the command follow ACTION as --NAME VALUE or --NAME=VALUE (a bare --NAME
means on); one named like an option of cmd itself (site, kind, option, timeout, wait, json,
config) is given as -o NAME=VALUE. Before anything is sent, ARGUMENT and the options are
checked against the profile of every device that has ACTION: an unknown option, a bad or
missing value is refused (exit 2) naming the option and the profile, and nothing is sent.

\b
Examples:
  campus-fleet cmd --kind board --site school-42 notice "Fire drill at 10:00" --minutes 10
  campus-fleet cmd building:school-42/a power_off --kind display
  campus-fleet cmd room-101-relays relay_1 on
  campus-fleet cmd site:school-42 reset_energy --kind meter --json

Every device gets its own answer, with the correlation id that travelled with it; devices
whose profile lacks ACTION are answered unknown_action at once. Exit 0 when every device
answered ok, 4 when some did not, 1 when none did, 2 when the command line or its options
are wrong, 3 when SELECTOR matches no device.
"""
CMD_USAGE = "[SELECTOR] ACTION [ARGUMENT] [--NAME VALUE]..."


class CommandLineError(ValueError):
    """The words of `cmd` do not make a command."""


def split_command_line(
    words: Sequence[str], site: str | None, pairs: Sequence[str] = ()
) -> tuple[str, str, str | None, dict[str, str]]:
    """(selector, action, argument text, named options) from the words after `cmd` that
    click did not take (`--site` stands for the selector `site:SITE`)."""
    try:
        positionals, named = split_words(words, pairs)
    except ValueError as exc:
        raise CommandLineError(str(exc)) from None
    if site is not None:
        if positionals and ":" in positionals[0]:
            raise CommandLineError(f"give SELECTOR ({positionals[0]}) or --site, not both")
        positionals.insert(0, f"site:{site}")
    if len(positionals) < 2:
        missing = "ACTION" if positionals else "SELECTOR and ACTION (or --site SITE and ACTION)"
        raise CommandLineError(f"missing {missing}: campus-fleet cmd {CMD_USAGE}")
    if len(positionals) > 3:
        raise CommandLineError(extra_words(positionals, "--NAME VALUE"))
    selector, action, *rest = positionals
    return selector, action, rest[0] if rest else None, named


@click.command(
    help=CMD_HELP,
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
)
@config_option
@click.argument("words", nargs=-1, type=click.UNPROCESSED, metavar=CMD_USAGE)
@click.option(
    "--site",
    "site_id",
    help="Every device of this site (narrow with --kind); SELECTOR is then left out.",
)
@click.option(
    "--kind",
    type=click.Choice(["display", "board", "sensor", "camera", "meter"]),
    help="Only devices of this kind (e.g. every display of a building).",
)
@click.option(
    "-o",
    "--option",
    "option_pairs",
    multiple=True,
    metavar="NAME=VALUE",
    help="A named option of the command whose name is one of cmd's own (repeatable).",
)
@click.option(
    "--timeout",
    "timeout_s",
    type=click.FloatRange(0.5, 3600),
    help="Seconds before a device's answer counts as missing (default: "
    "command_timeout_s of fleet.yaml).",
)
@click.option("--wait/--no-wait", default=True, show_default=True, help="Wait for the answers.")
@json_option
@pass_context
def cmd(
    ctx: Context,
    words: tuple[str, ...],
    site_id: str | None,
    kind: str | None,
    option_pairs: tuple[str, ...],
    timeout_s: float | None,
    wait: bool,
    as_json: bool,
) -> None:
    try:
        selector, action, argument_text, named = split_command_line(words, site_id, option_pairs)
    except CommandLineError as exc:
        fail(str(exc), EXIT_USAGE)
    store = ctx.writable_store()
    registry = registry_of(ctx, store)
    try:
        devices = registry.devices_matching(selector, kind)
    except NotFound as exc:
        fail(str(exc), EXIT_NOT_FOUND)
    except RegistryError as exc:
        fail(str(exc), EXIT_USAGE)
    if not devices:
        fail(
            f"no device matches {selector}" + (f" with kind {kind}" if kind else ""), EXIT_NOT_FOUND
        )
    library = library_of(ctx)
    targets = [Target(d["site"], d["gateway"], d["device"], d["profile"]) for d in devices]
    argument = parse_argument(argument_text)
    options, problems = check_command(library, targets, action, argument, named)
    details = {
        "action": action,
        "argument": argument,
        "options": options,
        "kind": kind,
        "devices": len(targets),
    }
    if problems:
        record(store, ctx.actor, "cmd", selector, details, f"error: {problems[0]}")
        if len(problems) == 1:
            fail(f"{problems[0]}; nothing sent", EXIT_USAGE)
        for problem in problems:
            click.echo(f"campus-fleet: {problem}", err=True)
        fail(f"nothing sent: {len(problems)} problems", EXIT_USAGE)
    not_running = service_problem(store)
    if not_running:
        fail(f"{not_running}: commands cannot be sent", EXIT_RUNTIME)
    timeout = timeout_s or ctx.config.command_timeout_s
    commands_ = Commands(store)
    with audited(store, ctx.actor, "cmd", selector, details):
        batch = commands_.queue(
            targets,
            action,
            argument,
            timeout_s=timeout,
            actor=ctx.actor,
            library=library,
            options=options,
        )
    if wait:

        def finished() -> tuple[int, int]:
            rows = commands_.batch(batch)
            return sum(r["status"] in FINAL for r in rows), len(rows)

        wait_until(finished, timeout + 2, f"{action} on {len(targets)} devices", as_json)
    _print_batch(commands_.batch(batch), batch, as_json)
    rows = commands_.batch(batch)
    ok = sum(r["status"] == "ok" for r in rows)
    if wait and ok == 0:
        sys.exit(EXIT_RUNTIME)
    if wait and ok < len(rows):
        sys.exit(EXIT_PARTIAL)


@click.group()
def commands() -> None:
    """Commands sent with 'campus-fleet cmd': recent batches and their answers."""


@commands.command("list")
@config_option
@json_option
@pass_context
def commands_list(ctx: Context, as_json: bool) -> None:
    """Recent command batches, newest first."""
    rows = Commands(ctx.writable_store()).recent()
    if as_json:
        emit_json([{**r, "created": iso(r["created_ns"])} for r in rows])
        return
    table = Table(title="Command batches")
    for column in ("batch", "action", "by", "devices", "ok", "waiting", "when"):
        table.add_column(column)
    now = time.time_ns()
    for r in rows:
        table.add_row(
            r["batch"],
            r["action"],
            r["actor"] or "",
            str(r["devices"]),
            str(r["ok"]),
            str(r["waiting"]),
            ago(r["created_ns"], now),
        )
    console.print(table)


@commands.command("show")
@config_option
@click.argument("batch")
@json_option
@pass_context
def commands_show(ctx: Context, batch: str, as_json: bool) -> None:
    """Every device's answer in a command batch."""
    rows = Commands(ctx.writable_store()).batch(batch)
    if not rows:
        fail(f"no command batch {batch!r} (see 'campus-fleet commands list')", EXIT_NOT_FOUND)
    _print_batch(rows, batch, as_json)


def describe_command(row: dict[str, Any]) -> str:
    """The command of a batch as it was given: notice 'Fire drill' --minutes 10."""
    words = [row["action"]]
    argument = json.loads(row["argument"])
    if argument is not None:
        words.append(repr(argument) if isinstance(argument, str) else json.dumps(argument))
    for name, value in json.loads(row["options"] or "{}").items():
        words.append(f"--{name} {json.dumps(value) if not isinstance(value, str) else repr(value)}")
    return " ".join(words)


def _print_batch(rows: list[dict[str, Any]], batch: str, as_json: bool) -> None:
    if as_json:
        emit_json(
            {
                "batch": batch,
                "results": [
                    {
                        "id": r["id"],
                        "site": r["site"],
                        "gateway": r["gateway"],
                        "device": r["device"],
                        "action": r["action"],
                        "argument": json.loads(r["argument"]),
                        "options": json.loads(r["options"] or "{}"),
                        "status": r["status"],
                        "result": json.loads(r["result"]) if r["result"] else None,
                        "error": r["error"],
                        "sent": iso(r["sent_ns"]),
                        "done": iso(r["done_ns"]),
                    }
                    for r in rows
                ],
            }
        )
        return
    table = Table(
        title=f"Command batch {batch}", caption=escape(describe_command(rows[0])) if rows else None
    )
    for column in ("device", "gateway", "status", "result / error", "correlation id"):
        table.add_column(column)
    for r in rows:
        style = "green" if r["status"] == "ok" else "red"
        detail = r["error"] or (r["result"] if r["result"] and r["result"] != "{}" else "")
        table.add_row(
            r["device"],
            f"{r['site']}/{r['gateway']}",
            f"[{style}]{r['status']}[/]",
            detail or "",
            r["id"],
        )
    console.print(table)
