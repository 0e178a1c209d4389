"""`campus-agent`: run the gateway daemon, check its configuration, and probe devices.

Exit codes: 0 success, 1 runtime failure, 2 bad command line or configuration (no traceback).
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import signal
import sys
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click

from agent import __version__
from agent.buffer import BufferError
from agent.config import AgentConfig, DeviceConfig, PolicySettings, load_config
from drivers.base import Value
from drivers.profiles import ProfileLibrary
from wire.command_words import extra_words, split_words
from wire.errors import DocumentError

EXIT_RUNTIME = 1
EXIT_CONFIG = 2

T = TypeVar("T")

CONFIG_HELP = "Agent configuration file (YAML); see the README's configuration reference."


def fail(message: str, code: int) -> NoReturn:
    click.echo(f"campus-agent: {message}", err=True)
    sys.exit(code)


def _load(config_path: Path) -> tuple[AgentConfig, ProfileLibrary]:
    try:
        return load_config(config_path)
    except DocumentError as exc:
        fail(str(exc), EXIT_CONFIG)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="campus-agent")
def main() -> None:
    """Edge agent of a school gateway.

    It polls classroom devices through their drivers, keeps every reading in an SQLite buffer
    until the broker has acknowledged it, and forwards telemetry, state and events over MQTT v5
    under campus/{site}/gw/{gateway}/.

    \b
    Examples:
      campus-agent check --config /etc/campus-iot/agent.yaml
      campus-agent run --config /etc/campus-iot/agent.yaml
    """


@main.command()
@click.option(
    "--config", "config_path", type=click.Path(path_type=Path), required=True, help=CONFIG_HELP
)
def check(config_path: Path) -> None:
    """Validate the configuration and every profile it uses, then exit (0 = valid)."""
    from agent.control import AppliedFileError, ConfigControl, load_trusted_keys
    from wire.verify import KeyFileError

    config, library = _load(config_path)
    try:
        keys = load_trusted_keys(config.fleet.public_keys)
    except KeyFileError as exc:
        fail(f"{config_path}: fleet.public_keys: {exc}", EXIT_CONFIG)
    click.echo(
        f"{config_path}: valid — site {config.site}, gateway {config.gateway}, "
        f"{len(config.devices)} devices, {len(library.profiles)} profiles in {library.directory}, "
        f"{len(keys)} trusted fleet keys"
    )
    click.echo(_policy_line(config.policy))
    applied_path = config.fleet.applied_path
    try:
        applied = ConfigControl.inspect(applied_path, config.site, config.gateway, keys, library)
    except AppliedFileError as exc:
        click.echo(
            f"{applied_path}: not usable, `run` will set it aside and use this file's "
            f"devices: {exc}"
        )
        return
    if applied is None:
        click.echo(f"no applied fleet config ({applied_path}): `run` uses this file's devices")
        return
    document, managed = applied
    click.echo(
        f"{applied_path}: fleet config version {document.version} (key {document.key_id}), "
        f"{len(managed.devices)} devices, {len(managed.schedules)} schedules: `run` uses it "
        "instead of this file's devices and schedules"
    )


def _policy_line(policy: PolicySettings) -> str:
    """What `run` will do with network policies the fleet pushes."""
    if not policy.enabled:
        return "network policy: not enforced (policy.enabled is false): pushed policies are refused"
    found = shutil.which(policy.nft_path)
    where = found or f"{policy.nft_path} NOT FOUND (install nftables)"
    return (
        f"network policy: enforced in table inet {policy.table} with {where}, confirmed within "
        f"{policy.confirm_timeout_s:g} s; the applied one is kept at {policy.applied_path}"
    )


@main.command()
@click.option(
    "--config", "config_path", type=click.Path(path_type=Path), required=True, help=CONFIG_HELP
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    help="Overrides log_level from the configuration.",
)
def run(config_path: Path, log_level: str | None) -> None:
    """Run the agent until SIGTERM or Ctrl-C."""
    config, library = _load(config_path)
    logging.basicConfig(
        level=(log_level or config.log_level).upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    from agent.control import ApplyError
    from agent.runtime import Agent
    from wire.verify import KeyFileError

    async def main_loop() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await Agent(config, library).run(stop)

    try:
        asyncio.run(main_loop())
    except KeyFileError as exc:
        fail(f"{config_path}: fleet.public_keys: {exc}", EXIT_CONFIG)
    except BufferError as exc:
        fail(f"buffer unusable: {exc}", EXIT_RUNTIME)
    except ApplyError as exc:
        fail(f"devices cannot be started: {exc}", EXIT_RUNTIME)


def _device_or_exit(config: AgentConfig, name: str) -> DeviceConfig:
    from agent.tools import select

    try:
        return select(config, [name])[0]
    except KeyError as exc:
        fail(exc.args[0], EXIT_CONFIG)


def _on_device(action: Coroutine[Any, Any, T], device: str, refused_prefix: str) -> T:
    """Runs a write or a command: a refused request exits 2, a failing device 1."""
    from drivers.errors import DriverError

    try:
        return asyncio.run(action)
    except ValueError as exc:
        fail(f"{refused_prefix}{exc}", EXIT_CONFIG)
    except DriverError as exc:
        fail(f"{device}: {exc}", EXIT_RUNTIME)


def _parse_value(text: str) -> Value:
    """A command-line value: JSON when it parses (21.5, true, "text"), else the text itself."""
    try:
        parsed = json.loads(text)
    except ValueError:
        return text
    return parsed if isinstance(parsed, bool | int | float | str) else text


@main.command()
@click.option(
    "--config", "config_path", type=click.Path(path_type=Path), required=True, help=CONFIG_HELP
)
@click.argument("devices", nargs=-1)
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def probe(config_path: Path, devices: tuple[str, ...], as_json: bool) -> None:
    """Poll DEVICES (default: all in the config) once and show what they answer.

    For installers checking a site against its profiles: every value with its unit, every
    point the profile's valid range rejects, every device that does not answer. Exit code 0 when
    every device answered with plausible values, 1 otherwise. Stop the agent first when the
    devices share a serial line with it.
    """
    from rich.table import Table

    from agent.tools import probe as run_probe
    from agent.tools import select
    from wire.terminal import make_console

    config, library = _load(config_path)
    try:
        chosen = select(config, devices)
    except KeyError as exc:
        fail(exc.args[0], EXIT_CONFIG)
    results = asyncio.run(run_probe(config, library, chosen))
    if as_json:
        click.echo(json.dumps([result.__dict__ for result in results], indent=2))
    else:
        console = make_console()
        for result in results:
            title = f"{result.device} ({result.profile}) — {result.seconds * 1000:.0f} ms"
            if result.error:
                console.print(f"[red]{title}: failed: {result.error}[/]")
                continue
            table = Table(title=title)
            for column in ("point", "value", "unit"):
                table.add_column(column, justify="right" if column == "value" else "left")
            for row in result.values:
                value = row["value"]
                shown = f"{value:.6g}" if isinstance(value, float) else str(value)
                table.add_row(row["point"], shown, row["unit"])
            for row in result.rejected:
                table.add_row(row["point"], "[red]rejected[/]", row["why"])
            console.print(table)
    sys.exit(0 if all(result.ok for result in results) else EXIT_RUNTIME)


@main.command()
@click.option(
    "--config", "config_path", type=click.Path(path_type=Path), required=True, help=CONFIG_HELP
)
@click.argument("device")
@click.argument("point")
@click.argument("value")
def write(config_path: Path, device: str, point: str, value: str) -> None:
    """Write VALUE (in the point's unit) to a read-write POINT of DEVICE, then read it back.

    Exit code 0 when the device holds the value, 1 when it does not answer or keeps another
    value, 2 when the point is unknown, read-only or the value is out of its range.
    """
    from agent.tools import write as run_write

    config, library = _load(config_path)
    target = _device_or_exit(config, device)
    profile = library.get(target.profile)
    try:
        spec = profile.point(point)
    except KeyError:
        names = ", ".join(p.name for p in profile.points if p.writable) or "none"
        fail(f"{profile.id} has no point {point!r} (writable: {names})", EXIT_CONFIG)
    if not spec.writable:
        fail(f"{profile.id} point {point!r} is read-only", EXIT_CONFIG)
    written = _on_device(run_write(library, target, point, _parse_value(value)), device, "")
    click.echo(json.dumps({"device": device, "point": point, "value": written}))


COMMAND_USAGE = "DEVICE NAME [ARGUMENT] [--OPTION VALUE]..."


def split_command_words(
    words: Sequence[str], pairs: Sequence[str] = ()
) -> tuple[str, str, str | None, dict[str, str]]:
    """(device, command, argument text, named options) from the words of `command` that click
    did not take: --NAME VALUE, --NAME=VALUE, a bare --NAME (on), and -o NAME=VALUE pairs.
    ValueError naming what is wrong."""
    positionals, named = split_words(words, pairs)
    if len(positionals) < 2:
        missing = "NAME" if positionals else "DEVICE and NAME"
        raise ValueError(f"missing {missing}: campus-agent command {COMMAND_USAGE}")
    if len(positionals) > 3:
        raise ValueError(extra_words(positionals, "--OPTION VALUE"))
    device, name, *rest = positionals
    return device, name, rest[0] if rest else None, named


@main.command(
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
)
@click.option(
    "--config", "config_path", type=click.Path(path_type=Path), required=True, help=CONFIG_HELP
)
@click.argument("words", nargs=-1, type=click.UNPROCESSED, metavar=COMMAND_USAGE)
@click.option(
    "-o",
    "--option",
    "option_pairs",
    multiple=True,
    metavar="NAME=VALUE",
    help="A named option of the command whose name is one of this command's own "
    "(config, option, help); repeatable.",
)
def command(config_path: Path, words: tuple[str, ...], option_pairs: tuple[str, ...]) -> None:
    """Run the profile command NAME on DEVICE, with ARGUMENT when it takes one.

    Named options of the command follow NAME as --OPTION VALUE or --OPTION=VALUE (a bare
    --OPTION means on); an option named like one of this command's own is given as
    -o OPTION=VALUE. ARGUMENT and option values are JSON when they parse (10, true), else
    text: put text with spaces in quotes. Both are checked against the profile before anything
    is sent: an unknown option, a bad value, or a missing option that has no default there is
    refused, naming the option.

    \b
    Examples:
      campus-agent command --config /etc/campus-iot/agent.yaml board-101 notice \\
          "Fire drill at 10:00" --minutes 10
      campus-agent command --config /etc/campus-iot/agent.yaml relays-1 set_relay_1 on
      campus-agent command --config /etc/campus-iot/agent.yaml projector-1 power_off

    Exit code 0 on success, 1 when the device fails, 2 for an unknown command, a bad argument
    or a bad option (named in the message).
    """
    from agent.tools import command as run_command

    try:
        device, name, argument, named = split_command_words(words, option_pairs)
    except ValueError as exc:
        fail(str(exc), EXIT_CONFIG)
    config, library = _load(config_path)
    target = _device_or_exit(config, device)
    profile = library.get(target.profile)
    try:
        spec = profile.command(name)
    except KeyError as exc:
        fail(exc.args[0], EXIT_CONFIG)
    value = None if argument is None else _parse_value(argument)
    options = {option: _parse_value(text) for option, text in named.items()}
    try:
        spec.check_argument(value)
        spec.check_options(options)
    except ValueError as exc:
        fail(f"{name}: {exc}; nothing sent", EXIT_CONFIG)
    result = _on_device(run_command(library, target, name, value, options), device, f"{name}: ")
    click.echo(json.dumps({"device": device, **result}))


if __name__ == "__main__":
    main()
