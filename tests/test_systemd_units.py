"""Checks of the hardened systemd units in systemd/ with systemd's own tools.

Two real checks, both offline (no systemd as PID 1 needed, so they run in a container):

* ``systemd-analyze security --offline=yes --threshold=N`` scores each unit file's exposure and
  exits 1 above N (the scale is ten times the printed score: 20 means 2.0).
* ``systemd-analyze verify`` parses the units as the manager would. It works offline too, but it
  insists that ExecStart's program exists and is executable, and /opt/campus-iot is not installed
  here, so it runs on copies whose ExecStart program is rewritten to /bin/true (arguments kept).
  verify exits 0 on unknown keys and unparsable values (it only warns), so its stderr must be
  empty as well.

systemd-analyze comes from the Debian package ``systemd``: a missing one fails these tests on
purpose instead of skipping them. Both commands take milliseconds.

The rest are plain Python checks of the unit files' promises (privileges, capabilities, paths).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNIT_DIR = Path(__file__).resolve().parent.parent / "systemd"
VENV_BIN = "/opt/campus-iot/venv/bin"

# Exposure thresholds in systemd-analyze's --threshold scale (score x 10).
THRESHOLDS: dict[str, int] = {
    "campus-agent.service": 30,
    "campus-fleet.service": 20,
    "campus-sim.service": 20,
}
EXEC_START: dict[str, str] = {
    "campus-agent.service": f"{VENV_BIN}/campus-agent run --config /etc/campus-iot/agent.yaml",
    "campus-fleet.service": f"{VENV_BIN}/campus-fleet serve --config /etc/campus-iot/fleet.yaml",
    "campus-sim.service": f"{VENV_BIN}/campus-sim run /etc/campus-iot/sim-scenario.yaml",
}
UNITS = sorted(THRESHOLDS)
SCORE_RE = re.compile(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)")

Unit = dict[str, dict[str, list[str]]]


def parse_unit(path: Path) -> Unit:
    """Parses a unit file into section -> key -> values in file order (keys may repeat)."""
    unit: Unit = {}
    section: dict[str, list[str]] | None = None
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        assert not line.endswith("\\"), f"{path.name}:{number}: continuation lines not expected"
        if line.startswith("[") and line.endswith("]"):
            section = unit.setdefault(line[1:-1], {})
            continue
        assert section is not None, f"{path.name}:{number}: assignment outside a section"
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}:{number}: not an assignment: {line!r}"
        section.setdefault(key.strip(), []).append(value.strip())
    return unit


def service(unit_name: str) -> dict[str, list[str]]:
    return parse_unit(UNIT_DIR / unit_name)["Service"]


def single(values: dict[str, list[str]], key: str) -> str:
    assert key in values, f"{key}= missing"
    assert len(values[key]) == 1, f"{key}= set {len(values[key])} times: {values[key]}"
    return values[key][0]


def capability_set(values: list[str]) -> set[str]:
    """The capabilities that a list of CapabilityBoundingSet=/AmbientCapabilities= lines leave.

    An empty assignment resets the list; an inverted one (~) is rejected: the units use allow
    lists only, which keeps this evaluation simple and the unit obvious to read.
    """
    caps: set[str] = set()
    for value in values:
        assert not value.startswith("~"), f"inverted capability list: {value!r}"
        caps = (caps | set(value.split())) if value else set()
    return caps


def systemd_analyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None:
        pytest.fail(
            "systemd-analyze not found: install the Debian package 'systemd' "
            "(scripts/debian-packages.txt)"
        )
    return path


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [systemd_analyze(), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize("unit_name", UNITS)
def test_security_exposure_within_threshold(unit_name: str) -> None:
    threshold = THRESHOLDS[unit_name]
    result = run(
        "security",
        "--offline=yes",
        f"--threshold={threshold}",
        "--no-pager",
        str(UNIT_DIR / unit_name),
    )
    match = SCORE_RE.search(result.stdout)
    assert match is not None, f"no overall score in:\n{result.stdout}\n{result.stderr}"
    score = float(match.group(1))
    assert result.returncode == 0, (
        f"{unit_name}: exposure {score} above {threshold / 10}\n{result.stdout}{result.stderr}"
    )
    assert score * 10 <= threshold
    assert result.stderr == "", f"{unit_name}: systemd-analyze warned:\n{result.stderr}"


def test_security_threshold_is_enforced() -> None:
    """Guards the check above: a threshold below the score must fail."""
    result = run(
        "security", "--offline=yes", "--threshold=0", "--no-pager", str(UNIT_DIR / UNITS[0])
    )
    assert result.returncode != 0, result.stdout


def test_verify_units(tmp_path: Path) -> None:
    for unit_name in UNITS:
        text = (UNIT_DIR / unit_name).read_text(encoding="utf-8")
        rewritten, count = re.subn(
            rf"^ExecStart={re.escape(VENV_BIN)}/\S+", "ExecStart=/bin/true", text, flags=re.M
        )
        assert count == 1, f"{unit_name}: expected one ExecStart= under {VENV_BIN}"
        (tmp_path / unit_name).write_text(rewritten, encoding="utf-8")
    result = run("verify", "--man=no", *(str(tmp_path / name) for name in UNITS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stderr == "", f"systemd-analyze verify warned:\n{result.stderr}"


@pytest.mark.parametrize("unit_name", UNITS)
def test_common_hardening(unit_name: str) -> None:
    path = UNIT_DIR / unit_name
    assert path.read_text(encoding="utf-8").startswith("#"), "no explanatory comment block"
    unit = parse_unit(path)
    values = unit["Service"]
    assert single(values, "NoNewPrivileges") == "yes"
    assert single(values, "ProtectSystem") == "strict"
    assert single(values, "ExecStart") == EXEC_START[unit_name]
    assert single(values, "Environment") == "PYTHONUNBUFFERED=1"
    assert single(values, "UMask") == "0077"
    assert single(values, "ConfigurationDirectory") == "campus-iot"
    assert single(unit["Unit"], "Documentation") == "file:///opt/campus-iot/README.md"
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]


def test_agent_has_exactly_cap_net_admin() -> None:
    values = service("campus-agent.service")
    assert capability_set(values["CapabilityBoundingSet"]) == {"CAP_NET_ADMIN"}
    assert capability_set(values["AmbientCapabilities"]) == {"CAP_NET_ADMIN"}


def test_agent_identity_devices_and_sockets() -> None:
    values = service("campus-agent.service")
    assert single(values, "User") == "campus-agent"
    assert "DynamicUser" not in values
    assert single(values, "StateDirectory") == "campus-agent"
    assert single(values, "Type") == "exec"
    assert "WatchdogSec" not in values
    assert single(values, "Restart") == "always"
    assert single(values, "RestartSec") == "2"
    assert single(values, "MemoryMax") == "150M"
    assert single(values, "SupplementaryGroups") == "dialout"
    assert single(values, "PrivateDevices") == "no"
    assert single(values, "DevicePolicy") == "closed"
    assert sorted(values["DeviceAllow"]) == ["char-ttyAMA rw", "char-ttyUSB rw"]
    families = set(single(values, "RestrictAddressFamilies").split())
    assert families == {"AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK"}


@pytest.mark.parametrize("unit_name", ["campus-fleet.service", "campus-sim.service"])
def test_fleet_and_sim_have_no_capabilities(unit_name: str) -> None:
    values = service(unit_name)
    assert capability_set(values["CapabilityBoundingSet"]) == set()
    assert capability_set(values.get("AmbientCapabilities", [])) == set()
    assert single(values, "PrivateDevices") == "yes"
    assert set(single(values, "RestrictAddressFamilies").split()) == {
        "AF_UNIX",
        "AF_INET",
        "AF_INET6",
    }


def test_fleet_identity() -> None:
    values = service("campus-fleet.service")
    assert single(values, "User") == "campus-fleet"
    assert single(values, "StateDirectory") == "campus-fleet"
    assert single(values, "MemoryMax") == "1G"


def test_sim_is_dynamic_and_stateless() -> None:
    values = service("campus-sim.service")
    assert single(values, "DynamicUser") == "yes"
    assert "User" not in values
    assert "StateDirectory" not in values


@pytest.mark.parametrize("name", UNITS)
def test_exec_start_is_a_command_line_the_program_accepts(name: str) -> None:
    """The unit's arguments parse: the same command with the venv's script and --help added
    exits 0 (an unknown option or command would exit 2)."""
    argv = EXEC_START[name].split()
    script = Path(sys.executable).parent / Path(argv[0]).name
    result = subprocess.run(
        [str(script), *argv[1:], "--help"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("name", UNITS)
def test_a_bad_configuration_is_not_restarted_for_ever(name: str) -> None:
    service = parse_unit(UNIT_DIR / name)["Service"]
    assert service["RestartPreventExitStatus"] == ["2"]
