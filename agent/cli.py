"""`campus-agent`: run the gateway daemon, or check its configuration.

Exit codes: 0 success, 1 runtime failure, 2 bad command line or configuration (no traceback).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from pathlib import Path

import click

from agent import __version__
from agent.buffer import BufferError
from agent.config import AgentConfig, load_config
from drivers.profiles import ProfileLibrary
from wire.errors import DocumentError

EXIT_RUNTIME = 1
EXIT_CONFIG = 2

CONFIG_HELP = "Agent configuration file (YAML); see the README's configuration reference."


def _load(config_path: Path) -> tuple[AgentConfig, ProfileLibrary]:
    try:
        return load_config(config_path)
    except DocumentError as exc:
        click.echo(f"campus-agent: {exc}", err=True)
        sys.exit(EXIT_CONFIG)


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
    config, library = _load(config_path)
    click.echo(
        f"{config_path}: valid — site {config.site}, gateway {config.gateway}, "
        f"{len(config.devices)} devices, {len(library.profiles)} profiles in {library.directory}"
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
    from agent.runtime import Agent

    async def main_loop() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await Agent(config, library).run(stop)

    try:
        asyncio.run(main_loop())
    except BufferError as exc:
        click.echo(f"campus-agent: buffer unusable: {exc}", err=True)
        sys.exit(EXIT_RUNTIME)


if __name__ == "__main__":
    main()
