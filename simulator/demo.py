"""`campus-sim demo`: the whole system on one machine, with a live table, until Ctrl-C.

Starts, each in its own process group: a private Mosquitto (loopback, dual stack), the simulated
classrooms, the fleet service and one agent. Stops every one of them on the way out, whatever
happened, so nothing is left running.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

import yaml
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from simulator.broker import BrokerError, MosquittoBroker, free_ports
from simulator.processes import stop_group
from wire.signing import generate_key, public_path

SITE = "demo-school"
MARKER = ".campus-demo"
GATEWAY = "gw-main"
POINTS = ("temperature", "humidity", "co2", "dew_point")
LABELS = {"temperature": "temp °C", "humidity": "RH %", "co2": "CO2 ppm", "dew_point": "dew pt °C"}


class DemoError(RuntimeError):
    pass


def command(name: str) -> list[str]:
    """The console script beside this Python (the venv's), else `python -m`."""
    script = Path(sys.executable).parent / name
    if script.exists():
        return [str(script)]
    module = {
        "campus-agent": "agent.cli",
        "campus-fleet": "fleet.cli",
        "campus-sim": "simulator.cli",
    }
    return [sys.executable, "-m", module[name]]


class Demo:
    def __init__(self, workdir: Path, rooms: int = 3) -> None:
        self.workdir = workdir.resolve()
        self.rooms = rooms
        self.broker = MosquittoBroker(self.workdir / "broker")
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self._logs: list[IO[bytes]] = []
        self.console = Console()

    # -- set-up --------------------------------------------------------------------------------

    def write_configs(self) -> None:
        ports = [p for p in free_ports(self.rooms + 1) if p != self.broker.port][: self.rooms]
        devices = [
            {
                "id": f"room-{101 + i}-env",
                "profile": "campussim-thc100",
                "host": "127.0.0.1",
                "port": ports[i],
                "unit": 1,
                "seed": 101 + i,
                "base_temperature": 20.5 + 0.7 * i,
            }
            for i in range(self.rooms)
        ]
        scenario = {
            "name": "demo",
            "time_scale": 60.0,
            "start_time_of_day": "07:58",
            "devices": devices,
        }
        mqtt = {"host": "::1", "port": self.broker.port, "keepalive_s": 5}
        key = self.workdir / "keys" / "fleet-signing.key"
        generate_key(key)
        fleet = {
            "mqtt": mqtt,
            "database": str(self.workdir / "fleet.db"),
            "signing_key": str(key),
        }
        agent = {
            "site": SITE,
            "gateway": GATEWAY,
            "mqtt": {**mqtt, "host": "127.0.0.1"},
            "buffer": {"path": str(self.workdir / "agent-buffer.db"), "commit_interval_s": 0.5},
            "state_interval_s": 10,
            # The demo runs on machines whose host keeps time but whose kernel flag says
            # "unsynced" (containers); a real gateway keeps the default, adjtimex.
            "clock": {"sync_check": "none"},
            # The fleet pushes a signed config built from its registry (inventory.csv): it
            # replaces these devices, which only serve until it arrives.
            "fleet": {
                "public_keys": [str(public_path(key))],
                "applied_path": str(self.workdir / "agent-config.applied.json"),
            },
            "devices": [
                {
                    "id": d["id"],
                    "profile": d["profile"],
                    "interval_s": 2,
                    "connection": {
                        "type": "modbus-tcp",
                        "host": d["host"],
                        "port": d["port"],
                        "unit": d["unit"],
                    },
                }
                for d in devices
            ],
        }
        for name, document in (("scenario", scenario), ("fleet", fleet), ("agent", agent)):
            (self.workdir / f"{name}.yaml").write_text(yaml.safe_dump(document, sort_keys=False))
        rows = ["site,building,room,gateway,device,kind,profile,connection"]
        rows += [
            f"{SITE},main,room-{101 + i},{GATEWAY},{d['id']},sensor,{d['profile']},"
            f"modbus-tcp://{d['host']}:{d['port']}?unit={d['unit']}"
            for i, d in enumerate(devices)
        ]
        (self.workdir / "inventory.csv").write_text("\n".join(rows) + "\n")
        (self.workdir / "site-settings.yaml").write_text("interval_s: 2\n")

    def fleet_cli(self, *args: str) -> None:
        """Runs a campus-fleet command as IT staff would; its output goes to fleet-cli.log."""
        with (self.workdir / "fleet-cli.log").open("ab") as log:
            done = subprocess.run(
                [*command("campus-fleet"), "--config", str(self.workdir / "fleet.yaml"), *args],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                timeout=60,
                check=False,
            )
        if done.returncode != 0:
            raise DemoError(
                f"campus-fleet {' '.join(args)} exited with {done.returncode} "
                f"(see {self.workdir / 'fleet-cli.log'})"
            )

    def spawn(self, name: str, argv: list[str]) -> None:
        log = (self.workdir / f"{name}.log").open("ab")
        self._logs.append(log)
        self.processes[name] = subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )

    def start(self) -> None:
        marker = self.workdir / MARKER
        if self.workdir.exists() and any(self.workdir.iterdir()):
            if not marker.exists():
                raise DemoError(
                    f"{self.workdir} is not empty and not an earlier demo's folder: "
                    "give --workdir a new or empty folder"
                )
            shutil.rmtree(self.workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        marker.write_text("made by campus-sim demo; emptied at each start\n")
        try:
            self.broker.start()
        except BrokerError as exc:
            raise DemoError(str(exc)) from None
        self.write_configs()
        w = self.workdir
        self.fleet_cli("import", str(w / "inventory.csv"))
        self.fleet_cli("settings", "set", f"site:{SITE}", str(w / "site-settings.yaml"))
        self.spawn("simulator", [*command("campus-sim"), "run", str(w / "scenario.yaml")])
        self.spawn("fleet", [*command("campus-fleet"), "--config", str(w / "fleet.yaml"), "serve"])
        self.wait_for_log("fleet", "subscribed to", timeout=20)
        self.spawn("agent", [*command("campus-agent"), "run", "--config", str(w / "agent.yaml")])
        self.wait_for_heartbeat(timeout=20)
        self.fleet_cli("config", "push", "all", "--no-wait")

    def wait_for_heartbeat(self, timeout: float) -> None:
        """`config push` needs the service's heartbeat in the database, connected."""
        import sqlite3

        deadline = time.monotonic() + timeout
        while True:
            self.check_alive()
            try:
                conn = sqlite3.connect(f"file:{self.workdir / 'fleet.db'}?mode=ro", uri=True)
                try:
                    row = conn.execute("SELECT max(connected) FROM service").fetchone()
                finally:
                    conn.close()
            except sqlite3.Error:
                row = None
            if row and row[0]:
                return
            if time.monotonic() > deadline:
                raise DemoError(f"the fleet service did not start within {timeout}s")
            time.sleep(0.05)

    def wait_for_log(self, name: str, text: str, timeout: float) -> None:
        """The fleet must be subscribed before the agent sends, or first readings go nowhere."""
        deadline = time.monotonic() + timeout
        log = self.workdir / f"{name}.log"
        while text not in log.read_text(errors="replace"):
            self.check_alive()
            if time.monotonic() > deadline:
                raise DemoError(f"{name} did not log {text!r} within {timeout}s (see {log})")
            time.sleep(0.05)

    def check_alive(self) -> None:
        for name, process in self.processes.items():
            if process.poll() is not None:
                tail = (self.workdir / f"{name}.log").read_text(errors="replace")[-800:]
                raise DemoError(f"{name} exited with {process.returncode}:\n{tail}")

    # -- tear-down -----------------------------------------------------------------------------

    def stop(self) -> None:
        """The agent first, so its 'offline' state reaches the fleet; then the rest."""
        for name in ("agent", "simulator", "fleet"):
            process = self.processes.get(name)
            if process is None:
                continue
            stop_group(process, timeout=10)
            if name == "agent":
                time.sleep(0.3)  # let the fleet store the agent's last state
        self.broker.stop()
        for log in self._logs:
            log.close()

    # -- the live view -------------------------------------------------------------------------

    def snapshot(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        from fleet.store import Store

        path = self.workdir / "fleet.db"
        if not path.exists():
            return [], []
        store = Store(path, read_only=True)
        try:
            return store.gateways(), store.latest()
        finally:
            store.close()

    def config_line(self) -> str:
        """What the fleet pushed and what the gateway answered, from the fleet database."""
        from fleet.store import Store
        from fleet.versions import Versions

        path = self.workdir / "fleet.db"
        if not path.exists():
            return ""
        store = Store(path, read_only=True)
        try:
            rows = Versions(store).status()
        finally:
            store.close()
        parts = []
        for r in rows:
            desired = (
                f"v{r['desired_version']} {r['desired_state']}" if r["desired_version"] else "-"
            )
            parts.append(
                f"config of {r['gateway']}: pushed {desired}, applied "
                f"v{r['applied_version'] or 0}" + (" (in sync)" if r["in_sync"] else "")
            )
        return "   ".join(parts)

    def render(self, started: float) -> Group:
        gateways, latest = self.snapshot()
        now = time.time_ns()
        header = Text.assemble(
            ("campus-iot demo", "bold"),
            f"  broker [::1]:{self.broker.port} and 127.0.0.1"
            f"   up {time.monotonic() - started:.0f}s"
            f"   logs in {self.workdir}   Ctrl-C stops everything\n",
            (
                f"try in another terminal: .venv/bin/campus-fleet --config "
                f"{self.workdir / 'fleet.yaml'} config status   (or: gateways list, "
                "devices list, audit)",
                "dim",
            ),
        )
        status = Text()
        if line := self.config_line():
            status.append(line + "\n")
        for g in gateways:
            colour = "green" if g["status"] == "online" else "red"
            status.append(f"gateway {g['site']}/{g['gateway']}: ")
            status.append(g["status"] or "unknown", style=colour)
            status.append(
                f"  received {g['received']}  last seq {g['last_seq']}"
                f"  duplicates {g['duplicates']}\n"
            )
        table = Table(title="Devices and their latest readings")
        table.add_column("device", no_wrap=True)
        table.add_column("state")
        for point in POINTS:
            table.add_column(LABELS[point], justify="right", no_wrap=True)
        table.add_column("seq", justify="right")
        table.add_column("age", justify="right")
        devices: dict[str, dict[str, Any]] = {}
        for row in latest:
            entry = devices.setdefault(row["device"], {"up": row["up"], "seq": 0, "ts": 0})
            entry[row["point"]] = row["value"]
            entry["seq"] = max(entry["seq"], row["seq"])
            entry["ts"] = max(entry["ts"], row["ts_ns"])
        for device, entry in sorted(devices.items()):
            state = {1: "[green]up[/]", 0: "[red]down[/]"}.get(entry["up"], "[yellow]?[/]")
            cells = [
                f"{entry[p]:.1f}" if isinstance(entry.get(p), float) else str(entry.get(p, "-"))
                for p in POINTS
            ]
            table.add_row(
                device, state, *cells, str(entry["seq"]), f"{(now - entry['ts']) / 1e9:.1f}s"
            )
        if not devices:
            table.add_row("waiting for the first readings…", "", "", "", "", "", "", "")
        return Group(header, status, table)

    def run(self, duration: float | None = None, plain: bool = False) -> None:
        started = time.monotonic()
        interrupted = False
        try:
            self.start()
            if plain:
                self._run_plain(started, duration)
            else:
                with Live(self.render(started), console=self.console, refresh_per_second=2) as live:
                    while duration is None or time.monotonic() - started < duration:
                        time.sleep(0.5)
                        self.check_alive()
                        live.update(self.render(started))
        except KeyboardInterrupt:
            interrupted = True
        finally:
            self.stop()
        gateways, latest = self.snapshot()
        received = sum(g["received"] for g in gateways)
        how = "interrupted" if interrupted else "finished"
        self.console.print(
            f"demo {how}: every process stopped; the fleet stored {received} readings "
            f"from {len({r['device'] for r in latest})} devices ({self.workdir / 'fleet.db'})"
        )

    def _run_plain(self, started: float, duration: float | None) -> None:
        while duration is None or time.monotonic() - started < duration:
            time.sleep(1)
            self.check_alive()
            for row in self.snapshot()[1]:
                print(
                    f"{time.monotonic() - started:6.1f}s {row['device']} {row['point']}="
                    f"{row['value']} seq={row['seq']}",
                    flush=True,
                )
