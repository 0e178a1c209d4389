"""campus-fleet commands: registry (being written)."""

from __future__ import annotations

import click


def register(main: click.Group, gateways: click.Group, devices: click.Group) -> None:
    """Adds this module's commands to the CLI."""
