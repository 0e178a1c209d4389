"""Installer tools through real processes: `campus-sim run` serving Modbus TCP and an RTU bus
(socat), read by mbpoll (an independent master) and by `campus-agent probe / write / command`;
`command` with named options on a simulated e-class board (private broker); `probe` of BTHome
sensors on a mock BlueZ (private system bus)."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from agent.cli import split_command_words
from simulator.ble import BleSimulation, BluezControl, SimulatedBleSensor
from simulator.board import SimulatedBoard, run_board
from simulator.broker import MosquittoBroker, free_port
from tests.bluez_mock import bluez, bluez_bus
from tests.conftest import Processes, run_cli, wait_for, write_yaml

__all__ = ["bluez", "bluez_bus"]  # fixtures used by name

pytestmark = pytest.mark.slow


@pytest.fixture
def site(tmp_path: Path, processes: Processes) -> dict[str, Any]:
    port = free_port()
    link = tmp_path / "ttyRS485-1"
    scenario = write_yaml(
        tmp_path / "scenario.yaml",
        {
            "time_scale": 60,
            "start_time_of_day": "09:00",
            "rtu_buses": [{"name": "bus-1", "link": str(link), "baudrate": 9600}],
            "devices": [
                {"id": "room-1-env", "profile": "campussim-thc100", "port": port},
                {"id": "meter-1", "profile": "eastron-sdm120", "bus": "bus-1", "unit": 2},
                {"id": "room-1-co2", "profile": "senseair-s8", "bus": "bus-1", "unit": 3},
                {"id": "relays-1", "profile": "wirenboard-wb-mr6xv", "bus": "bus-1", "unit": 4},
                {
                    "id": "broken-1",
                    "profile": "senseair-s8",
                    "bus": "bus-1",
                    "unit": 5,
                    "fault": {"kind": "offline"},
                },
            ],
        },
    )
    rtu = {"type": "modbus-rtu", "port": str(link), "baudrate": 9600, "timeout_s": 0.5}
    agent = write_yaml(
        tmp_path / "agent.yaml",
        {
            "site": "school-1",
            "gateway": "gw-1",
            "devices": [
                {
                    "id": "room-1-env",
                    "profile": "campussim-thc100",
                    "connection": {"type": "modbus-tcp", "host": "127.0.0.1", "port": port},
                },
                {"id": "meter-1", "profile": "eastron-sdm120", "connection": {**rtu, "unit": 2}},
                {"id": "room-1-co2", "profile": "senseair-s8", "connection": {**rtu, "unit": 3}},
                {
                    "id": "relays-1",
                    "profile": "wirenboard-wb-mr6xv",
                    "connection": {**rtu, "unit": 4},
                },
                {"id": "broken-1", "profile": "senseair-s8", "connection": {**rtu, "unit": 5}},
            ],
        },
    )
    processes.start("sim", "campus-sim", "run", str(scenario))
    wait_for(lambda: processes.log("sim").count("on serial line") == 4, 15, what="RTU bus up")
    wait_for(lambda: "listening on" in processes.log("sim"), 15, what="TCP device up")
    return {"agent": agent, "link": link, "port": port}


def mbpoll(*args: str) -> dict[str, str]:
    result = subprocess.run(
        ["mbpoll", *args], capture_output=True, text=True, timeout=10, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return dict(re.findall(r"^\[(\d+)\]:\s+(\S+)", result.stdout, re.MULTILINE))


def test_mbpoll_reads_the_simulated_rtu_meter(site: dict[str, Any]) -> None:
    # SDM120 input registers 0x0000 (voltage) and 0x0006 (current), float32, high word first
    values = mbpoll(
        "-m",
        "rtu",
        "-b",
        "9600",
        "-P",
        "none",
        "-a",
        "2",
        "-t",
        "3:float",
        "-B",
        "-r",
        "1",
        "-c",
        "4",
        "-1",
        str(site["link"]),
    )
    assert 220 < float(values["1"]) < 240, values
    assert 0 <= float(values["7"]) < 100, values


def test_probe_reads_every_device_and_names_the_broken_one(site: dict[str, Any]) -> None:
    result = run_cli("campus-agent", "probe", "--config", str(site["agent"]), "--json")
    assert result.returncode == 1, result.stderr  # one device does not answer
    probes = {p["device"]: p for p in json.loads(result.stdout)}
    assert probes["broken-1"]["ok"] is False and "no answer" in probes["broken-1"]["error"]
    for name in ("room-1-env", "meter-1", "room-1-co2", "relays-1"):
        assert probes[name]["ok"], probes[name]
        assert probes[name]["values"], name
    meter = {v["point"]: v for v in probes["meter-1"]["values"]}
    assert 220 < meter["voltage"]["value"] < 240 and meter["voltage"]["unit"] == "V"
    table = run_cli("campus-agent", "probe", "--config", str(site["agent"]), "meter-1")
    assert table.returncode == 0 and "voltage" in table.stdout and "frequency" in table.stdout


def test_write_and_commands_with_read_back(site: dict[str, Any]) -> None:
    agent = str(site["agent"])
    on = run_cli("campus-agent", "command", "--config", agent, "relays-1", "set_relay_1", "on")
    assert on.returncode == 0, on.stderr
    assert json.loads(on.stdout)["value"] is True
    written = run_cli(
        "campus-agent", "write", "--config", agent, "relays-1", "safe_mode_timeout", "120"
    )
    assert written.returncode == 0, written.stderr
    assert json.loads(written.stdout)["value"] == 120
    probe = json.loads(
        run_cli("campus-agent", "probe", "--config", agent, "relays-1", "--json").stdout
    )
    values = {v["point"]: v["value"] for v in probe[0]["values"]}
    assert values["relay_1"] is True and values["safe_mode_timeout"] == 120

    off = run_cli("campus-agent", "write", "--config", agent, "relays-1", "relay_1", "off")
    assert off.returncode == 0 and json.loads(off.stdout)["value"] is False, off.stderr
    dim = run_cli("campus-agent", "write", "--config", agent, "relays-1", "relay_1", "dim")
    assert dim.returncode == 2 and "not on/off" in dim.stderr
    bad = run_cli("campus-agent", "command", "--config", agent, "relays-1", "set_relay_1", "dim")
    assert bad.returncode == 2 and "not on/off" in bad.stderr
    read_only = run_cli("campus-agent", "write", "--config", agent, "meter-1", "voltage", "1")
    assert read_only.returncode == 2 and "read-only" in read_only.stderr
    out_of_range = run_cli(
        "campus-agent", "write", "--config", agent, "relays-1", "restore_after_power_loss", "7"
    )
    assert out_of_range.returncode == 2 and "above the profile's maximum" in out_of_range.stderr
    unknown = run_cli("campus-agent", "command", "--config", agent, "meter-1", "explode")
    assert unknown.returncode == 2 and "has no command 'explode'" in unknown.stderr


def test_the_agent_daemon_polls_the_rtu_bus_and_raises_alarms(
    tmp_path: Path, processes: Processes, broker: MosquittoBroker
) -> None:
    link = tmp_path / "ttyRS485-2"
    scenario = write_yaml(
        tmp_path / "daemon-scenario.yaml",
        {
            "rtu_buses": [{"name": "bus-1", "link": str(link)}],
            "devices": [
                {"id": "meter-1", "profile": "eastron-sdm120", "bus": "bus-1", "unit": 1},
                {
                    "id": "room-9-co2",
                    "profile": "senseair-s8",
                    "bus": "bus-1",
                    "unit": 2,
                    "values": {"co2": 1800},
                },
            ],
        },
    )
    fleet = write_yaml(
        tmp_path / "fleet.yaml",
        {
            "name": "fleet-rtu",
            "mqtt": {"host": "::1", "port": broker.port},
            "database": str(tmp_path / "fleet.db"),
            "sites": ["school-rtu"],
        },
    )
    rtu = {"type": "modbus-rtu", "port": str(link), "timeout_s": 0.5}
    agent = write_yaml(
        tmp_path / "daemon-agent.yaml",
        {
            "site": "school-rtu",
            "gateway": "gw-1",
            "mqtt": {"host": "127.0.0.1", "port": broker.port, "keepalive_s": 5},
            "buffer": {"path": str(tmp_path / "buffer.db")},
            "clock": {"sync_check": "none"},
            "devices": [
                {
                    "id": "meter-1",
                    "profile": "eastron-sdm120",
                    "interval_s": 0.5,
                    "connection": {**rtu, "unit": 1},
                },
                {
                    "id": "room-9-co2",
                    "profile": "senseair-s8",
                    "interval_s": 0.5,
                    "connection": {**rtu, "unit": 2},
                },
            ],
        },
    )
    processes.start("sim", "campus-sim", "run", str(scenario))
    wait_for(lambda: processes.log("sim").count("on serial line") == 2, 15, what="RTU bus")
    processes.start("fleet", "campus-fleet", "serve", "--config", str(fleet))
    wait_for(lambda: "subscribed to" in processes.log("fleet"), 15, what="fleet subscribed")
    processes.start("agent", "campus-agent", "run", "--config", str(agent))

    def readings(device: str) -> list[dict[str, Any]]:
        result = run_cli("campus-fleet", "--config", str(fleet), "readings", device, "--json")
        return json.loads(result.stdout) if result.returncode == 0 else []

    meter = wait_for(lambda: readings("meter-1"), 20, what="meter readings in the fleet")
    voltage = [r["value"] for r in meter if r["point"] == "voltage"]
    assert voltage and 220 < voltage[-1] < 240
    co2 = wait_for(
        lambda: [r for r in readings("room-9-co2") if r["point"] == "co2"], 20, what="co2"
    )
    assert co2[-1]["value"] == 1800

    def alarms() -> list[dict[str, Any]]:
        result = run_cli("campus-fleet", "--config", str(fleet), "events", "--json")
        return [e for e in json.loads(result.stdout) if e["kind"] == "alarm"]

    [alarm] = wait_for(alarms, 20, what="the co2 alarm event")
    assert alarm["device"] == "room-9-co2" and alarm["message"] == "co2 1800 ppm above 1500"
    assert alarm["data"]["state"] == "raised"
    time.sleep(1.5)
    assert len(alarms()) == 1, "an alarm is raised once, not at every poll"


def test_profiles_check_lists_every_problem(tmp_path: Path) -> None:
    good = run_cli("campus-fleet", "profiles", "check", "--json")
    assert good.returncode == 0
    assert len(json.loads(good.stdout)["valid"]) >= 9
    bad_dir = tmp_path / "profiles"
    bad_dir.mkdir()
    (bad_dir / "acme-a.yaml").write_text(
        "vendor: A\nmodel: A\nprotocol: modbus\nkind: sensor\nsource: s\npoints:\n"
        "  - {name: t, table: input, address: 0, type: float33}\n"
    )
    (bad_dir / "acme-b.yaml").write_text("vendor: B\nprotocol: modbus\n")
    result = run_cli("campus-fleet", "profiles", "check", str(bad_dir))
    assert result.returncode == 1
    assert "acme-a.yaml: line 7, points.0.type: Input should be" in result.stderr
    assert "acme-b.yaml: line 1, model: Field required" in result.stderr
    assert "acme-b.yaml: line 1, points: Field required" in result.stderr


# --- command options on an MQTT board --------------------------------------------------------


async def test_command_options_reach_the_board_and_bad_ones_are_refused(
    tmp_path: Path, broker: MosquittoBroker
) -> None:
    topic = f"eclass/board-{uuid.uuid4().hex[:8]}"
    connection = {"type": "mqtt", "host": "::1", "port": broker.port, "topic": topic}
    agent = write_yaml(
        tmp_path / "agent.yaml",
        {
            "site": "school-1",
            "gateway": "gw-1",
            "devices": [
                {
                    "id": "board-101",
                    "profile": "generic-android-eclass-board",
                    "connection": connection,
                }
            ],
        },
    )
    spec = SimulatedBoard(
        id="board-101", topic=topic, broker_host="::1", broker_port=broker.port, interval_s=0.5
    )

    async def command(*words: str) -> subprocess.CompletedProcess[str]:
        return await asyncio.to_thread(
            run_cli, "campus-agent", "command", "--config", str(agent), "board-101", *words
        )

    async with run_board(spec) as board:
        sent = await command("notice", "Fire drill at 10:00", "--minutes", "10")
        assert sent.returncode == 0, sent.stderr
        assert json.loads(sent.stdout)["notice"] == {"text": "Fire drill at 10:00", "minutes": 10}
        assert board.commands[-1]["minutes"] == 10  # a number on the wire, as the board wants
        assert board.notice is not None and board.notice.text == "Fire drill at 10:00"

        forms = {
            ("notice", "Exam", "--minutes=5"): 5,
            ("notice", "Exam", "-o", "minutes=3"): 3,
            ("--option", "minutes=2", "notice", "Exam"): 2,
            ("notice", "Lunch"): 10,  # the profile's default
        }
        answers = await asyncio.gather(*(command(*words) for words in forms))
        for (words, minutes), sent in zip(forms.items(), answers, strict=True):
            assert sent.returncode == 0, (words, sent.stderr)
            assert json.loads(sent.stdout)["notice"]["minutes"] == minutes, words
        assert len(board.commands) == 5

        refused = await asyncio.gather(
            *(
                command(*words)
                for words in (
                    ("notice", "x", "--minutes", "0"),
                    ("notice", "x", "--colour", "red"),
                    ("screen_on", "--minutes", "5"),
                    ("notice", "x", "-o", "minutes"),
                    ("notice",),
                )
            )
        )
        messages = [
            "notice: --minutes: 0 is below the minimum 1",  # (1.0: a float min)
            "notice: command 'notice' has no option colour (options: --minutes); nothing sent",
            "screen_on: command 'screen_on' has no option minutes (options: none); nothing sent",
            "-o 'minutes': write NAME=VALUE",
            "notice: command 'notice' needs an argument (text); nothing sent",
        ]
        for result, message in zip(refused, messages, strict=True):
            assert result.returncode == 2, (message, result.stdout, result.stderr)
            assert result.stderr.startswith("campus-agent: "), result.stderr
            assert message in result.stderr, (message, result.stderr)
        await asyncio.sleep(0.3)
        assert len(board.commands) == 5  # nothing was sent

    shown = run_cli("campus-agent", "command", "--help")
    assert shown.returncode == 0
    assert '"Fire drill at 10:00" --minutes 10' in shown.stdout
    assert "-o, --option NAME=VALUE" in shown.stdout


def test_command_words_are_split_like_campus_fleet_cmd() -> None:
    assert split_command_words(["board-101", "notice", "Hi", "--minutes", "10"]) == (
        "board-101",
        "notice",
        "Hi",
        {"minutes": "10"},
    )
    assert split_command_words(["b", "notice", "--loud", "--minutes=-5"], ["config=x"]) == (
        "b",
        "notice",
        None,
        {"loud": "true", "minutes": "-5", "config": "x"},
    )
    for words, pairs, message in (
        (["b", "notice", "x", "--minutes", "5"], ["minutes=6"], "option --minutes is given twice"),
        (["b", "notice", "x"], ["minutes"], "-o 'minutes': write NAME=VALUE"),
        (["b", "notice", "a", "b"], [], "unexpected 'b' after ARGUMENT 'a'"),
        (["b", "notice", "--Minutes", "5"], [], "'--Minutes' is not an option name"),
        (["b"], [], "missing NAME: campus-agent command DEVICE NAME [ARGUMENT]"),
    ):
        with pytest.raises(ValueError, match=re.escape(message)):
            split_command_words(words, pairs)


# --- probe of BTHome sensors -----------------------------------------------------------------

HEARD = "A4:C1:38:3E:B3:93"
SILENT = "A4:C1:38:00:00:99"


async def test_probe_waits_for_a_bthome_advert_and_names_a_silent_sensor(
    tmp_path: Path, bluez: BluezControl
) -> None:
    agent = write_yaml(
        tmp_path / "agent.yaml",
        {
            "site": "school-1",
            "gateway": "gw-1",
            "devices": [
                {
                    "id": "room-14-th",
                    "profile": "bthome-lywsd03mmc",
                    "connection": {"type": "ble", "address": SILENT, "advert_interval_s": 1.5},
                },
                {
                    "id": "room-12-th",
                    "profile": "bthome-lywsd03mmc",
                    "connection": {"type": "ble", "address": HEARD},
                },
            ],
        },
    )
    sensor = SimulatedBleSensor(
        id="room-12",
        address=HEARD,
        interval_s=0.5,
        drift=False,
        values={"temperature": 21.5, "humidity": 45.0, "battery": 90, "voltage": 2.95},
    )
    simulation = asyncio.create_task(BleSimulation(bluez, [sensor]).run())

    def probe(*args: str) -> subprocess.CompletedProcess[str]:
        return run_cli("campus-agent", "probe", "--config", str(agent), *args)

    try:
        result = await asyncio.to_thread(probe, "--json")
        table = await asyncio.to_thread(probe, "room-12-th")
        silent = await asyncio.to_thread(probe, "room-14-th")
    finally:
        simulation.cancel()
        with pytest.raises(asyncio.CancelledError):
            await simulation

    assert result.returncode == 1, result.stderr  # one sensor is silent
    probes = {p["device"]: p for p in json.loads(result.stdout)}
    heard = probes["room-12-th"]
    assert heard["ok"] and heard["rejected"] == [], heard
    got = {v["point"]: v["value"] for v in heard["values"]}
    assert got["temperature"] == 21.5 and got["humidity"] == 45.0 and got["battery"] == 90
    assert got["battery_voltage"] == 2.95 and got["rssi"] < 0
    assert probes["room-14-th"]["ok"] is False
    assert probes["room-14-th"]["error"].startswith(
        f"no advert from {SILENT} within 1.5 s on hci0: check that the sensor is in range"
    )
    assert probes["room-14-th"]["seconds"] >= 1.5

    assert table.returncode == 0, table.stderr
    assert "temperature" in table.stdout and "21.5" in table.stdout
    assert silent.returncode == 1
    assert f"failed: no advert from {SILENT} within 1.5 s" in " ".join(silent.stdout.split())
