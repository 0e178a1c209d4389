"""One site's fleet for end-to-end tests, in a directory of its own: its fleet.yaml, the
`campus-fleet` commands IT staff type (run as a shell runs them, output through a pipe), and the
real processes (campus-sim, campus-fleet serve, campus-agent), all stopped when the `with` ends.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Collection
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import yaml

from simulator.broker import MosquittoBroker
from tests.conftest import Processes, run_cli, wait_for, write_yaml


class Campus:
    def __init__(
        self, directory: Path, site: str, broker: MosquittoBroker, **settings: Any
    ) -> None:
        """Writes fleet.yaml: the one `site`, `broker` on 127.0.0.1, the database and the signing
        key in `directory`; `settings` go in too (alerts, command_timeout_s, …)."""
        self.dir = directory
        self.site = site
        self.signing_key = directory / "keys" / "fleet-signing.key"
        self.config = write_yaml(
            directory / "fleet.yaml",
            {
                "name": f"fleet-{site}",
                "mqtt": {"host": "127.0.0.1", "port": broker.port, "keepalive_s": 5},
                "database": str(directory / "fleet.db"),
                "sites": [site],
                "signing_key": str(self.signing_key),
                **settings,
            },
        )
        self.processes = Processes(directory)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.processes.close()

    # -- campus-fleet --config fleet.yaml …

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Output captured through a pipe, as `campus-fleet … | grep` in a shell sees it."""
        return run_cli("campus-fleet", "--config", str(self.config), *args, timeout=timeout)

    def ok(self, *args: str) -> str:
        """The command's output, once it succeeded."""
        result = self.cli(*args)
        assert result.returncode == 0, (args, result.stderr, result.stdout)
        return result.stdout

    def json(self, *args: str, ok: tuple[int, ...] = (0,), timeout: float = 60) -> Any:
        """The command's --json output, once it exited with one of `ok`."""
        result = self.cli(*args, "--json", timeout=timeout)
        assert result.returncode in ok, (args, result.returncode, result.stderr, result.stdout)
        return json.loads(result.stdout)

    # -- filling the registry

    def enroll(self, gateway: str, room: str) -> Path:
        """`gateways enroll GATEWAY --room ROOM --out …`: the agent.yaml of its bundle, with only
        the paths changed for a test (the fleet's key where --out put it, files in the
        gateway's own directory)."""
        home = self.dir / gateway
        bundle = home / "bundle"
        self.ok(
            "gateways", "enroll", gateway, "--site", self.site, "--room", room, "--out", str(bundle)
        )
        agent = yaml.safe_load((bundle / "agent.yaml").read_text())
        assert (agent["site"], agent["gateway"]) == (self.site, gateway)
        assert agent["fleet"]["public_keys"] == ["/etc/campus-iot/fleet-signing.pub"]
        agent["fleet"] = {
            "public_keys": [str(bundle / "fleet-signing.pub")],
            "applied_path": str(home / "config.applied.json"),
        }
        agent["buffer"] = {"path": str(home / "buffer.db"), "commit_interval_s": 0.2}
        agent["clock"] = {"sync_check": "none"}
        agent["state_interval_s"] = 5
        return write_yaml(home / "agent.yaml", agent)

    def add_device(
        self,
        device: str,
        profile: str,
        url: str,
        *,
        gateway: str,
        room: str | None = None,
        interval_s: float | None = None,
        timeout_s: float | None = None,
    ) -> None:
        """`device add DEVICE --profile PROFILE --connection URL` on `gateway` of the site,
        with --room, --interval and --timeout where given."""
        words = ["device", "add", device, "--site", self.site, "--gateway", gateway,
                 "--profile", profile, "--connection", url]  # fmt: skip
        for option, value in (
            ("--room", room),
            ("--interval", interval_s),
            ("--timeout", timeout_s),
        ):
            if value is not None:
                words += [option, str(value)]
        self.ok(*words)

    # -- the processes

    def start_sim(self, scenario: dict[str, Any], name: str = "sim") -> None:
        """`campus-sim run NAME.yaml` with this scenario."""
        path = write_yaml(self.dir / f"{name}.yaml", scenario)
        self.processes.start(name, "campus-sim", "run", str(path))

    def start_fleet(self) -> None:
        """`campus-fleet serve`, once it is subscribed to the gateways' topics."""
        self.processes.start("fleet", "campus-fleet", "--config", str(self.config), "serve")
        wait_for(
            lambda: "subscribed to" in self.processes.log("fleet"), 20, what="fleet subscribed"
        )

    def start_agent(self, config: Path, env: dict[str, str] | None = None) -> None:
        self.processes.start("agent", "campus-agent", "run", "--config", str(config), env=env)

    # -- the gateways

    def wait_online(self, gateways: Collection[str], timeout: float = 30) -> None:
        """Until `gateways list` has these gateways, and every one online."""
        wait_for(
            lambda: (
                {g["gateway"]: g["status"] for g in self.json("gateways", "list")}
                == dict.fromkeys(gateways, "online")
            ),
            timeout,
            what=f"{len(gateways)} gateways online",
        )

    def push_and_wait_applied(self, gateways: Collection[str], timeout_s: int = 30) -> Any:
        """`config push site:SITE --timeout S`: every one of `gateways`, and no other, applied."""
        pushed = self.json(
            "config", "push", f"site:{self.site}", "--timeout", str(timeout_s),
            timeout=timeout_s + 30,
        )  # fmt: skip
        states = {g["gateway"]: g["state"] for g in pushed["gateways"]}
        assert states == dict.fromkeys(gateways, "applied"), pushed
        return pushed

    # -- what the fleet says

    def devices(self) -> dict[str, dict[str, Any]]:
        """`devices list --site SITE`, by device id."""
        return {d["device"]: d for d in self.json("devices", "list", "--site", self.site)}

    def devices_with_points(self) -> dict[str, dict[str, Any]]:
        """`devices list --site SITE --points`, by device id."""
        listed = self.json("devices", "list", "--site", self.site, "--points")
        return {d["device"]: d for d in listed}

    def points(self, device: str) -> dict[str, Any]:
        """The latest value of each point of `device`."""
        return {p["point"]: p["value"] for p in self.devices_with_points()[device]["points"]}

    def devices_up_with(self, wanted: dict[str, set[str]]) -> dict[str, dict[str, Any]]:
        """The devices with their points, once each one of `wanted` is up and reports at least
        those points; {} before."""
        devices = self.devices_with_points()
        for device, points in wanted.items():
            entry = devices.get(device)
            if entry is None or entry["availability"] != "up":
                return {}
            if not points <= {p["point"] for p in entry["points"]}:
                return {}
        return devices

    def events(self) -> list[dict[str, Any]]:
        """This site's events of the last hour."""
        rows: list[dict[str, Any]] = self.json("events", "--since", "1h")
        return [e for e in rows if e["site"] == self.site]
