"""Shared fixtures: a private Mosquitto per session, and real processes that are always reaped."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from simulator.broker import MosquittoBroker, free_port
from simulator.processes import signal_group, stop_group

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MosquittoBroker]:
    """A Mosquitto of our own on an ephemeral port, 127.0.0.1 and ::1; never the system's 1883."""
    with MosquittoBroker(tmp_path_factory.mktemp("broker")) as running:
        yield running


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[MosquittoBroker]:
    """A broker for one test, which that test may stop, kill and restart."""
    running = MosquittoBroker(tmp_path / "own-broker")
    running.start()
    yield running
    running.stop()


class Processes:
    """Starts console scripts in their own process groups; stops them all at teardown."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.running: dict[str, subprocess.Popen[bytes]] = {}

    def start(
        self, name: str, script: str, *args: str, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        """`env`: variables set for this process only, over this one's environment."""
        log = (self.logdir / f"{name}.log").open("ab")
        process = subprocess.Popen(
            [str(BIN / script), *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
        log.close()
        self.running[name] = process
        return process

    def log(self, name: str) -> str:
        return (self.logdir / f"{name}.log").read_text(errors="replace")

    def signal(self, name: str, sig: int) -> None:
        signal_group(self.running[name], sig)

    def stop(self, name: str, timeout: float = 10) -> int:
        return stop_group(self.running[name], timeout)

    def kill(self, name: str) -> None:
        self.signal(name, signal.SIGKILL)
        self.running[name].wait()

    def close(self) -> None:
        for process in self.running.values():
            stop_group(process, timeout=5)


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    procs = Processes(tmp_path)
    yield procs
    procs.close()


def cli_environment() -> dict[str, str]:
    """This process's environment without the COLUMNS and LINES that pytest's readline puts in
    the C environment (unseen by os.environ, yet inherited): tools see a pipe, as in production."""
    return {name: value for name, value in os.environ.items() if name not in ("COLUMNS", "LINES")}


def run_cli(script: str, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env=cli_environment(),
    )


def fleet_json(config: Path, *args: str) -> Any:
    result = run_cli("campus-fleet", "--config", str(config), *args, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def wait_for(
    predicate: Callable[[], Any], timeout: float, interval: float = 0.2, what: str = ""
) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(interval)


def write_yaml(path: Path, document: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


@pytest.fixture
def classroom(tmp_path: Path, broker: MosquittoBroker) -> dict[str, Path]:
    """Config files of a one-room system: scenario, fleet and agent, wired to the session broker."""
    port = free_port()
    scenario = write_yaml(
        tmp_path / "scenario.yaml",
        {
            "time_scale": 60,
            "devices": [
                {"id": "room-7-env", "profile": "campussim-thc100", "port": port, "seed": 7}
            ],
        },
    )
    site = f"school-{port}"
    fleet = write_yaml(
        tmp_path / "fleet.yaml",
        {
            "name": f"fleet-{port}",
            "mqtt": {"host": "::1", "port": broker.port},
            "database": str(tmp_path / "fleet.db"),
            "sites": [site],
        },
    )
    agent = write_yaml(
        tmp_path / "agent.yaml",
        {
            "site": site,
            "gateway": "gw-1",
            "mqtt": {"host": "127.0.0.1", "port": broker.port, "keepalive_s": 2},
            "buffer": {"path": str(tmp_path / "buffer.db"), "commit_interval_s": 0.2},
            "state_interval_s": 5,
            "clock": {"sync_check": "none"},
            "devices": [
                {
                    "id": "room-7-env",
                    "profile": "campussim-thc100",
                    "interval_s": 0.2,
                    "connection": {"type": "modbus-tcp", "host": "127.0.0.1", "port": port},
                }
            ],
        },
    )
    return {"scenario": scenario, "fleet": fleet, "agent": agent, "dir": tmp_path}
