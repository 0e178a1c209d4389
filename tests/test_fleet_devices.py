"""The fleet side of projectors, boards, cameras and BLE sensors: connection URLs of every
protocol, registry checks per protocol, command options checked before anything is sent and
published with the command, and `devices list` with every device's health points.

The registry and CLI parts run `campus-fleet` in this process through click's runner on a real
SQLite file, with small profiles of each protocol written here (independent of the shipped
ones). The published commands and the health points go through a private Mosquitto, a real
`campus-fleet serve` process, and a paho client standing in for the gateways.
"""

from __future__ import annotations

import json
import shlex
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from click.testing import CliRunner, Result
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from drivers.profiles import ProfileLibrary
from fleet.cli import main
from fleet.cli_control import CommandLineError, split_command_line
from fleet.commands import Commands, Target, check_command
from fleet.csv_import import (
    connection_url,
    mask_connection,
    parse_connection_url,
)
from fleet.registry import RegistryError, parse_connection
from fleet.store import Store
from simulator.broker import MosquittoBroker, free_port
from tests.conftest import Processes, run_cli, wait_for, write_yaml
from wire.control import CommandOutcome, CommandRequest, CommandResult
from wire.models import DeviceState, Event, EventKind, GatewayState, Status, TelemetryBatch, encode
from wire.topics import Channel, topic

BIND_KEY = "231d39c1d7cc1ab1aee224cd096db932"

# -- small profiles of each protocol -----------------------------------------------------------

PROFILES: dict[str, dict[str, Any]] = {
    "t-projector": {
        "vendor": "Test",
        "model": "Projector",
        "protocol": "pjlink",
        "kind": "display",
        "source": "test profile",
        "points": [
            {"name": "power", "query": "power"},
            {"name": "lamp_hours", "query": "lamp_hours", "unit": "h", "min": 0},
        ],
        "commands": [{"name": "power_on", "set": "POWR", "value": "1"}],
    },
    "t-board": {
        "vendor": "Test",
        "model": "Board",
        "protocol": "mqtt",
        "kind": "board",
        "source": "test profile",
        "online": {"status": {"topic": "status"}},
        "points": [
            {"name": "screen", "topic": "state", "path": "screen", "type": "bool"},
            {"name": "temperature", "topic": "state", "path": "temp", "unit": "degC"},
        ],
        "commands": [
            {
                "name": "notice",
                "topic": "cmd",
                "argument": {"type": "text", "max_length": 40},
                "options": {
                    "minutes": {"type": "int", "min": 1, "max": 1440, "default": 10},
                    "urgent": {"type": "bool", "default": False},
                },
                "payload": {"text": "{argument}", "minutes": "{minutes}", "urgent": "{urgent}"},
            },
            {
                "name": "beep",
                "topic": "cmd",
                "options": {"seconds": {"type": "float", "min": 0.1, "max": 5}},
                "payload": {"beep": "{seconds}"},
            },
        ],
    },
    "t-board-small": {
        "vendor": "Test",
        "model": "Small board",
        "protocol": "mqtt",
        "kind": "board",
        "source": "test profile",
        "online": {"status": {"topic": "status"}},
        "points": [{"name": "screen", "topic": "state", "path": "screen", "type": "bool"}],
        "commands": [
            {
                "name": "notice",
                "topic": "cmd",
                "argument": {"type": "text", "max_length": 40},
                "options": {"minutes": {"type": "int", "min": 1, "max": 60, "default": 10}},
                "payload": {"text": "{argument}", "minutes": "{minutes}"},
            }
        ],
    },
    "t-camera": {
        "vendor": "Test",
        "model": "Camera",
        "protocol": "onvif",
        "kind": "camera",
        "source": "test profile",
        "points": [
            {"name": "onvif_ok", "source": "onvif.ok", "type": "bool"},
            {"name": "rtsp_ok", "source": "rtsp.ok", "type": "bool"},
            {"name": "clock_drift", "source": "onvif.clock_drift_s", "unit": "s"},
        ],
    },
    "t-ble": {
        "vendor": "Test",
        "model": "Thermometer",
        "protocol": "ble",
        "kind": "sensor",
        "mode": "bthome",
        "source": "test profile",
        "points": [
            {"name": "temperature", "source": "temperature", "unit": "degC"},
            {"name": "battery", "source": "battery", "type": "int", "unit": "%"},
            {"name": "rssi", "source": "rssi", "type": "int", "unit": "dBm"},
        ],
    },
}


@pytest.fixture(scope="module")
def profiles_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("profiles")
    for name, profile in PROFILES.items():
        write_yaml(directory / f"{name}.yaml", profile)
    library = ProfileLibrary.load(directory)  # fails here, with the field, if a model moved
    assert set(library.profiles) == set(PROFILES)
    return directory


# -- connection URLs -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected", "canonical"),
    [
        ("pjlink://[fd00:10::21]", {"type": "pjlink", "host": "fd00:10::21"}, None),
        (
            "pjlink://:s3cret@10.1.2.21:4352?timeout_s=3",
            {
                "type": "pjlink",
                "host": "10.1.2.21",
                "port": 4352,
                "password": "s3cret",
                "timeout_s": 3.0,
            },
            None,
        ),
        (
            "PJLINK://:p%40ss%2Fw%3A@[FD00::21]:14352",
            {"type": "pjlink", "host": "fd00::21", "port": 14352, "password": "p@ss/w:"},
            "pjlink://:p%40ss%2Fw%3A@[fd00::21]:14352",
        ),
        ("mqtt:///eclass/board-101", {"type": "mqtt", "topic": "eclass/board-101"}, None),
        (
            "mqtts://board:s3cret@broker.example/eclass/board-101",
            {
                "type": "mqtt",
                "host": "broker.example",
                "port": 8883,
                "tls": True,
                "username": "board",
                "password": "s3cret",
                "topic": "eclass/board-101",
            },
            None,
        ),
        (
            "mqtt://u%40x@[fd00::1]:1884/school%2042/board?tls=1&timeout_s=2.5",
            {
                "type": "mqtt",
                "host": "fd00::1",
                "port": 1884,
                "tls": True,
                "username": "u@x",
                "topic": "school 42/board",
                "timeout_s": 2.5,
            },
            "mqtts://u%40x@[fd00::1]:1884/school%2042/board?timeout_s=2.5",
        ),
        (
            "mqtt://[fd00::1]/eclass/b?keepalive_s=60&mqtt_version=3.1.1",
            {
                "type": "mqtt",
                "host": "fd00::1",
                "topic": "eclass/b",
                "keepalive_s": 60,
                "mqtt_version": "3.1.1",
            },
            "mqtt://[fd00::1]/eclass/b?mqtt_version=3.1.1&keepalive_s=60",
        ),
        (
            "onvif://admin:s3cret@[fd00::30]?rtsp=rtsp://[fd00::30]:554/stream1",
            {
                "type": "onvif",
                "host": "fd00::30",
                "username": "admin",
                "password": "s3cret",
                "rtsp_url": "rtsp://[fd00::30]:554/stream1",
            },
            None,
        ),
        (
            "onvif://admin:pw@cam.lan:8080/onvif/device_service"
            "?rtsp=rtsp%3A%2F%2Fcam.lan%2Fs1%3Fch%3D1&https=1&verify_tls=0",
            {
                "type": "onvif",
                "host": "cam.lan",
                "port": 8080,
                "path": "/onvif/device_service",
                "username": "admin",
                "password": "pw",
                "rtsp_url": "rtsp://cam.lan/s1?ch=1",
                "https": True,
                "verify_tls": False,
            },
            "onvif://admin:pw@cam.lan:8080/onvif/device_service"
            "?rtsp=rtsp://cam.lan/s1%3Fch%3D1&https=1&verify_tls=0",
        ),
        (
            "onvif://10.0.0.30?https=1",
            {"type": "onvif", "host": "10.0.0.30", "port": 443, "https": True},
            None,
        ),
        (
            "ble://a4:c1:38:12:34:56",
            {"type": "ble", "address": "A4:C1:38:12:34:56"},
            "ble://A4:C1:38:12:34:56",
        ),
        (
            f"ble://A4-C1-38-12-34-56/?adapter=hci1&bind_key={BIND_KEY.upper()}&scan=active",
            {
                "type": "ble",
                "address": "A4:C1:38:12:34:56",
                "adapter": "hci1",
                "bind_key": BIND_KEY,
                "scan": "active",
            },
            f"ble://A4:C1:38:12:34:56?adapter=hci1&bind_key={BIND_KEY}&scan=active",
        ),
        (
            "modbus-tcp://[fd00::5]:1502?unit=3",
            {"type": "modbus-tcp", "host": "fd00::5", "port": 1502, "unit": 3},
            None,
        ),
    ],
)
def test_connection_urls_round_trip(
    url: str, expected: dict[str, Any], canonical: str | None
) -> None:
    parsed = parse_connection_url(url)
    assert parsed == expected
    connection = parse_connection(parsed)
    written = connection_url(connection)
    assert written == (canonical or url)
    assert parse_connection(parse_connection_url(written)) == connection


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("pjlink://admin:pw@proj", "PJLink has no user name"),
        ("pjlink://pw@proj", "pjlink://:PASSWORD@HOST"),
        ("pjlink://:@proj", "empty PJLink password"),
        ("pjlink://proj/x", "unexpected path '/x'"),
        ("pjlink://fd00::21", "an IPv6 address goes in brackets: pjlink://[fd00::5]:4352"),
        ("pjlink://proj?unit=1", "unknown option 'unit' for pjlink (options: timeout_s)"),
        ("pjlink://:" + "x" * 33 + "@proj", "pjlink.password: String should have at most 32"),
        ("mqtt://broker", "no base topic"),
        ("mqtt://broker/eclass/#", "'#' is a wildcard"),
        ("mqtt://broker/eclass/+/b", "has a wildcard (+ or #)"),
        ("mqtt://broker/eclass%23", "has a wildcard (+ or #)"),
        ("mqtt://broker/eclass/", "ends in '/'"),
        ("mqtts://broker/t?tls=0", "tls=0 contradicts it"),
        ("mqtt://:pw@broker/t", "an MQTT password needs a user name"),
        ("mqtt://:1884/t", "a port or a user needs a host"),
        ("mqtt://broker/t?tls=maybe", "tls='maybe' is not 1 or 0"),
        ("mqtt://broker/t?mqtt_version=4", "mqtt.mqtt_version: Input should be '5' or '3.1.1'"),
        ("onvif://:pw@cam", "an ONVIF password needs a user name"),
        ("onvif://cam?rtsp=http://cam/s", "must be an rtsp:// URL"),
        ("onvif:///onvif/device_service", "no host in onvif://"),
        ("onvif://[fd00::30", "Invalid IPv6 URL"),
        ("ble://A4:C1:38:12:34", "is not a Bluetooth address"),
        ("ble://A4:C1:38:12:34:5G", "is not a Bluetooth address"),
        ("ble://A4:C1:38:12:34:56/x", "is not a Bluetooth address"),
        ("ble://A4:C1:38:12:34:56?adapter=usb0", "is not a Bluetooth adapter"),
        ("ble://A4:C1:38:12:34:56?bind_key=1234", "32 hex digits (got 4 characters)"),
        ("ble://A4:C1:38:12:34:56?scan=loud", "ble.scan: Input should be 'passive' or 'active'"),
        ("ble://A4:C1:38:12:34:56?unit=1", "unknown option 'unit' for ble"),
        ("ble://A4:C1:38:12:34:56#x", "unexpected '#x'"),
        ("ftp://files", "unknown scheme 'ftp' (use modbus-tcp://"),
    ],
)
def test_bad_connection_urls_say_what_is_wrong(url: str, message: str) -> None:
    with pytest.raises((ValueError, RegistryError)) as caught:
        parse_connection(parse_connection_url(url))
    assert message in str(caught.value)


@pytest.mark.parametrize(
    "url",
    [
        "pjlink://:Sup3rS3cret@[fd00::21]:99999",
        "onvif://admin:Sup3rS3cret@[fd00::30",
        "mqtt://user:Sup3rS3cret@:1884/t",
        "onvif://admin:Sup3rS3cret@",
    ],
)
def test_errors_never_repeat_a_password(url: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_connection_url(url)
    assert "Sup3rS3cret" not in str(caught.value)


def test_masked_urls_and_connections_hide_every_secret() -> None:
    camera = parse_connection(
        parse_connection_url("onvif://admin:s3cret@cam?rtsp=rtsp%3A%2F%2Fviewer%3Av13w%40cam%2Fs1")
    )
    assert connection_url(camera, mask=True) == (
        "onvif://admin:***@cam?rtsp=rtsp://viewer:***@cam/s1"
    )
    masked = mask_connection(camera.model_dump(mode="json", exclude_unset=True))
    assert masked["password"] == "***" and masked["rtsp_url"] == "rtsp://viewer:***@cam/s1"
    sensor = parse_connection(parse_connection_url(f"ble://A4:C1:38:12:34:56?bind_key={BIND_KEY}"))
    assert connection_url(sensor, mask=True) == "ble://A4:C1:38:12:34:56?bind_key=***"
    board = parse_connection(parse_connection_url("mqtt://u:p%40ss@[fd00::1]/b"))
    assert connection_url(board, mask=True) == "mqtt://u:***@[fd00::1]/b"
    assert connection_url(board) == "mqtt://u:p%40ss@[fd00::1]/b"


# -- the registry through the CLI --------------------------------------------------------------


@dataclass
class Fleet:
    dir: Path
    config: Path

    @property
    def db(self) -> Path:
        return self.dir / "fleet.db"

    def run(self, *args: str) -> Result:
        """`args` are the words of a command, or one string of them (split like a shell)."""
        words = shlex.split(args[0]) if len(args) == 1 else list(args)
        runner = CliRunner(env={"CAMPUS_FLEET_ACTOR": "tester", "CAMPUS_FLEET_SITE": None})
        return runner.invoke(main, ["--config", str(self.config), *words], catch_exceptions=False)

    def ok(self, *args: str) -> str:
        result = self.run(*args)
        assert result.exit_code == 0, result.output
        return result.stdout

    def json(self, *args: str) -> Any:
        return json.loads(self.ok(*args, "--json"))

    def fails(self, code: int, *args: str) -> str:
        result = self.run(*args)
        assert result.exit_code == code, result.output
        return result.stderr


def make_fleet(folder: Path, profiles: Path, **extra: Any) -> Fleet:
    config = write_yaml(
        folder / "fleet.yaml",
        {
            "name": "fleet-devices",
            "database": "fleet.db",
            "signing_key": "keys/fleet-signing.key",
            "profiles_dir": str(profiles),
            "mqtt": {"host": "::1", "port": 1883},
            **extra,
        },
    )
    return Fleet(folder, config)


@pytest.fixture
def fleet(tmp_path: Path, profiles_dir: Path) -> Fleet:
    made = make_fleet(tmp_path, profiles_dir)
    made.ok("site", "add", "lycee")
    made.ok("building", "add", "bat-a")
    for room in ("r-101", "r-102"):
        made.ok("room", "add", room, "--building", "bat-a")
    made.ok("gateway", "add", "gw-a", "--room", "r-101")
    made.ok("gateway", "add", "gw-b", "--room", "r-102")
    return made


SCHEME_DEVICES = [
    ("proj-101", "t-projector", "pjlink://:Pr0jPass@[fd00:10::21]", "display"),
    ("board-101", "t-board", "mqtt:///eclass/board-101", "board"),
    ("board-ext", "t-board", "mqtts://mdm:B0ardPass@[fd00::1]/eclass/ext", "board"),
    (
        "cam-hall",
        "t-camera",
        "onvif://admin:C4mPass@[fd00::30]?rtsp=rtsp://[fd00::30]/s1",
        "camera",
    ),
    ("th-101", "t-ble", f"ble://A4:C1:38:12:34:56?bind_key={BIND_KEY}", "sensor"),
]
SECRETS = ("Pr0jPass", "B0ardPass", "C4mPass", BIND_KEY)


def test_device_add_with_every_scheme_masks_secrets_when_shown(fleet: Fleet) -> None:
    for device, profile, url, _kind in SCHEME_DEVICES:
        added = fleet.json(
            "device", "add", device, "--gateway", "gw-a", "--profile", profile,
            "--connection", url,
        )  # fmt: skip
        assert not any(secret in json.dumps(added) for secret in SECRETS)
    listed = fleet.json("device", "list")
    assert {(d["device"], d["profile"], d["kind"]) for d in listed} == {
        (device, profile, kind) for device, profile, _url, kind in SCHEME_DEVICES
    }
    everything = json.dumps(listed) + fleet.ok("device", "list")
    assert not any(secret in everything for secret in SECRETS)
    by_id = {d["device"]: d for d in listed}
    assert by_id["proj-101"]["connection_url"] == "pjlink://:***@[fd00:10::21]"
    assert by_id["proj-101"]["connection"] == {
        "type": "pjlink",
        "host": "fd00:10::21",
        "password": "***",
    }
    assert by_id["th-101"]["connection_url"] == "ble://A4:C1:38:12:34:56?bind_key=***"
    assert by_id["board-101"]["connection"] == {"type": "mqtt", "topic": "eclass/board-101"}
    # --show-secrets shows what is stored, as given.
    for device, _profile, url, _kind in SCHEME_DEVICES:
        shown = fleet.json("device", "show", device, "--show-secrets")
        assert parse_connection(parse_connection_url(shown["connection_url"])) == parse_connection(
            parse_connection_url(url)
        )
    assert "Pr0jPass" in fleet.ok("device", "show", "proj-101", "--show-secrets")
    assert "Pr0jPass" not in fleet.ok("device", "show", "proj-101")
    # The audit log keeps the URL, without its password.
    audit = json.dumps(fleet.json("audit", "--action", "device.add"))
    assert "pjlink://:***@[fd00:10::21]" in audit
    assert not any(secret in audit for secret in ("Pr0jPass", "B0ardPass", "C4mPass"))
    # The desired config of the gateway carries every connection as the driver needs it.
    config = fleet.json("config", "show", "gateway:lycee/gw-a")["config"]
    connections = {d["id"]: d["connection"] for d in config["devices"]}
    assert connections["proj-101"]["password"] == "Pr0jPass"
    assert connections["board-ext"]["tls"] is True and connections["board-ext"]["port"] == 8883


def test_device_add_refuses_a_scheme_of_another_protocol(fleet: Fleet) -> None:
    error = fleet.fails(
        2, "device", "add", "x", "--gateway", "gw-a", "--profile", "t-board",
        "--connection", "pjlink://[fd00::9]",
    )  # fmt: skip
    assert "profile t-board speaks mqtt, connection is pjlink" in error
    error = fleet.fails(
        2, "device", "add", "x", "--gateway", "gw-a", "--profile", "t-ble",
        "--connection", "ble://A4:C1:38:12:34",
    )  # fmt: skip
    assert "--connection: 'A4:C1:38:12:34' is not a Bluetooth address" in error


@pytest.mark.parametrize(
    ("profile", "first", "second", "message"),
    [
        (
            "t-projector",
            "pjlink://[fd00:10::21]",
            "pjlink://:other@[FD00:10:0::21]:4352",
            "PJLink endpoint [fd00:10:0::21]:4352 is device d1 already",
        ),
        (
            "t-camera",
            "onvif://cam.lan",
            "onvif://admin:pw@CAM.LAN:80/other",
            "ONVIF endpoint cam.lan:80 is device d1 already",
        ),
        (
            "t-ble",
            "ble://A4:C1:38:12:34:56",
            "ble://a4-c1-38-12-34-56?adapter=hci1",
            "BLE address A4:C1:38:12:34:56 is device d1 already",
        ),
        (
            "t-board",
            "mqtt:///eclass/b-1",
            "mqtt://localhost:1883/eclass/b-1",
            "MQTT base topic 'eclass/b-1' on broker localhost:1883 is device d1 already",
        ),
    ],
)
def test_one_gateway_refuses_two_devices_at_one_endpoint(
    fleet: Fleet, profile: str, first: str, second: str, message: str
) -> None:
    add = "device add {} --gateway {} --profile " + profile + " --connection {}"
    fleet.ok(*shlex.split(add.format("d1", "gw-a", shlex.quote(first))))
    error = fleet.fails(2, *shlex.split(add.format("d2", "gw-a", shlex.quote(second))))
    assert f"device 'd2' on gateway 'gw-a': {message}" in error
    fleet.ok(*shlex.split(add.format("d2", "gw-b", shlex.quote(second))))  # another gateway
    error = fleet.fails(2, "device", "move", "d2", "--gateway", "gw-a")
    assert message in error


def test_devices_at_distinct_endpoints_share_a_gateway(fleet: Fleet) -> None:
    for device, profile, url in [
        ("p1", "t-projector", "pjlink://[fd00::21]"),
        ("p2", "t-projector", "pjlink://[fd00::21]:4353"),  # a second display behind one host
        ("c1", "t-camera", "onvif://[fd00::21]:8080"),
        ("b1", "t-board", "mqtt:///eclass/b-1"),
        ("b2", "t-board", "mqtt:///eclass/b-2"),
        ("b3", "t-board", "mqtt://[fd00::1]/eclass/b-1"),  # same topic, another broker
        ("s1", "t-ble", "ble://A4:C1:38:12:34:56"),
        ("s2", "t-ble", "ble://A4:C1:38:12:34:57"),
    ]:
        fleet.ok("device", "add", device, "--gateway", "gw-a", "--profile", profile,
                 "--connection", url)  # fmt: skip
    assert len(fleet.json("device", "list", "--gateway", "gw-a")) == 8


def test_inventory_import_takes_every_scheme_and_names_conflicting_lines(
    fleet: Fleet, tmp_path: Path
) -> None:
    rows = [
        "site;room;gateway;device;profile;connection",
        "lycee;r-101;gw-a;proj-101;t-projector;pjlink://:Pr0jPass@[fd00:10::21]",
        "lycee;r-101;gw-a;board-101;t-board;mqtt:///eclass/board-101",
        "lycee;r-101;gw-a;cam-101;t-camera;onvif://admin:C4mPass@[fd00::30]?https=1",
        f"lycee;r-101;gw-a;th-101;t-ble;ble://A4:C1:38:12:34:56?bind_key={BIND_KEY}",
    ]
    good = tmp_path / "good.csv"
    good.write_text("\n".join(rows) + "\n")
    assert fleet.json("import", str(good))["counts"]["devices"]["created"] == 4
    assert fleet.json("import", str(good))["changed"] is False  # the same file again
    shown = fleet.json("device", "show", "cam-101", "--show-secrets")
    assert shown["connection"]["port"] == 443
    bad = tmp_path / "bad.csv"
    bad.write_text(
        "\n".join(
            [
                rows[0],
                "lycee;r-101;gw-a;proj-102;t-projector;pjlink://[fd00:10::21]",
                "lycee;r-101;gw-a;th-102;t-ble;ble://a4:c1:38:12:34:56",
                "lycee;r-101;gw-a;board-102;t-board;mqtt://broker/eclass/#",
            ]
        )
        + "\n"
    )
    error = fleet.fails(2, "import", str(bad))
    assert f"{bad}:2: connection: on gateway 'gw-a': PJLink endpoint" in error
    assert "is device proj-101 already" in error
    assert f"{bad}:3: connection: on gateway 'gw-a': BLE address" in error
    assert f"{bad}:4: connection: '#' is a wildcard" in error
    assert "3 problems, nothing imported" in error


# -- command options ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("words", "site", "pairs", "expected"),
    [
        (
            ["notice", "Fire drill at 10:00", "--minutes", "10"],
            "lycee",
            [],
            ("site:lycee", "notice", "Fire drill at 10:00", {"minutes": "10"}),
        ),
        (
            ["room:lycee/r-101", "notice", "--minutes=5", "Hello", "--urgent"],
            None,
            [],
            ("room:lycee/r-101", "notice", "Hello", {"minutes": "5", "urgent": "true"}),
        ),
        (
            ["board-101", "set_offset", "-5", "--step", "-1"],
            None,
            ["timeout=3"],
            ("board-101", "set_offset", "-5", {"step": "-1", "timeout": "3"}),
        ),
        (["board-101", "reboot"], None, [], ("board-101", "reboot", None, {})),
    ],
)
def test_split_command_line(
    words: list[str], site: str | None, pairs: list[str], expected: tuple[Any, ...]
) -> None:
    assert split_command_line(words, site, pairs) == expected


@pytest.mark.parametrize(
    ("words", "site", "message"),
    [
        ([], "lycee", "missing ACTION"),
        ([], None, "missing SELECTOR and ACTION"),
        (["site:lycee", "notice", "x"], "lycee", "give SELECTOR (site:lycee) or --site, not both"),
        (["b", "notice", "Fire", "drill"], None, "unexpected 'drill' after ARGUMENT 'Fire'"),
        (["b", "notice", "--Minutes", "3"], None, "'--Minutes' is not an option name"),
        (["b", "notice", "--m", "3", "--m=4"], None, "option --m is given twice"),
    ],
)
def test_split_command_line_refuses(words: list[str], site: str | None, message: str) -> None:
    with pytest.raises(CommandLineError) as caught:
        split_command_line(words, site)
    assert message in str(caught.value)


def test_check_command_types_options_every_profile_agrees_on(profiles_dir: Path) -> None:
    library = ProfileLibrary.load(profiles_dir)
    boards = [Target("s", "gw", "b1", "t-board"), Target("s", "gw", "b2", "t-board-small")]
    sent, problems = check_command(library, boards, "notice", "Hi", {"minutes": "10"})
    assert (sent, problems) == ({"minutes": 10}, [])
    sent, problems = check_command(library, boards[:1], "notice", "Hi", {"urgent": "on"})
    assert (sent, problems) == ({"urgent": True}, [])
    sent, problems = check_command(library, boards, "notice", "Hi", {"minutes": "90"})
    assert problems == ["profile t-board-small (b2): --minutes: 90 is above the maximum 60"]
    # A device whose profile lacks the action is not checked: `queue` answers unknown_action.
    projector = [Target("s", "gw", "p1", "t-projector")]
    assert check_command(library, projector, "notice", None, {"x": "1"}) == ({"x": "1"}, [])


def test_cmd_checks_arguments_and_options_before_anything_is_sent(fleet: Fleet) -> None:
    for device, profile, url in [
        ("board-101", "t-board", "mqtt:///eclass/board-101"),
        ("board-102", "t-board-small", "mqtt:///eclass/board-102"),
        ("proj-101", "t-projector", "pjlink://[fd00:10::21]"),
    ]:
        fleet.ok("device", "add", device, "--gateway", "gw-a", "--profile", profile,
                 "--connection", url)  # fmt: skip
    cases = [
        (
            '--kind board --site lycee notice "Fire drill" --colour red',
            "command 'notice' has no option colour (options: --minutes, --urgent)",
        ),
        (
            'board-101 notice "Fire drill" --minutes 2000',
            "profile t-board (board-101): --minutes: 2000 is above the maximum 1440",
        ),
        ('board-101 notice "Fire drill" --minutes ten', "--minutes: 'ten' is not an integer"),
        ('board-101 notice "Fire drill" --urgent maybe', "--urgent: 'maybe' is not on/off"),
        ("board-101 beep", "command 'beep' needs --seconds (float)"),
        ("board-101 notice", "argument: command 'notice' needs an argument (text)"),
        (
            "board-101 notice " + "x" * 41,
            "argument: the text has 41 characters, at most 40",
        ),
        (
            '--site lycee --kind board notice "Fire drill" --minutes 90',
            "profile t-board-small (board-102): --minutes: 90 is above the maximum 60",
        ),
    ]
    for line, message in cases:
        error = fleet.fails(2, "cmd", *shlex.split(line))
        assert message in error, (line, error)
        assert "nothing sent" in error
    assert sqlite3.connect(fleet.db).execute("SELECT count(*) FROM commands").fetchone() == (0,)
    refused = fleet.json("audit", "--action", "cmd")
    assert len(refused) == len(cases)
    assert all(entry["result"].startswith("error: profile t-board") for entry in refused)
    # A command that fits every profile passes the checks; only the missing service stops it.
    error = fleet.fails(
        1, "cmd", "--kind", "board", "--site", "lycee", "notice", "Fire drill", "--minutes", "10"
    )
    assert "no 'campus-fleet serve' is running" in error


def test_an_old_database_gets_the_options_column(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    old = sqlite3.connect(path)
    old.execute(
        "CREATE TABLE commands (id TEXT PRIMARY KEY, batch TEXT, site TEXT, gateway TEXT, "
        "device TEXT, action TEXT, argument TEXT, actor TEXT, status TEXT, result TEXT, "
        "error TEXT, created_ns INTEGER, deadline_ns INTEGER, sent_ns INTEGER, done_ns INTEGER)"
    )
    now = time.time_ns()
    old.execute(
        "INSERT INTO commands VALUES ('c1', 'b1', 's', 'gw', 'd', 'power_on', 'null', 'me', "
        "'pending', NULL, NULL, ?, ?, NULL, NULL)",
        (now, now + 10**10),
    )
    old.commit()
    old.close()
    store = Store(path)
    columns = {row[1] for row in store.conn.execute("PRAGMA table_info(commands)")}
    assert "options" in columns
    ((site, gateway, request),) = Commands(store).pending()
    assert (site, gateway, request.action, request.options) == ("s", "gw", "power_on", {})


# -- through a real broker and `campus-fleet serve` ----------------------------------------------


@dataclass
class Live:
    fleet: Fleet
    site: str
    broker: MosquittoBroker
    client: paho.Client
    requests: list[tuple[str, CommandRequest]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def publish(self, gateway: str, channel: Channel, payload: bytes, retain: bool = False) -> None:
        info = self.client.publish(
            topic(self.site, gateway, channel), payload, qos=1, retain=retain
        )
        info.wait_for_publish(5)

    def received(self) -> list[tuple[str, CommandRequest]]:
        with self.lock:
            return list(self.requests)


def _heartbeat(db: Path) -> bool:
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            row = conn.execute("SELECT max(heartbeat_ns) FROM service").fetchone()
        finally:
            conn.close()
    except sqlite3.Error:
        return False
    return bool(row and row[0] and time.time_ns() - row[0] < 5e9)


LIVE_DEVICES = [
    ("gw-a", "proj-101", "t-projector", "pjlink://[fd00:10::21]"),
    ("gw-a", "board-101", "t-board", "mqtt:///eclass/board-101"),
    ("gw-b", "board-102", "t-board", "mqtt:///eclass/board-102"),
    ("gw-a", "cam-hall", "t-camera", "onvif://admin:pw@[fd00::30]"),
    ("gw-b", "th-102", "t-ble", "ble://A4:C1:38:12:34:56"),
]


@pytest.fixture(scope="module")
def live(
    tmp_path_factory: pytest.TempPathFactory, broker: MosquittoBroker, profiles_dir: Path
) -> Iterator[Live]:
    base = tmp_path_factory.mktemp("live")
    site = f"dev-{free_port()}"
    other = f"{site}-x"
    made = make_fleet(
        base,
        profiles_dir,
        name=f"fleet-{site}",
        mqtt={"host": "127.0.0.1", "port": broker.port, "keepalive_s": 5},
        sites=[site, other],
        command_timeout_s=20,
    )
    made.ok("keys", "generate")
    for place in (site, other):
        made.ok("site", "add", place)
        made.ok("gateway", "add", "gw-a", "--site", place)
    made.ok("gateway", "add", "gw-b", "--site", site)
    for gateway, device, profile, url in LIVE_DEVICES:
        made.ok("device", "add", device, "--site", site, "--gateway", gateway,
                "--profile", profile, "--connection", url)  # fmt: skip
    made.ok("device", "add", "board-x", "--site", other, "--gateway", "gw-a",
            "--profile", "t-board", "--connection", "mqtt:///eclass/board-x")  # fmt: skip
    processes = Processes(base)
    processes.start("fleet", "campus-fleet", "--config", str(made.config), "serve")
    client = paho.Client(
        CallbackAPIVersion.VERSION2, client_id=f"gw-{site}", protocol=MQTTProtocolVersion.MQTTv5
    )
    env = Live(made, site, broker, client)

    def on_message(_client: Any, _userdata: Any, message: paho.MQTTMessage) -> None:
        request = CommandRequest.model_validate_json(message.payload)
        with env.lock:
            env.requests.append((message.topic, request))

    client.on_message = on_message
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    try:
        for place in (site, other):
            result, _mid = client.subscribe(f"campus/{place}/gw/+/cmd", qos=1)
            assert result == paho.MQTT_ERR_SUCCESS
        wait_for(lambda: "subscribed to" in processes.log("fleet"), 20, what="fleet subscribed")
        wait_for(lambda: _heartbeat(made.db), 20, what="fleet heartbeat")
        yield env
    finally:
        client.loop_stop()
        client.disconnect()
        processes.close()


def test_cmd_options_reach_every_board_of_the_site_and_show_in_commands(live: Live) -> None:
    site = live.site
    sent = live.fleet.json(
        "cmd", "--kind", "board", "--site", site, "notice", "Fire drill at 10:00",
        "--minutes", "10", "--no-wait",
    )  # fmt: skip
    batch = sent["batch"]
    assert {r["device"] for r in sent["results"]} == {"board-101", "board-102"}
    assert {r["status"] for r in sent["results"]} <= {"pending", "sent"}
    wait_for(lambda: len(live.received()) >= 2, 15, what="two command requests")
    time.sleep(0.3)  # a third (wrong) one would be here by now
    requests = live.received()
    assert sorted((t, r.device) for t, r in requests) == [
        (f"campus/{site}/gw/gw-a/cmd", "board-101"),
        (f"campus/{site}/gw/gw-b/cmd", "board-102"),
    ]
    for _topic, request in requests:
        assert request.action == "notice"
        assert request.argument == "Fire drill at 10:00"
        assert request.options == {"minutes": 10}
        assert request.id in {r["id"] for r in sent["results"]}
    # The gateways answer; `commands show` has the options and the answers.
    for topic_name, request in requests:
        gateway = topic_name.split("/")[3]
        result = CommandResult(
            id=request.id,
            device=request.device,
            outcome=CommandOutcome.OK,
            result={"notice": "shown"},
            finished_ns=time.time_ns(),
        )
        live.publish(gateway, Channel.CMD_RESULT, encode(result))

    def answered() -> Any:
        shown = live.fleet.json("commands", "show", batch)
        return shown if {r["status"] for r in shown["results"]} == {"ok"} else None

    shown = wait_for(answered, 15, what="both answers recorded")
    for result in shown["results"]:
        assert result["options"] == {"minutes": 10}
        assert result["argument"] == "Fire drill at 10:00"
        assert result["result"] == {"notice": "shown"}
    table = live.fleet.ok("commands", "show", batch)
    assert "notice 'Fire drill at 10:00' --minutes 10" in table
    audit = live.fleet.json("audit", "--action", "cmd")[-1]
    assert audit["details"]["options"] == {"minutes": 10} and audit["result"] == "ok"


def test_devices_list_shows_health_and_the_latest_points(live: Live) -> None:
    now = time.time_ns()
    state = GatewayState(
        status=Status.ONLINE,
        ts_ns=now,
        agent_version="test",
        devices=[
            DeviceState(id="proj-101", profile="t-projector", kind="display", up=True),
            DeviceState(id="board-101", profile="t-board", kind="board", up=True),
            DeviceState(id="cam-hall", profile="t-camera", kind="camera", up=False),
        ],
    )
    live.publish("gw-a", Channel.STATE, encode(state), retain=True)
    readings: list[Any] = [
        (1, now - 2 * 10**9, "proj-101", "power", "on", 0),
        (2, now - 2 * 10**9, "proj-101", "lamp_hours", 1234, 0),
        (3, now - 10**9, "proj-101", "lamp_hours", 1235, 0),
        (4, now, "board-101", "screen", True, 0),
        (5, now, "board-101", "temperature", 41.5, 0),
        (6, now - 60 * 10**9, "cam-hall", "onvif_ok", True, 0),
        (7, now - 60 * 10**9, "cam-hall", "clock_drift", 0.4, 0),
    ]
    batch = TelemetryBatch(first_seq=1, last_seq=7, sent_ns=now, readings=readings)
    live.publish("gw-a", Channel.TELEMETRY, encode(batch))
    down = Event(ts_ns=now, kind=EventKind.DEVICE_DOWN, device="cam-hall", message="no answer")
    live.publish("gw-a", Channel.EVENTS, encode(down))

    def listed() -> dict[str, Any] | None:
        rows = live.fleet.json("devices", "list", "--site", live.site, "--points")
        found = {row["device"]: row for row in rows}
        points = found.get("proj-101", {}).get("points", [])
        ready = any(p["value"] == 1235 for p in points) and "cam-hall" in found
        return found if ready else None

    found = wait_for(listed, 15, what="state and readings ingested")
    assert set(found) == {"proj-101", "board-101", "cam-hall"}
    projector = found["proj-101"]
    assert (projector["availability"], projector["kind"], projector["profile"]) == (
        "up",
        "display",
        "t-projector",
    )
    assert [(p["point"], p["value"], p["unit"]) for p in projector["points"]] == [
        ("lamp_hours", 1235, "h"),
        ("power", "on", ""),
    ]
    for point in projector["points"]:
        assert 0 <= point["age_s"] < 60 and point["time"].endswith("Z")
    board = {p["point"]: (p["value"], p["unit"]) for p in found["board-101"]["points"]}
    assert board == {"screen": (True, ""), "temperature": (41.5, "degC")}
    assert next(p for p in found["board-101"]["points"] if p["point"] == "screen")["value"] is True
    camera = found["cam-hall"]
    assert camera["availability"] == "down" and camera["down_since"] is not None
    assert {p["point"]: p["unit"] for p in camera["points"]} == {
        "clock_drift": "s",
        "onvif_ok": "",
    }
    assert all(60 <= p["age_s"] < 120 for p in camera["points"])
    # Without --points the listing stays short; --kind narrows it.
    plain = live.fleet.json("devices", "list", "--site", live.site, "--kind", "camera")
    assert [(r["device"], "points" in r) for r in plain] == [("cam-hall", False)]
    table = live.fleet.ok("devices", "list", "--site", live.site, "--points")
    words = " ".join(table.split())
    for row in (
        "│ gw-a/proj-101 │ lamp_hours │ 1235 h │",
        "│ │ temperature │ 41.5 degC │",
        "│ gw-a/board-101 │ screen │ True │",
        "│ camera │ t-camera │ down 0s │",
    ):
        assert row in words, (row, table)
    # A gateway gone offline makes its devices' health unknown, not up.
    offline = GatewayState(status=Status.OFFLINE, ts_ns=time.time_ns(), reason="test")
    live.publish("gw-a", Channel.STATE, encode(offline), retain=True)
    wait_for(
        lambda: (
            {r["availability"] for r in live.fleet.json("devices", "list", "--site", live.site)}
            == {"unknown"}
        ),
        15,
        what="devices unknown while their gateway is offline",
    )
    live.publish("gw-a", Channel.STATE, b"", retain=True)  # clear the retained state


def test_campus_fleet_cmd_help_teaches_the_notice_example() -> None:
    result = run_cli("campus-fleet", "cmd", "--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    assert 'cmd --kind board --site school-42 notice "Fire drill at 10:00" --minutes 10' in text
    assert "-o, --option NAME=VALUE" in text
    device_help = run_cli("campus-fleet", "device", "add", "--help").stdout
    for scheme in ("modbus-tcp://", "modbus-rtu://", "pjlink://", "mqtt://", "mqtts://",
                   "onvif://", "ble://"):  # fmt: skip
        assert scheme in device_help
    assert "pjlink://:s3cret@10.1.2.21:4352" in run_cli("campus-fleet", "import", "--help").stdout


def test_profiles_check_names_each_profiles_protocol(profiles_dir: Path) -> None:
    result = run_cli("campus-fleet", "profiles", "check", str(profiles_dir), "--json")
    assert result.returncode == 0, result.stderr
    valid = {p["id"]: (p["protocol"], p["kind"]) for p in json.loads(result.stdout)["valid"]}
    assert valid["t-projector"] == ("pjlink", "display")
    assert valid["t-ble"] == ("ble", "sensor")
    text = run_cli("campus-fleet", "profiles", "check", str(profiles_dir))
    assert "ok   t-camera: Test Camera (onvif camera)" in text.stdout
