"""Consoles for the command-line tools (campus-agent, campus-fleet): rich tables that keep their
width in pipes and logs."""

from __future__ import annotations

import os
import sys

from rich.console import Console

#: Table width when standard output is a pipe or a file: rich would use 80 columns and cut
#: cells ("a201-boa…"), so `campus-fleet devices list | grep a201-board` would find nothing.
PIPE_WIDTH = 200


def make_console() -> Console:
    """A terminal keeps its own width; a pipe or a file gets `PIPE_WIDTH` (at least), unless
    `COLUMNS` says otherwise."""
    made = Console()
    try:
        piped = not sys.stdout.isatty()
    except (AttributeError, ValueError):  # no stdout, or a closed one
        piped = True
    if piped and not os.environ.get("COLUMNS", "").isdigit():
        made.width = max(PIPE_WIDTH, made.width)
    return made
