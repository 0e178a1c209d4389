"""A reading travels from a simulated classroom sensor to the fleet CLI, all real processes."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

from tests.conftest import Processes, fleet_json, run_cli, wait_for


def start_system(processes: Processes, classroom: dict[str, Path]) -> None:
    processes.start("sim", "campus-sim", "run", str(classroom["scenario"]))
    processes.start("fleet", "campus-fleet", "--config", str(classroom["fleet"]), "serve")
    wait_for(lambda: "subscribed to" in processes.log("fleet"), 15, what="fleet subscribed")
    processes.start("agent", "campus-agent", "run", "--config", str(classroom["agent"]))


def readings(classroom: dict[str, Path]) -> list[dict[str, object]]:
    """The device's readings, or [] until the fleet knows it (exit code 3: no such device)."""
    result = run_cli(
        "campus-fleet",
        "--config",
        str(classroom["fleet"]),
        "readings",
        "room-7-env",
        "--since",
        "1h",
        "--json",
    )
    if result.returncode == 3 or "no fleet database" in result.stderr:
        return []
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def gateway(classroom: dict[str, Path]) -> dict[str, object]:
    rows = fleet_json(classroom["fleet"], "gateways", "list")
    assert len(rows) == 1
    return rows[0]  # type: ignore[no-any-return]


def test_readings_reach_the_fleet_with_consecutive_sequence_numbers(
    processes: Processes, classroom: dict[str, Path]
) -> None:
    start_system(processes, classroom)
    rows = wait_for(
        lambda: len(readings(classroom)) >= 50 and readings(classroom),
        30,
        what="50 readings in the fleet",
    )
    seqs = [row["seq"] for row in rows]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), "sequence numbers have holes"
    assert seqs[0] == 1
    points = {row["point"] for row in rows}
    assert points == {"temperature", "humidity", "co2", "dew_point", "uptime"}
    by_point = {row["point"]: row["value"] for row in rows}
    assert 10 < by_point["temperature"] < 35  # type: ignore[operator]
    assert 0 <= by_point["humidity"] <= 100  # type: ignore[operator]
    assert 300 < by_point["co2"] < 5000  # type: ignore[operator]

    devices = fleet_json(classroom["fleet"], "devices", "list")
    assert [(d["device"], d["profile"], d["kind"], d["availability"]) for d in devices] == [
        ("room-7-env", "campussim-thc100", "sensor", "up")
    ]
    assert gateway(classroom)["status"] == "online"
    assert gateway(classroom)["duplicates"] == 0


def test_a_killed_agent_shows_offline_within_its_keepalive(
    processes: Processes, classroom: dict[str, Path]
) -> None:
    start_system(processes, classroom)
    wait_for(lambda: readings(classroom), 30, what="first readings")
    wait_for(lambda: gateway(classroom)["status"] == "online", 10, what="online state")
    processes.kill("agent")
    killed = time.monotonic()
    # keepalive_s is 2: the broker publishes the Last Will after 1.5 keep-alives without traffic.
    wait_for(lambda: gateway(classroom)["status"] == "offline", 10, what="offline (Last Will)")
    assert time.monotonic() - killed < 2 * 1.5 + 2
    assert gateway(classroom)["reason"] == "connection lost"


def test_a_stopped_agent_says_so_and_its_readings_continue_after_restart(
    processes: Processes, classroom: dict[str, Path]
) -> None:
    start_system(processes, classroom)
    wait_for(lambda: len(readings(classroom)) >= 20, 30, what="20 readings")
    assert processes.stop("agent") == 0
    wait_for(lambda: gateway(classroom)["status"] == "offline", 5, what="offline")
    assert gateway(classroom)["reason"] == "agent stopped"
    before = {row["seq"] for row in readings(classroom)}

    processes.start("agent2", "campus-agent", "run", "--config", str(classroom["agent"]))
    wait_for(lambda: len(readings(classroom)) >= len(before) + 20, 30, what="more readings")
    processes.signal("agent2", signal.SIGTERM)
    rows = readings(classroom)
    seqs = [row["seq"] for row in rows]
    assert seqs == list(range(1, len(seqs) + 1)), "restart reused or skipped sequence numbers"
    assert gateway(classroom)["duplicates"] == 0
