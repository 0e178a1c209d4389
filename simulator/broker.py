"""A private Mosquitto for the demo and the tests: generated config, loopback only, dual stack.

The broker listens on one port on both 127.0.0.1 and ::1 (or only on the `listen` addresses
given, e.g. ::1 for an IPv6-only network), keeps its own persistence file and log in its work
folder, and is started in its own session so that stopping it stops everything it spawned.
It is never the machine's own broker on 1883.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from simulator.processes import signal_group, stop_group

MOSQUITTO_CANDIDATES = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")
DUAL_STACK = ("127.0.0.1", "::1")


class BrokerError(RuntimeError):
    pass


def find_mosquitto() -> str:
    found = shutil.which("mosquitto")
    if found:
        return found
    for candidate in MOSQUITTO_CANDIDATES:
        if Path(candidate).exists():
            return candidate
    raise BrokerError(
        "mosquitto is not installed: run 'make install' (as root it installs the Debian package)"
    )


def free_ports(count: int) -> list[int]:
    """`count` distinct ports, each free on both 127.0.0.1 and ::1 when returned."""
    ports: list[int] = []
    while len(ports) < count:
        port = free_port()
        if port not in ports:
            ports.append(port)
    return ports


def free_port() -> int:
    """A TCP port free on both 127.0.0.1 and ::1."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as v4:
            v4.bind(("127.0.0.1", 0))
            port = int(v4.getsockname()[1])
            try:
                with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as v6:
                    v6.bind(("::1", port))
            except OSError:
                continue
            return port
    raise BrokerError("no TCP port is free on both 127.0.0.1 and ::1")


@dataclass(frozen=True)
class TlsListener:
    """A second listener, with TLS, on the broker's listen addresses (e.g. a cloud for bridges).

    With `require_certificate`, clients must present a certificate signed by `cafile`; with
    `use_identity_as_username`, its CN becomes the username that `acl_file` rules see.
    """

    port: int
    cafile: Path
    certfile: Path
    keyfile: Path
    require_certificate: bool = True
    use_identity_as_username: bool = True

    def config_lines(self, addresses: Sequence[str]) -> list[str]:
        """TLS options go under each listener line (even with per_listener_settings false)."""
        lines: list[str] = []
        for address in addresses:
            lines += [
                f"listener {self.port} {address}",
                f"cafile {self.cafile}",
                f"certfile {self.certfile}",
                f"keyfile {self.keyfile}",
                f"require_certificate {str(self.require_certificate).lower()}",
            ]
            if self.use_identity_as_username:
                lines.append("use_identity_as_username true")
        return lines


class MosquittoBroker:
    """`tls` adds a TLS listener on the same addresses; `extra_config` lines (e.g. `acl_file …`,
    `include_dir …`) come last, after every listener. Without both, a plain loopback broker."""

    def __init__(
        self,
        workdir: Path,
        port: int | None = None,
        *,
        max_queued: int = 1_000_000,
        listen: tuple[str, ...] = DUAL_STACK,
        tls: TlsListener | None = None,
        extra_config: Sequence[str] = (),
    ):
        if not listen:
            raise BrokerError("a broker needs at least one listen address")
        self.workdir = workdir
        self.port = port or free_port()
        self.max_queued = max_queued
        self.listen = listen
        self.tls = tls
        self.extra_config = tuple(extra_config)
        self.process: subprocess.Popen[bytes] | None = None
        self.config_path = workdir / "mosquitto.conf"
        self.log_path = workdir / "mosquitto.log"

    def config_text(self) -> str:
        user = "root" if os.geteuid() == 0 else os.environ.get("USER", "")
        lines = [
            *(f"listener {self.port} {address}" for address in self.listen),
            "allow_anonymous true",
            "persistence true",
            f"persistence_location {self.workdir}/",
            "autosave_interval 1",
            "autosave_on_changes true",
            f"max_queued_messages {self.max_queued}",
            "max_inflight_messages 100",
            "set_tcp_nodelay true",
            f"log_dest file {self.log_path}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages true",
            "log_timestamp_format %Y-%m-%dT%H:%M:%S",
        ]
        if self.tls is not None:
            lines += self.tls.config_lines(self.listen)
        lines += self.extra_config
        if user:
            lines.insert(0, f"user {user}")
        return "\n".join(lines) + "\n"

    def start(self, timeout: float = 10.0) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self.config_text())
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        self.process = subprocess.Popen(
            [find_mosquitto(), "-c", str(self.config_path)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                err = self.process.stderr.read().decode() if self.process.stderr else ""
                raise BrokerError(f"mosquitto exited at start: {err.strip()} ({self.log_tail()})")
            if (
                self._log_says_running(offset)
                and self._answers_connect()
                and (self.tls is None or self._accepts_tcp(self.tls.port))
            ):
                return
            time.sleep(0.02)
        self.stop()
        raise BrokerError(f"mosquitto did not start within {timeout}s: {self.log_tail()}")

    def _log_says_running(self, offset: int) -> bool:
        if not self.log_path.exists():
            return False
        with self.log_path.open("rb") as log:
            log.seek(offset)
            return b"running" in log.read()

    def _answers_connect(self) -> bool:
        """A real MQTT CONNECT/CONNACK round trip on every listen address."""
        connect = bytes.fromhex("101000044d5154540402003c0004") + b"ping"
        for host in self.listen:
            try:
                with socket.create_connection((host, self.port), timeout=1) as sock:
                    sock.sendall(connect)
                    if sock.recv(4)[:1] != b"\x20":
                        return False
            except OSError:
                return False
        return True

    def _accepts_tcp(self, port: int) -> bool:
        for host in self.listen:
            try:
                with socket.create_connection((host, port), timeout=1):
                    pass
            except OSError:
                return False
        return True

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 5 s; always reaps the process."""
        process = self.process
        if process is None:
            return
        stop_group(process, timeout=5)
        if process.stderr:
            process.stderr.close()
        self.process = None

    def kill(self) -> None:
        if self.process is not None:
            signal_group(self.process, signal.SIGKILL)
        self.stop()

    def log_tail(self, lines: int = 5) -> str:
        if not self.log_path.exists():
            return "no log"
        return " | ".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def __enter__(self) -> MosquittoBroker:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
