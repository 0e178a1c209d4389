"""`campus-sim demo` shows every device class with live values within seconds (Modbus sensors,
PJLink projectors, e-class boards on MQTT, ONVIF cameras, a BLE thermometer on a mock BlueZ),
sends one command to every board end to end, and leaves nothing running. Without dbus-daemon or
python-dbusmock it runs without the thermometer and says so in one line."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
import yaml

import simulator.demo as demo_module
from fleet.csv_import import connection_url, parse_connection_url
from simulator.demo import (
    CAMERA_DRIFT_S,
    PROJECTOR_PASSWORD,
    Demo,
    DemoDevice,
    DemoError,
    ble_unavailable,
    health,
    plain_values,
    plan_school,
)
from simulator.scenario import Scenario
from tests.conftest import BIN
from wire.gateway_config import DeviceConfig

NUMBER = r"-?\d+(?:\.\d+)?"


def descendants_alive(pids: set[int]) -> set[int]:
    return {
        pid
        for pid in pids
        if Path(f"/proc/{pid}").exists()
        and "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()
    }


def children_of(pid: int) -> set[int]:
    found: set[int] = set()
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            text = status.read_text()
        except OSError:
            continue
        if re.search(rf"^PPid:\s+{pid}$", text, re.MULTILINE):
            found.add(int(status.parent.name))
    return found


def first(lines: list[tuple[float, str]], pattern: str) -> tuple[float, re.Match[str]] | None:
    for at, line in lines:
        if found := re.search(pattern, line):
            return at, found
    return None


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_demo_shows_every_device_class_sends_a_notice_and_cleans_up(tmp_path: Path) -> None:
    started = time.monotonic()
    workdir = tmp_path / "demo"
    demo = subprocess.Popen(
        [
            str(BIN / "campus-sim"),
            "demo",
            "--plain",
            "--duration",
            "28",
            "--rooms",
            "2",
            "--workdir",
            str(workdir),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert demo.stdout is not None
    spawned: set[int] = set()
    lines: list[tuple[float, str]] = []
    for line in demo.stdout:
        lines.append((time.monotonic() - started, line))
        spawned |= children_of(demo.pid)
    text = "".join(line for _, line in lines)
    assert demo.wait(30) == 0, text
    assert "every process stopped" in text.splitlines()[-1], text[-2000:]
    assert len(spawned) >= 4, spawned  # broker, simulator, fleet, agent
    assert descendants_alive(spawned) == set(), "the demo left processes running"

    def seen(pattern: str) -> re.Match[str]:
        found = first(lines, pattern)
        assert found is not None, f"no line matches {pattern!r}:\n{text}"
        return found[1]

    sensor = first(lines, rf"room-10[12]-env sensor/modbus up temperature={NUMBER} .*co2=\d+")
    assert sensor is not None and sensor[0] < 15, text
    seen(r"config of gw-main: pushed v1 applied, applied v1 \(in sync\)")
    # Projectors: one lit, one in standby behind a PJLink password, lamp hours read.
    seen(r"room-101-projector display/pjlink up power=on lamp_hours=1200 ")
    seen(r"room-102-projector display/pjlink up power=standby lamp_hours=2050 ")
    # Boards: screen state, and the notice the demo sent through `campus-fleet cmd`.
    seen(r'command notice "Welcome to campus-iot" --minutes 5: 2 of 2 boards answered ok')
    for board in ("room-101-board", "room-102-board"):
        seen(rf'{board} board/mqtt up screen=true notice_active=true notice_text="Welcome to ')
    # Cameras: both streams answer; the west one's clock is CAMERA_DRIFT_S ahead.
    east = seen(rf"corridor-cam-east camera/onvif up rtsp_ok=true clock_drift_s=({NUMBER})")
    west = seen(rf"corridor-cam-west camera/onvif up rtsp_ok=true clock_drift_s=({NUMBER})")
    assert abs(float(east[1])) < 5
    assert abs(float(west[1]) - CAMERA_DRIFT_S) < 5
    devices = 8
    if (missing := ble_unavailable()) is None:
        seen(rf"staff-room-thermo sensor/ble up temperature={NUMBER} humidity={NUMBER} rssi=-\d+")
        devices += 1
    else:
        seen(re.escape(f"BLE thermometer left out: {missing}"))
    seen(rf"gateway demo-school/gw-main online: \d+ readings received, {devices} of {devices} ")

    # What IT staff would look at: the inventory holds every connection form, and the config
    # the gateway applied has every device, the projectors with their longer time limit.
    inventory = (workdir / "inventory.csv").read_text()
    for form in ("modbus-tcp://", f"pjlink://:{PROJECTOR_PASSWORD}@", "mqtt://", "onvif://"):
        assert form in inventory
    applied = json.loads((workdir / "agent-config.applied.json").read_text())["body"]["devices"]
    assert len(applied) == devices
    timeouts = {d["id"]: d.get("timeout_s") for d in applied}
    assert timeouts["room-101-projector"] == timeouts["room-102-projector"] == 10
    assert timeouts["room-101-env"] != 10


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_without_the_ble_tools_the_demo_runs_without_the_thermometer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    why = "dbus-daemon is not installed (Debian package 'dbus')"
    monkeypatch.setattr(demo_module, "ble_unavailable", lambda: why)
    demo = Demo(tmp_path / "demo", rooms=1)
    demo.run(duration=15, plain=True)
    out = capsys.readouterr().out
    note = [line for line in out.splitlines() if "BLE thermometer" in line]
    assert note == [f"BLE thermometer left out: {why}; the rest of the demo runs"], out
    assert "staff-room-thermo" not in out
    assert re.search(r"room-101-env sensor/modbus up temperature=", out), out
    assert "every process stopped" in out
    scenario = yaml.safe_load((tmp_path / "demo" / "scenario.yaml").read_text())
    assert "ble_sensors" not in scenario and "ble_workdir" not in scenario
    assert "ble://" not in (tmp_path / "demo" / "inventory.csv").read_text()
    assert all(p.poll() is not None for p in demo.processes.values())
    assert demo.broker.process is None


def test_a_long_workdir_puts_the_bus_socket_in_a_short_temp_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(demo_module, "ble_unavailable", lambda: None)
    short = Demo(tmp_path / "d")
    short.choose_ble_dir()
    assert short.bus_address == f"unix:path={tmp_path / 'd' / 'ble' / 'system_bus_socket'}"

    deep = Demo(tmp_path / ("x" * 60) / ("y" * 60))
    deep.choose_ble_dir()
    assert deep.ble_dir is not None and deep.ble_dir.name.startswith("campus-ble-")
    assert len(str(deep.ble_dir / "system_bus_socket")) <= 100
    assert deep.bus_address == f"unix:path={deep.ble_dir / 'system_bus_socket'}"
    deep.stop()  # nothing was started: it only removes the folder it made
    assert not deep.ble_dir.exists()


def test_ble_unavailable_names_the_missing_piece(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "dbusmock" else real(name, *a),
    )
    why = ble_unavailable()
    assert why is not None and why.startswith("python-dbusmock is not installed")


def test_the_school_is_a_valid_scenario_inventory_and_agent_config(tmp_path: Path) -> None:
    school = plan_school(3, list(range(20_000, 20_010)), 1883, tmp_path / "ble")
    scenario = Scenario.model_validate(school.scenario)
    assert [len(scenario.devices), len(scenario.projectors), len(scenario.boards)] == [3, 3, 3]
    assert [p.password for p in scenario.projectors] == [None, PROJECTOR_PASSWORD, None]
    assert [c.clock_offset_s for c in scenario.cameras] == [0.0, CAMERA_DRIFT_S]
    assert "wrong_clock" in scenario.cameras[1].modes
    assert [s.id for s in scenario.ble_sensors] == ["staff-room-thermo"]
    assert set(scenario.ids) == {d.id for d in school.devices}
    kinds = {(d.kind, d.protocol) for d in school.devices}
    assert kinds == {
        ("sensor", "modbus"),
        ("display", "pjlink"),
        ("board", "mqtt"),
        ("camera", "onvif"),
        ("sensor", "ble"),
    }
    for device in school.devices:
        config = DeviceConfig.model_validate(
            {"id": device.id, "profile": device.profile, "connection": device.connection}
        )
        # The inventory's URL reads back as the very connection the agent file has.
        url = connection_url(device.connection)
        assert parse_connection_url(url) == config.connection.model_dump(exclude_unset=True)

    without_ble = plan_school(1, list(range(20_000, 20_006)), 1883, None)
    assert "ble_sensors" not in without_ble.scenario
    assert [d.protocol for d in without_ble.devices].count("ble") == 0


def test_health_says_how_each_kind_is() -> None:
    def device(kind: str, protocol: str) -> DemoDevice:
        return DemoDevice("d", "r", kind, protocol, "p", {})

    camera = device("camera", "onvif")
    drifting = {"rtsp_ok": 1, "clock_drift_s": 95.2, "clock_mode": "Manual"}
    assert health(camera, drifting).plain == "rtsp ok · clock +95 s (Manual)"
    assert health(camera, {"rtsp_ok": 0, "clock_drift_s": 0.2}).plain == "rtsp FAILED · clock +0 s"
    assert plain_values(camera, drifting) == "rtsp_ok=true clock_drift_s=95.2"
    board = device("board", "mqtt")
    shown = {"screen": 1, "notice_active": 1, "notice_text": "Fire drill"}
    assert health(board, shown).plain == "screen on · “Fire drill”"
    assert health(board, {"screen": 0, "notice_active": 0}).plain == "screen off · no notice"
    assert plain_values(board, shown) == ('screen=true notice_active=true notice_text="Fire drill"')
    projector = device("display", "pjlink")
    lit = {"power": "on", "lamp_hours": 1200, "errors": "lamp"}
    assert health(projector, lit).plain == "on · lamp 1200 h · errors: lamp"
    thermo = device("sensor", "ble")
    heard = {"temperature": 21.37, "humidity": 48.0, "rssi": -64, "battery": 87}
    assert health(thermo, heard).plain == "rssi -64 dBm · battery 87 %"
    assert health(thermo, heard, readings=True).plain.startswith("21.4 °C · 48 %RH · rssi")
    assert plain_values(thermo, heard) == "temperature=21.4 humidity=48.0 rssi=-64"
    env = device("sensor", "modbus")
    assert health(env, {"temperature": 21.0, "co2": 612}, readings=True).plain == (
        "21.0 °C · CO2 612 ppm"
    )


def test_a_failing_fleet_command_stops_the_demo_with_its_name(tmp_path: Path) -> None:
    demo = Demo(tmp_path / "demo")
    demo.workdir.mkdir()
    with pytest.raises(DemoError, match=r"campus-fleet settings set site:nowhere .* exited with 2"):
        demo.fleet_cli("settings", "set", "site:nowhere", str(tmp_path / "missing.yaml"))
    assert "missing.yaml" in (demo.workdir / "fleet-cli.log").read_text()
    # A failure in the set-up thread surfaces at the main loop's next check.
    demo.setup_error = DemoError("campus-fleet config push all --no-wait exited with 1")
    with pytest.raises(DemoError, match="setting up the fleet failed: campus-fleet config push"):
        demo.check_alive()
