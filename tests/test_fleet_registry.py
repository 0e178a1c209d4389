"""The registry part of campus-fleet: sites, buildings, rooms, gateways, devices, their settings,
the inventory import, enrolment, the signing key and the audit log.

Commands run through the real CLI on a real SQLite file: in this process through click's runner
(the same `campus-fleet` entry point, without a process start per command), and as `campus-fleet`
processes where the process matters (exit codes, stderr, the OS user as actor).
"""

from __future__ import annotations

import csv
import json
import os
import shlex
import shutil
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner, Result

from agent.config import load_config as load_agent_config
from fleet import audit
from fleet.cli import main
from fleet.clikit import default_actor
from fleet.csv_import import connection_url, parse_connection_url
from fleet.registry import NotFound, Registry, RegistryError, Target, parse_connection
from fleet.settings import NodeSettings
from fleet.store import Store
from tests.conftest import REPO, fleet_json, run_cli, write_yaml
from wire.models import DeviceState, GatewayState, Status
from wire.signing import key_id, load_public_key_file

EXAMPLE = REPO / "fleet" / "examples" / "inventory.csv"
SITE = "lycee-jean-moulin"


@dataclass
class Fleet:
    """A fleet config in a temporary folder and the CLI run against it."""

    dir: Path
    config: Path

    @property
    def db(self) -> Path:
        return self.dir / "fleet.db"

    @property
    def key(self) -> Path:
        return self.dir / "keys" / "fleet-signing.key"

    def run(self, *args: str, actor: str | None = None) -> Result:
        """`args` are the words of a command, or one string of them (split like a shell)."""
        words = shlex.split(args[0]) if len(args) == 1 else list(args)
        prefix = ["--config", str(self.config), *(["--actor", actor] if actor else [])]
        runner = CliRunner(env={"CAMPUS_FLEET_ACTOR": None, "CAMPUS_FLEET_SITE": None})
        return runner.invoke(main, [*prefix, *words], catch_exceptions=False)

    def ok(self, *args: str, actor: str | None = None) -> str:
        result = self.run(*args, actor=actor)
        assert result.exit_code == 0, result.output
        return result.stdout

    def json(self, *args: str, actor: str | None = None) -> Any:
        return json.loads(self.ok(*args, "--json", actor=actor))

    def fails(self, code: int, *args: str, actor: str | None = None) -> str:
        """Runs a command that must exit with `code`; returns its stderr."""
        result = self.run(*args, actor=actor)
        assert result.exit_code == code, result.output
        return result.stderr

    def registry(self) -> Registry:
        return Registry(Store(self.db))


def make_fleet(folder: Path) -> Fleet:
    config = write_yaml(
        folder / "fleet.yaml",
        {
            "name": "district-north",
            "database": "fleet.db",
            "signing_key": "keys/fleet-signing.key",
            "mqtt": {"host": "::1", "port": 1883},
            "agent_broker": {"host": "fleet.lycee.example", "port": 8883},
        },
    )
    return Fleet(folder, config)


@pytest.fixture
def fleet(tmp_path: Path) -> Fleet:
    return make_fleet(tmp_path)


@pytest.fixture(scope="module")
def school_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The database of `school`, made once through the CLI and copied for each test."""
    template = make_fleet(tmp_path_factory.mktemp("school"))
    build_school(template)
    return template.db


@pytest.fixture
def school(fleet: Fleet, school_db: Path) -> Fleet:
    """A site with two buildings, three rooms, two gateways and three devices."""
    for suffix in ("", "-wal"):  # the WAL holds what is not checkpointed yet
        if (source := Path(f"{school_db}{suffix}")).exists():
            shutil.copyfile(source, f"{fleet.db}{suffix}")
    return fleet


def build_school(fleet: Fleet) -> None:
    fleet.ok("site", "add", SITE, "--name", "Lycée Jean Moulin")
    fleet.ok("building", "add", "bat-a", "--name", "Bâtiment A")
    fleet.ok("building", "add", "bat-b")
    fleet.ok("room", "add", "a-101", "--building", "bat-a", "--name", "Salle 101")
    fleet.ok("room", "add", "a-102", "--building", "bat-a")
    fleet.ok("room", "add", "b-201", "--building", "bat-b")
    fleet.ok("gateway", "add", "gw-a", "--building", "bat-a")
    fleet.ok("gateway", "add", "gw-b", "--room", "b-201")
    rtu = "modbus-rtu:///dev/ttyUSB0?baudrate=9600&parity=E"
    fleet.ok(
        f"device add a101-co2 --gateway gw-a --profile senseair-s8 --connection {rtu}&unit=1 "
        "--room a-101 --interval 30"
    )
    fleet.ok(
        f"device add a102-meter --gateway gw-a --profile eastron-sdm120 --connection {rtu}&unit=2 "
        "--room a-102"
    )
    fleet.ok(
        "device add b201-env --gateway gw-b --profile campussim-thc100 "
        "--connection modbus-tcp://[fd00::21]:1502?unit=3"
    )


# -- the tree ----------------------------------------------------------------------------------


def test_the_tree_as_json(school: Fleet) -> None:
    sites = school.json("site", "list")
    assert sites == [
        {
            "site": SITE,
            "name": "Lycée Jean Moulin",
            "settings": {},
            "buildings": 2,
            "rooms": 3,
            "gateways": 2,
            "devices": 3,
            "created": sites[0]["created"],
        }
    ]
    assert [b["building"] for b in school.json("building", "list", "--site", SITE)] == [
        "bat-a",
        "bat-b",
    ]
    rooms = school.json("room", "list", "--building", "bat-a")
    assert [(r["room"], r["devices"]) for r in rooms] == [("a-101", 1), ("a-102", 1)]
    gateways = {g["gateway"]: g for g in school.json("gateway", "list")}
    assert (gateways["gw-a"]["building"], gateways["gw-a"]["room"]) == ("bat-a", None)
    assert (gateways["gw-b"]["building"], gateways["gw-b"]["room"]) == ("bat-b", "b-201")
    assert gateways["gw-a"]["devices"] == 2
    assert gateways["gw-a"]["status"] == "never seen"

    devices = {d["device"]: d for d in school.json("device", "list", "--gateway", "gw-a")}
    assert set(devices) == {"a101-co2", "a102-meter"}
    co2 = devices["a101-co2"]
    assert co2["kind"] == "sensor"  # the profile's kind
    assert co2["connection"] == {
        "type": "modbus-rtu",
        "port": "/dev/ttyUSB0",
        "baudrate": 9600,
        "parity": "E",
        "unit": 1,
    }
    assert co2["connection_url"] == "modbus-rtu:///dev/ttyUSB0?unit=1&baudrate=9600&parity=E"
    assert co2["settings"] == {"interval_s": 30.0}

    building = school.json("building", "show", "bat-a")
    assert building["children"] == {
        "rooms": ["a-101", "a-102"],
        "gateways": ["gw-a"],
        "devices": ["a101-co2", "a102-meter"],
    }
    device = school.json("device", "show", "b201-env", "--site", SITE)
    assert device["connection"] == {
        "type": "modbus-tcp",
        "host": "fd00::21",
        "port": 1502,
        "unit": 3,
    }
    assert device["observed"] == []
    assert school.json("site", "show", SITE)["children"]["gateways"] == ["gw-a", "gw-b"]
    assert school.json("room", "show", "b-201")["children"] == {
        "gateways": ["gw-b"],
        "devices": ["b201-env"],
    }


def test_tables_for_people(school: Fleet) -> None:
    assert "a101-co2" in school.ok("device", "list")
    assert "Sites (1)" in school.ok("site", "list")
    shown = school.ok("gateway", "show", "gw-b")
    assert "b201-env" in shown and "b-201" in shown


ADD_X = "device add x --gateway gw-a --profile senseair-s8 --connection"


@pytest.mark.parametrize(
    ("command", "code", "message"),
    [
        ("site add Lycee", 2, "site id 'Lycee' must be 1-63 characters"),
        (f"site add {SITE}", 2, f"site:{SITE} already exists"),
        ("building add bat-c --site nowhere", 3, "no site 'nowhere'"),
        ("room add a-103 --building bat-z", 3, "no building 'bat-z'"),
        ("room add a-101 --building bat-b", 2, "already exists"),
        (
            "gateway add gw-c --room a-101 --building bat-b",
            2,
            "room 'a-101' is in building 'bat-a', not 'bat-b'",
        ),
        (
            "device add x --gateway gw-z --profile senseair-s8 --connection modbus-tcp://10.0.0.9",
            3,
            "no gateway 'gw-z'",
        ),
        (
            "device add x --gateway gw-a --profile acme-9000 --connection modbus-tcp://10.0.0.9",
            2,
            "unknown profile 'acme-9000'",
        ),
        (f"{ADD_X} modbus-tcp://10.0.0.9 --kind toaster", 2, "unknown kind 'toaster'"),
        (f"{ADD_X} modbus-tcp://fd00::9:502", 2, "IPv6 address goes in brackets"),
        (
            f"{ADD_X} modbus-rtu:///dev/ttyUSB0?unit=999",
            2,
            "connection: modbus-rtu.unit: Input should be less than or equal to 247",
        ),
        (
            f"{ADD_X} modbus-rtu:///dev/ttyUSB0?unit=5&baudrate=19200",
            2,
            "serial port /dev/ttyUSB0 runs at 9600 E 1 for device a101-co2, not 19200 N 1",
        ),
        (
            f"{ADD_X} modbus-rtu:///dev/ttyUSB0?unit=2&parity=E",
            2,
            "unit 2 at /dev/ttyUSB0 is device a102-meter already",
        ),
        (f"{ADD_X} modbus-tcp://10.0.0.9 --interval 0", 2, "--interval"),
        ("device show nothing", 3, "no device 'nothing'"),
        ("site add", 2, "Missing argument"),
    ],
)
def test_refused_input(school: Fleet, command: str, code: int, message: str) -> None:
    assert message in school.fails(code, command)


def test_site_is_needed_when_there_are_several(school: Fleet) -> None:
    school.ok("site", "add", "college-nord")
    assert "several sites (college-nord, lycee-jean-moulin): give --site" in school.fails(
        2, "building", "add", "bat-c"
    )
    school.ok("building", "add", "bat-c", "--site", "college-nord")


def test_read_commands_before_any_database(fleet: Fleet) -> None:
    assert "no fleet database at" in fleet.fails(1, "site", "list")
    assert "give --site" in fleet.fails(2, "building", "add", "bat-a")


# -- moves and removals ------------------------------------------------------------------------


def test_moves(school: Fleet) -> None:
    moved = school.json("room", "move", "b-201", "--building", "bat-a")
    assert moved["building"] == "bat-a"
    gateway = school.json("gateway", "show", "gw-b")
    assert (gateway["building"], gateway["room"]) == ("bat-a", "b-201")  # moved with its room

    assert school.json("gateway", "move", "gw-b", "--building", "bat-b")["room"] is None
    gateway = school.json("gateway", "move", "gw-a", "--room", "a-102")
    assert (gateway["building"], gateway["room"]) == ("bat-a", "a-102")
    assert "a move needs a building, a room or both" in school.fails(2, "gateway", "move", "gw-a")

    device = school.json("device", "move", "a102-meter", "--gateway", "gw-b", "--room", "b-201")
    assert (device["gateway"], device["room"]) == ("gw-b", "b-201")
    assert school.json("device", "move", "a102-meter", "--no-room")["room"] is None
    assert "no gateway 'gw-z'" in school.fails(
        3, "device", "move", "a102-meter", "--gateway", "gw-z"
    )


def test_a_move_onto_a_busy_bus_is_refused(school: Fleet) -> None:
    school.ok(
        "device add b-co2 --gateway gw-b --profile senseair-s8 "
        "--connection modbus-rtu:///dev/ttyUSB0?unit=1"
    )
    message = school.fails(2, "device", "move", "a101-co2", "--gateway", "gw-b")
    assert "serial port /dev/ttyUSB0 runs at 9600 N 1 for device b-co2, not 9600 E 1" in message
    assert school.json("device", "show", "a101-co2")["gateway"] == "gw-a"


def test_removal_is_refused_while_things_belong_to_it(school: Fleet) -> None:
    message = school.fails(2, "building", "remove", "bat-a")
    assert f"building:{SITE}/bat-a still has rooms: a-101, a-102; gateways: gw-a; " in message
    assert "devices: a101-co2, a102-meter" in message and "--cascade" in message
    assert "devices: a101-co2, a102-meter" in school.fails(2, "gateway", "remove", "gw-a")
    assert "gateways: gw-b; devices: b201-env" in school.fails(2, "room", "remove", "b-201")
    assert "still has buildings: bat-a, bat-b" in school.fails(2, "site", "remove", SITE)
    assert school.json("site", "show", SITE)["devices"] == 3  # nothing removed

    removed = school.json("gateway", "remove", "gw-b", "--cascade")
    assert removed == {"removed": {"gateways": ["gw-b"], "devices": ["b201-env"]}}
    assert school.json("device", "remove", "a102-meter") == {"removed": {"devices": ["a102-meter"]}}
    removed = school.json("building", "remove", "bat-a", "--cascade")
    assert removed["removed"] == {
        "buildings": ["bat-a"],
        "rooms": ["a-101", "a-102"],
        "gateways": ["gw-a"],
        "devices": ["a101-co2"],
    }
    assert [r["room"] for r in school.json("room", "list")] == ["b-201"]
    assert school.json("site", "remove", SITE, "--cascade")["removed"]["buildings"] == ["bat-b"]
    assert school.json("site", "list") == []
    assert "no gateway 'gw-a'" in school.fails(3, "gateway", "remove", "gw-a", "--site", SITE)


# -- settings ----------------------------------------------------------------------------------


def settings_file(fleet: Fleet, name: str, settings: dict[str, Any]) -> str:
    return str(write_yaml(fleet.dir / f"{name}.yaml", settings))


def test_settings_are_inherited_down_the_tree(school: Fleet) -> None:
    site_rules: dict[str, Any] = {
        "interval_s": 60,
        "timezone": "Europe/Paris",
        "alarms": {"co2": {"high": 1500, "hysteresis": 50}},
        "schedules": [{"id": "night", "at": "22:00", "kinds": ["board"], "action": "all_off"}],
    }
    levels: dict[str, dict[str, Any]] = {
        f"site:{SITE}": site_rules,
        f"building:{SITE}/bat-a": {"interval_s": 30, "poll_jitter_s": 2},
        f"room:{SITE}/a-101": {"alarms": {"co2": {"high": 1200}}},
        f"gateway:{SITE}/gw-a": {"timeout_s": 3},
        f"device:{SITE}/a101-co2": {"interval_s": 10},
    }
    for target, values in levels.items():
        out = school.json("settings", "set", target, settings_file(school, target[:4], values))
        assert out["target"] == target
    own = school.json("settings", "show", f"room:{SITE}/a-101")
    assert own == {
        "target": f"room:{SITE}/a-101",
        "effective": False,
        "settings": {"alarms": {"co2": {"high": 1200.0}}},
    }

    effective = school.json("settings", "show", f"device:{SITE}/a101-co2", "--effective")
    assert [level["target"] for level in effective["chain"]] == list(levels)
    settings = effective["settings"]
    assert settings["interval_s"] == 10  # the device's own
    assert settings["timeout_s"] == 3  # its gateway's
    assert settings["poll_jitter_s"] == 2  # its room's building
    assert settings["timezone"] == "Europe/Paris"  # the site's
    assert settings["alarms"] == {"co2": {"high": 1200.0}}  # the room's replaces the site's

    # a102-meter is in a-102 (no settings), so it gets the site's alarm and the building's interval
    meter = school.json("settings", "show", f"device:{SITE}/a102-meter", "--effective")
    assert meter["settings"]["interval_s"] == 30
    assert meter["settings"]["alarms"] == {"co2": {"high": 1500.0, "hysteresis": 50.0}}
    assert "interval_s: 10.0" in school.ok("settings", "show", f"device:{SITE}/a101-co2")


def test_chains_for_the_desired_config_builder(school: Fleet) -> None:
    school.ok("settings", "set", f"site:{SITE}", settings_file(school, "s", {"interval_s": 60}))
    school.ok(
        "settings", "set", f"building:{SITE}/bat-b", settings_file(school, "b", {"interval_s": 45})
    )
    school.ok("settings", "set", f"room:{SITE}/a-101", settings_file(school, "r", {"timeout_s": 4}))
    # a device in a room of bat-a on a gateway of bat-b: its room decides its building
    school.ok("device", "move", "b201-env", "--room", "a-101")
    registry = school.registry()

    assert registry.gateway_chain(SITE, "gw-a") == [
        NodeSettings(interval_s=60),
        NodeSettings(),  # bat-a
        NodeSettings(),  # the gateway itself (no room: skipped)
    ]
    chain = registry.device_chain(SITE, "b201-env")
    assert chain == [
        NodeSettings(interval_s=60),
        NodeSettings(),  # bat-a, the building of room a-101
        NodeSettings(timeout_s=4),  # a-101
        NodeSettings(),  # gw-b
        NodeSettings(),  # the device
    ]
    assert [str(t) for t, _ in registry.lineage(Target("device", SITE, "b201-env"))] == [
        f"site:{SITE}",
        f"building:{SITE}/bat-a",
        f"room:{SITE}/a-101",
        f"gateway:{SITE}/gw-b",
        f"device:{SITE}/b201-env",
    ]
    # without a room of its own, a device is in its gateway's room and building
    school.ok("device", "move", "b201-env", "--no-room")
    assert registry.device_chain(SITE, "b201-env")[1] == NodeSettings(interval_s=45)

    rows = registry.devices_of_gateway(SITE, "gw-a")
    assert [r["device"] for r in rows] == ["a101-co2", "a102-meter"]
    assert rows[0]["connection"]["port"] == "/dev/ttyUSB0"
    assert rows[0]["settings"] == {"interval_s": 30.0}
    with pytest.raises(NotFound):
        registry.devices_of_gateway(SITE, "gw-z")


def test_selectors(school: Fleet) -> None:
    school.ok("site", "add", "college-nord")
    school.ok("gateway", "add", "gw-c", "--site", "college-nord")
    school.ok(
        "device add a101-co2 --site college-nord --gateway gw-c --profile senseair-s8 "
        "--connection modbus-tcp://10.1.0.5"
    )
    registry = school.registry()
    assert registry.gateways_matching("all") == [
        ("college-nord", "gw-c"),
        (SITE, "gw-a"),
        (SITE, "gw-b"),
    ]
    assert registry.gateways_matching(f"site:{SITE}") == [(SITE, "gw-a"), (SITE, "gw-b")]
    assert registry.gateways_matching(f"building:{SITE}/bat-b") == [(SITE, "gw-b")]
    assert registry.gateways_matching(f"room:{SITE}/b-201") == [(SITE, "gw-b")]
    assert registry.gateways_matching(f"room:{SITE}/a-101") == []
    assert registry.gateways_matching(f"gateway:{SITE}/gw-a") == [(SITE, "gw-a")]

    def names(selector: str, kind: str | None = None) -> list[str]:
        return [f"{d['site']}/{d['device']}" for d in registry.devices_matching(selector, kind)]

    assert names(f"building:{SITE}/bat-a") == [f"{SITE}/a101-co2", f"{SITE}/a102-meter"]
    assert names(f"building:{SITE}/bat-a", "meter") == [f"{SITE}/a102-meter"]
    assert names(f"room:{SITE}/b-201") == [f"{SITE}/b201-env"]  # through its gateway's room
    assert names(f"gateway:{SITE}/gw-a", "sensor") == [f"{SITE}/a101-co2"]
    assert names("all", "meter") == [f"{SITE}/a102-meter"]
    assert names(f"device:{SITE}/a101-co2") == [f"{SITE}/a101-co2"]
    assert names("b201-env") == [f"{SITE}/b201-env"]
    assert registry.devices_matching("a102-meter")[0] == {
        "site": SITE,
        "device": "a102-meter",
        "gateway": "gw-a",
        "kind": "meter",
        "profile": "eastron-sdm120",
    }
    with pytest.raises(RegistryError, match="device:college-nord/a101-co2, device:lycee"):
        registry.devices_matching("a101-co2")
    for unknown in ("nothing", f"room:{SITE}/z-999", "building:nowhere/bat-a"):
        with pytest.raises(NotFound):
            registry.devices_matching(unknown)
    with pytest.raises(NotFound, match="no gateway 'gw-z'"):
        registry.gateways_matching(f"gateway:{SITE}/gw-z")
    for bad in ("floor:x/y", f"room:{SITE}", f"device:{SITE}/a101-co2"):
        with pytest.raises(RegistryError) as caught:
            registry.gateways_matching(bad)
        assert not isinstance(caught.value, NotFound)
    with pytest.raises(RegistryError, match="unknown kind 'toaster'"):
        registry.devices_matching("all", "toaster")


@pytest.mark.parametrize(
    ("target", "settings", "message"),
    [
        (
            "device:{site}/a101-co2",
            {"schedules": [{"id": "x", "at": "22:00", "kinds": ["board"], "action": "off"}]},
            "a device takes only alarms, interval_s, timeout_s (not schedules)",
        ),
        (
            "device:{site}/a101-co2",
            {"alarms": {"kwh": {"high": 5}}},
            "profile senseair-s8 has no point 'kwh'",
        ),
        (
            "site:{site}",
            {"interval_s": "often"},
            "line 1, interval_s: Input should be a valid number",
        ),
        ("room:{site}/a-101", {"colour": "red"}, "colour: Extra inputs are not permitted"),
        ("site:{site}", {"alarms": {"co2": {"low": 9, "high": 1}}}, "alarm low 9.0 must be below"),
        ("floor:{site}/x", {}, "target 'floor:lycee-jean-moulin/x' must be site:S"),
    ],
)
def test_bad_settings_are_refused(
    school: Fleet, target: str, settings: dict[str, Any], message: str
) -> None:
    path = settings_file(school, "bad", settings)
    assert message in school.fails(2, "settings", "set", target.format(site=SITE), path)


def test_settings_of_an_unknown_target(school: Fleet) -> None:
    path = settings_file(school, "ok", {"interval_s": 5})
    assert "no room 'z-999'" in school.fails(3, "settings", "set", f"room:{SITE}/z-999", path)
    assert "no device 'x'" in school.fails(3, "settings", "show", f"device:{SITE}/x", "--effective")


# -- the inventory import ----------------------------------------------------------------------


def test_import_of_the_example_inventory(fleet: Fleet) -> None:
    dry = fleet.json("import", str(EXAMPLE), "--dry-run")
    created = {level: dry["counts"][level]["created"] for level in dry["counts"]}
    assert created == {"sites": 1, "buildings": 2, "rooms": 5, "gateways": 2, "devices": 9}
    assert dry["dry_run"] and dry["changed"]
    assert fleet.json("site", "list") == []  # a dry run writes nothing

    first = fleet.json("import", str(EXAMPLE))
    assert first["counts"] == dry["counts"] and first["rows"] == 9
    again = fleet.json("import", str(EXAMPLE))
    assert not again["changed"]
    assert {level: c["unchanged"] for level, c in again["counts"].items()} == created
    assert "nothing changed: the registry already matches" in fleet.ok("import", str(EXAMPLE))

    gateways = {g["gateway"]: g for g in fleet.json("gateway", "list")}
    assert (gateways["gw-bat-a"]["building"], gateways["gw-bat-a"]["devices"]) == ("bat-a", 5)
    assert gateways["gw-bat-b"]["room"] is None  # its devices are in two rooms
    building = fleet.json("building", "show", "bat-a")
    assert building["name"] == "Bâtiment A (sciences)"
    assert building["children"]["rooms"] == ["a-101", "a-102", "a-tech"]
    hall = fleet.json("device", "show", "b-hall-env")
    assert hall["connection"] == {
        "type": "modbus-tcp",
        "host": "fd00:20::21",
        "port": 502,
        "unit": 1,
    }
    assert hall["settings"] == {"interval_s": 30.0}
    meter = fleet.json("device", "show", "b-hall-meter")
    assert meter["connection_url"] == (
        "modbus-rtu:///dev/ttyUSB0?unit=11&baudrate=9600&parity=N&stopbits=1&retries=2"
    )
    assert fleet.json("device", "show", "a-lights")["settings"] == {}


def test_an_edited_inventory_updates_what_changed(fleet: Fleet) -> None:
    fleet.ok("import", str(EXAMPLE))
    fleet.ok(
        "settings", "set", f"device:{SITE}/a101-co2", settings_file(fleet, "t", {"timeout_s": 2})
    )
    text = EXAMPLE.read_text(encoding="utf-8")
    text = text.replace("Salle 102 (chimie)", "Labo chimie")
    co2 = "a101-co2,sensor,senseair-s8,modbus-rtu:///dev/ttyUSB0?unit=1&baudrate=9600&parity=N"
    assert f"{co2}&stopbits=1,30" in text
    text = text.replace(f"{co2}&stopbits=1,30", f"{co2}&stopbits=1,15")
    edited = fleet.dir / "edited.csv"
    edited.write_text(text, encoding="utf-8")
    result = fleet.json("import", str(edited))
    assert result["counts"]["devices"] == {"created": 0, "updated": 1, "unchanged": 8}
    assert result["counts"]["rooms"] == {"created": 0, "updated": 1, "unchanged": 4}
    assert fleet.json("room", "show", "a-102")["name"] == "Labo chimie"
    # the interval comes from the file; the timeout set by hand stays
    assert fleet.json("device", "show", "a101-co2")["settings"] == {
        "interval_s": 15.0,
        "timeout_s": 2.0,
    }


def test_an_inventory_from_excel_with_semicolons(fleet: Fleet) -> None:
    rows = [
        " Site ; Building ; Room ; Gateway ; Device ; Profile ; Connection ; Interval S ",
        f"{SITE};bat-a;a-101;gw-1;co2-1;senseair-s8;modbus-rtu:///dev/ttyAMA0?unit=4;2,5",
        ";;;;;;;",  # an empty row Excel leaves at the end
    ]
    path = fleet.dir / "excel.csv"
    path.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(rows).encode() + b"\r\n")
    result = fleet.json("import", str(path))
    assert result["rows"] == 1
    device = fleet.json("device", "show", "co2-1")
    assert device["settings"] == {"interval_s": 2.5}
    assert device["connection"] == {"type": "modbus-rtu", "port": "/dev/ttyAMA0", "unit": 4}
    assert fleet.json("gateway", "show", "gw-1")["room"] == "a-101"  # where all its devices are


BAD_ROWS = [
    # line 1
    "Site;Building;Room;Gateway;Device;Kind;Profile;Connection;interval_s;Colour",
    # line 2: fine
    f"{SITE};bat-a;a-101;gw-a;a101-co2;sensor;senseair-s8;modbus-rtu:///dev/ttyUSB0?unit=1;30;",
    # line 3: an IPv6 address without brackets
    f"{SITE};bat-a;a-101;gw-a;a101-pm;sensor;deltaohm-pmsense;modbus-tcp://fd00::5:502?unit=1;;",
    # line 4: an unknown profile
    f"{SITE};bat-a;a-102;gw-a;a102-x;;acme-9000;modbus-tcp://10.0.0.9?unit=1;;",
    # line 5: the device of line 2 again
    f"{SITE};bat-a;a-101;gw-a;a101-co2;sensor;senseair-s8;modbus-rtu:///dev/ttyUSB0?unit=1;30;",
    # line 6: the device of line 2 on another gateway, and room a-101 in another building
    f"{SITE};bat-b;a-101;gw-b;a101-co2;sensor;senseair-s8;modbus-tcp://10.0.0.7;30;",
    # line 7: "quoted; cells", an unknown kind, a bad interval and a bad option
    f'"{SITE}";"bat-b";"b-1";gw-b;b1-env;heater;campussim-thc100;"modbus-tcp://h?unit=x";soon;',
    # line 8: missing values, a bad id
    f"{SITE};bat-b;;GW B;;;senseair-s8;;;",
    # line 9: another baud rate on the serial port of line 2
    f"{SITE};bat-a;a-102;gw-a;a102-co2;;senseair-s8;modbus-rtu:///dev/ttyUSB0?unit=9&baudrate=19200;;",
]


def test_every_bad_row_is_reported_and_nothing_imported(fleet: Fleet) -> None:
    path = fleet.dir / "bad.csv"
    path.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(BAD_ROWS).encode("utf-8") + b"\r\n")
    expected = [
        (1, None, "unknown column 'colour'"),
        (3, "connection", "an IPv6 address goes in brackets"),
        (4, "profile", "unknown profile 'acme-9000' (known:"),
        (5, "device", "device 'a101-co2' is listed twice (also on line 2)"),
        (6, "building", "room 'a-101' is in building 'bat-b' here but 'bat-a' on line 2"),
        (6, "device", "device 'a101-co2' is on gateway 'gw-b' here but on 'gw-a' on line 2"),
        (7, "connection", "unit='x' is not a whole number"),
        (7, "interval_s", "'soon' is not a number of seconds"),
        (7, "kind", "unknown kind 'heater'"),
        (8, "connection", "missing value"),
        (8, "device", "missing value"),
        (8, "gateway", "gateway id 'GW B' must be 1-63 characters"),
        (9, "connection", "serial port /dev/ttyUSB0 runs at 9600 N 1 for device a101-co2"),
    ]
    for dry_run in (["--dry-run"], []):
        result = run_cli(
            "campus-fleet", "--config", str(fleet.config), "import", str(path), "--json", *dry_run
        )
        assert result.returncode == 2, result.stderr
        report = json.loads(result.stdout)
        assert report["imported"] is False
        found = [(p["line"], p["column"], p["message"]) for p in report["problems"]]
        assert len(found) == len(expected), found
        for (line, column, message), (got_line, got_column, got) in zip(
            expected, found, strict=True
        ):
            assert (got_line, got_column) == (line, column) and message in got, got
        assert "13 problems, nothing imported" in result.stderr

    people = run_cli("campus-fleet", "--config", str(fleet.config), "import", str(path))
    assert people.returncode == 2
    assert f"{path}:3: connection: bad port in 'fd00::5:502'" in people.stderr
    assert f"{path}:9: connection: on gateway 'gw-a': serial port" in people.stderr
    assert fleet.json("site", "list") == []
    assert fleet.json("device", "list") == []


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "the file is empty"),
        ("site,gateway,device,profile\n", "missing column 'connection'"),
        ("site,gateway,device,profile,connection\n", "no rows below the header"),
        (
            f"site,gateway,device,profile,connection\n{SITE},g,d,senseair-s8,modbus-tcp://h,extra\n",
            "6 cells, the header has 5 columns",
        ),
        (
            f"site,gateway,device,room,profile,connection\n{SITE},g,d,r-1,senseair-s8,modbus-tcp://h\n",
            "room 'r-1' is new: give the building it is in",
        ),
    ],
)
def test_malformed_inventories(fleet: Fleet, text: str, message: str) -> None:
    path = fleet.dir / "inventory.csv"
    path.write_text(text, encoding="utf-8")
    assert message in fleet.fails(2, "import", str(path))


def test_an_inventory_that_is_not_utf8(fleet: Fleet) -> None:
    path = fleet.dir / "latin1.csv"
    path.write_bytes("site,gateway,device,profile,connection\nlycée,g,d,p,c\n".encode("latin-1"))
    assert f"{path}:2: not UTF-8 text" in fleet.fails(2, "import", str(path))


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("modbus-tcp://192.168.10.21", {"type": "modbus-tcp", "host": "192.168.10.21"}),
        (
            "MODBUS-TCP://PLC-1.lan:1502?unit=7&timeout_s=0.5&retries=3",
            {
                "type": "modbus-tcp",
                "host": "plc-1.lan",
                "port": 1502,
                "unit": 7,
                "timeout_s": 0.5,
                "retries": 3,
            },
        ),
        (
            "modbus-tcp://[fd00::5]:502?unit=1",
            {"type": "modbus-tcp", "host": "fd00::5", "port": 502, "unit": 1},
        ),
        (
            "modbus-rtu:///dev/ttyUSB0?unit=3&baudrate=9600&parity=e&stopbits=1",
            {
                "type": "modbus-rtu",
                "port": "/dev/ttyUSB0",
                "unit": 3,
                "baudrate": 9600,
                "parity": "E",
                "stopbits": 1,
            },
        ),
        (
            "modbus-rtu:///dev/serial/by-id/usb-FTDI_RS485-if00?unit=2",
            {"type": "modbus-rtu", "port": "/dev/serial/by-id/usb-FTDI_RS485-if00", "unit": 2},
        ),
    ],
)
def test_connection_urls(url: str, expected: dict[str, Any]) -> None:
    parsed = parse_connection_url(url)
    assert parsed == expected
    again = parse_connection_url(connection_url(parse_connection(parsed)))
    assert parse_connection(again) == parse_connection(parsed)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("10.0.0.5", "is not a connection URL"),
        ("http://10.0.0.5", "unknown scheme 'http'"),
        ("modbus-tcp://?unit=1", "no host"),
        ("modbus-tcp://h/x", "unexpected path '/x'"),
        ("modbus-tcp://u:p@h", "takes no user or password"),
        ("modbus-tcp://h:99999", "bad port"),
        ("modbus-tcp://h?baudrate=9600", "unknown option 'baudrate' for modbus-tcp"),
        ("modbus-tcp://h?unit=1&unit=2", "option 'unit' is given twice"),
        ("modbus-tcp://h?unit", "must be name=value pairs"),
        ("modbus-rtu://dev/ttyUSB0", "three slashes"),
        ("modbus-rtu:///dev/ttyUSB0?timeout_s=fast", "timeout_s='fast' is not a number"),
    ],
)
def test_bad_connection_urls(url: str, message: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_connection_url(url)
    assert message in str(caught.value)


# -- keys and enrolment ------------------------------------------------------------------------


def test_keys(fleet: Fleet) -> None:
    assert "run 'campus-fleet keys generate' first" in fleet.fails(1, "keys", "show")
    made = fleet.json("keys", "generate")
    assert stat.S_IMODE(fleet.key.stat().st_mode) == 0o600
    public = Path(made["public_key"])
    assert public == fleet.key.with_name("fleet-signing.key.pub")
    assert made["key_id"] == key_id(load_public_key_file(public))
    shown = fleet.json("keys", "show")
    assert shown["key_id"] == made["key_id"]
    assert shown["public_key_pem"] == public.read_text()

    assert "already exists; --force replaces it" in fleet.fails(2, "keys", "generate")
    replaced = fleet.json("keys", "generate", "--force")
    assert replaced["key_id"] != made["key_id"]
    assert fleet.json("keys", "show")["key_id"] == replaced["key_id"]
    assert sorted(p.name for p in fleet.key.parent.iterdir()) == [
        "fleet-signing.key",
        "fleet-signing.key.pub",
    ]


def test_enrolment_bundle_runs_an_agent(school: Fleet, tmp_path: Path) -> None:
    assert "run 'campus-fleet keys generate' first" in school.fails(1, "gateways", "enroll", "gw-a")
    kid = school.json("keys", "generate")["key_id"]
    out = tmp_path / "bundle"
    result = run_cli(
        "campus-fleet",
        "--config",
        str(school.config),
        "gateways",
        "enroll",
        "gw-new",
        "--site",
        SITE,
        "--room",
        "a-102",
        "--out",
        str(out),
        "--json",
    )
    assert result.returncode == 0, result.stderr
    bundle = json.loads(result.stdout)
    assert (bundle["site"], bundle["gateway"], bundle["key_id"]) == (SITE, "gw-new", kid)
    assert bundle["created"] is True
    assert sorted(p.name for p in out.iterdir()) == ["agent.yaml", "fleet-signing.pub"]
    for path in out.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert (out / "agent.yaml").read_text() == bundle["agent_yaml"]
    assert (out / "fleet-signing.pub").read_text() == bundle["public_key_pem"]
    gateway = school.json("gateway", "show", "gw-new")
    assert (gateway["building"], gateway["room"]) == ("bat-a", "a-102")
    assert gateway["enrolled"] is not None

    document = yaml.safe_load(bundle["agent_yaml"])
    assert document["fleet"]["public_keys"] == ["/etc/campus-iot/fleet-signing.pub"]
    document["fleet"]["public_keys"] = [str(out / "fleet-signing.pub")]  # where this test put it
    document["buffer"] = {"path": str(tmp_path / "buffer.db")}
    config, _ = load_agent_config(write_yaml(tmp_path / "agent.yaml", document))
    assert (config.site, config.gateway) == (SITE, "gw-new")
    assert (config.mqtt.host, config.mqtt.port) == ("fleet.lycee.example", 8883)  # agent_broker
    assert key_id(load_public_key_file(config.fleet.public_keys[0])) == kid
    assert config.devices == []  # the fleet pushes them

    assert "already exist; use --force" in school.fails(
        2, "gateway", "enroll", "gw-new", "--out", str(out)
    )
    again = school.json("gateway", "enroll", "gw-new", "--out", str(out), "--force")
    assert again["created"] is False
    assert "registered in building 'bat-a', room 'a-102'" in school.fails(
        2, "gateway", "enroll", "gw-new", "--room", "b-201"
    )


def test_enrolment_printed_for_people(school: Fleet) -> None:
    school.ok("keys", "generate")
    config = yaml.safe_load(school.config.read_text())
    del config["agent_broker"]
    write_yaml(school.config, config)
    result = school.run("gateway", "enroll", "gw-a")
    assert result.exit_code == 0, result.output
    agent_yaml, key = result.stdout.split("# ---- /etc/campus-iot/fleet-signing.pub")
    document = yaml.safe_load(agent_yaml)
    assert document["mqtt"] == {"host": "::1", "port": 1883}
    assert "-----BEGIN PUBLIC KEY-----" in key
    assert "the fleet's own loopback: set agent_broker" in result.stderr


# -- audit -------------------------------------------------------------------------------------


def test_every_change_is_audited(school: Fleet, tmp_path: Path) -> None:
    school.ok("room", "add", "a-103", "--building", "bat-a", actor="alice")
    school.fails(2, "room", "add", "a-103", "--building", "bat-a")  # refused: logged too
    school.ok("settings", "set", f"room:{SITE}/a-103", settings_file(school, "x", {"timeout_s": 2}))
    school.ok("room", "move", "a-103", "--building", "bat-b", actor="bob")
    school.ok("room", "remove", "a-103", actor="alice")
    school.ok("import", str(EXAMPLE), actor="carol")
    school.ok("keys", "generate", actor="carol")
    school.ok("gateway", "enroll", "gw-a", actor="carol")
    # the OS user when no --actor is given, from a real process
    default = os.environ.get("CAMPUS_FLEET_ACTOR") or default_actor()
    assert fleet_json(school.config, "device", "remove", "b201-env")["removed"]

    entries = school.json("audit")
    actions = [(e["actor"], e["action"], e["target"], e["result"]) for e in entries]
    here = default_actor()
    assert actions[:8] == [
        (here, "site.add", f"site:{SITE}", "ok"),
        (here, "building.add", f"building:{SITE}/bat-a", "ok"),
        (here, "building.add", f"building:{SITE}/bat-b", "ok"),
        (here, "room.add", f"room:{SITE}/a-101", "ok"),
        (here, "room.add", f"room:{SITE}/a-102", "ok"),
        (here, "room.add", f"room:{SITE}/b-201", "ok"),
        (here, "gateway.add", f"gateway:{SITE}/gw-a", "ok"),
        (here, "gateway.add", f"gateway:{SITE}/gw-b", "ok"),
    ]
    assert actions[11:] == [
        ("alice", "room.add", f"room:{SITE}/a-103", "ok"),
        (here, "room.add", f"room:{SITE}/a-103", f"error: room:{SITE}/a-103 already exists"),
        (here, "settings.set", f"room:{SITE}/a-103", "ok"),
        ("bob", "room.move", f"room:{SITE}/a-103", "ok"),
        ("alice", "room.remove", f"room:{SITE}/a-103", "ok"),
        ("carol", "registry.import", "file:inventory.csv", "ok"),
        ("carol", "keys.generate", f"key:{school.key}", "ok"),
        ("carol", "gateway.enroll", f"gateway:{SITE}/gw-a", "ok"),
        (default, "device.remove", f"device:{SITE}/b201-env", "ok"),
    ]
    details = {e["action"]: e["details"] for e in entries}
    assert details["room.move"] == {"building": "bat-b"}
    assert details["settings.set"]["settings"] == {"timeout_s": 2.0}
    # a101-co2 was registered already: the inventory moves it onto gw-bat-a
    assert details["registry.import"]["counts"]["devices"] == {
        "created": 8,
        "updated": 1,
        "unchanged": 0,
    }
    assert details["gateway.enroll"]["created"] is False
    assert details["room.remove"]["removed"] == {"rooms": ["a-103"]}

    assert [e["action"] for e in school.json("audit", "--actor", "alice")] == [
        "room.add",
        "room.remove",
    ]
    assert [e["actor"] for e in school.json("audit", "--action", "room.move")] == ["bob"]
    assert len(school.json("audit", "--action", "room")) == 7
    assert len(school.json("audit", "--action", "gateway.*")) == 3
    assert school.json("audit", "--since", "2000-01-01T00:00") == entries
    assert len(school.json("audit", "--limit", "2")) == 2

    for suffix in (".csv", ".jsonl"):
        path = tmp_path / f"audit{suffix}"
        assert school.json("audit", "--export", str(path)) == {
            "exported": len(entries),
            "file": str(path),
        }
        assert exported(path) == entries
    assert "must end in .csv or .jsonl" in school.fails(
        2, "audit", "--export", str(tmp_path / "a.txt")
    )
    assert "is neither a duration" in school.fails(2, "audit", "--since", "lately")


def exported(path: Path) -> list[dict[str, Any]]:
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text().splitlines()]
    with path.open(newline="") as stream:
        rows = list(csv.DictReader(stream))
    return [
        {
            **row,
            "id": int(row["id"]),
            "ts_ns": int(row["ts_ns"]),
            "details": json.loads(row["details"]),
        }
        for row in rows
    ]


def test_a_failed_import_is_audited_with_its_problems(fleet: Fleet) -> None:
    path = fleet.dir / "bad.csv"
    path.write_bytes("\r\n".join(BAD_ROWS).encode())
    fleet.fails(2, "import", str(path), actor="dave")
    fleet.fails(2, "import", str(path), "--dry-run", actor="dave")  # a dry run is not a change
    [entry] = fleet.json("audit")
    assert entry["result"] == f"error: {path}: 13 problems, nothing imported"
    assert entry["details"]["error_details"][0] == f"{path}:1: unknown column 'colour' " + (
        "(columns: site, gateway, device, profile, connection, building, room, kind, "
        "interval_s, building_name, room_name)"
    )
    assert len(entry["details"]["error_details"]) == 13


def test_audited_records_the_outcome_and_reraises(tmp_path: Path) -> None:
    store = Store(tmp_path / "fleet.db")
    with audit.audited(store, "erin", "config.push", "site:s", {"version": 1}) as details:
        details["sent"] = 3
    with (
        pytest.raises(RuntimeError, match="broker down"),
        audit.audited(store, "erin", "config.push", "site:s"),
    ):
        raise RuntimeError("broker down")
    with pytest.raises(SystemExit), audit.audited(store, "erin", "cmd.run", "device:s/d"):
        raise SystemExit(4)
    entries = audit.entries(store)
    assert [(e["result"], e["details"]) for e in entries] == [
        ("ok", {"version": 1, "sent": 3}),
        ("error: broker down", {}),
        ("error: exit code 4", {}),
    ]
    assert audit.record(store, "erin", "x.y", "site:s", {"path": tmp_path}, "ok") == 4
    assert audit.entries(store, action="x")[0]["details"] == {"path": str(tmp_path)}


# -- what gateways report ----------------------------------------------------------------------


@pytest.fixture
def reported(school: Fleet) -> Iterator[Fleet]:
    """gw-a reports a registered device and one nobody registered."""
    store = Store(school.db)
    state = GatewayState(
        status=Status.ONLINE,
        ts_ns=1,
        devices=[
            DeviceState(id="a101-co2", profile="senseair-s8", kind="sensor", up=True),
            DeviceState(id="old-meter", profile="eastron-sdm120", kind="meter", up=False),
        ],
    )
    with store.transaction():
        store.record_state(SITE, "gw-a", state)
        store.record_state("other-school", "gw-x", GatewayState(status=Status.OFFLINE))
    store.close()
    yield school


def test_unassigned_devices(reported: Fleet) -> None:
    assert reported.json("devices", "unassigned") == [
        {
            "site": SITE,
            "gateway": "gw-a",
            "device": "old-meter",
            "profile": "eastron-sdm120",
            "kind": "meter",
            "up": False,
            "last_seen": None,
        }
    ]
    assert "old-meter" in reported.ok("devices", "unassigned")
    observed = reported.json("device", "show", "a101-co2")["observed"]
    assert observed == [{"gateway": "gw-a", "up": True, "last_seen": None}]
    assert reported.json("gateway", "show", "gw-a")["status"] == "online"
    reported.ok(
        "device add old-meter --gateway gw-a --profile eastron-sdm120 "
        "--connection modbus-rtu:///dev/ttyUSB0?unit=7&parity=E"
    )
    assert reported.json("devices", "unassigned") == []


def test_help_teaches_with_examples(fleet: Fleet) -> None:
    groups = ("site", "building", "room", "gateway", "device", "settings", "keys", "import")
    for group in (*groups, "audit"):
        text = fleet.ok(group, "--help")
        assert "Examples:" in text and "campus-fleet " in text, group
    assert "enroll" in fleet.ok("gateways", "--help")
    assert "unassigned" in fleet.ok("devices", "--help")
