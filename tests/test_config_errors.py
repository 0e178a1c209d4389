"""Bad configuration files stop a program at start: file, line and field named, exit 2,
no traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import run_cli

GOOD_DEVICE = """\
  - id: room-1-env
    profile: campussim-thc100
    connection:
      type: modbus-tcp
      host: 127.0.0.1
      port: 15020
"""


def agent_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agent.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("gateway: gw-1\ndevices: []\n", ["site: Field required", "line 1"]),
        ("site: s\ngateway: GW 1\n", ["line 2", "gateway: String should match pattern"]),
        (
            "site: s\ngateway: g\nmqtt:\n  port: many\n",
            ["line 4", "mqtt.port: Input should be a valid integer"],
        ),
        (
            "site: s\ngateway: g\nmqtt:\n  prot: 1883\n",
            ["line 4", "mqtt.prot: Extra inputs are not permitted"],
        ),
        (
            "site: s\ngateway: g\ndevices:\n" + GOOD_DEVICE.replace("campussim-thc100", "nope"),
            ["line 5", "devices.0.profile: unknown profile 'nope'", "campussim-thc100"],
        ),
        (
            "site: s\ngateway: g\ndevices:\n" + GOOD_DEVICE.replace("modbus-tcp", "carrier-pigeon"),
            [
                "line 6",
                "devices.0.connection: Input tag 'carrier-pigeon'",
                "'modbus-tcp', 'modbus-rtu'",
            ],
        ),
        (
            "site: s\ngateway: g\ndevices:\n" + GOOD_DEVICE + GOOD_DEVICE,
            ["line 3, devices: Value error, device id 'room-1-env' is used twice"],
        ),
        ("site: [unclosed\n", ["not valid YAML", "line 2"]),
        ("- just\n- a list\n", ["Input should be a valid dictionary"]),
    ],
)
def test_bad_agent_config(tmp_path: Path, text: str, expected: list[str]) -> None:
    path = agent_config(tmp_path, text)
    for command in ("check", "run"):
        result = run_cli("campus-agent", command, "--config", str(path))
        assert result.returncode == 2, result.stderr
        assert "Traceback" not in result.stderr
        assert str(path) in result.stderr
        for fragment in expected:
            assert fragment in result.stderr, result.stderr


def test_missing_config_file(tmp_path: Path) -> None:
    result = run_cli("campus-agent", "run", "--config", str(tmp_path / "absent.yaml"))
    assert result.returncode == 2
    assert "absent.yaml" in result.stderr and "cannot read" in result.stderr
    assert "Traceback" not in result.stderr


def test_good_agent_config_checks(tmp_path: Path) -> None:
    path = agent_config(tmp_path, "site: s\ngateway: g\ndevices:\n" + GOOD_DEVICE)
    result = run_cli("campus-agent", "check", "--config", str(path))
    assert result.returncode == 0, result.stderr
    assert "valid" in result.stdout and "1 devices" in result.stdout
    assert "network policy: not enforced (policy.enabled is false)" in result.stdout
    enforcing = agent_config(
        tmp_path,
        "site: s\ngateway: g\npolicy:\n  enabled: true\n  nft_path: /nonexistent/nft\n",
    )
    result = run_cli("campus-agent", "check", "--config", str(enforcing))
    assert result.returncode == 0, result.stderr
    assert "network policy: enforced in table inet campus_iot" in result.stdout
    assert "/nonexistent/nft NOT FOUND" in result.stdout


def test_a_bad_profile_names_its_own_file(tmp_path: Path) -> None:
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    (profiles / "broken.yaml").write_text(
        "vendor: X\nmodel: Y\nprotocol: modbus\nkind: sensor\nsource: manual\npoints:\n"
        "  - name: a\n    table: input\n    address: 0\n    type: float32\n"
        "  - name: b\n    table: input\n    address: 1\n"
    )
    path = agent_config(tmp_path, f"site: s\ngateway: g\nprofiles_dir: {profiles}\n")
    result = run_cli("campus-agent", "check", "--config", str(path))
    assert result.returncode == 2
    assert "broken.yaml" in result.stderr
    assert "points 'a' and 'b' overlap at input 1" in result.stderr


def test_bad_fleet_config(tmp_path: Path) -> None:
    path = tmp_path / "fleet.yaml"
    path.write_text("mqtt:\n  host: ::1\n  keepalive_s: 0\ndatabase: [1]\n")
    result = run_cli("campus-fleet", "--config", str(path), "serve")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "line 3, mqtt.keepalive_s: Input should be greater than or equal to 2" in result.stderr
    assert "line 4, database:" in result.stderr


def test_bad_scenario(tmp_path: Path) -> None:
    path = tmp_path / "scenario.yaml"
    path.write_text("devices:\n  - id: r1\n    profile: nope\n    port: 70000\n")
    result = run_cli("campus-sim", "run", str(path))
    assert result.returncode == 2
    assert "line 4, devices.0.port: Input should be less than or equal to 65535" in result.stderr


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["readings", "nobody"], 3, "no device 'nobody'"),
        (["readings", "x", "--since", "yesterday-ish"], 2, "neither a duration"),
        (["readings", "x", "--limit", "0"], 2, "--limit"),
        (["gateways", "frobnicate"], 2, "No such command"),
    ],
)
def test_fleet_cli_errors(tmp_path: Path, args: list[str], code: int, message: str) -> None:
    from fleet.store import Store

    Store(tmp_path / "fleet.db").close()
    result = run_cli("campus-fleet", "--db", str(tmp_path / "fleet.db"), *args)
    assert result.returncode == code, result.stderr
    assert message in result.stderr


def test_fleet_cli_without_a_database(tmp_path: Path) -> None:
    result = run_cli("campus-fleet", "--db", str(tmp_path / "none.db"), "gateways", "list")
    assert result.returncode == 1
    assert "no fleet database" in result.stderr


def test_fleet_cli_on_a_file_that_is_not_a_database(tmp_path: Path) -> None:
    (tmp_path / "fleet.db").write_bytes(b"not a database at all" * 200)
    result = run_cli("campus-fleet", "--db", str(tmp_path / "fleet.db"), "stats")
    assert result.returncode == 1
    assert "cannot read the fleet database" in result.stderr
    assert "Traceback" not in result.stderr


def test_demo_refuses_a_folder_it_did_not_make(tmp_path: Path) -> None:
    (tmp_path / "precious.txt").write_text("homework")
    result = run_cli("campus-sim", "demo", "--workdir", str(tmp_path), "--duration", "1")
    assert result.returncode == 1
    assert "not an earlier demo's folder" in result.stderr
    assert (tmp_path / "precious.txt").read_text() == "homework"
