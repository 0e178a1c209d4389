"""A simulated building of projectors, e-class boards and cameras, all real processes: a private
Mosquitto, `campus-sim run`, `campus-fleet serve` and one `campus-agent run` that gets its
devices from a signed config the fleet pushes.

The registry is filled through the CLI (site, building, rooms, an enrolled gateway, one
`device add` per device with a pjlink://, onvif:// or mqtt:// URL). Checked: every device is up
in `devices list` with its health points; a projector switched on through `campus-fleet cmd`
warms up; a notice reaches both boards and shows in their state; a bad option sends nothing;
the lamp alarm shows as an agent event and as a fleet alert; a camera nobody answers for is down,
with the reason in the events.
"""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from simulator.broker import MosquittoBroker, free_ports
from tests.conftest import BIN, wait_for
from tests.fleet_campus import Campus

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

GATEWAY = "gw-a"
PROJECTOR = "a101-proj"  # class 2, password, lamp past its alarm threshold (3500 h)
PANEL = "a201-panel"  # class 1 flat panel, no password
CAMERA = "hall-cam"  # healthy
DRIFTING = "yard-cam"  # wrong clock, old firmware
DEAD = "gate-cam"  # nothing listens at its address
BOARDS = ("a101-board", "a201-board")
PROJECTOR_PASSWORD = "s3cret"
CAMERA_PASSWORD = "camp4ss"
LAMP_HOURS = 3620
CLOCK_OFFSET_S = 90.0
NOTICE = "Fire drill at 10:00"
ERROR_POINTS = (
    *("error.fan", "error.lamp", "error.temperature", "error.cover", "error.filter"),
    "error.other",
)


def _scenario(ports: list[int], broker: MosquittoBroker, site: str) -> dict[str, Any]:
    proj, panel, cam_http, cam_rtsp, yard_http, yard_rtsp = ports[:6]
    return {
        "name": "building",
        "time_scale": 1,
        "projectors": [
            {
                "id": PROJECTOR,
                "port": proj,
                "password": PROJECTOR_PASSWORD,
                "pjlink_class": 2,
                "name": "A101 projector",
                "lamp_hours": LAMP_HOURS,
                "filter_hours": 400,
                "warm_up_s": 2,
                "cool_down_s": 2,
            },
            {
                "id": PANEL,
                "port": panel,
                "pjlink_class": 1,
                "name": "A201 panel",
                "product": "FP-65",
                "lamps": 0,
                "filter_hours": None,
                "power": "on",
                "warm_up_s": 0,
            },
        ],
        "cameras": [
            {
                "id": CAMERA,
                "http_port": cam_http,
                "rtsp_port": cam_rtsp,
                "password": CAMERA_PASSWORD,
            },
            {
                "id": DRIFTING,
                "http_port": yard_http,
                "rtsp_port": yard_rtsp,
                "password": CAMERA_PASSWORD,
                "clock_offset_s": CLOCK_OFFSET_S,
                "modes": ["wrong_clock", "old_firmware"],
            },
        ],
        "boards": [
            {
                "id": board,
                "topic": f"eclass/{site}/{board}",
                "broker_host": "127.0.0.1",
                "broker_port": broker.port,
                "interval_s": 2,
                "storage_free_mb": 9000 + 1000 * index,
                "app_version": f"4.2.{index}",
                "seed": index,
            }
            for index, board in enumerate(BOARDS)
        ],
    }


def _connections(ports: list[int], broker: MosquittoBroker, site: str) -> dict[str, str]:
    proj, panel, cam_http, cam_rtsp, yard_http, yard_rtsp, dead_http, dead_rtsp = ports
    camera = f"onvif://admin:{CAMERA_PASSWORD}@127.0.0.1"
    return {
        PROJECTOR: f"pjlink://:{PROJECTOR_PASSWORD}@127.0.0.1:{proj}?timeout_s=3",
        PANEL: f"pjlink://127.0.0.1:{panel}?timeout_s=3",
        CAMERA: f"{camera}:{cam_http}?rtsp=rtsp://127.0.0.1:{cam_rtsp}/stream1&timeout_s=3",
        DRIFTING: f"{camera}:{yard_http}?rtsp=rtsp://127.0.0.1:{yard_rtsp}/stream1&timeout_s=3",
        DEAD: f"{camera}:{dead_http}?rtsp=rtsp://127.0.0.1:{dead_rtsp}/stream1&timeout_s=2",
        **{board: f"mqtt://127.0.0.1:{broker.port}/eclass/{site}/{board}" for board in BOARDS},
    }


DEVICES = [  # id, profile, room
    (PROJECTOR, "generic-pjlink-projector", "a-101"),
    (PANEL, "generic-pjlink-flat-panel", "a-201"),
    (CAMERA, "generic-onvif-camera", "a-101"),
    (DRIFTING, "generic-onvif-camera", "a-201"),
    (DEAD, "generic-onvif-camera", "a-201"),
    (BOARDS[0], "generic-android-eclass-board", "a-101"),
    (BOARDS[1], "generic-android-eclass-board", "a-201"),
]


@pytest.fixture(scope="module")
def building(tmp_path_factory: pytest.TempPathFactory, broker: MosquittoBroker) -> Iterator[Campus]:
    base = tmp_path_factory.mktemp("building")
    # The dead camera's ports are bound and never listened on: connections are refused, and
    # nothing else can take them while the module runs.
    closed = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(2)]
    for sock in closed:
        sock.bind(("127.0.0.1", 0))
    ports = [*free_ports(6), *(int(sock.getsockname()[1]) for sock in closed)]
    site = f"lycee-{ports[0]}"
    alerts = [
        {
            "id": "lamp-worn",
            "type": "threshold",
            "profiles": ["generic-pjlink-projector"],
            "point": "lamp_hours",
            "above": 3500,
        },
        {"id": "device-down", "type": "device_offline", "for_s": 1},
    ]
    try:
        with Campus(base, site, broker, command_timeout_s=10, alerts=alerts) as campus:
            agent = _fill_registry(campus, _connections(ports, broker, site))
            campus.start_sim(_scenario(ports, broker, site))
            campus.start_fleet()
            campus.start_agent(agent)
            campus.wait_online([GATEWAY])
            campus.push_and_wait_applied([GATEWAY])
            yield campus
    finally:
        for sock in closed:
            sock.close()


def _fill_registry(campus: Campus, connections: dict[str, str]) -> Path:
    """The registry of the building, as IT staff fill it; the gateway's agent.yaml."""
    campus.ok("keys", "generate")
    campus.ok("site", "add", campus.site, "--name", "Lycée du test")
    campus.ok("building", "add", "a", "--site", campus.site, "--name", "Bâtiment A")
    for room in ("a-101", "a-201"):
        campus.ok("room", "add", room, "--site", campus.site, "--building", "a")
    agent = campus.enroll(GATEWAY, room="a-101")
    for device, profile, room in DEVICES:
        campus.add_device(
            device, profile, connections[device],
            gateway=GATEWAY, room=room, interval_s=2, timeout_s=10,
        )  # fmt: skip
    return agent


HEALTH_POINTS = {
    PROJECTOR: {"power", "lamp_hours", "filter_hours", "errors", *ERROR_POINTS},
    PANEL: {"power", "input", "errors", "error.fan", "error.temperature", "error.other"},
    CAMERA: {"rtsp_ok", "onvif_ok", "clock_drift_s", "firmware", "firmware_outdated"},
    DRIFTING: {"rtsp_ok", "onvif_ok", "clock_drift_s", "firmware", "firmware_outdated"},
    **{
        board: {"screen", "app_version", "storage_free", "temperature", "notice_active"}
        for board in BOARDS
    },
}


def test_every_device_is_up_with_its_health_points(building: Campus) -> None:
    devices = wait_for(
        lambda: building.devices_up_with(HEALTH_POINTS), 30, what="every device up with its points"
    )
    assert set(devices) == {device for device, _, _ in DEVICES}
    for device, profile, _ in DEVICES:
        assert devices[device]["profile"] == profile
        assert devices[device]["gateway"] == GATEWAY
    kinds = {device: entry["kind"] for device, entry in devices.items()}
    assert kinds == {
        PROJECTOR: "display",
        PANEL: "display",
        CAMERA: "camera",
        DRIFTING: "camera",
        DEAD: "camera",
        BOARDS[0]: "board",
        BOARDS[1]: "board",
    }

    def values(device: str) -> dict[str, Any]:
        return {p["point"]: p["value"] for p in devices[device]["points"]}

    projector = values(PROJECTOR)
    assert projector["power"] in ("standby", "warming", "on")  # a test may have switched it on
    assert LAMP_HOURS <= projector["lamp_hours"] <= LAMP_HOURS + 1
    assert projector["filter_hours"] == 400
    assert projector["errors"] == "ok"
    assert all(projector[point] == 0 for point in ERROR_POINTS)
    assert (projector["name"], projector["pjlink_class"]) == ("A101 projector", 2)
    units = {p["point"]: p["unit"] for p in devices[PROJECTOR]["points"]}
    assert units["lamp_hours"] == "h"

    panel = values(PANEL)
    assert (panel["power"], panel["input"], panel["errors"]) == ("on", "31", "ok")
    assert panel["product"] == "FP-65"
    assert not {"lamp_hours", "filter_hours"} & set(panel)  # a panel has no lamp

    healthy, drifting = values(CAMERA), values(DRIFTING)
    for camera in (healthy, drifting):
        assert camera["rtsp_ok"] is True and camera["onvif_ok"] is True
        assert camera["rtsp_status"] == "200 OK" and camera["rtsp_tracks"] == 2
    assert abs(healthy["clock_drift_s"]) <= 1.5
    assert abs(drifting["clock_drift_s"] - CLOCK_OFFSET_S) <= 1.5
    assert healthy["firmware_outdated"] is False and healthy["firmware_known_good"] is True
    assert drifting["firmware_outdated"] is True and drifting["firmware"].startswith("V5.4.0")

    for index, board in enumerate(BOARDS):
        state = values(board)
        assert state["screen"] is True
        assert state["app_version"] == f"4.2.{index}"
        assert 8000 + 1000 * index < state["storage_free"] <= 9000 + 1000 * index
        assert 20 < state["temperature"] < 75
        units = {p["point"]: p["unit"] for p in devices[board]["points"]}
        assert units["storage_free"] == "MB"

    assert devices[DEAD]["availability"] == "down"


def test_the_table_lists_every_device(building: Campus) -> None:
    wait_for(lambda: building.devices_up_with(HEALTH_POINTS), 30, what="every device up")
    # As on an IT staff member's terminal (rich cuts cells to fit 80 columns when piped).
    command = [str(BIN / "campus-fleet"), "--config", str(building.config), "devices", "list"]
    result = subprocess.run(
        [*command, "--points"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert result.returncode == 0, result.stderr
    assert f"Devices ({len(DEVICES)})" in result.stdout
    listing, _, points = result.stdout.partition("Latest points")
    # 8 columns and a reason column, since the dead camera is down; its reason may wrap onto
    # lines of their own (the device cell empty).
    assert "┃ reason" in listing, result.stdout
    rows = {
        cells[3].strip(): line
        for line in listing.splitlines()
        if len(cells := line.split("│")) == 10 and cells[3].strip()
    }
    assert set(rows) == {device for device, _, _ in DEVICES}, result.stdout
    for device, profile, _ in DEVICES:
        assert profile in rows[device]
        assert ("down" if device == DEAD else "up") in rows[device]
    for shown in (f"{LAMP_HOURS} h", "clock_drift_s", "rtsp_ok", "storage_free", "app_version"):
        assert shown in points, shown
    # Piped at the default width the table still lists every device, one row each.
    narrow = building.cli("devices", "list")
    assert narrow.returncode == 0, narrow.stderr
    assert f"Devices ({len(DEVICES)})" in narrow.stdout
    assert sum(GATEWAY in line for line in narrow.stdout.splitlines()) == len(DEVICES)


def test_a_projector_switched_on_warms_up(building: Campus) -> None:
    wait_for(lambda: building.devices_up_with({PROJECTOR: {"power"}}), 30, what="projector up")
    result = building.json("cmd", PROJECTOR, "power_on")
    (answer,) = result["results"]
    assert (answer["device"], answer["status"]) == (PROJECTOR, "ok"), answer
    # What the projector answered, as the gateway reports it: it took POWR 1 and warms up.
    assert answer["result"]["sent"] == "POWR 1", answer
    assert answer["result"]["power"] in ("warming", "on"), answer
    wait_for(
        lambda: building.points(PROJECTOR)["power"] in ("warming", "on"),
        15,
        what="projector warming or on",
    )
    # Warm-up takes 2 s: then it is on, and input and mute are read again.
    points = wait_for(
        lambda: (p := building.points(PROJECTOR))["power"] == "on" and "input" in p and p,
        20,
        what="projector on",
    )
    assert points["input"] == "31" and points["video_mute"] is False
    shown = building.json("commands", "show", result["batch"])
    assert [(r["device"], r["status"]) for r in shown["results"]] == [(PROJECTOR, "ok")]


def test_a_notice_reaches_every_board(building: Campus) -> None:
    wait_for(
        lambda: building.devices_up_with({board: {"notice_active"} for board in BOARDS}),
        30,
        what="boards up",
    )
    result = building.json(
        "cmd", "--kind", "board", "--site", building.site, "notice", NOTICE, "--minutes", "10"
    )
    answers = {r["device"]: r for r in result["results"]}
    assert set(answers) == set(BOARDS)
    for answer in answers.values():
        assert answer["status"] == "ok", answer
        assert answer["options"] == {"minutes": 10}  # typed from the profile, not "10"
        assert answer["result"]["notice"] == {"text": NOTICE, "minutes": 10}, answer

    def shown() -> bool:
        for board in BOARDS:
            points = building.points(board)
            if not (points["notice_active"] is True and points["notice_text"] == NOTICE):
                return False
        return True

    wait_for(shown, 15, what="the notice in both boards' state")
    batch = next(b for b in building.json("commands", "list") if b["batch"] == result["batch"])
    assert (batch["action"], batch["devices"], batch["ok"]) == ("notice", 2, 2)


@pytest.mark.parametrize(
    ("option", "message"),
    [(("--minutes", "0"), "minutes"), (("--colour", "red"), "colour")],
)
def test_a_bad_option_sends_nothing(
    building: Campus, option: tuple[str, str], message: str
) -> None:
    before = len(building.json("commands", "list"))
    result = building.cli(
        "cmd", "--kind", "board", "--site", building.site, "notice", NOTICE, *option
    )
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert message in result.stderr and "nothing sent" in result.stderr, result.stderr
    assert "generic-android-eclass-board" in result.stderr
    assert len(building.json("commands", "list")) == before
    refusal = building.json("audit", "--action", "cmd")[-1]
    assert refusal["result"].startswith("error:") and message in refusal["result"]


def test_the_lamp_alarm_shows_in_events_and_alerts(building: Campus) -> None:
    def alarm() -> dict[str, Any] | None:
        return next(
            (
                e
                for e in building.events()
                if e["kind"] == "alarm"
                and e["device"] == PROJECTOR
                and e["data"].get("point") == "lamp_hours"
            ),
            None,
        )

    event = wait_for(alarm, 30, what="the agent's lamp alarm event")
    assert event["data"]["state"] == "raised" and event["data"]["high"] == 3500
    assert "lamp_hours" in event["message"] and "above 3500" in event["message"]
    # The fleet's own rule on lamp_hours raises an alert from the readings.
    alert = wait_for(
        lambda: next(
            (
                a
                for a in building.json("alerts", "--open", "--site", building.site)
                if a["rule"] == "lamp-worn"
            ),
            None,
        ),
        30,
        what="the lamp-worn alert",
    )
    assert (alert["device"], alert["point"], alert["state"]) == (PROJECTOR, "lamp_hours", "open")
    assert LAMP_HOURS <= alert["value"] <= LAMP_HOURS + 1
    # The healthy camera raised nothing; the drifting one its clock alarm.
    alarms = {
        (e["device"], e["data"].get("point")) for e in building.events() if e["kind"] == "alarm"
    }
    assert (DRIFTING, "clock_drift_s") in alarms
    assert not any(device == CAMERA for device, _ in alarms)


def test_a_camera_nobody_answers_is_down_with_the_reason(building: Campus) -> None:
    dead = wait_for(
        lambda: (d := building.devices_with_points()[DEAD])["availability"] == "down" and d,
        30,
        what="gate-cam down",
    )
    assert dead["down_since"] is not None and dead["last_reading"] is None
    assert "camera unreachable" in dead["reason"] and "connection refused" in dead["reason"]
    assert dead["points"] == []
    (event,) = [e for e in building.events() if e["device"] == DEAD]
    assert event["kind"] == "device_down"
    assert "camera unreachable" in event["message"]
    assert "connection refused" in event["message"]
    alert = wait_for(
        lambda: next(
            (
                a
                for a in building.json("alerts", "--open", "--site", building.site)
                if a["rule"] == "device-down" and a["device"] == DEAD
            ),
            None,
        ),
        30,
        what="the device-down alert",
    )
    assert alert["state"] == "open"
    open_down = {
        a["device"]
        for a in building.json("alerts", "--open", "--site", building.site)
        if a["rule"] == "device-down"
    }
    assert open_down == {DEAD}
