"""The whole data path on an IPv6-only network, all real processes in a network namespace whose
loopback has ::1 and no 127.0.0.1, so that any hidden use of IPv4 fails loudly.

Broker on ::1 only; simulated Modbus TCP devices on ::1; the fleet reaches the broker by the
literal ::1, the agent by a name that resolves only to ::1 (the namespace's own hosts file); a
device's connection is imported as `modbus-tcp://[::1]:PORT` and pushed as a signed config.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from simulator.broker import free_ports
from tests.conftest import BIN, Processes, wait_for, write_yaml
from wire.signing import generate_key, public_path

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

V6_NAME = "ip6-localhost"  # Debian's name for ::1; this machine's /etc/hosts lacks it
POINTS = {"temperature", "humidity", "co2", "dew_point", "uptime"}

# Runs inside the namespace: a broker on ::1 only, until SIGTERM (which stops it cleanly).
BROKER = """
import signal, sys, threading
from pathlib import Path
from simulator.broker import MosquittoBroker
stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: stop.set())
with MosquittoBroker(Path(sys.argv[1]), int(sys.argv[2]), listen=("::1",)):
    print("broker ready", flush=True)
    stop.wait()
"""


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10, check=False)


@pytest.fixture
def namespace() -> Iterator[str]:
    """A network namespace with only ::1 on its loopback and a hosts file naming only ::1."""
    if os.geteuid() != 0:
        pytest.skip("needs root to create a network namespace")
    if shutil.which("ip") is None:
        pytest.skip("needs iproute2 ('ip') for network namespaces")
    name = f"campus-v6-{os.getpid()}-{secrets.token_hex(3)}"
    added = _ip("netns", "add", name)
    if added.returncode != 0:
        pytest.skip(f"network namespaces unavailable: {added.stderr.strip()}")
    etc = Path("/etc/netns") / name  # `ip netns exec` bind-mounts etc/netns/NAME/hosts
    try:
        etc.mkdir(parents=True)
        (etc / "hosts").write_text(f"::1 {V6_NAME} ip6-loopback\n")
        for command in (
            ("-n", name, "link", "set", "lo", "up"),
            ("-n", name, "addr", "del", "127.0.0.1/8", "dev", "lo"),
        ):
            done = _ip(*command)
            assert done.returncode == 0, done.stderr
        yield name
    finally:
        # Anything still in the namespace is ours: end it by pid before deleting the namespace.
        for pid in _ip("netns", "pids", name).stdout.split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        _ip("netns", "del", name)
        shutil.rmtree(etc, ignore_errors=True)


class Net:
    """Starts and runs the console scripts inside the namespace."""

    def __init__(self, name: str, processes: Processes, fleet_config: Path) -> None:
        self.name = name
        self.processes = processes
        self.fleet_config = fleet_config

    def start(self, label: str, program: str, *args: str) -> None:
        """`program` is a console script of ours, or an absolute path (Processes.start runs
        BIN / its first argument, and BIN / an absolute path is that path)."""
        ip = shutil.which("ip")
        assert ip is not None
        self.processes.start(label, ip, "netns", "exec", self.name, str(BIN / program), *args)

    def run(self, program: str, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ip", "netns", "exec", self.name, program, *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    def fleet(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.run(str(BIN / "campus-fleet"), "--config", str(self.fleet_config), *args)

    def fleet_json(self, *args: str) -> Any:
        result = self.fleet(*args, "--json")
        assert result.returncode == 0, (result.returncode, result.stderr)
        return json.loads(result.stdout)

    def readings(self, device: str) -> list[dict[str, Any]]:
        """The device's readings, or [] until the fleet knows it (exit code 3)."""
        result = self.fleet("readings", device, "--since", "1h", "--limit", "100000", "--json")
        if result.returncode == 3 or "no fleet database" in result.stderr:
            return []
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)  # type: ignore[no-any-return]

    def gateway(self) -> dict[str, Any]:
        rows = self.fleet_json("gateways", "list")
        assert len(rows) == 1, rows
        return rows[0]  # type: ignore[no-any-return]

    def availability(self) -> dict[str, tuple[str, str]]:
        """device → (its availability, its gateway's status)."""
        rows = self.fleet_json("devices", "list")
        return {row["device"]: (row["availability"], row["gateway_status"]) for row in rows}


def test_the_data_path_and_a_config_push_work_without_ipv4(
    namespace: str, processes: Processes, tmp_path: Path
) -> None:
    # The namespace really is IPv6-only: no IPv4 address at all, ::1 on the loopback.
    assert _ip("-n", namespace, "-4", "addr", "show").stdout.strip() == ""
    assert "inet6 ::1/128" in _ip("-n", namespace, "-6", "addr", "show", "dev", "lo").stdout

    broker_port, first_port, second_port = free_ports(3)
    site = f"school-v6-{broker_port}"
    key = tmp_path / "keys" / "fleet-signing.key"
    fleet_config = write_yaml(
        tmp_path / "fleet.yaml",
        {
            "name": f"fleet-{broker_port}",
            "mqtt": {"host": "::1", "port": broker_port, "keepalive_s": 5},
            "database": str(tmp_path / "fleet.db"),
            "sites": [site],
            "signing_key": str(key),
            "ack_timeout_s": 20,
        },
    )
    net = Net(namespace, processes, fleet_config)
    generate_key(key)  # what `campus-fleet keys generate` writes
    scenario = write_yaml(
        tmp_path / "scenario.yaml",
        {
            "time_scale": 60,
            "devices": [
                {
                    "id": "room-7-env",
                    "profile": "campussim-thc100",
                    "host": "::1",
                    "port": first_port,
                    "seed": 7,
                },
                {
                    "id": "room-8-env",
                    "profile": "campussim-thc100",
                    "host": "::1",
                    "port": second_port,
                    "seed": 8,
                },
            ],
        },
    )
    agent = write_yaml(
        tmp_path / "agent.yaml",
        {
            "site": site,
            "gateway": "gw-1",
            "mqtt": {"host": V6_NAME, "port": broker_port, "keepalive_s": 2},
            "buffer": {"path": str(tmp_path / "buffer.db"), "commit_interval_s": 0.2},
            "fleet": {
                "public_keys": [str(public_path(key))],
                "applied_path": str(tmp_path / "config.applied.json"),
            },
            "state_interval_s": 2,
            "clock": {"sync_check": "none"},
            "devices": [
                {
                    "id": "room-7-env",
                    "profile": "campussim-thc100",
                    "interval_s": 0.2,
                    "connection": {"type": "modbus-tcp", "host": "::1", "port": first_port},
                }
            ],
        },
    )

    broker_dir = tmp_path / "broker"
    net.start("broker", sys.executable, "-c", BROKER, str(broker_dir), str(broker_port))
    wait_for(lambda: "broker ready" in processes.log("broker"), 15, what="broker on ::1")
    listeners = [
        line
        for line in (broker_dir / "mosquitto.conf").read_text().splitlines()
        if line.startswith("listener")
    ]
    assert listeners == [f"listener {broker_port} ::1"]
    net.start("sim", "campus-sim", "run", str(scenario))
    wait_for(lambda: processes.log("sim").count(" on ::1 port ") == 2, 15, what="sim on ::1")
    net.start("fleet", "campus-fleet", "--config", str(fleet_config), "serve")
    wait_for(lambda: "subscribed to" in processes.log("fleet"), 15, what="fleet subscribed")
    net.start("agent", "campus-agent", "run", "--config", str(agent))

    # Readings travel device → agent → broker → fleet, every hop over IPv6.
    rows = wait_for(
        lambda: len(rows := net.readings("room-7-env")) >= 50 and rows,
        30,
        what="50 readings in the fleet",
    )
    seqs = [row["seq"] for row in rows]
    assert seqs == list(range(1, len(seqs) + 1)), "sequence numbers have holes"
    assert {row["point"] for row in rows} == POINTS
    assert 300 < {row["point"]: row["value"] for row in rows}["co2"] < 5000
    wait_for(lambda: net.availability() == {"room-7-env": ("up", "online")}, 10, what="device up")
    assert f"connected to MQTT broker {V6_NAME}:{broker_port}" in processes.log("agent")

    # An imported connection in the bracket form, pushed signed and applied over IPv6.
    inventory = tmp_path / "inventory.csv"
    inventory.write_text(
        "site,building,room,gateway,device,kind,profile,connection,interval_s\n"
        f"{site},a,room-8,gw-1,room-8-env,sensor,campussim-thc100,"
        f"modbus-tcp://[::1]:{second_port}?unit=1,0.2\n"
    )
    imported = net.fleet("import", str(inventory))
    assert imported.returncode == 0, imported.stderr + imported.stdout
    pushed = net.fleet_json("config", "push", f"site:{site}", "--timeout", "20")
    assert [(g["gateway"], g["state"]) for g in pushed["gateways"]] == [("gw-1", "applied")]
    applied = json.loads((tmp_path / "config.applied.json").read_text())
    devices = applied["body"]["devices"]
    assert [(d["id"], d["connection"]["host"], d["connection"]["port"]) for d in devices] == [
        ("room-8-env", "::1", second_port)
    ]
    new_rows = wait_for(
        lambda: len(rows := net.readings("room-8-env")) >= 25 and rows,
        20,
        what="readings of the pushed device",
    )
    assert {row["point"] for row in new_rows} == POINTS
    # The gateway's sequence stays whole across the change of config: old device, then new.
    old_rows = net.readings("room-7-env")
    all_seqs = sorted(row["seq"] for row in old_rows + new_rows)
    assert all_seqs == list(range(1, all_seqs[-1] + 1)), "sequence numbers have holes"
    wait_for(lambda: net.availability().get("room-8-env") == ("up", "online"), 10, what="pushed up")

    # A planned stop says so over IPv6 too (the agent's last publish before it disconnects).
    assert processes.stop("agent") == 0
    gateway = wait_for(
        lambda: (row := net.gateway())["status"] == "offline" and row, 10, what="offline"
    )
    assert (gateway["reason"], gateway["duplicates"]) == ("agent stopped", 0)

    broker_log = (broker_dir / "mosquitto.log").read_text()
    assert "Opening ipv6 listen socket" in broker_log
    assert "ipv4" not in broker_log
    connections = [line for line in broker_log.splitlines() if "New connection from" in line]
    assert connections and all("from ::1:" in line for line in connections), connections
    for name in ("broker", "sim", "fleet", "agent"):
        assert "Traceback" not in processes.log(name), processes.log(name)[-3000:]
