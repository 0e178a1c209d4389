"""What `campus-fleet` says about device health and commands, through real processes: a private
Mosquitto, `campus-sim run`, `campus-fleet serve` and `campus-agent run`.

Checked: a relay that answers a command at once still has its sent time (sent ≤ done); a device
whose port is closed is down with the agent's reason in `devices list` (JSON and table), and the
reason goes when it answers again; piped tables keep ids of 30+ characters whole. Below them,
store-level checks: an older database gets the `reason` column, an older agent's state (no
reason) keeps the reason its device_down event gave, and the sent time of a command whose answer
came before its PUBACK.
"""

from __future__ import annotations

import json
import os
import pty
import sqlite3
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from datetime import datetime
from fcntl import ioctl
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from pydantic import ValidationError

from fleet.cli import main
from fleet.commands import Commands, Target
from fleet.store import Store
from simulator.broker import MosquittoBroker, free_ports
from tests.conftest import BIN, REPO, cli_environment, wait_for, write_yaml
from tests.fleet_campus import Campus
from wire.control import CommandOutcome, CommandResult
from wire.models import DEVICE_REASON_MAX, DeviceState, Event, EventKind, GatewayState

pytestmark = pytest.mark.timeout(120)

GATEWAY = "gw-1"
# Ids longer than a cell of an 80-column table, as real inventories have them.
RELAY = "lab-b-204-relay-module-for-the-fume-hood"
SENSOR = "lab-b-204-environment-sensor-near-the-door"
DEAD = "lab-b-204-unplugged-co2-sensor-behind-the-shelf"


def shell_env(**extra: str) -> dict[str, str]:
    return {**cli_environment(), **extra}


class Health(Campus):
    def __init__(
        self, directory: Path, site: str, broker: MosquittoBroker, dead_port: int, **settings: Any
    ) -> None:
        super().__init__(directory, site, broker, **settings)
        self.dead_port = dead_port  # where nothing listens, until a test starts a device there


@pytest.fixture(scope="module")
def campus(tmp_path_factory: pytest.TempPathFactory, broker: MosquittoBroker) -> Iterator[Health]:
    base = tmp_path_factory.mktemp("health")
    relay_port, sensor_port, dead_port = free_ports(3)
    site = f"health-{relay_port}"

    def device(device_id: str, profile: str, port: int) -> dict[str, Any]:
        connection = {"type": "modbus-tcp", "host": "127.0.0.1", "port": port}
        return {"id": device_id, "profile": profile, "interval_s": 0.2, "connection": connection}

    agent = write_yaml(
        base / "agent.yaml",
        {
            "site": site,
            "gateway": GATEWAY,
            "mqtt": {"host": "127.0.0.1", "port": broker.port, "keepalive_s": 5},
            "buffer": {"path": str(base / "buffer.db"), "commit_interval_s": 0.2},
            "fleet": {"applied_path": str(base / "config.applied.json")},
            "state_interval_s": 5,
            "clock": {"sync_check": "none"},
            "devices": [
                device(RELAY, "wirenboard-wb-mr6xv", relay_port),
                device(SENSOR, "campussim-thc100", sensor_port),
                device(DEAD, "campussim-thc100", dead_port),  # nothing listens there (yet)
            ],
        },
    )
    with Health(base, site, broker, dead_port, command_timeout_s=10) as campus:
        # The registry needs only the relay (its profile, for `cmd`): filled in this process,
        # seconds quicker than four runs of the CLI.
        runner = CliRunner(env={"CAMPUS_FLEET_ACTOR": "tester", "CAMPUS_FLEET_SITE": None})
        for words in (
            ["keys", "generate"],
            ["site", "add", site],
            ["gateway", "add", GATEWAY, "--site", site],
            ["device", "add", RELAY, "--site", site, "--gateway", GATEWAY,
             "--profile", "wirenboard-wb-mr6xv",
             "--connection", f"modbus-tcp://127.0.0.1:{relay_port}?unit=1"],
        ):  # fmt: skip
            args = ["--config", str(campus.config), *words]
            done = runner.invoke(main, args, catch_exceptions=False)
            assert done.exit_code == 0, (words, done.output)
        campus.start_sim(
            {
                "devices": [
                    {"id": RELAY, "profile": "wirenboard-wb-mr6xv", "port": relay_port},
                    {"id": SENSOR, "profile": "campussim-thc100", "port": sensor_port, "seed": 3},
                ]
            }
        )
        campus.start_fleet()
        campus.start_agent(agent)
        wait_for(
            lambda: (
                {d: s.get("availability") for d, s in campus.devices().items()}
                == {RELAY: "up", SENSOR: "up", DEAD: "down"}
            ),
            30,
            what="two devices up, one down",
        )
        yield campus


def _time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def test_a_quick_answer_keeps_its_sent_time(campus: Health) -> None:
    # A relay on loopback answers in milliseconds: before the service has seen the PUBACK.
    for value in ("true", "false"):
        before = time.time_ns()
        answered = campus.json("cmd", RELAY, "set_relay_1", value)
        (result,) = answered["results"]
        assert result["status"] == "ok", result
        assert result["sent"] is not None, result
        assert _time(result["sent"]) <= _time(result["done"]), result
        shown = campus.json("commands", "show", answered["batch"])
        assert [(r["sent"], r["done"]) for r in shown["results"]] == [
            (result["sent"], result["done"])
        ]
        conn = sqlite3.connect(f"file:{campus.dir / 'fleet.db'}?mode=ro", uri=True)
        try:
            sent_ns, done_ns = conn.execute(
                "SELECT sent_ns, done_ns FROM commands WHERE id = ?", (result["id"],)
            ).fetchone()
        finally:
            conn.close()
        assert before <= sent_ns <= done_ns <= time.time_ns()


def _rows_of(table: str, device: str) -> list[str]:
    return [line for line in table.splitlines() if device in line]


def _cells(table: str) -> list[dict[str, str]]:
    """The rows of a rich table as {column: text}; a cell wrapped onto more lines is joined."""
    header: list[str] = []
    rows: list[dict[str, str]] = []
    for line in table.splitlines():
        if line.startswith("┃"):
            words = [cell.strip() for cell in line.split("┃")[1:-1]]
            if header:
                words = [" ".join(filter(None, p)) for p in zip(header, words, strict=True)]
            header = words
        elif line.startswith("│"):
            cells = [cell.strip() for cell in line.split("│")[1:-1]]
            if rows and not cells[0]:
                for name, cell in zip(header, cells, strict=True):
                    rows[-1][name] = " ".join(filter(None, (rows[-1][name], cell)))
            else:
                rows.append(dict(zip(header, cells, strict=True)))
    return rows


def test_a_device_at_a_closed_port_is_down_with_the_reason_until_it_answers(
    campus: Health,
) -> None:
    devices = campus.devices()
    dead = devices[DEAD]
    assert dead["availability"] == "down" and dead["down_since"] is not None
    assert "127.0.0.1" in dead["reason"] and str(campus.dead_port) in dead["reason"], dead
    assert "cannot connect" in dead["reason"], dead
    assert len(dead["reason"]) <= DEVICE_REASON_MAX
    assert devices[SENSOR]["reason"] is None and devices[RELAY]["reason"] is None
    # The table: a reason column, the reason on the down device's row, ids whole in a pipe.
    table = campus.ok("devices", "list", "--site", campus.site)
    rows = {row["device"]: row for row in _cells(table)}
    assert list(rows[DEAD])[-1] == "reason", table
    # Whole, brackets too (rich would take "[Errno 111]" for markup).
    assert rows[DEAD]["availability"].startswith("down"), table
    assert rows[DEAD]["reason"] == dead["reason"], table
    for device in (RELAY, SENSOR):
        assert (rows[device]["availability"], rows[device]["reason"]) == ("up", ""), table
    assert len(_rows_of(table, DEAD)) == 1, table
    assert "…" not in table, table
    # Something listens at its port now: it is up again and the reason is gone.
    campus.start_sim(
        {"devices": [{"id": DEAD, "profile": "campussim-thc100", "port": campus.dead_port}]},
        name="revived",
    )
    back = wait_for(
        lambda: (d := campus.devices()[DEAD])["availability"] == "up" and d,
        20,
        what="the device back up",
    )
    assert back["reason"] is None and back["down_since"] is None
    table = campus.ok("devices", "list", "--site", campus.site)
    assert "reason" not in table and len(_rows_of(table, DEAD)) == 1, table


def test_piped_tables_keep_long_ids_whole_and_columns_is_obeyed(campus: Health) -> None:
    piped = campus.ok("devices", "list", "--site", campus.site)
    for device in (RELAY, SENSOR, DEAD):
        assert len(_rows_of(piped, device)) == 1, (device, piped)
    registered = campus.ok("device", "list", "--site", campus.site)
    assert len(_rows_of(registered, RELAY)) == 1, registered
    assert "…" not in piped + registered
    # COLUMNS set by the caller is their choice: the same table at 60 columns is cut.
    narrow = subprocess.run(
        [str(BIN / "campus-fleet"), "--config", str(campus.config),
         "devices", "list", "--site", campus.site],
        capture_output=True, text=True, timeout=30, check=False,
        env=shell_env(COLUMNS="60"),
    )  # fmt: skip
    assert narrow.returncode == 0, narrow.stderr
    assert max(len(line) for line in narrow.stdout.splitlines()) <= 60
    assert not _rows_of(narrow.stdout, RELAY), narrow.stdout


def _console_width(columns: str | None, terminal: bool) -> int:
    """The width `fleet.clikit.console` takes in a fresh process writing to a 97-column
    terminal (a pty) or to a pipe."""
    env = {k: v for k, v in shell_env().items() if k != "TERM"}
    if columns is not None:
        env["COLUMNS"] = columns
    code = "from fleet.clikit import console; print(console.width)"
    if not terminal:
        result = subprocess.run(
            [sys.executable, "-c", code],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
            cwd=REPO,
            env=env,
        )
        return int(result.stdout)
    main_fd, child_fd = pty.openpty()
    try:
        ioctl(child_fd, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 97, 0, 0))
        subprocess.run(
            [sys.executable, "-c", code],
            stdin=child_fd,
            stdout=child_fd,
            stderr=subprocess.DEVNULL,
            timeout=30,
            check=True,
            cwd=REPO,
            env={**env, "TERM": "xterm"},
        )
        return int(os.read(main_fd, 100).decode().strip())
    finally:
        os.close(main_fd)
        os.close(child_fd)


def test_a_terminal_keeps_its_width_a_pipe_gets_a_wide_one() -> None:
    assert _console_width(None, terminal=True) == 97
    assert _console_width(None, terminal=False) == 200
    assert _console_width("132", terminal=False) == 132
    assert _console_width("150", terminal=True) == 150


# -- store level -------------------------------------------------------------------------------

SITE = "school-1"


def _state(devices: list[dict[str, Any]]) -> GatewayState:
    """A state as it arrives on the wire (JSON), from an agent of any version."""
    payload = {"v": 1, "status": "online", "ts_ns": time.time_ns(), "devices": devices}
    return GatewayState.model_validate_json(json.dumps(payload))


def _device(store: Store, device: str) -> dict[str, Any]:
    (row,) = store.find_device(f"{SITE}/{GATEWAY}/{device}")
    return row


def test_an_older_database_gets_the_reason_column(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as old:
        old.execute(
            "CREATE TABLE devices (site TEXT, gateway TEXT, device TEXT, profile TEXT, "
            "kind TEXT, up INTEGER, last_seen_ns INTEGER, down_since_ns INTEGER, "
            "PRIMARY KEY (site, gateway, device))"
        )
        old.execute(f"INSERT INTO devices VALUES ('{SITE}', '{GATEWAY}', 'd1', 'p', 'sensor', 0, "
                    "NULL, 5)")  # fmt: skip
    old.close()
    store = Store(path)
    try:
        assert _device(store, "d1")["reason"] is None
        with store.transaction():
            store.record_state(SITE, GATEWAY, _state([
                {"v": 1, "id": "d1", "profile": "p", "kind": "sensor", "up": False,
                 "reason": "timeout after 5 s"},
            ]))  # fmt: skip
        assert _device(store, "d1")["reason"] == "timeout after 5 s"
        assert _device(store, "d1")["down_since_ns"] == 5
    finally:
        store.close()


def test_an_older_agents_state_keeps_the_reason_of_the_down_event(tmp_path: Path) -> None:
    store = Store(tmp_path / "fleet.db")
    old = {"v": 1, "id": "cam", "profile": "generic-onvif-camera", "kind": "camera"}
    try:
        with store.transaction():
            store.record_state(SITE, GATEWAY, _state([{**old, "up": True}]))
            down = Event(
                ts_ns=time.time_ns(),
                kind=EventKind.DEVICE_DOWN,
                device="cam",
                message="camera unreachable: " + "x" * 1000,
            )
            store.record_event(SITE, GATEWAY, down)
        reason = _device(store, "cam")["reason"]
        assert reason.startswith("camera unreachable: ") and len(reason) == DEVICE_REASON_MAX
        with store.transaction():  # the next state of an older agent has no reason
            store.record_state(SITE, GATEWAY, _state([{**old, "up": False}]))
        assert _device(store, "cam")["reason"] == reason
        with store.transaction():  # a newer agent's says what is wrong now
            store.record_state(SITE, GATEWAY, _state([{**old, "up": False, "reason": "HTTP 401"}]))
            store.record_event(  # and a late copy of the event does not undo it
                SITE, GATEWAY, down.model_copy(update={"ts_ns": down.ts_ns + 1})
            )
        assert _device(store, "cam")["reason"] == "HTTP 401"
        with store.transaction():
            store.record_state(SITE, GATEWAY, _state([{**old, "up": True}]))
        assert _device(store, "cam")["reason"] is None
        with store.transaction():  # down again, then up by event: no reason left over
            store.record_event(SITE, GATEWAY, down.model_copy(update={"message": "refused"}))
            assert _device(store, "cam")["reason"] == "refused"
            up = Event(ts_ns=time.time_ns(), kind=EventKind.DEVICE_UP, device="cam", message="ok")
            store.record_event(SITE, GATEWAY, up)
        assert (_device(store, "cam")["up"], _device(store, "cam")["reason"]) == (1, None)
    finally:
        store.close()


def test_a_device_state_reason_is_optional_and_bounded() -> None:
    plain = DeviceState.model_validate_json('{"v":1,"id":"d","profile":"p","kind":"sensor"}')
    assert plain.reason is None
    DeviceState(id="d", profile="p", kind="sensor", up=False, reason="x" * DEVICE_REASON_MAX)
    with pytest.raises(ValidationError, match="reason"):
        DeviceState(
            id="d", profile="p", kind="sensor", up=False, reason="x" * (DEVICE_REASON_MAX + 1)
        )


def test_the_sent_time_is_the_publications_whatever_comes_first(tmp_path: Path) -> None:
    store = Store(tmp_path / "fleet.db")
    commands = Commands(store)
    names = ("answered-first", "acked-first", "refused", "timed-out")
    targets = [Target(SITE, GATEWAY, name, "p") for name in names]
    try:
        batch = commands.queue(targets, "power_on", None, timeout_s=1, actor="t", library=None)
        ids = {row["device"]: row["id"] for row in commands.batch(batch)}
        published = time.time_ns()
        with store.transaction():
            commands.mark_publishing(list(ids.values()), published)

        def answer(device: str) -> None:
            result = CommandResult(
                id=ids[device],
                device=device,
                outcome=CommandOutcome.OK,
                finished_ns=published + 5_000_000,
            )
            assert commands.record_result(SITE, GATEWAY, result)

        with store.transaction():
            answer("answered-first")  # the answer is in before the PUBACK
            commands.mark_sent([ids["answered-first"], ids["acked-first"]])
            commands.mark_unsent([ids["refused"]])  # tried again later
        with store.transaction():
            answer("acked-first")
            commands.expire(published + 2 * 10**9)
        rows = {row["device"]: row for row in commands.batch(batch)}
        assert {name: (rows[name]["status"], rows[name]["sent_ns"]) for name in names} == {
            "answered-first": ("ok", published),
            "acked-first": ("ok", published),
            "refused": ("timeout", None),
            "timed-out": ("timeout", published),
        }
        assert rows["answered-first"]["sent_ns"] <= rows["answered-first"]["done_ns"]
        with store.transaction():  # a late PUBACK or failure changes nothing once answered
            commands.mark_unsent([ids["answered-first"]])
            commands.mark_sent([ids["answered-first"]])
            commands.mark_publishing([ids["answered-first"]], published + 1)
        assert commands.batch(batch)[0]["sent_ns"] == published
    finally:
        store.close()
