"""Stopping child processes that run in their own process group (session)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess


def signal_group(process: subprocess.Popen[bytes] | subprocess.Popen[str], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, sig)


def stop_group(
    process: subprocess.Popen[bytes] | subprocess.Popen[str], timeout: float = 5.0
) -> int:
    """SIGTERM to the whole group, SIGKILL after `timeout`; always reaps. Returns the exit code."""
    if process.poll() is None:
        signal_group(process, signal.SIGTERM)
        try:
            return process.wait(timeout)
        except subprocess.TimeoutExpired:
            signal_group(process, signal.SIGKILL)
    return process.wait()
