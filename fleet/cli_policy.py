"""campus-fleet policy: the network policy of gateways, from the registry tree to nftables.

A policy is set in parts on the tree (`policy:` in the settings of a site, building, room or
gateway, see `campus-fleet settings set`), merged for each gateway, checked, signed and pushed
like a config; the gateway compiles it to its own nftables table, confirms it can still reach
the broker, and reports the version, the hash of the compiled text and the rule counters.
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import re
import sys
import time
from typing import Any

import click
import yaml
from rich.table import Table

from fleet.audit import audited
from fleet.cli_control import (
    _one_gateway,
    print_diffs,
    push_bodies,
    registry_of,
    resolve_gateways,
    service_problem,
    wait_until,
)
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
from fleet.desired_policy import DesiredPolicyError, build_policy, render
from fleet.registry import Registry, Target
from fleet.settings import NodeSettings
from fleet.timefmt import ago, iso
from fleet.versions import REJECTED, Versions
from wire.policy import parse_policy


def register(main: click.Group) -> None:
    main.add_command(policy)


@click.group()
def policy() -> None:
    """Network policies: who may talk to whom, enforced by each gateway with nftables.

    Parts of the policy are set in the settings of the tree (`policy:` with zones, flows, …;
    see 'campus-fleet settings set'): zones and flows merge by id from the site down to the
    gateway. `push` signs each gateway's policy and publishes it; the gateway checks it with
    `nft -c`, applies it in one transaction, confirms it can still reach the broker (or
    restores the previous rules), and reports the counters of every rule.

    \b
    Examples:
      campus-fleet policy show gateway:school-42/gw-001
      campus-fleet policy render gateway:school-42/gw-001
      campus-fleet policy diff site:school-42
      campus-fleet policy push site:school-42
      campus-fleet policy status --json
    """


def _desired(registry: Registry, site: str, gateway: str) -> dict[str, Any]:
    try:
        built = build_policy(registry, site, gateway)
    except DesiredPolicyError as exc:
        fail(str(exc), EXIT_USAGE)
    if built is None:
        fail(
            f"no policy is set for {site}/{gateway} (set 'policy:' in the settings of its site, "
            "building, room or gateway)",
            EXIT_NOT_FOUND,
        )
    return built[0]


@policy.command("show")
@config_option
@click.argument("gateway")
@click.option("--applied", is_flag=True, help="The policy the gateway last applied.")
@json_option
@pass_context
def policy_show(ctx: Context, gateway: str, applied: bool, as_json: bool) -> None:
    """The policy of GATEWAY (gateway:SITE/GW, SITE/GW or a gateway id): desired by default."""
    store = ctx.writable_store()
    registry = registry_of(ctx, store)
    site, gw = _one_gateway(registry, gateway)
    if applied:
        versions = Versions(store, "policy")
        version = versions.applied_version(site, gw)
        body = versions.body(site, gw, version) if version else None
        if body is None:
            fail(f"{site}/{gw} has applied no policy yet", EXIT_NOT_FOUND)
        which = f"version {version}"
    else:
        body, which = _desired(registry, site, gw), "desired"
    if as_json:
        emit_json({"site": site, "gateway": gw, "which": which, "policy": body})
        return
    click.echo(f"# {site}/{gw}: policy, {which}")
    click.echo(yaml.safe_dump(body, sort_keys=False, allow_unicode=True), nl=False)


@policy.command("render")
@config_option
@click.argument("gateway")
@click.option("--applied", is_flag=True, help="Render the policy the gateway last applied.")
@pass_context
def policy_render(ctx: Context, gateway: str, applied: bool) -> None:
    """The nftables table GATEWAY's policy compiles to, as the gateway will load it.

    Deterministic: the same policy gives the same text (its SHA-256 is the hash the gateway
    reports). The broker's addresses come from agent_broker (else mqtt) of fleet.yaml; a
    gateway resolving the broker's name differently gets other addresses in its
    `restrict_output` rule.
    """
    store = ctx.writable_store()
    registry = registry_of(ctx, store)
    site, gw = _one_gateway(registry, gateway)
    if applied:
        versions = Versions(store, "policy")
        version = versions.applied_version(site, gw)
        body = versions.body(site, gw, version) if version else None
        if body is None:
            fail(f"{site}/{gw} has applied no policy yet", EXIT_NOT_FOUND)
    else:
        body = _desired(registry, site, gw)
    click.echo(render(parse_policy(body), ctx.config), nl=False)


@policy.command("diff")
@config_option
@click.argument("targets", nargs=-1, required=True)
@json_option
@pass_context
def policy_diff(ctx: Context, targets: tuple[str, ...], as_json: bool) -> None:
    """What a push would change in the nftables of every gateway of TARGETS: a diff of the
    rendered tables, applied against desired.

    TARGETS: site:SITE, building:SITE/BUILDING, room:SITE/ROOM, gateway:SITE/GATEWAY, or all.
    """
    store = ctx.writable_store()
    registry = registry_of(ctx, store)
    versions = Versions(store, "policy")
    result = []
    for site, gw in resolve_gateways(registry, targets):
        try:
            built = build_policy(registry, site, gw)
        except DesiredPolicyError as exc:
            fail(str(exc), EXIT_USAGE)
        desired = render(built[1], ctx.config) if built else ""
        applied_version = versions.applied_version(site, gw)
        applied_body = versions.body(site, gw, applied_version) if applied_version else None
        applied = render(parse_policy(applied_body), ctx.config) if applied_body else ""
        lines = list(
            difflib.unified_diff(
                applied.splitlines(keepends=True),
                desired.splitlines(keepends=True),
                fromfile=f"{site}/{gw} applied v{applied_version}"
                if applied_version
                else f"{site}/{gw} (no policy applied)",
                tofile=f"{site}/{gw} desired" if built else f"{site}/{gw} (no policy set)",
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


@policy.command("push")
@config_option
@click.argument("targets", nargs=-1, required=True)
@click.option("--dry-run", is_flag=True, help="Build and check, show what would change.")
@click.option("--force", is_flag=True, help="A new version even when nothing changed.")
@click.option(
    "--wait/--no-wait", default=True, show_default=True, help="Follow the acknowledgements."
)
@click.option(
    "--timeout",
    "timeout_s",
    type=click.FloatRange(0.1, 86_400),
    default=90.0,
    show_default=True,
    help="Seconds to wait for every acknowledgement (a gateway confirms its uplink first).",
)
@json_option
@pass_context
def policy_push(
    ctx: Context,
    targets: tuple[str, ...],
    dry_run: bool,
    force: bool,
    wait: bool,
    timeout_s: float,
    as_json: bool,
) -> None:
    """Push the network policy to every gateway of TARGETS.

    Every policy is built and checked first; if one is invalid nothing is pushed (exit 2).
    A gateway answers applied, or rejected with the reason: refused by `nft -c`, enforcement
    disabled on the gateway, or rolled back because it lost its uplink to the broker. Exit 0
    when every gateway applied it, 4 when some did not (see 'policy status'), 1 when the
    service is not running or has no signing key, 3 when a gateway has no policy set.

    TARGETS: site:SITE, building:SITE/BUILDING, room:SITE/ROOM, gateway:SITE/GATEWAY, or all.
    """
    store = ctx.writable_store()
    registry = registry_of(ctx, store)
    versions = Versions(store, "policy")
    gateways = resolve_gateways(registry, targets)
    bodies: dict[tuple[str, str], dict[str, Any]] = {}
    invalid: list[str] = []
    missing: list[str] = []
    for site, gw in gateways:
        try:
            built = build_policy(registry, site, gw)
        except DesiredPolicyError as exc:
            invalid.append(str(exc))
            continue
        if built is None:
            missing.append(f"{site}/{gw}")
        else:
            bodies[(site, gw)] = built[0]
    if invalid:
        for line in invalid:
            click.echo(f"campus-fleet: {line}", err=True)
        fail(f"nothing pushed: {len(invalid)} of {len(gateways)} policies are invalid", EXIT_USAGE)
    if missing:
        fail(f"nothing pushed: no policy is set for {', '.join(missing)}", EXIT_NOT_FOUND)
    push_bodies(
        ctx, store, versions, bodies, targets, dry_run=dry_run, force=force, wait=wait,
        timeout_s=timeout_s, as_json=as_json,
    )  # fmt: skip


@policy.command("status")
@config_option
@click.argument("targets", nargs=-1)
@json_option
@pass_context
def policy_status(ctx: Context, targets: tuple[str, ...], as_json: bool) -> None:
    """Desired vs applied policy per gateway, the hash of what runs, why a version was
    rejected, and the rule counters the gateway last reported (drops per chain and flow).

    Without TARGETS every registered gateway. Exit 0 when all are in sync, 4 when not.
    """
    store = ctx.writable_store()
    registry = registry_of(ctx, store)
    gateways = resolve_gateways(registry, targets) if targets else None
    rows = Versions(store, "policy").status(gateways)
    reported = {
        (r[0], r[1]): json.loads(r[2]) if r[2] else None
        for r in store.conn.execute("SELECT site, gateway, policy_state FROM gateways")
    }
    data = []
    for r in rows:
        state = reported.get((r["site"], r["gateway"])) or {}
        counters = state.get("counters", [])
        data.append(
            {
                "site": r["site"],
                "gateway": r["gateway"],
                "desired_version": r["desired_version"],
                "desired_state": r["desired_state"],
                "applied_version": r["applied_version"] or 0,
                "in_sync": r["in_sync"],
                "last_ack": r["last_status"],
                "reason": r["last_reason"] if r["last_status"] == REJECTED else r["desired_reason"],
                "last_ack_time": iso(r["last_ack_ns"]),
                "running_sha256": state.get("sha256"),
                "enforcement_error": state.get("error"),
                "dropped_packets": sum(
                    c["packets"] for c in counters if c.get("verdict") == "drop"
                ),
                "counters": counters,
                "counters_time": iso(state.get("counters_ns")),
                "gateway_status": r["gateway_status"] or "unknown",
            }
        )
    if as_json:
        emit_json(data)
    else:
        now = time.time_ns()
        table = Table(title=f"Network policy per gateway ({len(data)})")
        table.add_column("gateway", no_wrap=True)
        for column in ("desired", "applied", "in sync", "dropped", "last answer", "reason"):
            table.add_column(column)
        for d, r in zip(data, rows, strict=True):
            desired = (
                f"v{d['desired_version']} {d['desired_state']}" if d["desired_version"] else "-"
            )
            answer = (
                f"{r['last_status']} v{r['last_version']} {ago(r['last_ack_ns'], now)}"
                if r["last_status"]
                else "never"
            )
            table.add_row(
                f"{d['site']}/{d['gateway']}",
                desired,
                f"v{d['applied_version']}" if d["applied_version"] else "-",
                "[green]yes[/]" if d["in_sync"] else "[red]no[/]",
                str(d["dropped_packets"]),
                answer,
                d["reason"] or d["enforcement_error"] or "",
            )
        console.print(table)
    if any(not d["in_sync"] for d in data):
        sys.exit(EXIT_PARTIAL)


# -- set members, changed without a reload --------------------------------------------------------


def _member_kind(value: str) -> str:
    """Which list of a device set a member goes in: macs, ipv6 or ipv4."""
    if _MAC.fullmatch(value):
        return "macs"
    try:
        network = ipaddress.ip_network(value, strict=False)
    except ValueError:
        fail(f"{value!r} is not a MAC, an IPv6 or an IPv4 address or prefix", EXIT_USAGE)
    return "ipv6" if network.version == 6 else "ipv4"


_MAC = re.compile(r"(?i)[0-9a-f]{2}([:-][0-9a-f]{2}){5}")


def _same_member(kind: str, value: str) -> str:
    """A member as compared: MACs lowercase with colons, addresses in their canonical form
    (`fd00:ab:0:1:0:0:0:9` is `fd00:ab:0:1::9`)."""
    if kind == "macs":
        return value.lower().replace("-", ":")
    try:
        return str(ipaddress.ip_network(value, strict=False))
    except ValueError:
        return value


def _with_member(
    part: dict[str, Any], zone: str, set_id: str, kind: str, value: str, add: bool
) -> dict[str, Any] | None:
    """The policy part with the member added or removed, or None when the part does not
    define that set."""
    changed: dict[str, Any] = json.loads(json.dumps(part))
    for zone_entry in changed.get("zones", []):
        if zone_entry.get("id") != zone:
            continue
        for set_entry in zone_entry.get("sets", []):
            if set_entry.get("id") != set_id:
                continue
            if set_entry.get(kind) is None:  # declaring the list would change what the set means
                held = "MACs" if kind == "macs" else f"{kind} addresses"
                fail(f"set {zone}.{set_id} holds no {held}", EXIT_USAGE)
            wanted = _same_member(kind, value)
            members = [m for m in set_entry[kind] if _same_member(kind, str(m)) != wanted]
            if add:
                members.append(value.lower().replace("-", ":") if kind == "macs" else value)
            set_entry[kind] = members
            return changed
    return None


def _defining_node(
    lineage: list[tuple[Target, NodeSettings]],
    zone: str,
    set_id: str,
    kind: str,
    value: str,
    add: bool,
) -> tuple[Target, NodeSettings, dict[str, Any]] | None:
    """The lowest node of the chain whose policy part defines the set, with that part changed."""
    for node, settings in reversed(lineage):
        if settings.policy is not None:
            changed = _with_member(settings.policy, zone, set_id, kind, value, add)
            if changed is not None:
                return node, settings, changed
            if any(entry.get("id") == zone for entry in settings.policy.get("zones", [])):
                return None  # this level's zone replaces the ones above, and has no such set
    return None


@policy.command("member")
@config_option
@click.argument("action", type=click.Choice(["add", "remove"]))
@click.argument("gateway")
@click.argument("set_ref", metavar="ZONE.SET")
@click.argument("value")
@click.option(
    "--timeout",
    "timeout_s",
    type=click.FloatRange(0.5, 3600),
    default=30.0,
    show_default=True,
    help="Seconds to wait for the gateway's answer.",
)
@json_option
@pass_context
def policy_member(
    ctx: Context,
    action: str,
    gateway: str,
    set_ref: str,
    value: str,
    timeout_s: float,
    as_json: bool,
) -> None:
    """Add or remove a member (a MAC, or an IPv6/IPv4 address) of a device set, at once and
    without reloading the gateway's rules, e.g. a camera that was just installed.

    The member is also written into the policy of the tree, on the node that defines the set
    (so the next 'policy push' keeps it), then sent to GATEWAY's `policy` device, which adds it
    to its live nftables set. Exit 0 when the gateway did it, 1 when it did not.

    \b
    Example:
      campus-fleet policy member add gateway:school-42/gw-b cameras.known 00:1a:07:3c:11:04
    """
    from fleet.commands import FINAL, Commands
    from fleet.commands import Target as CommandTarget
    from fleet.registry import parse_target

    zone, dot, set_id = set_ref.partition(".")
    if not dot or not zone or not set_id:
        fail(f"{set_ref!r} is not ZONE.SET (e.g. cameras.known)", EXIT_USAGE)
    kind = _member_kind(value)
    store = ctx.writable_store()
    registry = registry_of(ctx, store)
    site, gw = _one_gateway(registry, gateway)
    problem = service_problem(store)
    if problem:
        fail(f"{problem}: the member cannot be sent", EXIT_RUNTIME)
    found = _defining_node(
        registry.lineage(parse_target(f"gateway:{site}/{gw}")),
        zone,
        set_id,
        kind,
        value,
        action == "add",
    )
    if found is None:
        fail(f"no level of {site}/{gw}'s tree defines the set {set_ref}", EXIT_NOT_FOUND)
    node, settings, changed = found
    details = {"gateway": f"{site}/{gw}", "set": set_ref, "value": value, "node": str(node)}
    with audited(store, ctx.actor, f"policy.member.{action}", str(node), details):
        updated = NodeSettings.model_validate(
            {**settings.model_dump(mode="json", exclude_defaults=True), "policy": changed}
        )
        registry.set_settings(node, updated)
        try:
            build_policy(registry, site, gw)
        except DesiredPolicyError as exc:
            registry.set_settings(node, settings)  # put the tree back as it was
            fail(str(exc), EXIT_USAGE)
        commands_ = Commands(store)
        batch = commands_.queue(
            [CommandTarget(site, gw, "policy", "")],
            "add_element" if action == "add" else "delete_element",
            {"set": set_ref, "value": value},
            timeout_s=timeout_s,
            actor=ctx.actor,
            library=None,
        )

    def finished() -> tuple[int, int]:
        rows = commands_.batch(batch)
        return sum(r["status"] in FINAL for r in rows), len(rows)

    wait_until(finished, timeout_s + 2, f"{action} {value}", as_json)
    (row,) = commands_.batch(batch)
    answer = {
        "site": site,
        "gateway": gw,
        "set": set_ref,
        "value": value,
        "written_to": str(node),
        "status": row["status"],
        "result": json.loads(row["result"]) if row["result"] else None,
        "error": row["error"],
        "id": row["id"],
    }
    if as_json:
        emit_json(answer)
    else:
        style = "green" if row["status"] == "ok" else "red"
        console.print(
            f"{site}/{gw} {set_ref}: {action} {value}: [{style}]{row['status']}[/]"
            + (f" ({row['error']})" if row["error"] else "")
            + f"; kept in the policy of {node}"
        )
    if row["status"] != "ok":
        sys.exit(EXIT_RUNTIME)
