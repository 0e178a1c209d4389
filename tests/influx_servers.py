"""Real time-series servers for the InfluxDB sink's tests: VictoriaMetrics and InfluxDB 1.6.

Each server runs in its own process group on a free loopback port with its data in a temporary
folder; `stop()`/`kill()` and `start()` again keep port and data (a restart, as in production), and
`close()` (the fixtures call it) always reaps the process.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest

from simulator.broker import free_port
from simulator.processes import signal_group, stop_group

VICTORIA_METRICS = "/usr/bin/victoria-metrics"
INFLUXD = "/usr/bin/influxd"


def http(
    method: str, url: str, body: bytes | None = None, timeout: float = 10
) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=body, method=method)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


class Server:
    """A server process; subclasses say how to start it and when it is ready."""

    name = "server"

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def ready(self) -> bool:
        raise NotImplementedError

    def start(self, timeout: float = 20) -> None:
        assert self.process is None or self.process.poll() is not None, "already running"
        log = (self.workdir / f"{self.name}.log").open("ab")
        self.process = subprocess.Popen(
            self.command(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        deadline = time.monotonic() + timeout
        while not self._answers():
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited {self.process.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} not ready after {timeout} s:\n{self.log()}")
            time.sleep(0.05)

    def _answers(self) -> bool:
        try:
            return self.ready()
        except OSError:
            return False

    def stop(self) -> int:
        """SIGTERM, then waits (SIGKILL after 10 s)."""
        assert self.process is not None
        return stop_group(self.process, timeout=10)

    def kill(self) -> None:
        assert self.process is not None
        signal_group(self.process, signal.SIGKILL)
        self.process.wait()

    def close(self) -> None:
        if self.process is not None:
            stop_group(self.process, timeout=5)

    def log(self) -> str:
        path = self.workdir / f"{self.name}.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""


class VictoriaMetrics(Server):
    """Accepts /api/v2/write; each field is stored as `{measurement}_{field}`, tags as labels,
    times in milliseconds, strings as 0."""

    name = "victoria-metrics"

    def command(self) -> list[str]:
        return [
            VICTORIA_METRICS,
            f"-storageDataPath={self.workdir / 'data'}",
            f"-httpListenAddr=127.0.0.1:{self.port}",
            "-retentionPeriod=100y",
            "-loggerLevel=WARN",
        ]

    def ready(self) -> bool:
        return http("GET", f"{self.url}/health", timeout=1)[0] == 200

    def export(self, match: str = '{__name__=~".+"}') -> list[dict[str, Any]]:
        """Every series matching (a flush first, so that all writes are readable)."""
        http("GET", f"{self.url}/internal/force_flush")
        query = urlencode({"match[]": match, "start": "0"})
        status, body = http("GET", f"{self.url}/api/v1/export?{query}")
        assert status == 200, body
        return [json.loads(line) for line in body.decode().splitlines() if line.strip()]

    def samples(self, match: str = '{__name__=~".+"}') -> int:
        return sum(len(series["values"]) for series in self.export(match))


class InfluxD(Server):
    """InfluxDB 1.6 (`influxd run -config`), HTTP and RPC on loopback, no usage reporting."""

    name = "influxd"

    def __init__(self, workdir: Path, auth: bool = False) -> None:
        """`auth`: authentication on, with an admin `admin`/`admin-pw` (see `start`)."""
        super().__init__(workdir)
        self.auth = auth
        self.rpc_port = free_port()
        self.config = workdir / "influxd.conf"
        self.config.write_text(
            "\n".join(
                [
                    "reporting-enabled = false",
                    f'bind-address = "127.0.0.1:{self.rpc_port}"',
                    "[meta]",
                    f'  dir = "{workdir / "meta"}"',
                    "[data]",
                    f'  dir = "{workdir / "data"}"',
                    f'  wal-dir = "{workdir / "wal"}"',
                    "  query-log-enabled = false",
                    "[monitor]",
                    "  store-enabled = false",
                    "[http]",
                    f'  bind-address = "127.0.0.1:{self.port}"',
                    "  log-enabled = false",
                    f"  auth-enabled = {str(auth).lower()}",
                    "[logging]",
                    '  level = "warn"',
                    "  suppress-logo = true",
                    "",
                ]
            )
        )

    def command(self) -> list[str]:
        return [INFLUXD, "run", "-config", str(self.config)]

    def ready(self) -> bool:
        return http("GET", f"{self.url}/ping", timeout=1)[0] == 204

    def start(self, timeout: float = 20) -> None:
        super().start(timeout)
        if self.auth and not (self.workdir / "admin-created").exists():
            # With no user yet, 1.x lets anyone create the first admin.
            self.query("CREATE USER admin WITH PASSWORD 'admin-pw' WITH ALL PRIVILEGES")
            (self.workdir / "admin-created").touch()

    def query(self, q: str, db: str | None = None) -> list[dict[str, Any]]:
        """The `series` of the first result (epoch=ns); fails on an error."""
        params = {"q": q, "epoch": "ns", **({"db": db} if db else {})}
        if self.auth and (self.workdir / "admin-created").exists():
            params.update(u="admin", p="admin-pw")
        status, body = http("POST", f"{self.url}/query?{urlencode(params)}")
        assert status == 200, body
        result = json.loads(body)["results"][0]
        assert "error" not in result, result
        series: list[dict[str, Any]] = result.get("series", [])
        return series

    def rows(self, q: str, db: str) -> list[dict[str, Any]]:
        """Rows of every series as dicts (tags of GROUP BY merged in)."""
        rows = []
        for series in self.query(q, db):
            for values in series["values"]:
                rows.append(
                    {**series.get("tags", {}), **dict(zip(series["columns"], values, strict=True))}
                )
        return rows

    def create_database(self, name: str) -> None:
        self.query(f'CREATE DATABASE "{name}"')


@pytest.fixture
def victoria(tmp_path: Path) -> Iterator[VictoriaMetrics]:
    server = VictoriaMetrics(tmp_path / "victoria-metrics")
    server.start()
    yield server
    server.close()


@pytest.fixture
def influxd(tmp_path: Path) -> Iterator[InfluxD]:
    server = InfluxD(tmp_path / "influxd")
    server.start()
    yield server
    server.close()
