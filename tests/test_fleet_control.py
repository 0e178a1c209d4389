"""The fleet's control plane through real processes: a private Mosquitto, `campus-fleet serve`,
simulated Modbus devices, and 20 real agents (agent.runtime.Agent, in one host process).

Covered: signed config push with acknowledgements, rejection with the reason, staged rollouts
that halt on failures and roll the failed stage back, a fleet restart mid-rollout, tampered and
replayed documents reported, device commands with per-device answers.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
import yaml
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from simulator.broker import MosquittoBroker, free_port
from tests.conftest import REPO, wait_for, write_yaml
from tests.fleet_campus import Campus
from wire.models import encode
from wire.signing import generate_key, sign
from wire.topics import Channel, topic

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]

GATEWAYS = [f"gw-{n:02d}" for n in range(1, 21)]
BAD = {"gw-18", "gw-19", "gw-20"}  # their profile of the sensor lacks the co2 point
RELAYS = {"gw-01": "rel-01", "gw-02": "rel-02", "gw-03": "rel-03"}


class Fleet(Campus):
    """The campus of 20 gateways, whose agents (their agent.yaml in `agents`) run in one host
    process, tests/agent_host.py."""

    def __init__(
        self, directory: Path, site: str, broker: MosquittoBroker, **settings: Any
    ) -> None:
        super().__init__(directory, site, broker, **settings)
        self.agents: list[Path] = []

    def start_fleet(self) -> None:
        super().start_fleet()
        db = self.dir / "fleet.db"
        wait_for(lambda: _heartbeat(db), 20, what="fleet heartbeat")

    def start_agents(self) -> None:
        with (self.dir / "agents.log").open("ab") as log:
            self.processes.running["agents"] = subprocess.Popen(
                [sys.executable, str(REPO / "tests" / "agent_host.py"), *map(str, self.agents)],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def status(self) -> dict[str, dict[str, Any]]:
        rows = self.json("config", "status", ok=(0, 4))
        return {row["gateway"]: row for row in rows}


def _heartbeat(db: Path) -> bool:
    import sqlite3

    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        row = conn.execute("SELECT max(heartbeat_ns) FROM service").fetchone()
    except sqlite3.Error:
        return False
    finally:
        conn.close()
    return bool(row and row[0] and time.time_ns() - row[0] < 5e9)


def _bad_profiles(directory: Path) -> Path:
    """The shipped profiles, but the sensor's profile without its co2 point."""
    directory.mkdir()
    for path in (REPO / "firmware-profiles").glob("*.yaml"):
        shutil.copy(path, directory / path.name)
    profile = yaml.safe_load((directory / "campussim-thc100.yaml").read_text())
    profile["points"] = [p for p in profile["points"] if p["name"] != "co2"]
    (directory / "campussim-thc100.yaml").write_text(yaml.safe_dump(profile, sort_keys=False))
    return directory


def _inventory(site: str, path: Path) -> list[dict[str, Any]]:
    """Writes the inventory spreadsheet of the 20 gateways (a sensor each, a relay module on
    three) to `path`; the devices campus-sim serves for them."""
    sim_devices: list[dict[str, Any]] = []
    rows = ["site,building,room,gateway,device,kind,profile,connection"]
    for index, gw in enumerate(GATEWAYS, start=1):
        port = free_port()
        device = f"env-{index:02d}"
        sim_devices.append(
            {"id": device, "profile": "campussim-thc100", "port": port, "seed": index}
        )
        building = "a" if index <= 10 else "b"
        rows.append(
            f"{site},{building},room-{index:02d},{gw},{device},sensor,campussim-thc100,"
            f"modbus-tcp://127.0.0.1:{port}?unit=1"
        )
        if gw in RELAYS:
            port = free_port()
            sim_devices.append({"id": RELAYS[gw], "profile": "wirenboard-wb-mr6xv", "port": port})
            rows.append(
                f"{site},{building},room-{index:02d},{gw},{RELAYS[gw]},board,"
                f"wirenboard-wb-mr6xv,modbus-tcp://127.0.0.1:{port}?unit=1"
            )
    path.write_text("\n".join(rows) + "\n")
    return sim_devices


def _agent_configs(env: Fleet, broker: MosquittoBroker) -> list[Path]:
    """Each gateway's agent.yaml, trusting the fleet's key; the BAD ones with `_bad_profiles`."""
    public = env.signing_key.with_name(env.signing_key.name + ".pub")
    bad_profiles = _bad_profiles(env.dir / "bad-profiles")
    agents = []
    for gw in GATEWAYS:
        agent = {
            "site": env.site,
            "gateway": gw,
            "mqtt": {"host": "127.0.0.1", "port": broker.port, "keepalive_s": 5},
            "buffer": {"path": str(env.dir / gw / "buffer.db"), "commit_interval_s": 0.2},
            "fleet": {
                "public_keys": [str(public)],
                "applied_path": str(env.dir / gw / "config.applied.json"),
            },
            "state_interval_s": 5,
            "clock": {"sync_check": "none"},
        }
        if gw in BAD:
            agent["profiles_dir"] = str(bad_profiles)
        (env.dir / gw).mkdir()
        agents.append(write_yaml(env.dir / gw / "agent.yaml", agent))
    return agents


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, broker: MosquittoBroker) -> Iterator[Fleet]:
    base = tmp_path_factory.mktemp("control")
    site = f"ctl-{free_port()}"
    inventory = base / "inventory.csv"
    sim_devices = _inventory(site, inventory)
    with Fleet(base, site, broker, ack_timeout_s=20, command_timeout_s=8) as env:
        env.ok("keys", "generate")
        env.ok("import", str(inventory))
        site_settings = write_yaml(base / "site-settings.yaml", {"interval_s": 1})
        env.ok("settings", "set", f"site:{site}", str(site_settings))
        env.agents = _agent_configs(env, broker)
        env.start_sim({"time_scale": 1, "devices": sim_devices})
        env.start_fleet()
        env.start_agents()
        env.wait_online(GATEWAYS, timeout=60)
        env.push_and_wait_applied(GATEWAYS, timeout_s=60)
        yield env


def _log(env: Fleet) -> str:
    return (env.dir / "agents.log").read_text(errors="replace")[-4000:]


def test_push_is_applied_by_every_gateway_and_devices_report(fleet: Fleet) -> None:
    status = fleet.status()
    assert set(status) == set(GATEWAYS)
    assert all(row["in_sync"] and row["applied_version"] >= 1 for row in status.values())
    # The devices the config gave the agents are polled: their readings reach the fleet.
    devices = wait_for(
        lambda: (
            {d["device"] for d in fleet.json("devices", "list") if d["availability"] == "up"}
            >= {f"env-{n:02d}" for n in range(1, 21)}
        ),
        60,
        what="every sensor up",
    )
    assert devices
    # A dry run builds and validates, and says nothing would change.
    plan = fleet.json("config", "push", f"site:{fleet.site}", "--dry-run")
    assert plan["dry_run"] and not any(g["changed"] for g in plan["gateways"])
    # Pushing again changes nothing: no new version.
    again = fleet.json("config", "push", f"site:{fleet.site}")
    assert not any(g["new"] for g in again["gateways"])
    # The audit log has the push, with who made it.
    audit = fleet.json("audit", "--action", "config.push")
    assert audit and audit[-1]["result"] == "ok"


def test_rollout_halts_on_failures_and_rolls_the_failed_stage_back(fleet: Fleet) -> None:
    before = fleet.status()
    overlay = write_yaml(
        fleet.dir / "co2-alarm.yaml", {"alarms": {"co2": {"high": 1000, "hysteresis": 50}}}
    )
    started = fleet.json(
        "rollout",
        "start",
        "--target",
        f"site:{fleet.site}",
        "--stages",
        "1,25%,100%",
        "--max-failures",
        "10%",
        "--config",
        str(overlay),
        "--ack-timeout",
        "30",
    )
    rollout_id = started["rollout"]
    final = wait_for(
        lambda: (
            (s := fleet.json("rollout", "status", str(rollout_id)))["state"] in ("halted", "done")
            and s
        ),
        120,
        what="rollout halted",
    )
    assert final["state"] == "halted", final
    listed = {r["id"]: r for r in fleet.json("rollout", "list")}
    assert listed[rollout_id]["state"] == "halted"
    by_gateway = {g["gateway"]: g for g in final["gateways"]}
    # The canary and the 25 % stage applied it and keep it.
    for gw in GATEWAYS[:5]:
        assert by_gateway[gw]["status"] == "applied", by_gateway[gw]
    # The last stage failed (3 of 20 > 10 %): every gateway of it is rolled back.
    for gw in GATEWAYS[5:]:
        assert by_gateway[gw]["status"] == "rolled_back", by_gateway[gw]
    for gw in BAD:
        assert "co2" in (by_gateway[gw]["reason"] or ""), by_gateway[gw]

    def rolled_back_applied() -> dict[str, dict[str, Any]] | None:
        status = fleet.status()
        done = all(status[gw]["in_sync"] for gw in GATEWAYS)
        return status if done else None

    status = wait_for(rolled_back_applied, 90, what="rollback versions applied")
    for gw in GATEWAYS[5:]:
        applied = fleet.json("config", "show", f"gateway:{fleet.site}/{gw}", "--applied")
        previous = fleet.json(
            "config",
            "show",
            f"gateway:{fleet.site}/{gw}",
            "--version",
            str(before[gw]["applied_version"]),
        )
        assert applied["config"] == previous["config"], gw
        assert status[gw]["applied_version"] > before[gw]["applied_version"]
    canary = fleet.json("config", "show", f"gateway:{fleet.site}/gw-01", "--applied")
    assert canary["config"]["devices"][0]["alarms"]["co2"]["high"] == 1000


def test_rollout_survives_a_fleet_restart(fleet: Fleet) -> None:
    fleet.processes.stop("fleet")
    overlay = write_yaml(fleet.dir / "slower.yaml", {"interval_s": 2})
    started = fleet.json(
        "rollout",
        "start",
        "--target",
        f"building:{fleet.site}/a",
        "--stages",
        "1,50%,100%",
        "--max-failures",
        "0%",
        "--config",
        str(overlay),
    )
    rollout_id = str(started["rollout"])
    fleet.start_fleet()
    wait_for(
        lambda: fleet.json("rollout", "status", rollout_id)["stage"] >= 2,
        60,
        what="rollout past its canary",
    )
    fleet.processes.kill("fleet")  # a crash in the middle of the rollout
    time.sleep(1)
    fleet.start_fleet()
    final = wait_for(
        lambda: (s := fleet.json("rollout", "status", rollout_id))["state"] != "running" and s,
        120,
        what="rollout finished",
    )
    assert final["state"] == "done", final
    assert final["progress"]["applied"] == 10
    # Once done, the settings are the building's own: a later push keeps them.
    shown = fleet.json("config", "show", f"gateway:{fleet.site}/gw-03")
    assert all(d["interval_s"] == 2 for d in shown["config"]["devices"])
    diff = fleet.json("config", "diff", f"building:{fleet.site}/a")
    assert not any(entry["changed"] for entry in diff), [e["diff"] for e in diff if e["changed"]]


def _publish_retained(port: int, name: str, payload: bytes) -> None:
    client = paho.Client(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5)
    client.connect("127.0.0.1", port)
    client.loop_start()
    client.publish(name, payload, qos=1, retain=True).wait_for_publish(10)
    client.loop_stop()
    client.disconnect()


def test_tampered_and_replayed_configs_are_refused_and_reported(
    fleet: Fleet, broker: MosquittoBroker
) -> None:
    gw = "gw-02"
    status = fleet.status()[gw]
    config_topic = topic(fleet.site, gw, Channel.CONFIG)
    # Signed by a key the gateway does not trust.
    rogue = generate_key(fleet.dir / "rogue.key")
    del rogue
    from wire.signing import load_private_key

    document = sign(
        load_private_key(fleet.dir / "rogue.key"),
        kind="config",
        site=fleet.site,
        gateway=gw,
        version=status["applied_version"] + 1,
        issued_ns=time.time_ns(),
        body={"devices": []},
    )
    _publish_retained(broker.port, config_topic, encode(document))
    reported = wait_for(
        lambda: (row := fleet.status()[gw])["last_ack"] == "rejected" and row,
        30,
        what="rejection reported",
    )
    assert "trust" in reported["reason"], reported
    # The gateway still runs what it had.
    assert reported["applied_version"] == status["applied_version"]

    # A replay of an older, genuinely signed version.
    import sqlite3

    conn = sqlite3.connect(fleet.dir / "fleet.db")
    (old,) = conn.execute(
        "SELECT document FROM config_versions WHERE site = ? AND gateway = ? AND version = 1",
        (fleet.site, gw),
    ).fetchone()
    conn.close()
    _publish_retained(broker.port, config_topic, old.encode())
    wait_for(lambda: "older" in (fleet.status()[gw]["reason"] or ""), 30, what="replay reported")
    # A forced push puts the genuine latest config back on the topic.
    pushed = fleet.json("config", "push", f"gateway:{fleet.site}/{gw}", "--force")
    assert pushed["gateways"][0]["state"] == "applied", pushed


def test_commands_reach_devices_and_every_device_answers(fleet: Fleet) -> None:
    result = fleet.json(
        "cmd", f"site:{fleet.site}", "set_relay_1", "true", "--kind", "board", timeout=60
    )
    answers = {r["device"]: r for r in result["results"]}
    assert set(answers) == set(RELAYS.values())
    for answer in answers.values():
        assert answer["status"] == "ok", answer
        assert answer["id"]  # the correlation id
    batch = result["batch"]
    assert any(b["batch"] == batch for b in fleet.json("commands", "list"))
    shown = fleet.json("commands", "show", batch)
    assert {r["id"] for r in shown["results"]} == {a["id"] for a in answers.values()}
    # The relay really switched: the device reports it.
    wait_for(
        lambda: any(
            r["point"] == "relay_1" and r["value"] in (1, True)
            for r in fleet.json("readings", "rel-01", "--since", "5m")
        ),
        30,
        what="relay_1 on in the readings",
    )
    # A sensor has no such command: answered at once, nothing sent.
    refused = fleet.cli("cmd", "env-05", "set_relay_1", "true", "--json")
    assert refused.returncode == 1
    (answer,) = json.loads(refused.stdout)["results"]
    assert answer["status"] == "unknown_action"
    # A bad argument is refused by the fleet against the profile, before anything is sent.
    bad = fleet.cli("cmd", "rel-02", "set_relay_1", '"maybe"', "--json")
    assert bad.returncode == 2, bad.stderr
    assert "profile wirenboard-wb-mr6xv (rel-02): argument:" in bad.stderr, bad.stderr
    assert "nothing sent" in bad.stderr


def test_a_gateway_offline_during_a_push_applies_it_when_it_returns(fleet: Fleet) -> None:
    # Stop every agent (a planned stop), push, bring them back: the retained config is theirs.
    host = fleet.processes.running["agents"]
    host.send_signal(signal.SIGTERM)
    host.wait(30)
    wait_for(
        lambda: all(g["status"] == "offline" for g in fleet.json("gateways", "list")),
        30,
        what="gateways offline",
    )
    overlay = fleet.dir / "room-settings.yaml"
    overlay.write_text(yaml.safe_dump({"interval_s": 3}))
    assert fleet.cli("settings", "set", f"room:{fleet.site}/room-04", str(overlay)).returncode == 0
    pushed = fleet.cli("config", "push", f"gateway:{fleet.site}/gw-04", "--timeout", "2", "--json")
    assert pushed.returncode == 4  # not acknowledged yet
    assert json.loads(pushed.stdout)["gateways"][0]["state"] == "sent"
    fleet.start_agents()
    wait_for(lambda: fleet.status()["gw-04"]["in_sync"], 60, what="gw-04 applied on return")
    applied = fleet.json("config", "show", f"gateway:{fleet.site}/gw-04", "--applied")
    assert applied["config"]["devices"][0]["interval_s"] == 3
