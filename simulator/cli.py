"""`campus-sim`: simulated classroom devices for installers and tests, and the demo.

Exit codes: 0 success; 1 runtime failure (e.g. a port already taken); 2 bad command line or
scenario file.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from pathlib import Path

import click

from simulator.modbus_server import ListenError
from simulator.scenario import load_scenario
from wire.errors import DocumentError

BUILTIN = Path(__file__).parent / "scenarios"


def resolve_scenario(name: str) -> Path:
    """A path, or the name of a built-in scenario (see `campus-sim scenarios`)."""
    path = Path(name)
    if path.exists() or "/" in name or name.endswith((".yaml", ".yml")):
        return path
    return BUILTIN / f"{name}.yaml"


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="campus-iot", prog_name="campus-sim")
def main() -> None:
    """Simulated classroom devices that speak the real protocols.

    Installers use them to try a gateway before the real devices are wired; the tests use them
    as independent peers; `demo` runs a whole campus-iot on one machine.

    \b
    Examples:
      campus-sim scenarios
      campus-sim run classroom
      campus-sim run ./my-school.yaml
      campus-sim demo
    """


@main.command()
def scenarios() -> None:
    """List the built-in scenarios."""
    for path in sorted(BUILTIN.glob("*.yaml")):
        first = path.read_text().splitlines()[0].lstrip("# ")
        click.echo(f"{path.stem:<16} {first}")


@main.command()
@click.argument("scenario")
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="info",
    show_default=True,
)
def run(scenario: str, log_level: str) -> None:
    """Serve the devices of SCENARIO (a YAML file or a built-in name) until Ctrl-C."""
    logging.basicConfig(
        level=log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("pymodbus").setLevel(logging.WARNING)
    try:
        spec, library = load_scenario(resolve_scenario(scenario))
    except DocumentError as exc:
        click.echo(f"campus-sim: {exc}", err=True)
        sys.exit(2)
    from simulator.runner import run_scenario

    async def serve() -> None:
        task = asyncio.create_task(run_scenario(spec, library))
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await task

    try:
        asyncio.run(serve())
    except* ListenError as group:
        for error in group.exceptions:
            click.echo(f"campus-sim: {error}", err=True)
        sys.exit(1)


@main.command()
@click.option(
    "--rooms",
    type=click.IntRange(1, 50),
    default=3,
    show_default=True,
    help="Simulated classrooms, each with a sensor, a projector and an e-class board.",
)
@click.option(
    "--workdir",
    type=click.Path(path_type=Path, file_okay=False),
    default=Path(".demo"),
    show_default=True,
    help="Where configs, logs and databases go (emptied at start).",
)
@click.option(
    "--duration",
    type=click.FloatRange(min=1),
    default=None,
    help="Stop by itself after this many seconds (default: run until Ctrl-C).",
)
@click.option("--plain", is_flag=True, help="Print plain lines instead of a live table.")
def demo(rooms: int, workdir: Path, duration: float | None, plain: bool) -> None:
    """Run a whole campus-iot here: a private broker, simulated classrooms, the fleet and an
    agent, with a live table of devices and their latest readings. Ctrl-C stops everything."""
    from simulator.demo import Demo, DemoError

    try:
        Demo(workdir, rooms=rooms).run(duration=duration, plain=plain)
    except DemoError as exc:
        click.echo(f"campus-sim demo: {exc}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
