"""`campus-sim demo`: the whole system on one machine, with a live table, until Ctrl-C.

Starts, each in its own process group: a private Mosquitto (loopback, dual stack), the simulated
school (per classroom a Modbus sensor, a PJLink projector and an e-class board on the demo's
broker; two ONVIF cameras in the corridor; a BLE thermometer on a private mock BlueZ when
dbus-daemon and python-dbusmock are there), the fleet service and one agent. Stops every one of
them on the way out, whatever happened, so nothing is left running.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import yaml
from rich import box
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
#: The points each protocol shows in `--plain` lines (the table's health column shows the same).
PLAIN_POINTS = {
    "modbus": POINTS,
    "pjlink": ("power", "lamp_hours"),
    "mqtt": ("screen", "notice_active", "notice_text"),
    "onvif": ("rtsp_ok", "clock_drift_s"),
    "ble": ("temperature", "humidity", "rssi"),
}
BOOL_POINTS = frozenset({"screen", "notice_active", "rtsp_ok"})
PROJECTOR_PASSWORD = "demo-pjlink"
PROJECTOR_TIMEOUT_S = 10.0  # real projectors can answer slowly in standby: the README says 10-15 s
CAMERA_USER, CAMERA_PASSWORD = "admin", "demo-camera"
CAMERA_DRIFT_S = 95.0  # the west camera's clock: ahead by this much, set by hand (no NTP)
BLE_ADDRESS = "A4:C1:38:00:D3:01"
MAX_SOCKET_PATH = 100  # what simulator.ble.PrivateBluez accepts for its bus socket
STATE_INTERVAL_S = 5  # the agent's: how soon the table learns that a device is up or down
WIDE_TABLE = 130  # terminal columns for the table with a column per sensor reading
WELCOME = "Welcome to campus-iot"
WELCOME_MINUTES = 5
WELCOME_FALLBACK_S = 30.0  # sent by then even if some boards are not up, to show the outcome


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


def ble_unavailable() -> str | None:
    """Why the BLE thermometer cannot be simulated here, or None when it can."""
    if shutil.which("dbus-daemon") is None and not Path("/usr/bin/dbus-daemon").exists():
        return "dbus-daemon is not installed (Debian package 'dbus')"
    for module, package in (("dbusmock", "python-dbusmock"), ("dbus", "dbus-python")):
        if importlib.util.find_spec(module) is None:
            return f"{package} is not installed in {sys.prefix}"
    return None


# -- what the demo school has ---------------------------------------------------------------------


@dataclass(frozen=True)
class DemoDevice:
    """One device of the demo: how the fleet registers it and how the table shows it."""

    id: str
    room: str
    kind: str  # the fleet's kind: sensor, display, board, camera
    protocol: str  # a key of PLAIN_POINTS
    profile: str
    connection: dict[str, Any]
    timeout_s: float | None = None  # its own poll time limit, when not the default

    @property
    def label(self) -> str:
        return f"{self.kind}/{self.protocol}"


@dataclass
class School:
    """The scenario of the simulated devices, and the same devices as the fleet registers them
    (in the order the table shows them)."""

    scenario: dict[str, Any]
    devices: list[DemoDevice] = field(default_factory=list)

    def add(self, section: str, simulated: dict[str, Any], device: DemoDevice) -> None:
        self.scenario.setdefault(section, []).append(simulated)
        self.devices.append(device)


def plan_school(rooms: int, ports: list[int], broker_port: int, ble_workdir: Path | None) -> School:
    """Per classroom a THC-100 sensor, a projector (the second room's has a PJLink password)
    and a board; two cameras in the corridor (the west one's clock is wrong); and, with a
    `ble_workdir`, a BTHome thermometer in the staff room. `ports` holds 2 × rooms + 4 ports."""
    free = iter(ports)
    school = School({"name": "demo", "time_scale": 60.0, "start_time_of_day": "07:58"})
    for i in range(rooms):
        _classroom(school, i, free, broker_port, locked=i == min(1, rooms - 1))
    for side, wrong_clock in (("east", False), ("west", True)):
        _camera(school, side, next(free), next(free), wrong_clock)
    if ble_workdir is not None:
        school.scenario["ble_workdir"] = str(ble_workdir)
        _thermometer(school)
    return school


def _classroom(
    school: School, i: int, free: Iterator[int], broker_port: int, *, locked: bool
) -> None:
    room = f"room-{101 + i}"
    port = next(free)
    school.add(
        "devices",
        {
            "id": f"{room}-env",
            "profile": "campussim-thc100",
            "host": "127.0.0.1",
            "port": port,
            "unit": 1,
            "seed": 101 + i,
            "base_temperature": 20.5 + 0.7 * i,
        },
        DemoDevice(
            f"{room}-env",
            room,
            "sensor",
            "modbus",
            "campussim-thc100",
            {"type": "modbus-tcp", "host": "127.0.0.1", "port": port, "unit": 1},
        ),
    )
    projector: dict[str, Any] = {
        "id": f"{room}-projector",
        "port": next(free),
        "pjlink_class": 2,
        "name": f"Room {101 + i}",
        "serial": f"SIM{101 + i:04d}",
        "power": "on" if i % 2 == 0 else "standby",  # slides in every other room
        "lamp_hours": 1200.0 + 850.0 * i,
    }
    pjlink: dict[str, Any] = {"type": "pjlink", "host": "127.0.0.1", "port": projector["port"]}
    if locked:
        projector["password"] = pjlink["password"] = PROJECTOR_PASSWORD
    school.add(
        "projectors",
        projector,
        DemoDevice(
            projector["id"],
            room,
            "display",
            "pjlink",
            "generic-pjlink-projector",
            pjlink,
            PROJECTOR_TIMEOUT_S,
        ),
    )
    board = f"{room}-board"
    school.add(
        "boards",
        {
            "id": board,
            "broker_host": "127.0.0.1",
            "broker_port": broker_port,
            "interval_s": 3.0,  # its state and heartbeat (30 s on a real board)
            "temperature_c": 41.0 + 1.5 * i,
            "seed": 101 + i,
        },
        DemoDevice(
            board,
            room,
            "board",
            "mqtt",
            "generic-android-eclass-board",
            {"type": "mqtt", "host": "127.0.0.1", "port": broker_port, "topic": f"eclass/{board}"},
        ),
    )


def _camera(school: School, side: str, http_port: int, rtsp_port: int, wrong_clock: bool) -> None:
    camera: dict[str, Any] = {
        "id": f"corridor-cam-{side}",
        "http_port": http_port,
        "rtsp_port": rtsp_port,
        "username": CAMERA_USER,
        "password": CAMERA_PASSWORD,
        "serial": f"CS200-{side.upper()}",
    }
    if wrong_clock:
        camera |= {"modes": ["wrong_clock"], "clock_offset_s": CAMERA_DRIFT_S, "ntp": False}
    onvif = {
        "type": "onvif",
        "host": "127.0.0.1",
        "port": http_port,
        "username": CAMERA_USER,
        "password": CAMERA_PASSWORD,
        "rtsp_url": f"rtsp://127.0.0.1:{rtsp_port}/stream1",
    }
    school.add(
        "cameras",
        camera,
        DemoDevice(camera["id"], "corridor", "camera", "onvif", "generic-onvif-camera", onvif),
    )


def _thermometer(school: School) -> None:
    school.add(
        "ble_sensors",
        {
            "id": "staff-room-thermo",
            "address": BLE_ADDRESS,
            "name": "ATC_D30001",
            "interval_s": 2.0,
            "values": {"temperature": 21.4, "humidity": 48.0, "battery": 87, "voltage": 2.95},
            "seed": 7,
        },
        DemoDevice(
            "staff-room-thermo",
            "staff-room",
            "sensor",
            "ble",
            "bthome-lywsd03mmc",
            # It advertises every 2 s here (10 s in the profile): down after 6 missed adverts.
            {"type": "ble", "address": BLE_ADDRESS, "advert_interval_s": 2.0},
        ),
    )


# -- the health column ----------------------------------------------------------------------------


def _number(value: Any, digits: int = 0) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    return f"{value:.{digits}f}"


def health(device: DemoDevice, values: Mapping[str, Any], readings: bool = False) -> Text:
    """A few points that say how the device is, by protocol; missing points are left out.
    With `readings`, a sensor's temperature, humidity and CO2 come first (narrow tables)."""
    text = Text()

    def add(part: str, style: str = "") -> None:
        if text:
            text.append(" · ", style="dim")
        text.append(part, style=style)

    v = values
    if readings and device.kind == "sensor":
        for point, unit, digits in (("temperature", "°C", 1), ("humidity", "%RH", 0)):
            if point in v:
                add(f"{_number(v[point], digits)} {unit}")
        if "co2" in v:
            add(f"CO2 {_number(v['co2'])} ppm")
    if device.protocol == "pjlink":
        if "power" in v:
            add(str(v["power"]), "green" if v["power"] == "on" else "")
        if "lamp_hours" in v:
            add(f"lamp {_number(v['lamp_hours'])} h")
        if v.get("errors") not in (None, "ok"):
            add(f"errors: {v['errors']}", "red")
    elif device.protocol == "mqtt":
        if "screen" in v:
            add(f"screen {'on' if v['screen'] else 'off'}")
        if v.get("notice_active"):
            add(f"“{v.get('notice_text', '')}”", "cyan")  # the notice on the screen
        elif "notice_active" in v:
            add("no notice", "dim")
    elif device.protocol == "onvif":
        if "rtsp_ok" in v:
            add("rtsp ok" if v["rtsp_ok"] else "rtsp FAILED", "" if v["rtsp_ok"] else "red")
        drift = v.get("clock_drift_s")
        if isinstance(drift, int | float):
            late = abs(drift) > 5
            mode = f" ({v['clock_mode']})" if late and "clock_mode" in v else ""
            add(f"clock {drift:+.0f} s{mode}", "red" if late else "")
    elif device.protocol == "ble":
        if "rssi" in v:
            add(f"rssi {_number(v['rssi'])} dBm")
        if "battery" in v:
            add(f"battery {_number(v['battery'])} %")
    return text


def plain_values(device: DemoDevice, values: Mapping[str, Any]) -> str:
    """`point=value` for the points of PLAIN_POINTS the device has sent."""
    parts = []
    for point in PLAIN_POINTS[device.protocol]:
        if point not in values:
            continue
        value = values[point]
        if point in BOOL_POINTS:
            shown = "true" if value else "false"  # the store keeps booleans as 1 and 0
        elif isinstance(value, float):
            shown = f"{value:.1f}"
        elif isinstance(value, str) and (" " in value or not value):
            shown = json.dumps(value, ensure_ascii=False)
        else:
            shown = str(value)
        parts.append(f"{point}={shown}")
    return " ".join(parts)


def state_word(up: int | None) -> str:
    """A device's state as its gateway last reported it: up, down, or ? (not reported)."""
    return {1: "up", 0: "down"}.get(up if up is not None else -1, "?")


@dataclass
class DeviceView:
    """What the fleet knows of one device: the gateway's up/down and the latest readings."""

    up: int | None = None
    values: dict[str, Any] = field(default_factory=dict)
    seq: int = 0
    ts_ns: int = 0


@dataclass
class Snapshot:
    gateways: list[dict[str, Any]] = field(default_factory=list)
    devices: dict[str, DeviceView] = field(default_factory=dict)
    readings: int = 0


# -- the demo -------------------------------------------------------------------------------------


class Demo:
    def __init__(self, workdir: Path, rooms: int = 3) -> None:
        self.workdir = workdir.resolve()
        self.rooms = rooms
        self.broker = MosquittoBroker(self.workdir / "broker")
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self._logs: list[IO[bytes]] = []
        self.console = Console()
        self.school = School({})
        self.ble_note = ""  # one line when the BLE thermometer is left out
        self.ble_dir: Path | None = None
        self._ble_tmp: Path | None = None  # a short folder of our own, when workdir is too long
        self.agent_started = 0.0
        self.welcome: subprocess.Popen[bytes] | None = None
        self.welcome_line = ""
        self.config_line = ""
        self._setup: threading.Thread | None = None
        self.setup_error: DemoError | None = None
        self._stopping = threading.Event()

    # -- set-up --------------------------------------------------------------------------------

    def choose_ble_dir(self) -> None:
        """Where the mock BlueZ's socket goes: in the workdir, or a short temp dir when that
        path would be too long for a unix socket."""
        missing = ble_unavailable()
        if missing is not None:
            self.ble_note = f"BLE thermometer left out: {missing}; the rest of the demo runs"
            return
        ble = self.workdir / "ble"
        if len(str(ble / "system_bus_socket")) > MAX_SOCKET_PATH:
            self._ble_tmp = Path(tempfile.mkdtemp(prefix="campus-ble-"))
            ble = self._ble_tmp
        self.ble_dir = ble

    @property
    def bus_address(self) -> str | None:
        if self.ble_dir is None:
            return None
        return f"unix:path={self.ble_dir / 'system_bus_socket'}"

    def write_configs(self) -> None:
        from fleet.csv_import import connection_url

        wanted = 2 * self.rooms + 4
        ports = [p for p in free_ports(wanted + 1) if p != self.broker.port][:wanted]
        self.school = plan_school(self.rooms, ports, self.broker.port, self.ble_dir)
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
            "state_interval_s": STATE_INTERVAL_S,
            # The demo runs on machines whose host keeps time but whose kernel flag says
            # "unsynced" (containers); a real gateway keeps the default, adjtimex.
            "clock": {"sync_check": "none"},
            # The fleet pushes a signed config built from its registry (inventory.csv): it
            # replaces these devices, which only serve until it arrives (the same devices
            # with the same settings, so their poll loops carry on).
            "fleet": {
                "public_keys": [str(public_path(key))],
                "applied_path": str(self.workdir / "agent-config.applied.json"),
            },
            "devices": [
                {
                    "id": d.id,
                    "profile": d.profile,
                    "kind": d.kind,
                    "interval_s": 2,
                    **({"timeout_s": d.timeout_s} if d.timeout_s is not None else {}),
                    "connection": d.connection,
                }
                for d in self.school.devices
            ],
        }
        documents = (("scenario", self.school.scenario), ("fleet", fleet), ("agent", agent))
        for name, document in documents:
            (self.workdir / f"{name}.yaml").write_text(yaml.safe_dump(document, sort_keys=False))
        rows = ["site,building,room,gateway,device,kind,profile,connection"]
        rows += [
            f"{SITE},main,{d.room},{GATEWAY},{d.id},{d.kind},{d.profile},"
            f"{connection_url(d.connection)}"
            for d in self.school.devices
        ]
        (self.workdir / "inventory.csv").write_text("\n".join(rows) + "\n")
        (self.workdir / "site-settings.yaml").write_text("interval_s: 2\n")
        (self.workdir / "projector-settings.yaml").write_text(
            f"timeout_s: {PROJECTOR_TIMEOUT_S:g}\n"
        )

    def fleet_cli(self, *args: str) -> None:
        """Runs a campus-fleet command as IT staff would; its output goes to fleet-cli.log.
        `stop()` ends it early (the fleet is set up in a thread while the table shows)."""
        argv = [*command("campus-fleet"), "--config", str(self.workdir / "fleet.yaml"), *args]
        with (self.workdir / "fleet-cli.log").open("ab") as log:
            process = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
            try:
                deadline = time.monotonic() + 60
                while process.poll() is None and time.monotonic() < deadline:
                    if self._stopping.wait(0.05):
                        raise DemoError(f"campus-fleet {' '.join(args)}: stopped")
            finally:
                if process.poll() is None:
                    process.kill()
                    process.wait()
        if process.returncode != 0:
            raise DemoError(
                f"campus-fleet {' '.join(args)} exited with {process.returncode} "
                f"(see {self.workdir / 'fleet-cli.log'})"
            )

    def spawn(self, name: str, argv: list[str], env: Mapping[str, str] | None = None) -> None:
        log = (self.workdir / f"{name}.log").open("ab")
        self._logs.append(log)
        self.processes[name] = subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
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
        self.console.print(
            f"campus-iot demo: starting a broker, the simulated school, the fleet and an agent "
            f"(logs in {self.workdir}) …",
            highlight=False,
            soft_wrap=True,
        )
        try:
            self.broker.start()
        except BrokerError as exc:
            raise DemoError(str(exc)) from None
        self.choose_ble_dir()
        self.write_configs()
        w = self.workdir
        self.fleet_cli("import", str(w / "inventory.csv"))
        self.fleet_cli("settings", "set", f"site:{SITE}", str(w / "site-settings.yaml"))
        self.spawn("simulator", [*command("campus-sim"), "run", str(w / "scenario.yaml")])
        self.spawn("fleet", [*command("campus-fleet"), "--config", str(w / "fleet.yaml"), "serve"])
        self.wait_for_log("fleet", "subscribed to", timeout=20)
        env = {}
        if (address := self.bus_address) is not None:
            # The simulator prints this line once the mock BlueZ answers; bleak in the agent
            # finds that BlueZ through the same variable.
            self.wait_for_log("simulator", f"DBUS_SYSTEM_BUS_ADDRESS={address}", timeout=30)
            env["DBUS_SYSTEM_BUS_ADDRESS"] = address
        self.spawn(
            "agent", [*command("campus-agent"), "run", "--config", str(w / "agent.yaml")], env
        )
        self.agent_started = time.monotonic()
        self._setup = threading.Thread(target=self.configure_fleet, name="demo-fleet-setup")
        self._setup.start()

    def configure_fleet(self) -> None:
        """While the table already shows what the agent reads from its own file's devices:
        the projectors' longer poll time limit in the registry (as the README advises; one
        `settings set` each), then `config push`, which gives the gateway the registry's
        devices with their settings. A failure stops the demo (see check_alive)."""
        try:
            for device in self.school.devices:
                if device.timeout_s is not None:
                    self.fleet_cli(
                        "settings",
                        "set",
                        f"device:{SITE}/{device.id}",
                        str(self.workdir / "projector-settings.yaml"),
                    )
            self.wait_for_heartbeat(timeout=20)
            self.fleet_cli("config", "push", "all", "--no-wait")
        except DemoError as exc:
            self.setup_error = exc
        except Exception as exc:  # the thread's edge: the main loop reports it and stops
            self.setup_error = DemoError(f"{type(exc).__name__}: {exc}")

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
            if self._stopping.wait(0.05):
                raise DemoError("stopped while waiting for the fleet service")

    def wait_for_log(self, name: str, text: str, timeout: float) -> None:
        """Waits for a process to say it is ready (the fleet subscribed before the agent sends,
        or first readings go nowhere; the mock BlueZ up before the agent scans)."""
        deadline = time.monotonic() + timeout
        log = self.workdir / f"{name}.log"
        while text not in log.read_text(errors="replace"):
            self.check_alive()
            if time.monotonic() > deadline:
                raise DemoError(f"{name} did not log {text!r} within {timeout}s (see {log})")
            time.sleep(0.05)

    def check_alive(self) -> None:
        if self.setup_error is not None and not self._stopping.is_set():
            raise DemoError(f"setting up the fleet failed: {self.setup_error}")
        for name, process in self.processes.items():
            if process.poll() is not None:
                tail = (self.workdir / f"{name}.log").read_text(errors="replace")[-800:]
                raise DemoError(f"{name} exited with {process.returncode}:\n{tail}")

    # -- the welcome notice: one command, end to end ----------------------------------------------

    def boards(self) -> list[str]:
        return [d.id for d in self.school.devices if d.kind == "board"]

    def maybe_send_welcome(self, snapshot: Snapshot, in_sync: bool) -> None:
        """Once the config is applied and every board is up (or after WELCOME_FALLBACK_S), a
        notice goes to every board of the site through `campus-fleet cmd`, as IT staff send it."""
        if self.welcome is not None or not self.agent_started:
            return
        boards = self.boards()
        ready = in_sync and all(
            (view := snapshot.devices.get(b)) is not None and view.up == 1 for b in boards
        )
        if not ready and time.monotonic() - self.agent_started < WELCOME_FALLBACK_S:
            return
        argv = [
            *command("campus-fleet"),
            "--config",
            str(self.workdir / "fleet.yaml"),
            "cmd",
            "--site",
            SITE,
            "--kind",
            "board",
            "--timeout",
            "15",
            "--json",
            "notice",
            WELCOME,
            "--minutes",
            str(WELCOME_MINUTES),
        ]
        self.welcome_line = (
            f'command: campus-fleet cmd --site {SITE} --kind board notice "{WELCOME}" '
            f"--minutes {WELCOME_MINUTES}: sent, waiting for {len(boards)} boards"
        )
        with (
            (self.workdir / "welcome-cmd.json").open("wb") as out,
            (self.workdir / "fleet-cli.log").open("ab") as log,
        ):
            self.welcome = subprocess.Popen(
                argv,
                stdout=out,
                stderr=log,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    def check_welcome(self) -> None:
        """The outcome of the notice, once `campus-fleet cmd` has exited."""
        if self.welcome is None or self.welcome.returncode is not None:
            return
        if self.welcome.poll() is None:
            return
        output = (self.workdir / "welcome-cmd.json").read_text(errors="replace")
        try:
            results = json.loads(output)["results"]
        except (ValueError, KeyError, TypeError):
            self.welcome_line = (
                f'command notice "{WELCOME}": campus-fleet cmd exited with '
                f"{self.welcome.returncode} (see {self.workdir / 'fleet-cli.log'})"
            )
            return
        ok = sum(1 for r in results if r.get("status") == "ok")
        failed = [f"{r['device']} {r['status']}" for r in results if r.get("status") != "ok"]
        self.welcome_line = (
            f'command notice "{WELCOME}" --minutes {WELCOME_MINUTES}: {ok} of {len(results)} '
            f"boards answered ok" + (f"; {', '.join(failed)}" if failed else "")
        )

    # -- tear-down -----------------------------------------------------------------------------

    def stop(self) -> None:
        """The agent first, so its 'offline' state reaches the fleet; then the rest."""
        self._stopping.set()
        if self._setup is not None:
            self._setup.join()
        if self.welcome is not None:
            stop_group(self.welcome, timeout=5)
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
        if self._ble_tmp is not None:
            shutil.rmtree(self._ble_tmp, ignore_errors=True)

    # -- the live view -------------------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        from fleet.store import Store

        path = self.workdir / "fleet.db"
        if not path.exists():
            return Snapshot()
        store = Store(path, read_only=True)
        try:
            gateways, devices, latest = store.gateways(), store.devices(), store.latest()
        finally:
            store.close()
        views = {d["device"]: DeviceView(up=d["up"]) for d in devices}
        for row in latest:
            view = views.setdefault(row["device"], DeviceView(up=row["up"]))
            view.values[row["point"]] = row["value"]
            view.seq = max(view.seq, row["seq"])
            view.ts_ns = max(view.ts_ns, row["ts_ns"])
        return Snapshot(gateways, views, sum(g["received"] for g in gateways))

    def config_status(self) -> tuple[str, bool]:
        """What the fleet pushed and what the gateway answered, from the fleet database; and
        whether every gateway runs its desired config."""
        from fleet.store import Store
        from fleet.versions import Versions

        path = self.workdir / "fleet.db"
        if not path.exists():
            return "", False
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
        return "   ".join(parts), bool(rows) and all(r["in_sync"] for r in rows)

    def shown_devices(self, snapshot: Snapshot) -> list[tuple[str, DemoDevice | None]]:
        """The demo's devices in their school order, then any other device a gateway reported."""
        ours = [(d.id, d) for d in self.school.devices]
        known = {d.id for d in self.school.devices}
        return ours + [(name, None) for name in sorted(snapshot.devices) if name not in known]

    def device_table(self, snapshot: Snapshot, width: int) -> Table:
        """One row per device. From WIDE_TABLE columns on, a room sensor's readings have their
        own columns; below, they lead the health column, which wraps."""
        wide = width >= WIDE_TABLE
        now = time.time_ns()
        table = Table(
            title="Devices and their latest readings", box=box.SIMPLE_HEAD, show_edge=False
        )
        table.add_column("device", no_wrap=True)
        table.add_column("kind", no_wrap=True)
        table.add_column("state", no_wrap=True)
        for point in POINTS if wide else ():
            table.add_column(LABELS[point], justify="right", no_wrap=True)
        table.add_column("health", ratio=1)
        if wide:
            table.add_column("seq", justify="right", no_wrap=True)
        table.add_column("age", justify="right", no_wrap=True)
        for name, device in self.shown_devices(snapshot):
            view = snapshot.devices.get(name, DeviceView())
            state = {"up": "[green]up[/]", "down": "[red]down[/]"}.get(
                state_word(view.up), "[yellow]?[/]"
            )
            row: list[str | Text] = [name]
            if device is None:
                row += ["", state]
            else:
                row += [device.label if wide else device.kind, state]
            if wide:
                # A room sensor's columns; a board's own (SoC) temperature is not one.
                sensor = device is None or device.kind == "sensor"
                row += [
                    _number(view.values[p], 0 if p == "co2" else 1)
                    if sensor and p in view.values
                    else ""
                    for p in POINTS
                ]
            row.append(Text("") if device is None else health(device, view.values, not wide))
            if wide:
                row.append(str(view.seq or "-"))
            row.append(f"{(now - view.ts_ns) / 1e9:.1f}s" if view.ts_ns else "-")
            table.add_row(*row)
        return table

    def render(self, started: float, snapshot: Snapshot) -> Group:
        header = Text.assemble(
            ("campus-iot demo", "bold"),
            f"  broker [::1]:{self.broker.port} and 127.0.0.1"
            f"   up {time.monotonic() - started:.0f}s"
            f"   logs in {self.workdir}   Ctrl-C stops everything\n",
            (
                f"try in another terminal: .venv/bin/campus-fleet --config "
                f"{self.workdir / 'fleet.yaml'} devices list   (or: config status, "
                "commands list, audit)",
                "dim",
            ),
        )
        status = Text()
        if self.ble_note:
            status.append(self.ble_note + "\n", style="yellow")
        if self.config_line:
            status.append(self.config_line + "\n")
        if self.welcome_line:
            status.append(self.welcome_line + "\n", style="cyan")
        for g in snapshot.gateways:
            colour = "green" if g["status"] == "online" else "red"
            status.append(f"gateway {g['site']}/{g['gateway']}: ")
            status.append(g["status"] or "unknown", style=colour)
            status.append(
                f"  received {g['received']}  last seq {g['last_seq']}"
                f"  duplicates {g['duplicates']}\n"
            )
        return Group(header, status, self.device_table(snapshot, self.console.width))

    def run(self, duration: float | None = None, plain: bool = False) -> None:
        started = time.monotonic()
        interrupted = False
        try:
            self.start()
            if plain:
                self._run_plain(started, duration)
            else:
                with Live(
                    self.render(started, Snapshot()), console=self.console, refresh_per_second=2
                ) as live:
                    while duration is None or time.monotonic() - started < duration:
                        time.sleep(0.5)
                        self.check_alive()
                        live.update(self.render(started, self.step()))
        except KeyboardInterrupt:
            interrupted = True
        finally:
            self.stop()
        snapshot = self.snapshot()
        how = "interrupted" if interrupted else "finished"
        self.console.print(
            f"demo {how}: every process stopped; the fleet stored {snapshot.readings} readings "
            f"from {sum(1 for v in snapshot.devices.values() if v.values)} devices "
            f"({self.workdir / 'fleet.db'})",
            highlight=False,
            soft_wrap=True,
        )

    def state_overdue(self) -> bool:
        """The agent has had time to say whether each device is up (its state_interval_s)."""
        return time.monotonic() - self.agent_started > STATE_INTERVAL_S

    def step(self) -> Snapshot:
        """One refresh: what the fleet knows now, and the welcome notice when it is time."""
        snapshot = self.snapshot()
        self.config_line, in_sync = self.config_status()
        self.check_welcome()
        self.maybe_send_welcome(snapshot, in_sync)
        return snapshot

    def _run_plain(self, started: float, duration: float | None) -> None:
        """A line per device when its state or shown values change (its first readings
        included), each status line when it changes, and the gateway every 10 s."""
        if self.ble_note:
            print(self.ble_note, flush=True)
        printed: dict[str, tuple[int | None, str]] = {}
        said: set[str] = set()
        summary_at = 0.0
        while duration is None or time.monotonic() - started < duration:
            time.sleep(1)
            self.check_alive()
            snapshot = self.step()
            elapsed = time.monotonic() - started
            at = f"{elapsed:6.1f}s"
            for line in (self.config_line, self.welcome_line):
                if line and line not in said:
                    said.add(line)
                    print(f"{at} {line}", flush=True)
            for name, device in self.shown_devices(snapshot):
                view = snapshot.devices.get(name)
                waiting = view is not None and view.up is None and not self.state_overdue()
                if view is None or waiting:
                    continue  # its first state (up or down) is on its way: one line, not two
                if device is not None:
                    values = plain_values(device, view.values)
                else:  # not one of the demo's: every point
                    values = " ".join(f"{p}={v}" for p, v in sorted(view.values.items()))
                values = values or "(no readings yet)"
                if printed.get(name) == (view.up, values):
                    continue
                printed[name] = (view.up, values)
                label = device.label if device is not None else "?"
                print(
                    f"{at} {name} {label} {state_word(view.up)} {values} seq={view.seq}",
                    flush=True,
                )
            if elapsed >= summary_at + 10:
                summary_at = elapsed
                states = [state_word(v.up) for v in snapshot.devices.values()]
                count = f"{states.count('up')} of {len(self.shown_devices(snapshot))} devices up"
                if unknown := states.count("?"):
                    count += f", {unknown} not reported yet"
                for g in snapshot.gateways:
                    print(
                        f"{at} gateway {g['site']}/{g['gateway']} {g['status']}: "
                        f"{g['received']} readings received, {count}",
                        flush=True,
                    )
