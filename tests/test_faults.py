"""Store-and-forward under faults, all real: processes, Mosquitto, SQLite files, Modbus.

Each test runs a simulated classroom (5 readings per poll), the fleet and an agent, breaks
something, then lets the system settle and checks the fleet's accounting: every sequence number
the agent committed arrived exactly once, or its loss was counted.
"""

from __future__ import annotations

import json
import signal
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from drivers.profiles import default_profiles_dir
from simulator.broker import MosquittoBroker, free_port
from tests.conftest import Processes, fleet_json, run_cli, wait_for, write_yaml

pytestmark = pytest.mark.slow


class System:
    """Config files and process control for one fault scenario."""

    def __init__(
        self,
        tmp_path: Path,
        broker: MosquittoBroker,
        processes: Processes,
        *,
        interval_s: float = 0.1,
        agent: dict[str, Any] | None = None,
        profiles_dir: Path | None = None,
    ) -> None:
        self.dir = tmp_path
        self.broker = broker
        self.processes = processes
        self.buffer = tmp_path / "buffer.db"
        port = free_port()
        self.site = f"school-{port}"
        self.scenario = write_yaml(
            tmp_path / "scenario.yaml",
            {
                "time_scale": 60,
                "devices": [{"id": "room-1-env", "profile": "campussim-thc100", "port": port}],
            },
        )
        self.fleet = write_yaml(
            tmp_path / "fleet.yaml",
            {
                "name": f"fleet-{port}",
                "mqtt": {"host": "::1", "port": broker.port, "keepalive_s": 5},
                "database": str(tmp_path / "fleet.db"),
                "sites": [self.site],
            },
        )
        document: dict[str, Any] = {
            "site": self.site,
            "gateway": "gw-1",
            "mqtt": {"host": "127.0.0.1", "port": broker.port, "keepalive_s": 5},
            "buffer": {"path": str(self.buffer), "commit_interval_s": 0.2},
            "state_interval_s": 2,
            "clock": {"sync_check": "none"},
            "devices": [
                {
                    "id": "room-1-env",
                    "profile": "campussim-thc100",
                    "interval_s": interval_s,
                    "connection": {"type": "modbus-tcp", "host": "127.0.0.1", "port": port},
                }
            ],
        }
        if profiles_dir is not None:
            document["profiles_dir"] = str(profiles_dir)
        for key, value in (agent or {}).items():
            if isinstance(value, dict):
                document[key] = {**document.get(key, {}), **value}
            else:
                document[key] = value
        self.agent = write_yaml(tmp_path / "agent.yaml", document)
        self.agents = 0

    def start_sim(self) -> None:
        self.processes.start("sim", "campus-sim", "run", str(self.scenario))

    def start_fleet(self, name: str = "fleet") -> None:
        log_before = self.processes.log(name) if (self.dir / f"{name}.log").exists() else ""
        self.processes.start(name, "campus-fleet", "serve", "--config", str(self.fleet))
        wait_for(
            lambda: (
                self.processes.log(name).count("subscribed to") > log_before.count("subscribed to")
            ),
            20,
            what="fleet subscribed",
        )

    def start_agent(self) -> str:
        self.agents += 1
        name = f"agent{self.agents}"
        self.processes.start(name, "campus-agent", "run", "--config", str(self.agent))
        return name

    def start(self) -> str:
        self.start_sim()
        self.start_fleet()
        return self.start_agent()

    def stats(self) -> dict[str, Any]:
        rows = fleet_json(self.fleet, "stats")
        return rows[0] if rows else {"received": 0, "last_seq": 0, "gaps": [], "evicted": 0}

    def agent_meta(self) -> dict[str, int]:
        if not self.buffer.exists():
            return {"last_seq": 0, "depth": 0, "evicted": 0}
        try:
            with sqlite3.connect(f"file:{self.buffer}?mode=ro", uri=True, timeout=5) as db:
                meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
                meta["depth"] = db.execute("SELECT count(*) FROM readings").fetchone()[0]
        except sqlite3.OperationalError:  # the agent is still creating its tables
            return {"last_seq": 0, "depth": 0, "evicted": 0}
        return meta

    def stored(self) -> list[tuple[int, str]]:
        with sqlite3.connect(self.dir / "fleet.db", timeout=5) as db:
            return db.execute("SELECT seq, point FROM readings ORDER BY seq").fetchall()

    def settle(self, timeout: float = 60) -> dict[str, Any]:
        """Stops the device, waits until the agent's buffer is empty and the fleet has caught
        up with the agent's last sequence number, and returns the fleet's stats."""
        self.processes.stop("sim")

        def caught_up() -> dict[str, Any] | None:
            meta = self.agent_meta()
            stats = self.stats()
            if meta["depth"] == 0 and stats["last_seq"] >= meta["last_seq"] > 0:
                return stats
            return None

        stats = wait_for(caught_up, timeout, interval=0.5, what="the fleet to catch up")
        assert stats["last_seq"] == self.agent_meta()["last_seq"]
        return stats


def assert_each_once(system: System, stats: dict[str, Any]) -> None:
    seqs = [seq for seq, _ in system.stored()]
    assert seqs == list(range(1, stats["last_seq"] + 1)), f"gaps: {stats['gaps'][:5]}"
    assert stats["gaps"] == [] and stats["received"] == stats["last_seq"]


def test_broker_down_for_20_seconds(
    tmp_path: Path, own_broker: MosquittoBroker, processes: Processes
) -> None:
    system = System(tmp_path, own_broker, processes, interval_s=0.1)  # 50 readings/s
    agent = system.start()
    wait_for(lambda: system.stats()["received"] >= 100, 20, what="first readings")
    own_broker.stop()
    time.sleep(20)
    buffered = system.agent_meta()["depth"]
    assert buffered >= 20 * 50 * 0.8, "the agent must have kept polling into its buffer"
    own_broker.start()
    stats = system.settle()
    assert_each_once(system, stats)
    # QoS 1 is at-least-once: a batch the broker took just before it stopped, whose PUBACK
    # never came back, is sent again (DUP). It is stored once and counted; at most a window.
    assert stats["duplicates"] <= 8 * 1000
    log = processes.log(agent)
    assert "MQTT connection lost" in log and log.count("connected to MQTT broker") >= 2


def test_agent_killed_five_times_under_load(
    tmp_path: Path, broker: MosquittoBroker, processes: Processes
) -> None:
    system = System(tmp_path, broker, processes, interval_s=0.1)
    agent = system.start()
    for _ in range(5):
        time.sleep(2)
        before = system.agent_meta()["last_seq"]
        processes.kill(agent)
        after = system.agent_meta()["last_seq"]
        assert after >= before, "a committed reading vanished"
        agent = system.start_agent()
    time.sleep(2)
    stats = system.settle()
    assert_each_once(system, stats)
    assert stats["last_seq"] > 5 * 50


def test_fleet_killed_mid_ingest(
    tmp_path: Path, broker: MosquittoBroker, processes: Processes
) -> None:
    system = System(tmp_path, broker, processes, interval_s=0.05)  # 100 readings/s
    system.start()
    for round_ in range(5):
        time.sleep(1.5)
        processes.kill(f"fleet{round_}" if round_ else "fleet")
        time.sleep(0.5)  # telemetry keeps arriving at the broker for the fleet's session
        system.start_fleet(f"fleet{round_ + 1}")
    stats = system.settle()
    assert_each_once(system, stats)


def test_buffer_cap_during_a_long_outage(
    tmp_path: Path, own_broker: MosquittoBroker, processes: Processes
) -> None:
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    profile = yaml.safe_load((default_profiles_dir() / "campussim-thc100.yaml").read_text())
    for point in profile["points"]:
        point["priority"] = {"temperature": "high", "uptime": "low"}.get(point["name"], "normal")
    (profiles / "campussim-thc100.yaml").write_text(yaml.safe_dump(profile))
    cap_mb = 0.25
    system = System(
        tmp_path,
        own_broker,
        processes,
        interval_s=0.02,  # 250 readings/s
        agent={"buffer": {"max_mb": cap_mb}},
        profiles_dir=profiles,
    )
    agent = system.start()
    wait_for(lambda: system.stats()["received"] > 0, 20, what="first readings")
    own_broker.stop()
    wait_for(lambda: system.agent_meta()["evicted"] > 3000, 60, what="evictions")
    sizes = [Path(f"{system.buffer}{suffix}") for suffix in ("", "-wal")]
    on_disk = sum(path.stat().st_size for path in sizes if path.exists())
    assert on_disk <= cap_mb * 1_000_000 * 1.6, f"buffer files take {on_disk} bytes"
    with sqlite3.connect(f"file:{system.buffer}?mode=ro", uri=True) as db:
        points = dict(db.execute("SELECT point, count(*) FROM readings GROUP BY point"))
    # Each eviction removes every low-priority reading before a normal one; the cap is measured
    # every few commits, so only readings taken since the last measurement can be left.
    assert points.get("uptime", 0) * 20 < points["co2"], "low priority readings go first"
    assert points["temperature"] > points["co2"], "high priority readings go last"
    assert processes.running[agent].poll() is None, "the agent keeps running"

    own_broker.start()
    stats = system.settle(timeout=90)
    meta = system.agent_meta()
    assert stats["evicted"] == meta["evicted"] > 0, "evictions are counted on both sides"
    missing = stats["missing"]
    assert stats["received"] + missing == stats["last_seq"]
    assert stats["gaps"] and stats["gaps_truncated"]  # every fifth reading: many small gaps
    assert missing == meta["evicted"], "every gap is an eviction, and nothing else is missing"
    stored = system.stored()
    temperatures = sum(1 for _, point in stored if point == "temperature")
    assert temperatures == stats["last_seq"] // 5, "alarm-priority readings are never evicted"
    kinds = [e["kind"] for e in fleet_json(system.fleet, "events")]
    assert "buffer_eviction" in kinds


@pytest.mark.parametrize("offset_s", [-1.6e9, 3.2e7], ids=["behind-1975", "ahead-1-year"])
def test_clock_synced_late_is_corrected(
    tmp_path: Path, broker: MosquittoBroker, processes: Processes, offset_s: float
) -> None:
    clock = tmp_path / "clock.json"
    clock.write_text(json.dumps({"offset_s": offset_s, "synced": False}))
    system = System(
        tmp_path,
        broker,
        processes,
        interval_s=0.1,
        agent={"clock": {"sync_check": "file", "file": str(clock), "hold_unsynced_s": 120}},
    )
    started_ns = time.time_ns()
    system.start()
    wait_for(lambda: system.agent_meta()["last_seq"] >= 100, 20, what="buffered readings")
    assert system.stats()["received"] == 0, "unsynced readings wait for the clock"
    clock.write_text(json.dumps({"offset_s": 0, "synced": True}))  # NTP steps the clock
    wait_for(lambda: system.stats()["received"] >= 200, 20, what="readings after sync")
    clock.write_text(json.dumps({"offset_s": 3600, "synced": True}))  # a step while synced
    wait_for(
        lambda: any(e["kind"] == "clock_step" for e in fleet_json(system.fleet, "events")),
        15,
        what="clock_step event",
    )
    stats = system.settle()
    assert_each_once(system, stats)
    with sqlite3.connect(tmp_path / "fleet.db") as db:
        rows = db.execute("SELECT seq, ts_ns, quality FROM readings ORDER BY seq").fetchall()
    assert rows[0][2] == 2, "readings from before the sync are marked as corrected"
    before_step = [ts for _, ts, quality in rows if quality == 2]
    assert before_step and all(started_ns - 5e9 < ts < time.time_ns() for ts in before_step), (
        "corrected timestamps are the real time, neither 1975 nor next year"
    )
    timestamps = [ts for _, ts, _ in rows]
    assert timestamps == sorted(timestamps), "time follows sequence order"


@pytest.mark.parametrize("kind", ["garbage", "foreign"])
def test_damaged_buffer_file_is_kept_aside(
    tmp_path: Path, broker: MosquittoBroker, processes: Processes, kind: str
) -> None:
    system = System(tmp_path, broker, processes)
    if kind == "garbage":
        system.buffer.write_bytes(b"\x00\x01garbage" * 4096)
    else:
        with sqlite3.connect(system.buffer) as db:
            db.execute("CREATE TABLE photos (id INTEGER, jpeg BLOB)")
    system.start()
    wait_for(lambda: system.stats()["received"] >= 50, 20, what="readings from a fresh buffer")
    [event] = [e for e in fleet_json(system.fleet, "events") if e["kind"] == "buffer_reset"]
    kept = Path(event["data"]["kept_as"])
    assert kept.exists() and kept.parent == tmp_path
    assert ("not a database" if kind == "garbage" else "foreign SQLite") in event["message"]
    result = run_cli("campus-fleet", "--config", str(system.fleet), "events")
    assert "buffer_reset" in result.stdout
    stats = system.settle()
    assert_each_once(system, stats)


def test_graceful_stop_keeps_unsent_readings(
    tmp_path: Path, own_broker: MosquittoBroker, processes: Processes
) -> None:
    system = System(tmp_path, own_broker, processes)
    agent = system.start()
    wait_for(lambda: system.stats()["received"] >= 50, 20, what="readings")
    own_broker.stop()
    time.sleep(2)
    processes.signal(agent, signal.SIGTERM)
    assert processes.running[agent].wait(15) == 0
    assert system.agent_meta()["depth"] > 0
    own_broker.start()
    system.start_agent()
    stats = system.settle()
    assert_each_once(system, stats)
